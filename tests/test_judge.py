"""The LLM-judge client (course_utils.judge) against a fake Ollama server on 127.0.0.1."""
from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from course_utils import judge


class FakeOllama:
    """A server on a free port that records requests and answers with canned bodies."""

    def __init__(self, models=("llama3:latest",), chat_replies=None, tags_body=None):
        self.requests: list[dict] = []
        self.models = list(models)
        self.chat_replies = list(chat_replies or [])
        self.tags_body = tags_body
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest's output clean
                pass

            def _send(self, body: str, status: int = 200):
                data = body.encode("utf-8")
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                fake.requests.append({"method": "GET", "path": self.path})
                if self.path == "/api/tags":
                    body = fake.tags_body if fake.tags_body is not None else json.dumps(
                        {"models": [{"name": name} for name in fake.models]})
                    self._send(body)
                else:
                    self._send("{}", 404)

            def do_POST(self):
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length).decode("utf-8"))
                fake.requests.append({"method": "POST", "path": self.path, "body": body,
                                      "content_type": self.headers.get("Content-Type")})
                reply = fake.chat_replies.pop(0) if fake.chat_replies else "50"
                if isinstance(reply, str):
                    reply = json.dumps({"model": body["model"], "message": {"role": "assistant", "content": reply}, "done": True})
                else:  # raw bytes: a malformed reply
                    reply = reply.decode("utf-8")
                self._send(reply)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def closed_port_url() -> str:
    with socket.socket() as sock:  # bind, read the port, close: nothing listens there now
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


ENTRY = {"instruction": "Name the capital of France.", "input": "", "output": "The capital of France is Paris."}


def test_chat_sends_ollama_body_and_reads_content():
    with FakeOllama(chat_replies=["Score: 87"]) as fake:
        text = judge.chat("hello judge", url=fake.url, model="llama3", seed=7)
    assert text == "Score: 87"
    (request,) = fake.requests
    assert request["method"] == "POST" and request["path"] == "/api/chat"
    assert request["content_type"] == "application/json"
    assert request["body"] == {
        "model": "llama3",
        "messages": [{"role": "user", "content": "hello judge"}],
        "stream": False,
        "options": {"temperature": 0.0, "seed": 7},
    }


def test_judge_responses_end_to_end():
    entries = [dict(ENTRY, model_response="Paris."), dict(ENTRY, model_response="Lyon."), dict(ENTRY, model_response="?")]
    with FakeOllama(chat_replies=["95", "The answer is wrong. Score: 10/100", "I cannot decide between 20 and 30."]) as fake:
        report = judge.judge_responses(entries, url=fake.url, model="llama3")
    assert report.status.ok
    assert report.scores == [95, 10, None]
    assert report.n_unparsed == 1 and report.mean == pytest.approx(52.5)
    assert "1 replies held no score" in report.summary()
    assert [r["path"] for r in fake.requests] == ["/api/tags", "/api/chat", "/api/chat", "/api/chat"]
    prompt = fake.requests[1]["body"]["messages"][0]["content"]
    assert "Name the capital of France." in prompt and "The capital of France is Paris." in prompt and "Paris." in prompt
    assert "0" in prompt and "100" in prompt


def test_unreachable_server_gives_a_clear_message_and_no_scores():
    url = closed_port_url()
    status = judge.probe_server(url, "llama3", timeout=0.5)
    assert not status.ok
    assert status.message.startswith(f"No model server answered at {url}")
    assert "ollama serve" in status.message and "ollama pull llama3" in status.message
    report = judge.judge_responses([dict(ENTRY, model_response="x")], url=url, probe_timeout=0.5)
    assert report.scores == [] and report.mean is None and report.summary() == status.message


def test_probe_reports_a_missing_model_and_a_non_ollama_server():
    with FakeOllama(models=["mistral:latest"]) as fake:
        status = judge.probe_server(fake.url, "llama3")
    assert not status.ok and "ollama pull llama3" in status.message
    with FakeOllama(models=["llama3:latest"]) as fake:
        assert judge.probe_server(fake.url, "llama3").ok  # the ':latest' tag counts
    with FakeOllama(tags_body='["not", "ollama"]') as fake:
        status = judge.probe_server(fake.url, "llama3")
    assert not status.ok and "not like Ollama" in status.message


@pytest.mark.parametrize("raw", [b"not json at all", b'{"message": {}}', b'{"response": "85"}', b'{"message": {"content": 85}}'])
def test_malformed_chat_replies_raise_judge_error(raw):
    with FakeOllama(chat_replies=[raw]) as fake:
        with pytest.raises(judge.JudgeError):
            judge.chat("x", url=fake.url, model="llama3")


@pytest.mark.parametrize(
    "reply, expected",
    [
        ("85", 85), (" 85.\n", 85), ("**72**", 72), ("Score: 40", 40), ("score of 0", 0),
        ("I would give it 90/100.", 90), ("60 out of 100", 60), ("The response deserves 100", 100),
        ("Score: 80. Step 2 of my reasoning...", 80),
        ("", None), ("no idea", None), ("between 20 and 30", None), ("It is 7.5 or so.", 7), ("about 45.", 45), ("150", None), ("-5", None), ("1000", None),
    ],
)
def test_parse_score(reply, expected):
    assert judge.parse_score(reply) == expected


def test_url_and_model_come_from_argument_then_environment(monkeypatch):
    monkeypatch.delenv(judge.URL_ENV, raising=False)
    monkeypatch.delenv(judge.OLLAMA_HOST_ENV, raising=False)
    monkeypatch.delenv(judge.MODEL_ENV, raising=False)
    assert judge.judge_url() == "http://localhost:11434"
    assert judge.judge_model() == "llama3"
    monkeypatch.setenv(judge.OLLAMA_HOST_ENV, "0.0.0.0")  # Ollama's bind-all form
    assert judge.judge_url() == "http://localhost:11434"
    monkeypatch.setenv(judge.OLLAMA_HOST_ENV, "127.0.0.1:9999")
    assert judge.judge_url() == "http://127.0.0.1:9999"
    monkeypatch.setenv(judge.URL_ENV, "http://judge.local:8080/")
    assert judge.judge_url() == "http://judge.local:8080"  # COURSE_JUDGE_URL wins over OLLAMA_HOST
    assert judge.judge_url("http://10.0.0.2:1234") == "http://10.0.0.2:1234"  # the argument wins over both
    monkeypatch.setenv(judge.MODEL_ENV, "phi3")
    assert judge.judge_model() == "phi3" and judge.judge_model("gemma") == "gemma"
