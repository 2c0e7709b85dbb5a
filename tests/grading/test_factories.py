"""What the checks run student code on (``course_utils.grading.factories``)."""
from __future__ import annotations

import torch

from course_utils.grading.factories import _tiny_gpt, grading_config, token_loader


def test_grading_config_defaults_and_overrides():
    cfg = grading_config()
    assert (cfg.vocab_size, cfg.context_length, cfg.emb_dim, cfg.n_heads, cfg.n_layers) == (97, 12, 16, 4, 2)
    assert cfg.drop_rate > 0 and not cfg.tie_weights
    assert grading_config(emb_dim=24, n_heads=3).emb_dim == 24


def test_token_loader_is_fixed_shifted_and_keeps_a_short_last_batch():
    loader = token_loader(50, 7, 5, 3, seed=1)
    batches = list(loader)
    assert [x.shape[0] for x, _ in batches] == [3, 3, 1]
    again = list(token_loader(50, 7, 5, 3, seed=1))
    assert all(torch.equal(x, x2) and torch.equal(y, y2) for (x, y), (x2, y2) in zip(batches, again))
    x, y = batches[0]
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the inputs shifted by one


def test_tiny_gpt_is_seeded_and_leaves_the_global_state_alone():
    state = torch.get_rng_state()
    a, b = _tiny_gpt(grading_config(), 3), _tiny_gpt(grading_config(), 3)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert torch.equal(torch.get_rng_state(), state)
