"""The response helpers added to course_utils.instruct: prompts, greedy answers, JSON files."""
from __future__ import annotations

import torch

from course_utils.gpt import GPTConfig, GPTModel
from course_utils.instruct import (
    RESPONSE_HEADER,
    format_example,
    generate_response,
    generate_responses,
    load_responses,
    response_prompt,
    save_responses,
)
from course_utils.tokenizers import GPT2_EOT_ID, gpt2_tokenizer

ENTRY = {"instruction": "Convert 5 km to meters.", "input": "", "output": "5 km is 5000 meters."}


def tiny_model(seed: int = 0, context_length: int = 128) -> GPTModel:
    torch.manual_seed(seed)
    return GPTModel(GPTConfig.tiny(context_length=context_length)).eval()


def greedy_by_hand(model, ids, n, eot=GPT2_EOT_ID):
    """A plain argmax loop (independent of course_utils.generate), stopping before end-of-text."""
    ids = list(ids)
    new = []
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids]))[0, -1]
            nxt = int(logits.argmax())
            if nxt == eot:
                break
            ids.append(nxt)
            new.append(nxt)
    return new


def test_response_prompt_is_the_start_of_the_training_text():
    prompt = response_prompt(ENTRY)
    assert prompt.endswith(RESPONSE_HEADER)
    assert format_example(ENTRY) == prompt + ENTRY["output"]


def test_generate_response_matches_a_hand_written_greedy_loop():
    tok = gpt2_tokenizer()
    model = tiny_model()
    expected = tok.decode(greedy_by_hand(model, tok.encode(response_prompt(ENTRY)), 12)).strip()
    assert generate_response(model, ENTRY, tok, max_new_tokens=12) == expected


def test_long_prompt_is_cut_to_leave_room_for_the_answer():
    tok = gpt2_tokenizer()
    model = tiny_model(context_length=64)
    prompt_ids = tok.encode(response_prompt(ENTRY))
    assert len(prompt_ids) + 40 > 64  # the prompt does not leave room for 40 tokens
    expected = tok.decode(greedy_by_hand(model, prompt_ids[-(64 - 40):], 40)).strip()
    assert generate_response(model, ENTRY, tok, max_new_tokens=40) == expected


def test_generation_stops_at_end_of_text():
    model = tiny_model()
    with torch.no_grad():  # make end-of-text the top logit everywhere
        model.out_head.weight[GPT2_EOT_ID] = 0.0
        model.out_head.weight[GPT2_EOT_ID, 0] = 1e4
        model.final_norm.shift.zero_()
        model.final_norm.shift[0] = 10.0
    assert generate_response(model, ENTRY, max_new_tokens=20) == ""


def test_generate_responses_and_json_round_trip(tmp_path):
    model = tiny_model()
    entries = [ENTRY, dict(ENTRY, instruction="Name a colour.")]
    answered = generate_responses(model, entries, max_new_tokens=5, response_key="answer", show_progress=False)
    assert [set(e) for e in answered] == [set(ENTRY) | {"answer"}] * 2
    assert "answer" not in entries[0]  # the inputs are not modified
    assert answered[1]["answer"] == generate_response(model, entries[1], max_new_tokens=5)
    path = save_responses(answered + [dict(ENTRY, answer="Grüße, 5 000 m")], tmp_path / "responses.json")
    text = path.read_text(encoding="utf-8")
    assert "Grüße" in text and text.endswith("\n")  # readable UTF-8, not \u escapes
    assert load_responses(path)[:2] == answered
