"""Tests for course_utils.lora: trainable counts, identical start, updates touch only LoRA."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import course_utils.lora as lora_module
from course_utils.gpt import GPTConfig, GPTModel
from course_utils.lora import LinearWithLoRA, LoRALayer, count_trainable, freeze_for_lora, replace_linear_with_lora
from course_utils.train import calc_loss_batch, make_optimizer

CFG = GPTConfig.tiny(vocab_size=500, context_length=16)
RANK, ALPHA = 4, 8.0


def base_and_lora(seed: int = 0, cfg: GPTConfig = CFG) -> tuple[GPTModel, GPTModel, list[nn.Linear]]:
    """The same GPT twice (one adapted) and the Linear layers the plain one had."""
    torch.manual_seed(seed)
    base = GPTModel(cfg)
    adapted = GPTModel(cfg)
    adapted.load_state_dict(base.state_dict())
    linears = [m for m in adapted.modules() if isinstance(m, nn.Linear)]
    replace_linear_with_lora(adapted, rank=RANK, alpha=ALPHA)
    return base.eval(), adapted.eval(), linears


def test_only_lora_matrices_train_and_the_count_matches_the_formula():
    _, model, linears = base_and_lora()
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(name.endswith(("lora.A", "lora.B")) for name in trainable)
    # every Linear gets A (in x r) and B (r x out): r * (in + out) new numbers
    expected = sum(RANK * (lin.in_features + lin.out_features) for lin in linears)
    assert count_trainable(model) == expected
    n_layers = CFG.n_layers
    # 4 linears in attention (q, k, v, out) + 2 in the feed-forward per block, plus the output head
    assert len(linears) == 6 * n_layers + 1
    assert sum(isinstance(m, LinearWithLoRA) for m in model.modules()) == len(linears)


def test_outputs_are_identical_at_the_start():
    base, model, _ = base_and_lora()
    idx = torch.randint(0, CFG.vocab_size, (2, 10))
    with torch.no_grad():
        assert torch.equal(model(idx), base(idx)), "B = 0 makes the update exactly zero"


def test_one_step_changes_outputs_but_not_base_weights():
    base, model, _ = base_and_lora()
    frozen_before = {n: t.clone() for n, t in model.state_dict().items() if ".lora." not in n}
    optimizer = make_optimizer(model, lr=1e-2)
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == {
        id(p) for n, p in model.named_parameters() if ".lora." in n
    }
    idx = torch.randint(0, CFG.vocab_size, (2, 10))
    model.train()
    optimizer.zero_grad()
    calc_loss_batch(idx, idx.roll(-1, dims=1), model, "cpu").backward()
    optimizer.step()
    model.eval()
    with torch.no_grad():
        assert not torch.allclose(model(idx), base(idx)), "the LoRA update must change the outputs"
    for name, tensor in model.state_dict().items():
        if ".lora." not in name:
            assert torch.equal(tensor, frozen_before[name]), f"base weight {name} changed"
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if n.endswith("lora.B"))


def test_lora_layer_init_and_scaling():
    torch.manual_seed(0)
    layer = LoRALayer(in_dim=256, out_dim=32, rank=8, alpha=16)
    assert layer.A.shape == (256, 8) and layer.B.shape == (8, 32)
    assert torch.count_nonzero(layer.B) == 0
    # like nn.Linear(256, 8).weight: uniform within 1/sqrt(fan_in) = 1/16
    bound = 1 / math.sqrt(256)
    assert layer.A.abs().max() <= bound and layer.A.abs().max() > 0.9 * bound
    with torch.no_grad():
        layer.B.normal_()
    x = torch.randn(3, 5, 256)
    torch.testing.assert_close(layer(x), (16 / 8) * (x @ layer.A @ layer.B))


def test_linear_with_lora_equals_linear_plus_update():
    torch.manual_seed(0)
    linear = nn.Linear(6, 3)
    wrapped = LinearWithLoRA(linear, rank=2, alpha=2)
    with torch.no_grad():
        wrapped.lora.B.normal_()
    x = torch.randn(4, 6)
    expected = x @ linear.weight.T + linear.bias + (2 / 2) * (x @ wrapped.lora.A @ wrapped.lora.B)
    torch.testing.assert_close(wrapped(x), expected)
    assert wrapped.weight is linear.weight and (wrapped.in_features, wrapped.out_features) == (6, 3)


def test_tied_head_stays_tied_and_replace_is_idempotent():
    torch.manual_seed(0)
    model = replace_linear_with_lora(GPTModel(CFG.replace(tie_weights=True)), rank=RANK, alpha=ALPHA)
    assert model.out_head.linear.weight is model.tok_emb.weight
    count = count_trainable(model)
    replace_linear_with_lora(model, rank=RANK, alpha=ALPHA)
    assert count_trainable(model) == count, "already-adapted layers are not wrapped again"
    assert not isinstance(model.out_head.linear, LinearWithLoRA)


def test_freeze_for_lora_and_unfrozen_replace():
    torch.manual_seed(0)
    model = replace_linear_with_lora(GPTModel(CFG), rank=RANK, alpha=ALPHA, freeze=False)
    everything = sum(p.numel() for p in model.parameters())
    assert count_trainable(model) == everything
    freeze_for_lora(model)
    assert all((".lora." in n) == p.requires_grad for n, p in model.named_parameters())
    with pytest.raises(ValueError, match="rank"):
        LoRALayer(4, 4, rank=0, alpha=1)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_lora_matrices_follow_the_base_layers_dtype(dtype):
    torch.manual_seed(0)
    linear = nn.Linear(8, 4).to(dtype)
    wrapped = LinearWithLoRA(linear, rank=2, alpha=4)
    assert wrapped.lora.A.dtype == wrapped.lora.B.dtype == dtype
    with torch.no_grad():
        wrapped.lora.B.normal_()
    x = torch.randn(3, 8, dtype=dtype)
    out = wrapped(x)  # mixing dtypes would raise in the matmul, or upcast the output
    assert out.dtype == dtype
    torch.testing.assert_close(out, linear(x) + 2.0 * (x @ wrapped.lora.A @ wrapped.lora.B))


def test_lora_matrices_follow_the_base_layers_device():
    linear = nn.Linear(8, 4, device="meta")  # a device other than the CPU, available everywhere
    wrapped = LinearWithLoRA(linear, rank=2, alpha=4)
    assert wrapped.lora.A.device.type == wrapped.lora.B.device.type == "meta"
    model = replace_linear_with_lora(nn.Sequential(nn.Linear(4, 4, device="meta", dtype=torch.float64)), rank=2, alpha=2)
    assert {(p.device.type, p.dtype) for p in model.parameters()} == {("meta", torch.float64)}


def test_lora_on_a_bfloat16_gpt_runs_and_starts_equal():
    torch.manual_seed(0)
    base = GPTModel(CFG).to(torch.bfloat16).eval()
    adapted = GPTModel(CFG).to(torch.bfloat16)
    adapted.load_state_dict(base.state_dict())
    replace_linear_with_lora(adapted, rank=RANK, alpha=ALPHA).eval()
    assert {p.dtype for n, p in adapted.named_parameters() if ".lora." in n} == {torch.bfloat16}
    idx = torch.randint(0, CFG.vocab_size, (1, 6))
    with torch.no_grad():
        assert torch.equal(adapted(idx), base(idx))


# The module docstring's figures for GPT-2 small with rank 16, counted on the meta device
# (no memory is allocated): 12 blocks x (4 x 16 x (768 + 768) + 16 x (768 + 3072) + 16 x (3072 + 768))
# = 2,654,208 in the blocks, plus the output head: 16 x (768 + 2) for a 2-class classifier
# head, 16 x (768 + 50257) for the language-model head.
@pytest.mark.parametrize("head,expected", [("classifier", 2_666_528), ("lm", 3_470_608)])
def test_gpt2_small_rank_16_trainable_counts_in_the_docstring(head, expected):
    with torch.device("meta"):
        model = GPTModel(GPTConfig.gpt2("124M"))
        if head == "classifier":
            model.out_head = nn.Linear(768, 2)
    replace_linear_with_lora(model, rank=16, alpha=16)
    assert count_trainable(model) == expected
    assert f"{expected:,}" in lora_module.__doc__, "the docstring must state the figure this test counts"


def test_count_trainable_counts_a_shared_tensor_once():
    torch.manual_seed(0)
    model = GPTModel(CFG.replace(tie_weights=True))
    unique = {id(p): p.numel() for p in model.parameters()}
    assert count_trainable(model) == sum(unique.values())
    assert count_trainable(model) < sum(p.numel() for _, p in model.named_parameters(remove_duplicate=False))
    model.tok_emb.weight.requires_grad = False
    assert count_trainable(model) == sum(unique.values()) - model.tok_emb.weight.numel()


def test_unfrozen_replace_keeps_earlier_freezing():
    torch.manual_seed(0)
    model = GPTModel(CFG)
    model.tok_emb.weight.requires_grad = False
    replace_linear_with_lora(model, rank=RANK, alpha=ALPHA, freeze=False)
    assert not model.tok_emb.weight.requires_grad
    adapted = [m for m in model.modules() if isinstance(m, LinearWithLoRA)]
    assert adapted and all(m.linear.weight.requires_grad and m.lora.A.requires_grad for m in adapted)


def test_lora_layer_repr_and_scaling_attributes():
    layer = LoRALayer(in_dim=6, out_dim=3, rank=2, alpha=5)
    assert (layer.rank, layer.alpha, layer.scaling) == (2, 5, 2.5)
    assert repr(layer) == "LoRALayer(in_dim=6, out_dim=3, rank=2, alpha=5)"
