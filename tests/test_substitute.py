"""course_utils.substitute: OpenAI's weights when they can be loaded, a labelled stand-in when not.

Which bugs these catch: the offline path failing instead of falling back; the stand-in
passed off as GPT-2 (flag, label or notice wrong); a slow offline start (a download
attempted although the Hub is unreachable); real errors (a corrupt file) swallowed by
the fallback; the online path not loading the weights it downloaded; a stand-in that
did not learn anything or differs between two runs.
"""
from __future__ import annotations

import socket

import pytest
import torch

from course_utils import substitute
from course_utils.gpt import GPTConfig, GPTModel
from course_utils.settings import SMOKE_ENV_VAR

transformers = pytest.importorskip("transformers")


@pytest.fixture(autouse=True)
def quick_and_isolated(monkeypatch, tmp_path):
    """Quick mode (tiny stand-in), an empty Hub cache, and a fresh memo per test."""
    monkeypatch.setenv(SMOKE_ENV_VAR, "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv(substitute.CACHE_ENV, str(tmp_path / "course-cache"))
    monkeypatch.setattr(substitute, "_SUBSTITUTES", {})
    monkeypatch.setattr(substitute, "_cached_weights", lambda name: False)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_offline_flag_gives_the_labelled_stand_in(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(substitute, "download_gpt2", lambda *a, **k: pytest.fail("no download when offline"))
    choice = substitute.pretrained_or_substitute("gpt2", device="cpu")
    assert not choice.is_gpt2
    assert "HF_HUB_OFFLINE" in choice.notice and "not" in choice.notice
    assert "stand-in" in choice.label and "GPT-2 124M" in choice.notice
    assert isinstance(choice.model, GPTModel) and not choice.model.training
    assert choice.model.cfg.vocab_size == 50257  # GPT-2's tokenizer fits it
    assert choice.details["steps"] > 0


def test_unreachable_hub_falls_back_without_trying_to_download(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    monkeypatch.setattr(substitute, "download_gpt2", lambda *a, **k: pytest.fail("probe said unreachable"))
    choice = substitute.pretrained_or_substitute("355M", device="cpu")
    assert not choice.is_gpt2
    assert "cannot be reached" in choice.notice and "GPT-2 355M" in choice.notice


def test_hub_probe_sees_a_listening_server_and_a_closed_port(monkeypatch):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        assert substitute.hub_reachable(timeout=2)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    assert not substitute.hub_reachable(timeout=2)


def small_hf_checkpoint(tmp_path):
    """A random 2-layer GPT-2 in the Hub's file format, and the config our model needs for it."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=32)).eval()
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in hf.state_dict().items() 
               if not k.startswith("lm_head") and not k.endswith((".attn.bias", ".attn.masked_bias"))}, path)
    cfg = GPTConfig(context_length=32, emb_dim=64, n_heads=4, n_layers=2, drop_rate=0.0, qkv_bias=True, tie_weights=True)
    return hf, path, cfg


def test_cached_or_downloadable_weights_are_loaded_as_gpt2(monkeypatch, tmp_path):
    hf, path, cfg = small_hf_checkpoint(tmp_path)
    monkeypatch.setattr(substitute, "_cached_weights", lambda name: True)
    monkeypatch.setattr(substitute, "download_gpt2", lambda name: path)
    monkeypatch.setattr(substitute, "gpt2_config", lambda name: cfg)
    monkeypatch.setattr(substitute, "train_substitute", lambda **k: pytest.fail("the weights were there"))
    choice = substitute.pretrained_or_substitute("gpt2", device="cpu")
    assert choice.is_gpt2 and choice.notice == "" and "GPT-2 124M" in choice.label
    ids = torch.randint(0, cfg.vocab_size, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(choice.model(ids), hf(ids).logits, atol=1e-4, rtol=1e-4)


def test_a_broken_weights_file_is_an_error_not_a_fallback(monkeypatch, tmp_path):
    broken = tmp_path / "model.safetensors"
    broken.write_bytes(b"not a safetensors file")
    monkeypatch.setattr(substitute, "_cached_weights", lambda name: True)
    monkeypatch.setattr(substitute, "download_gpt2", lambda name: broken)
    monkeypatch.setattr(substitute, "train_substitute", lambda **k: pytest.fail("a corrupt file must not be hidden"))
    with pytest.raises(Exception) as err:
        substitute.pretrained_or_substitute("gpt2", device="cpu")
    assert not isinstance(err.value, pytest.fail.Exception)


def test_a_failed_download_falls_back(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(substitute, "hub_reachable", lambda timeout=3.0: True)

    def unreachable(name):
        raise RuntimeError("openai-community/gpt2/model.safetensors is not in the cache and the Hub cannot be reached")

    monkeypatch.setattr(substitute, "download_gpt2", unreachable)
    choice = substitute.pretrained_or_substitute("gpt2", device="cpu")
    assert not choice.is_gpt2 and "download failed" in choice.notice


def test_stand_in_learns_and_is_reproducible():
    model, figures = substitute.train_substitute(device="cpu", use_cache=False)
    assert figures["train_loss"] < 10.0  # a uniform guess over 50,257 tokens scores ln(50257) = 10.8
    substitute._SUBSTITUTES.clear()  # train again from scratch, not from the memo or the disk
    again, _ = substitute.train_substitute(device="cpu", use_cache=False)
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name


def test_memo_hands_out_independent_copies():
    first, _ = substitute.train_substitute(device="cpu")
    with torch.no_grad():
        first.tok_emb.weight.zero_()
    second, _ = substitute.train_substitute(device="cpu")
    assert second.tok_emb.weight.abs().sum() > 0  # fine-tuning one copy must not change the next


def test_show_prints_the_notice_outside_a_notebook(monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    choice = substitute.pretrained_or_substitute("gpt2", device="cpu")
    choice.show()
    out = capsys.readouterr().out
    assert out.startswith("NOTICE: not GPT-2.") and choice.notice in out


def test_the_stand_in_is_trained_once_per_machine(monkeypatch):
    first, figures = substitute.train_substitute(device="cpu")
    files = list(substitute.cache_dir().glob("stand-in-*.safetensors"))
    assert len(files) == 1
    substitute._SUBSTITUTES.clear()  # a new process: only the disk remembers
    monkeypatch.setattr(substitute, "fit", lambda *a, **k: pytest.fail("trained again despite the cache"))
    second, cached_figures = substitute.train_substitute(device="cpu")
    assert cached_figures.pop("from_cache") == 1.0 and figures.pop("from_cache") == 0.0
    assert cached_figures == pytest.approx(figures)
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), name
    assert second.out_head.weight is second.tok_emb.weight  # still tied after loading


def test_a_broken_cache_file_is_replaced_not_loaded():
    substitute.train_substitute(device="cpu")
    (path,) = substitute.cache_dir().glob("stand-in-*.safetensors")
    path.write_bytes(path.read_bytes()[:100])  # truncated
    substitute._SUBSTITUTES.clear()
    model, figures = substitute.train_substitute(device="cpu")
    assert figures["steps"] > 0 and path.stat().st_size > 1000  # trained again and written anew
    with torch.no_grad():
        assert torch.isfinite(model(torch.zeros(1, 4, dtype=torch.long))).all()
