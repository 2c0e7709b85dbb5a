"""The chat helpers (course_utils.chat), without a browser: the reply, the transcript, the box's click."""
from __future__ import annotations

import pytest
import torch

from course_utils.chat import chat_box, reply, static_transcript, transcript_html
from course_utils.gpt import GPTConfig, GPTModel
from course_utils.instruct import generate_response
from course_utils.tokenizers import gpt2_tokenizer


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPTModel(GPTConfig.tiny(context_length=128)).eval()


def test_reply_is_the_greedy_answer_to_the_alpaca_prompt(model):
    expected = generate_response(model, {"instruction": "Say hi.", "input": "", "output": ""}, max_new_tokens=6)
    assert reply(model, "  Say hi.\n", max_new_tokens=6) == expected


def test_transcript_escapes_html_and_keeps_order():
    page = transcript_html([("Is 2 < 3?", "<b>yes</b>"), ("second", "answer two")], title="Demo & test")
    assert "Is 2 &lt; 3?" in page and "&lt;b&gt;yes&lt;/b&gt;" in page and "<b>yes</b>" not in page
    assert page.index("Is 2") < page.index("second") and "Demo &amp; test" in page


def test_static_transcript_answers_each_instruction(model):
    exchanges, page = static_transcript(model, ["One.", "Two."], gpt2_tokenizer(), max_new_tokens=4)
    assert [q for q, _ in exchanges] == ["One.", "Two."]
    assert exchanges[0][1] == reply(model, "One.", max_new_tokens=4)
    assert page == transcript_html(exchanges)


def test_chat_box_click_appends_an_exchange(model):
    pytest.importorskip("ipywidgets")
    box = chat_box(model, max_new_tokens=4)
    box.send.click()  # empty text: nothing happens
    assert box.exchanges == [] and box.transcript.value == ""
    box.text.value = "Name a fruit."
    box.send.click()  # what a browser click does: runs the on_click handler
    assert box.exchanges == [("Name a fruit.", reply(model, "Name a fruit.", max_new_tokens=4))]
    assert "Name a fruit." in box.transcript.value and box.text.value == "" and not box.send.disabled
    box.text.value = "And a vegetable?"
    box.on_send()
    assert len(box.exchanges) == 2 and box.transcript.value == transcript_html(box.exchanges)
