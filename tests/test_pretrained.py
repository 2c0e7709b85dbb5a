"""Loading GPT-2 checkpoints into our GPTModel, checked against Hugging Face transformers.

The reference is ``transformers.GPT2LMHeadModel`` with random (seeded, perturbed)
weights: we save its state dict the way the published files are laid out, load it
into our model, and require the same logits (fp32, max abs difference <= 1e-4) and
the same greedy continuations. No network: the Hub is put in offline mode.
"""
import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before huggingface_hub/transformers read it

import time
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from safetensors.torch import save_file
from transformers import GPT2Config, GPT2LMHeadModel

from course_utils.generate import generate
from course_utils.gpt import GPTConfig, GPTModel
from course_utils.pretrained import (
    GPT2_CHECKPOINTS,
    download_gpt2,
    gpt2_config,
    gpt2_repo_id,
    gpt2_weight_map,
    load_gpt2_file,
    load_gpt2_state_dict,
    load_pretrained_gpt2,
)

LOGITS_ATOL = 1e-4  # fp32; the two implementations differ only in summation order
TINY = dict(n_embd=64, n_layer=2, n_head=4, n_positions=64, vocab_size=50257)
FAKE_COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """Offline even if huggingface_hub was imported (and read the env) before this module."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def hf_gpt2(seed: int, noise: float, **sizes) -> GPT2LMHeadModel:
    """A randomly initialised HF GPT-2 whose every parameter (biases, LayerNorms too) is perturbed.

    ``noise`` is the std added to the matrices. HF's own init (std 0.02) makes greedy
    decoding repeat one token forever, which would hide a position or cache bug; more
    noise makes the continuation depend on the context.
    """
    torch.manual_seed(seed)
    config = GPT2Config(
        **sizes,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        activation_function="gelu_new",  # GPT-2's tanh GELU, like ours
        layer_norm_epsilon=1e-5,
    )
    model = GPT2LMHeadModel(config).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for param in model.parameters():  # lm_head is wte, so it is perturbed once
            scale = noise if param.dim() > 1 else 0.1  # HF starts biases at 0, LayerNorm at (1, 0)
            param.add_(scale * torch.randn(param.shape, generator=gen))
    model.generation_config.eos_token_id = None  # run the full length, as ours does with eos_id=None
    return model


def published_layout(hf_model: GPT2LMHeadModel, prefix: bool) -> dict[str, torch.Tensor]:
    """The ``transformer.*`` tensors (no lm_head), optionally without the prefix, plus the
    ``h.N.attn.bias`` causal-mask buffers the published files carry."""
    sd = {}
    for key, tensor in hf_model.state_dict().items():
        if not key.startswith("transformer."):
            continue
        sd[key if prefix else key[len("transformer."):]] = tensor.clone().contiguous()
    n_ctx = hf_model.config.n_positions
    mask = torch.tril(torch.ones(n_ctx, n_ctx)).view(1, 1, n_ctx, n_ctx)
    for i in range(hf_model.config.n_layer):
        sd[("transformer." if prefix else "") + f"h.{i}.attn.bias"] = mask.clone()
    return sd


def tiny_config(**overrides) -> GPTConfig:
    return GPTConfig(
        vocab_size=TINY["vocab_size"], context_length=TINY["n_positions"], emb_dim=TINY["n_embd"],
        n_heads=TINY["n_head"], n_layers=TINY["n_layer"], drop_rate=0.0, qkv_bias=True, tie_weights=True,
    ).replace(**overrides)


def max_logits_diff(ours: GPTModel, hf: GPT2LMHeadModel, seed: int, seq_len: int) -> tuple[float, float]:
    """(max |ours - hf|, max |hf|) over the logits of a random (2, seq_len) batch."""
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, hf.config.vocab_size, (2, seq_len), generator=gen)
    ours.eval()
    with torch.no_grad():
        expected = hf(idx).logits
        got = ours(idx)
    assert got.shape == expected.shape
    return (got - expected).abs().max().item(), expected.abs().max().item()


def assert_logits_match(ours: GPTModel, hf: GPT2LMHeadModel, label: str, seq_len: int = 32) -> None:
    diff, scale = max_logits_diff(ours, hf, seed=7, seq_len=seq_len)
    print(f"\n[{label}] max abs logits diff vs transformers: {diff:.3e} (max |logit| {scale:.3f})")
    assert diff <= LOGITS_ATOL, f"{label}: max abs logits diff {diff:.3e} > {LOGITS_ATOL} (max |logit| {scale:.3f})"


def hf_greedy(hf: GPT2LMHeadModel, idx: torch.Tensor, new: int) -> tuple[torch.Tensor, float]:
    """HF's greedy continuation of ``idx`` and the smallest top-1 minus top-2 logit gap on the way.

    The gap tells a real disagreement from a near tie that float rounding may break
    either way; the tests check it is far above the logits tolerance.
    """
    out = hf.generate(
        idx,
        attention_mask=torch.ones_like(idx),
        do_sample=False,
        max_new_tokens=new,
        pad_token_id=0,
        output_logits=True,
        return_dict_in_generate=True,
    )
    top2 = torch.stack(out.logits).topk(2, dim=-1).values  # (new, B, 2)
    return out.sequences, (top2[..., 0] - top2[..., 1]).min().item()


def assert_same_greedy(ours: GPTModel, hf: GPT2LMHeadModel, idx: torch.Tensor, context_size: int) -> None:
    expected, margin = hf_greedy(hf, idx, 20)
    got = generate(ours, idx, max_new_tokens=20, context_size=context_size, temperature=0.0)
    new_ours, new_hf = got[:, idx.shape[1]:], expected[:, idx.shape[1]:]
    assert new_hf.shape == (idx.shape[0], 20)
    assert all(len(set(row)) > 5 for row in new_hf.tolist()), f"degenerate reference {new_hf.tolist()}"
    assert margin > 10 * LOGITS_ATOL, f"near tie (top-2 gap {margin:.2e}): pick another seed"
    assert torch.equal(got, expected), f"ours {new_ours.tolist()} vs HF {new_hf.tolist()}"


def params_snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_unchanged(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), f"{key} changed during a failed load"


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def tiny_hf() -> GPT2LMHeadModel:
    return hf_gpt2(seed=0, noise=0.2, **TINY)


@pytest.fixture(scope="module")
def full_124m(tmp_path_factory) -> tuple[GPT2LMHeadModel, GPTModel, Path]:
    """HF's 124M with random weights, its published-layout file, and our model built from that file."""
    hf = hf_gpt2(seed=1, noise=0.05)  # GPT2Config defaults are the 124M size
    path = tmp_path_factory.mktemp("gpt2-124M") / "model.safetensors"
    save_file(published_layout(hf, prefix=False), str(path))
    ours = load_gpt2_file(path)  # config inferred from the file
    return hf, ours, path


# ---------------------------------------------------------------- names and configs

def test_checkpoint_names_and_aliases():
    assert GPT2_CHECKPOINTS == {"gpt2": "124M", "gpt2-medium": "355M", "gpt2-large": "774M", "gpt2-xl": "1558M"}
    assert gpt2_repo_id("gpt2-xl") == gpt2_repo_id("1558M") == "openai-community/gpt2-xl"
    assert gpt2_config("355M") == gpt2_config("gpt2-medium")
    cfg = gpt2_config("gpt2-large")
    assert (cfg.emb_dim, cfg.n_layers, cfg.n_heads) == (1280, 36, 20)
    assert cfg.qkv_bias and cfg.tie_weights and cfg.drop_rate == 0.0 and cfg.context_length == 1024
    with pytest.raises(ValueError, match="gpt2-medium"):
        gpt2_config("gpt3")


def test_weight_map_covers_every_parameter_once():
    model = GPTModel(tiny_config(tie_weights=False))
    rules = gpt2_weight_map(model.cfg.n_layers)
    targets = [r.ours for r in rules] + ["out_head.weight"]  # the head is handled by the loader
    assert sorted(targets) == sorted(name for name, _ in model.named_parameters())
    transposed = {r.hf_key.split(".", 2)[-1] for r in rules if r.transpose}
    assert transposed == {"attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight"}


# ---------------------------------------------------------------- logits against transformers

def test_tiny_file_with_prefix_matches_transformers(tiny_hf, tmp_path):
    path = tmp_path / "model.safetensors"
    save_file(published_layout(tiny_hf, prefix=True), str(path))
    model = load_gpt2_file(path, GPTModel(tiny_config()))
    assert_logits_match(model, tiny_hf, "tiny, transformer.* keys, from file")


def test_tiny_state_dict_without_prefix_matches_transformers(tiny_hf):
    sd = published_layout(tiny_hf, prefix=False)
    assert "h.0.attn.bias" in sd  # mask buffers present, as in the published files
    sd["h.1.attn.masked_bias"] = torch.tensor(-1e4)
    model = GPTModel(tiny_config())
    assert load_gpt2_state_dict(model, sd) is model
    assert_logits_match(model, tiny_hf, "tiny, no prefix, with mask buffers")


def test_untied_head_gets_lm_head_or_wte(tiny_hf):
    sd = published_layout(tiny_hf, prefix=False)
    model = load_gpt2_state_dict(GPTModel(tiny_config(tie_weights=False)), sd)
    assert torch.equal(model.out_head.weight, sd["wte.weight"])  # GPT-2 reuses wte
    assert_logits_match(model, tiny_hf, "tiny, untied head filled from wte")

    sd["lm_head.weight"] = torch.randn_like(sd["wte.weight"])
    model = load_gpt2_state_dict(GPTModel(tiny_config(tie_weights=False)), sd)
    assert torch.equal(model.out_head.weight, sd["lm_head.weight"])
    assert not torch.equal(model.tok_emb.weight, model.out_head.weight)


def test_124m_file_matches_transformers(full_124m):
    hf, ours, _ = full_124m
    assert ours.cfg == gpt2_config("gpt2")  # inferred from the shapes in the file
    assert_logits_match(ours, hf, "124M, published layout, config inferred", seq_len=64)


# ---------------------------------------------------------------- greedy generation

def test_tiny_greedy_generation_matches_transformers(tiny_hf):
    model = load_gpt2_state_dict(GPTModel(tiny_config()), tiny_hf.state_dict())
    idx = torch.randint(0, TINY["vocab_size"], (2, 10), generator=torch.Generator().manual_seed(3))
    assert_same_greedy(model, tiny_hf, idx, context_size=TINY["n_positions"])


@pytest.mark.parametrize("stride", [1, 16])
def test_tiny_generation_past_the_context_matches_transformers(tiny_hf, stride):
    """Past n_positions, with the windows written out here and HF's own cache within each window."""
    model = load_gpt2_state_dict(GPTModel(tiny_config()), tiny_hf.state_dict())
    context, new = TINY["n_positions"], 80  # 10 + 80 tokens: past the 64-token window
    idx = torch.randint(0, TINY["vocab_size"], (2, 10), generator=torch.Generator().manual_seed(5))
    expected, start, cache, margin = idx, 0, None, float("inf")
    with torch.no_grad():
        for _ in range(new):
            moved = False
            while expected.shape[1] - start > context:  # the window [start, end) moves by whole strides
                start, moved = start + stride, True
            if cache is None or moved:
                out = tiny_hf(expected[:, start:], use_cache=True)
            else:
                out = tiny_hf(expected[:, -1:], cache=cache, use_cache=True)
            cache, top2 = out.cache, out.logits[:, -1].topk(2, dim=-1).values
            margin = min(margin, (top2[:, 0] - top2[:, 1]).min().item())
            expected = torch.cat([expected, out.logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert margin > 10 * LOGITS_ATOL, f"near tie (top-2 gap {margin:.2e}): pick another seed"
    assert len(set(expected[0, 10:].tolist())) > 5, "degenerate reference"
    got = generate(model, idx, new, context, window_stride=stride)
    assert torch.equal(got, expected)


def test_124m_greedy_generation_matches_transformers(full_124m):
    hf, ours, _ = full_124m
    idx = torch.randint(0, 50257, (2, 8), generator=torch.Generator().manual_seed(4))
    assert_same_greedy(ours, hf, idx, context_size=1024)


# ---------------------------------------------------------------- errors leave the model untouched

def test_missing_key_is_named_and_model_unchanged(tiny_hf):
    sd = published_layout(tiny_hf, prefix=True)
    del sd["transformer.h.1.mlp.c_proj.bias"]
    model = GPTModel(tiny_config())
    before = params_snapshot(model)
    with pytest.raises(ValueError, match=r"missing keys: h\.1\.mlp\.c_proj\.bias"):
        load_gpt2_state_dict(model, sd)
    assert_unchanged(model, before)


def test_unexpected_key_is_named(tiny_hf):
    sd = published_layout(tiny_hf, prefix=False)
    sd["h.0.attn.rotary.weight"] = torch.zeros(3)
    model = GPTModel(tiny_config())
    before = params_snapshot(model)
    with pytest.raises(ValueError, match=r"unexpected keys: h\.0\.attn\.rotary\.weight"):
        load_gpt2_state_dict(model, sd)
    assert_unchanged(model, before)


def test_misshaped_tensor_late_in_the_dict_copies_nothing(tiny_hf):
    sd = published_layout(tiny_hf, prefix=False)
    sd["h.1.mlp.c_fc.weight"] = sd["h.1.mlp.c_fc.weight"].T.contiguous()  # already (out, in)
    model = GPTModel(tiny_config())
    before = params_snapshot(model)
    with pytest.raises(ValueError, match=r"h\.1\.mlp\.c_fc\.weight has shape \(256, 64\) but the model needs \(64, 256\)"):
        load_gpt2_state_dict(model, sd)
    assert_unchanged(model, before)  # wte, h.0, ... come earlier and were not copied either


def test_other_emb_dim_is_reported(tiny_hf):
    sd = published_layout(tiny_hf, prefix=False)
    model = GPTModel(tiny_config(emb_dim=128))
    before = params_snapshot(model)
    with pytest.raises(ValueError, match=r"wte\.weight has shape \(50257, 64\) but the model needs \(50257, 128\)"):
        load_gpt2_state_dict(model, sd)
    assert_unchanged(model, before)


def test_124m_checkpoint_into_355m_model_names_the_size(full_124m):
    _, _, path = full_124m
    from safetensors.torch import load_file

    with torch.device("meta"):  # shapes only: no memory, no init time
        model = GPTModel(gpt2_config("355M"))
    with pytest.raises(ValueError, match=r"missing keys: h\.12\.") as err:
        load_gpt2_state_dict(model, load_file(str(path)))
    assert "12 blocks" in str(err.value) and "24 blocks" in str(err.value)
    # with the depth right, the width is what gets reported
    with torch.device("meta"):
        model = GPTModel(gpt2_config("355M").replace(n_layers=12))
    with pytest.raises(ValueError, match=r"wte\.weight has shape \(50257, 768\) but the model needs \(50257, 1024\)"):
        load_gpt2_state_dict(model, load_file(str(path)))


def test_qkv_bias_into_model_without_it(tiny_hf):
    sd = published_layout(tiny_hf, prefix=False)
    model = GPTModel(tiny_config(qkv_bias=False))
    before = params_snapshot(model)
    with pytest.raises(ValueError, match=r"h\.0\.attn\.c_attn\.bias.*qkv_bias=True"):
        load_gpt2_state_dict(model, sd)
    assert_unchanged(model, before)


def test_untied_lm_head_into_tied_model_is_refused(tiny_hf):
    sd = published_layout(tiny_hf, prefix=False)
    sd["lm_head.weight"] = sd["wte.weight"] + 1.0
    model = GPTModel(tiny_config())
    before = params_snapshot(model)
    with pytest.raises(ValueError, match="tie_weights=False"):
        load_gpt2_state_dict(model, sd)
    assert_unchanged(model, before)


# ---------------------------------------------------------------- download (offline)

def test_download_offline_without_cache_says_what_to_do(tmp_path):
    start = time.perf_counter()
    with pytest.raises(RuntimeError) as err:
        download_gpt2("gpt2", cache_dir=tmp_path)
    elapsed = time.perf_counter() - start
    message = str(err.value)
    assert "openai-community/gpt2" in message
    assert "load_gpt2_file" in message and "HF_HOME" in message and "connect" in message
    assert elapsed < 5, f"offline failure took {elapsed:.1f} s; it should not wait for the network"


def fill_hub_cache(cache_dir: Path, name: str, source: Path | None = None) -> Path:
    """Lay a file out the way huggingface_hub caches it: refs/main -> snapshots/<commit>/."""
    repo = cache_dir / f"models--openai-community--{name}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(FAKE_COMMIT)  # no newline, as the hub writes it
    snapshot = repo / "snapshots" / FAKE_COMMIT
    snapshot.mkdir(parents=True)
    target = snapshot / "model.safetensors"
    if source is None:
        target.write_bytes(b"not really weights")
    else:
        target.symlink_to(source)
    return target


def test_download_offline_uses_the_cache(tmp_path):
    expected = fill_hub_cache(tmp_path, "gpt2-medium")
    got = download_gpt2("355M", cache_dir=tmp_path)
    assert got == expected.resolve() or got == expected
    assert got.read_bytes() == b"not really weights"
    with pytest.raises(RuntimeError, match="openai-community/gpt2-xl"):  # other sizes are not cached
        download_gpt2("gpt2-xl", cache_dir=tmp_path)


def test_load_pretrained_gpt2_from_an_offline_cache(full_124m, tmp_path, monkeypatch):
    hf, _, path = full_124m
    fill_hub_cache(tmp_path, "gpt2", source=path)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))  # as HF_HOME would
    model = load_pretrained_gpt2("gpt2", device="cpu")
    assert not model.training
    assert_logits_match(model, hf, "124M via load_pretrained_gpt2", seq_len=16)
