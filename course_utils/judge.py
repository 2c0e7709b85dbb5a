"""An LLM as judge: scoring responses with a larger model on a local server (chapter 7).

Word-overlap scores (:mod:`course_utils.response_scores`) cannot tell a correct answer
in other words from a wrong one. A larger instruction-tuned model can, roughly: we show
it the instruction, the reference answer and our model's answer, and ask for a score
from 0 to 100. This module is a small client for a model server that speaks Ollama's
``/api/chat`` JSON (Ollama itself, or anything that imitates it), written with the
standard library only:

    POST {url}/api/chat
    {"model": ..., "messages": [{"role": "user", "content": ...}], "stream": false,
     "options": {"temperature": 0, "seed": ...}}
    -> {"message": {"role": "assistant", "content": "..."}, ...}

Where the server is: the ``url`` argument, else the ``COURSE_JUDGE_URL`` environment
variable, else ``OLLAMA_HOST`` (Ollama's own variable, which may omit the scheme and
the port), else ``http://localhost:11434``. Which model: ``model`` argument, else
``COURSE_JUDGE_MODEL``, else ``llama3``.

Nothing here is required for the course: :func:`probe_server` asks the server, with a
short timeout, whether it is there, and when nothing answers it returns a message
saying how to start one, so a notebook prints it and moves on. Replies that hold no
usable score are reported as such (``None``), never guessed.
"""
from __future__ import annotations

import json
import os
import re
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from .instruct import format_input

URL_ENV = "COURSE_JUDGE_URL"
OLLAMA_HOST_ENV = "OLLAMA_HOST"
MODEL_ENV = "COURSE_JUDGE_MODEL"
DEFAULT_URL = "http://localhost:11434"
DEFAULT_MODEL = "llama3"
DEFAULT_PORT = 11434
PROBE_TIMEOUT_S = 2.0
CHAT_TIMEOUT_S = 120.0


class JudgeError(RuntimeError):
    """The server answered, but not with a chat reply we can read."""


def _normalise_url(raw: str) -> str:
    """Add a scheme and Ollama's port where missing; a bind-all address becomes localhost."""
    raw = raw.strip().rstrip("/")
    if "://" not in raw:
        raw = "http://" + raw
    parts = urlsplit(raw)
    host = parts.hostname or "localhost"
    if host in {"0.0.0.0", "::"}:  # what `ollama serve` listens on, not an address to call
        host = "localhost"
    if ":" in host:  # an IPv6 literal goes back into brackets
        host = f"[{host}]"
    port = parts.port or DEFAULT_PORT
    return f"{parts.scheme}://{host}:{port}{parts.path}"


def judge_url(url: str | None = None) -> str:
    """The server's base URL: ``url``, else ``COURSE_JUDGE_URL``, else ``OLLAMA_HOST``, else localhost:11434."""
    raw = url or os.environ.get(URL_ENV) or os.environ.get(OLLAMA_HOST_ENV) or DEFAULT_URL
    return _normalise_url(raw)


def judge_model(model: str | None = None) -> str:
    """The judge's model name: ``model``, else ``COURSE_JUDGE_MODEL``, else ``llama3``."""
    return model or os.environ.get(MODEL_ENV) or DEFAULT_MODEL


def _no_server_message(url: str, model: str) -> str:
    return (
        f"No model server answered at {url}; start one with `ollama serve` and `ollama pull {model}` "
        f"(or set {URL_ENV} to where yours runs), or skip this step."
    )


@dataclass
class ServerStatus:
    """What :func:`probe_server` found: ``ok`` when the judge can be used, and why not otherwise."""

    ok: bool
    url: str
    model: str
    message: str


def probe_server(url: str | None = None, model: str | None = None, timeout: float = PROBE_TIMEOUT_S) -> ServerStatus:
    """Ask ``GET {url}/api/tags`` (Ollama's list of local models) whether the judge can run.

    Not ok when nothing answers in ``timeout`` seconds, when the answer is not the
    list Ollama sends, or when the model is not in it (then the message says which
    ``ollama pull`` is missing).
    """
    url, model = judge_url(url), judge_model(model)
    try:
        with urllib.request.urlopen(f"{url}/api/tags", timeout=timeout) as reply:
            listing = json.loads(reply.read().decode("utf-8"))
    except (urllib.error.URLError, OSError, ValueError):
        return ServerStatus(False, url, model, _no_server_message(url, model))
    if not isinstance(listing, dict) or not isinstance(listing.get("models"), list):
        return ServerStatus(False, url, model, f"The server at {url} answered, but not like Ollama's /api/tags; skipping the judge.")
    names = {str(entry.get("name", "")) for entry in listing["models"] if isinstance(entry, dict)}
    if model not in names and f"{model}:latest" not in names:
        return ServerStatus(False, url, model, f"The server at {url} has no model {model!r}; run `ollama pull {model}`, or skip this step.")
    return ServerStatus(True, url, model, f"Judge: {model} at {url}.")


def chat(
    prompt: str,
    url: str | None = None,
    model: str | None = None,
    seed: int = 123,
    temperature: float = 0.0,
    timeout: float = CHAT_TIMEOUT_S,
) -> str:
    """Send one user message to ``/api/chat`` (no streaming) and return the reply's text.

    Temperature 0 and a fixed seed make the judge as repeatable as the server allows.
    Raises :class:`JudgeError` when the reply is not ``{"message": {"content": str}}``
    and ``urllib.error.URLError`` when the server cannot be reached.
    """
    body = {
        "model": judge_model(model),
        "messages": [{"role": "user", "content": prompt}],
        "stream": False,
        "options": {"temperature": temperature, "seed": seed},
    }
    request = urllib.request.Request(
        f"{judge_url(url)}/api/chat",
        data=json.dumps(body).encode("utf-8"),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=timeout) as reply:
        raw = reply.read().decode("utf-8")
    try:
        content = json.loads(raw)["message"]["content"]
    except (ValueError, KeyError, TypeError) as err:
        raise JudgeError(f"The server's reply is not an /api/chat answer: {raw[:200]!r}") from err
    if not isinstance(content, str):
        raise JudgeError(f"The reply's message content is not text: {content!r}")
    return content


def judge_prompt(entry: dict[str, str], response: str) -> str:
    """The question put to the judge for one entry: task, reference, response, 0-100."""
    return (
        "You are grading the answer of a small language model.\n\n"
        f"Task given to the model:\n{format_input(entry)}\n\n"
        f"Reference answer:\n{entry['output']}\n\n"
        f"Model's answer:\n{response}\n\n"
        "How well does the model's answer complete the task, compared with the reference? "
        "Give a score from 0 (useless) to 100 (as good as the reference). "
        "Reply with the integer only."
    )


_NUMBER = re.compile(r"(?<![\w.-])(\d{1,3})(?:\.\d+)?(?!\w|\.\d)")  # a whole number, maybe ending a sentence
_LABELLED = re.compile(r"score\s*(?:is|of)?\s*[:=]?\s*\**\s*(\d{1,3})\b", re.IGNORECASE)
_OUT_OF = re.compile(r"\b(\d{1,3})\s*(?:/|out of)\s*100\b", re.IGNORECASE)


def parse_score(reply: str) -> int | None:
    """The 0-100 score in a judge's reply, or ``None`` when there is no unambiguous one.

    Accepted, in this order: a reply that is just a number ("85", "85."), a labelled
    score ("Score: 85", "score of 85"), a fraction of 100 ("85/100", "85 out of 100"),
    or exactly one number in the text (a decimal counts by its whole part). Numbers
    above 100, several candidates,
    or none at all give ``None``: a wrong score would be worse than a missing one.
    """
    text = reply.strip().strip("*").strip()
    plain = re.fullmatch(r"(\d{1,3})\s*\.?", text)
    if plain:
        candidates = [int(plain.group(1))]
    else:
        candidates = [int(m) for m in _LABELLED.findall(text)] or [int(m) for m in _OUT_OF.findall(text)]
        if not candidates:
            candidates = [int(m) for m in _NUMBER.findall(text)]
    candidates = list(dict.fromkeys(candidates))  # the same number twice is still one answer
    if len(candidates) != 1 or not 0 <= candidates[0] <= 100:
        return None
    return candidates[0]


@dataclass
class JudgeReport:
    """The judge's scores (``None`` where a reply held no score) and the raw replies."""

    status: ServerStatus
    scores: list[int | None] = field(default_factory=list)
    replies: list[str] = field(default_factory=list)

    @property
    def n_unparsed(self) -> int:
        return sum(score is None for score in self.scores)

    @property
    def mean(self) -> float | None:
        """Mean over the replies that held a score; ``None`` when none did."""
        parsed = [s for s in self.scores if s is not None]
        return sum(parsed) / len(parsed) if parsed else None

    def summary(self) -> str:
        if not self.status.ok:
            return self.status.message
        mean = "n/a" if self.mean is None else f"{self.mean:.1f}"
        return (
            f"{self.status.model} scored {len(self.scores) - self.n_unparsed} of {len(self.scores)} "
            f"responses, mean {mean} / 100; {self.n_unparsed} replies held no score."
        )


def judge_responses(
    entries: Sequence[dict],
    response_key: str = "model_response",
    url: str | None = None,
    model: str | None = None,
    seed: int = 123,
    probe_timeout: float = PROBE_TIMEOUT_S,
) -> JudgeReport:
    """Probe the server, then ask it to score every entry's response.

    When the probe fails, the report holds no scores and ``summary()`` is the probe's
    message (how to start a server), so a notebook can print it and go on.
    """
    status = probe_server(url, model, timeout=probe_timeout)
    report = JudgeReport(status)
    if not status.ok:
        return report
    for entry in entries:
        reply = chat(judge_prompt(entry, entry[response_key]), status.url, status.model, seed=seed)
        report.replies.append(reply)
        report.scores.append(parse_score(reply))
    return report


__all__ = [
    "JudgeError",
    "JudgeReport",
    "ServerStatus",
    "chat",
    "judge_model",
    "judge_prompt",
    "judge_responses",
    "judge_url",
    "parse_score",
    "probe_server",
]
