"""Talking to the fine-tuned model: a reply function, a static transcript, a chat box (chapter 7).

:func:`reply` wraps a typed instruction in the Alpaca prompt the model was fine-tuned
on and returns its greedy answer (:func:`course_utils.instruct.generate_response`).
:func:`transcript_html` shows a few such exchanges as plain HTML, which a static page
(the course site) displays as it is; :func:`chat_box` is the live version, an
ipywidgets box with a text field, a button and the growing conversation, which only
works in a running notebook.

Each exchange is independent: the model sees one instruction at a time, never the
earlier turns, because it was trained on single instruction-response pairs.
"""
from __future__ import annotations

import html
from collections.abc import Sequence

import tiktoken
import torch

from .instruct import generate_response
from .tokenizers import gpt2_tokenizer

_TURN = (
    '<div style="margin:0.4em 0"><b>{who}:</b> '
    '<span style="white-space:pre-wrap">{text}</span></div>'
)


def reply(
    model: torch.nn.Module,
    instruction: str,
    tokenizer: tiktoken.Encoding | None = None,
    device: str | torch.device = "cpu",
    input_text: str = "",
    max_new_tokens: int = 64,
) -> str:
    """The model's answer to ``instruction`` (and an optional ``input_text``)."""
    entry = {"instruction": instruction.strip(), "input": input_text.strip(), "output": ""}
    return generate_response(model, entry, tokenizer, device, max_new_tokens)


def turn_html(instruction: str, answer: str) -> str:
    """One exchange as HTML, with both texts escaped."""
    return _TURN.format(who="You", text=html.escape(instruction)) + _TURN.format(who="Model", text=html.escape(answer))


def transcript_html(exchanges: Sequence[tuple[str, str]], title: str = "") -> str:
    """Several (instruction, answer) pairs as one HTML block, for a static page."""
    heading = f"<p><b>{html.escape(title)}</b></p>" if title else ""
    body = "".join(turn_html(instruction, answer) for instruction, answer in exchanges)
    return f'<div style="border:1px solid #ccc;padding:0.6em;border-radius:4px">{heading}{body}</div>'


def static_transcript(
    model: torch.nn.Module,
    instructions: Sequence[str],
    tokenizer: tiktoken.Encoding | None = None,
    device: str | torch.device = "cpu",
    max_new_tokens: int = 64,
    title: str = "",
) -> tuple[list[tuple[str, str]], str]:
    """Answer each instruction; returns the (instruction, answer) pairs and their HTML."""
    tokenizer = tokenizer or gpt2_tokenizer()
    exchanges = [(text, reply(model, text, tokenizer, device, max_new_tokens=max_new_tokens)) for text in instructions]
    return exchanges, transcript_html(exchanges, title)


def chat_box(
    model: torch.nn.Module,
    tokenizer: tiktoken.Encoding | None = None,
    device: str | torch.device = "cpu",
    max_new_tokens: int = 64,
    placeholder: str = "Type an instruction, e.g. 'Name three primary colors.'",
):
    """An ipywidgets ``VBox``: a text area, a "Send" button, and the conversation so far.

    Clicking the button (or calling ``box.send.click()``, as the tests do) sends the
    text to :func:`reply`, appends the exchange to ``box.transcript`` (an ``HTML``
    widget) and to ``box.exchanges``, and clears the text area. An empty text is ignored.
    """
    import ipywidgets as widgets  # only needed for the live box

    tokenizer = tokenizer or gpt2_tokenizer()
    text = widgets.Textarea(placeholder=placeholder, layout=widgets.Layout(width="100%", height="4em"))
    send = widgets.Button(description="Send", button_style="primary", icon="paper-plane")
    transcript = widgets.HTML(value="")
    exchanges: list[tuple[str, str]] = []

    def on_send(_button=None) -> None:
        instruction = text.value.strip()
        if not instruction:
            return
        send.disabled = True  # one question at a time
        try:
            answer = reply(model, instruction, tokenizer, device, max_new_tokens=max_new_tokens)
        finally:
            send.disabled = False
        exchanges.append((instruction, answer))
        transcript.value = transcript_html(exchanges)
        text.value = ""

    send.on_click(on_send)
    box = widgets.VBox([text, send, transcript])
    box.text, box.send, box.transcript, box.exchanges, box.on_send = text, send, transcript, exchanges, on_send
    return box


__all__ = ["chat_box", "reply", "static_transcript", "transcript_html", "turn_html"]
