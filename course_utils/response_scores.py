"""Scoring generated responses against reference answers, offline (chapter 7).

A fine-tuned model's answers need a number, and the cheapest numbers need no second
model: they compare the words of a response with the words of the reference answer.
All three below first *normalise* both texts the way the SQuAD question-answering
benchmark does (lower case, no punctuation, no "a"/"an"/"the", single spaces), so that
"The Sun." and "sun" count as the same answer:

- :func:`exact_match`: 1 when the normalised texts are identical, else 0. Strict: a
  correct answer phrased differently scores 0.
- :func:`token_f1`: the two texts as *bags* of words; precision is the share of the
  response's words found in the reference, recall the share of the reference's words
  found in the response (each word counted at most as often as it occurs in both).
- :func:`rouge_l`: like F1, but the shared words must appear *in the same order*: it
  uses the longest common subsequence (LCS) of the two word lists (ROUGE-L, Lin 2004).

They reward overlap, not meaning: a wrong answer that repeats the question's words can
beat a right one in other words. That is why chapter 7 adds an LLM judge
(:mod:`course_utils.judge`) as an optional second opinion.
"""
from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

ARTICLES = frozenset({"a", "an", "the"})
METRICS = ("exact_match", "token_f1", "rouge_l")
_SPACES = re.compile(r"\s+")


def _is_punctuation(char: str) -> bool:
    """Unicode punctuation (categories P*) plus the ASCII symbols SQuAD strips, like $ and +."""
    return unicodedata.category(char).startswith("P") or char in "$+<=>^`|~"


def normalize_text(text: str) -> str:
    """Lower case, punctuation removed, articles dropped, whitespace collapsed.

    Punctuation is deleted, not replaced by a space, so "don't" becomes "dont" and
    "well-known" becomes "wellknown", as in SQuAD's evaluation script.
    """
    lowered = text.lower()
    no_punct = "".join(ch for ch in lowered if not _is_punctuation(ch))
    words = [word for word in _SPACES.split(no_punct) if word and word not in ARTICLES]
    return " ".join(words)


def normalized_tokens(text: str) -> list[str]:
    """The words of :func:`normalize_text`'s result."""
    normalized = normalize_text(text)
    return normalized.split(" ") if normalized else []


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the two texts are equal after normalisation, else 0.0."""
    return float(normalize_text(prediction) == normalize_text(reference))


def _f_measure(overlap: int, n_prediction: int, n_reference: int) -> float:
    """F1 from an overlap count; two empty texts agree perfectly, one empty text not at all."""
    if n_prediction == 0 and n_reference == 0:
        return 1.0
    if overlap == 0:
        return 0.0
    precision = overlap / n_prediction
    recall = overlap / n_reference
    return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str, reference: str) -> float:
    """Bag-of-words F1 between the normalised texts (0.0 to 1.0)."""
    pred, ref = normalized_tokens(prediction), normalized_tokens(reference)
    shared = Counter(pred) & Counter(ref)  # per word: the smaller of the two counts
    return _f_measure(sum(shared.values()), len(pred), len(ref))


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of two sequences (dynamic programming).

    ``row[j]`` holds the LCS length of the prefix of ``a`` seen so far and ``b[:j]``;
    one row is kept, so memory is O(len(b)).
    """
    row = [0] * (len(b) + 1)
    for item in a:
        diagonal = 0  # the value above-left of the current cell
        for j, other in enumerate(b, start=1):
            above = row[j]
            row[j] = diagonal + 1 if item == other else max(row[j], row[j - 1])
            diagonal = above
    return row[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1: precision LCS/len(prediction), recall LCS/len(reference), normalised words."""
    pred, ref = normalized_tokens(prediction), normalized_tokens(reference)
    return _f_measure(lcs_length(pred, ref), len(pred), len(ref))


@dataclass
class ResponseScores:
    """Per-example scores (same order as the entries) and their means."""

    per_example: list[dict[str, float]] = field(default_factory=list)
    mean: dict[str, float] = field(default_factory=dict)

    def table(self) -> str:
        """The means as a small text table, in percent."""
        return "\n".join(f"{name:<12} {100 * self.mean[name]:6.2f} %" for name in METRICS)


def score_responses(
    entries: Sequence[dict], response_key: str = "model_response", reference_key: str = "output"
) -> ResponseScores:
    """Exact match, token F1 and ROUGE-L of ``entry[response_key]`` against ``entry[reference_key]``.

    The means are over all entries (0.0 for each metric when there are none). A
    missing response is an error: a forgotten generation step should not score 0
    quietly.
    """
    per_example = []
    for i, entry in enumerate(entries):
        if response_key not in entry:
            raise KeyError(f"entry {i} has no {response_key!r}; generate the responses first (see generate_responses).")
        prediction, reference = entry[response_key], entry[reference_key]
        per_example.append({
            "exact_match": exact_match(prediction, reference),
            "token_f1": token_f1(prediction, reference),
            "rouge_l": rouge_l(prediction, reference),
        })
    n = len(per_example)
    mean = {name: (sum(row[name] for row in per_example) / n if n else 0.0) for name in METRICS}
    return ResponseScores(per_example, mean)


__all__ = [
    "METRICS",
    "ResponseScores",
    "exact_match",
    "lcs_length",
    "normalize_text",
    "normalized_tokens",
    "rouge_l",
    "score_responses",
    "token_f1",
]
