"""Fair grading, measured on single-mistake hand-ins (``handins.py``, ``handin_cases.py``).

Every correct variant scores full marks, and every mistake costs exactly its own
component's points: a composite check (feed-forward, block, model, loader loss, training
loop, sampler, LoRA wrapper and replacement, the attention modules, the prompt mask)
grades the reference notebook with one sub-component broken as correct.
"""
from __future__ import annotations

import pytest

from .handin_cases import HANDINS
from .handins import cost

SLOW = {"ch05", "appendix_a"}  # a few seconds per hand-in: training loops in the checks


@pytest.mark.parametrize("handin", [pytest.param(h, id=f"{h.assignment}-{h.component.removesuffix('_solution')}-{h.label}",
                                                 marks=(pytest.mark.slow,) if h.assignment in SLOW else ())
                                    for h in HANDINS])
def test_a_single_mistake_costs_its_own_points_only(handin):
    lost, should, failed = cost(handin)
    assert set(failed) == set(handin.should_lose), (
        f"{handin.label}: lost {lost:g} points ({sorted(failed)}), should lose {should:g} ({sorted(handin.should_lose)})\n"
        + "\n".join(f"  {g}: {why}" for g, why in failed.items()))


def test_every_composite_check_has_an_isolation_case():
    """A hand-in with a broken sub-component, graded by the checks that build on it."""
    built_on = {"ch03_attention_weights", "ch03_context_vectors", "ch04_layer_norm", "ch04_gelu",
                "ch04_transformer_block", "ch05_loss_batch", "ch05_sampling_probs", "appendix_e_lora_layer",
                "appendix_e_linear_with_lora"}
    mistaken = {h.component.removesuffix("_solution") for h in HANDINS if h.should_lose}
    assert built_on <= mistaken
    assert any(h.should_lose == ("ch07_collate",) for h in HANDINS)  # the plain collate wrong, the prompt mask right
    assert any(h.should_lose == ("ch07_collate_prompt_mask",) for h in HANDINS)
