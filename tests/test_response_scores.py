"""Offline response scores (course_utils.response_scores) on cases worked out by hand."""
from __future__ import annotations

import pytest

from course_utils.response_scores import (
    exact_match,
    lcs_length,
    normalize_text,
    normalized_tokens,
    rouge_l,
    score_responses,
    token_f1,
)


def test_normalize_lowercases_strips_punctuation_articles_and_spaces():
    assert normalize_text("  The Sun,  is a STAR! ") == "sun is star"
    assert normalize_text("An apple; the end.") == "apple end"
    assert normalize_text("don't stop") == "dont stop"  # punctuation is deleted, not spaced
    assert normalize_text("Theory and anthem") == "theory and anthem"  # only whole-word articles go
    assert normalize_text("¿Qué? «Bien»") == "qué bien"  # unicode punctuation too
    assert normalize_text("") == "" and normalized_tokens("  . ,") == []


def test_exact_match_after_normalisation():
    assert exact_match("The cumulonimbus.", "cumulonimbus") == 1.0
    assert exact_match("cumulonimbus clouds", "cumulonimbus") == 0.0
    assert exact_match("", "") == 1.0
    assert exact_match("", "answer") == 0.0


def test_token_f1_by_hand():
    # prediction words: [cat, sat, on, mat, mat] (the 'the's go); reference: [cat, is, on, mat]
    # shared bag: cat 1, on 1, mat min(2, 1) = 1 -> 3; precision 3/5, recall 3/4
    # F1 = 2 * 0.6 * 0.75 / (0.6 + 0.75) = 0.9 / 1.35 = 2/3
    assert token_f1("The cat sat on the mat mat", "the cat is on the mat") == pytest.approx(2 / 3)
    assert token_f1("red blue", "blue red") == 1.0  # order does not matter to a bag
    assert token_f1("red", "green") == 0.0


def test_token_f1_edge_cases():
    assert token_f1("", "") == 1.0  # both empty: nothing to disagree on
    assert token_f1("", "something") == 0.0
    assert token_f1("something", "") == 0.0
    assert token_f1("the a an", "") == 1.0  # only articles: empty after normalisation


def test_lcs_length_by_hand():
    # a b c d e vs a c e: the subsequence a, c, e -> 3
    assert lcs_length(list("abcde"), list("ace")) == 3
    # x y z vs z y x: any single letter is common, no two in the same order -> 1
    assert lcs_length(["x", "y", "z"], ["z", "y", "x"]) == 1
    # a b a b vs b a b: "b a b" -> 3
    assert lcs_length(list("abab"), list("bab")) == 3
    assert lcs_length([], ["a"]) == 0 and lcs_length(["a"], []) == 0


def test_lcs_length_against_brute_force():
    import itertools
    import random

    def brute(a, b):
        for k in range(min(len(a), len(b)), 0, -1):
            subs = {tuple(s) for s in itertools.combinations(a, k)}
            if any(tuple(s) in subs for s in itertools.combinations(b, k)):
                return k
        return 0

    rng = random.Random(0)
    for _ in range(200):
        a = [rng.choice("abc") for _ in range(rng.randint(0, 7))]
        b = [rng.choice("abc") for _ in range(rng.randint(0, 7))]
        assert lcs_length(a, b) == brute(a, b), (a, b)


def test_rouge_l_by_hand():
    # prediction [police, killed, gunman] vs reference [police, kill, gunman]
    # LCS = police, gunman -> 2; precision 2/3, recall 2/3 -> F = 2/3
    assert rouge_l("police killed the gunman", "police kill the gunman") == pytest.approx(2 / 3)
    # order matters: [gunman, killed, police] vs [police, killed, gunman]: LCS 1 -> 1/3
    assert rouge_l("the gunman killed police", "police killed the gunman") == pytest.approx(1 / 3)
    # while the bag of words is identical
    assert token_f1("the gunman killed police", "police killed the gunman") == 1.0
    # unequal lengths: [a1, b, c, d] vs [b, d]: LCS 2, P = 2/4, R = 2/2 -> F = 2*0.5*1/1.5 = 2/3
    assert rouge_l("a1 b c d", "b d") == pytest.approx(2 / 3)
    assert rouge_l("", "") == 1.0 and rouge_l("x", "") == 0.0


def test_score_responses_means_and_order():
    entries = [
        {"output": "Paris.", "model_response": "paris"},  # EM 1, F1 1, ROUGE-L 1
        {"output": "red green", "model_response": "green blue"},  # EM 0, F1 0.5, ROUGE-L 0.5
    ]
    scores = score_responses(entries)
    assert scores.per_example[0] == {"exact_match": 1.0, "token_f1": 1.0, "rouge_l": 1.0}
    assert scores.per_example[1]["token_f1"] == pytest.approx(0.5)
    assert scores.per_example[1]["rouge_l"] == pytest.approx(0.5)
    assert scores.mean == pytest.approx({"exact_match": 0.5, "token_f1": 0.75, "rouge_l": 0.75})
    assert "exact_match" in scores.table() and "75.00 %" in scores.table()


def test_score_responses_other_key_empty_and_missing():
    assert score_responses([{"output": "a b", "mine": "a b"}], response_key="mine").mean["exact_match"] == 1.0
    assert score_responses([]).mean == {"exact_match": 0.0, "token_f1": 0.0, "rouge_l": 0.0}
    with pytest.raises(KeyError, match="generate the responses"):
        score_responses([{"output": "x"}])
