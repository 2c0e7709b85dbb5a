"""More tests for course_utils.checkpoint: the manifest's checks, unusual models and paths.

tests/test_checkpoint.py covers the round trips and damaged files; these pin the
remaining documented behaviour, each test aimed at one check the module makes.
"""
from __future__ import annotations

import json
import os

import pytest
import torch
from torch import nn

from course_utils import checkpoint as ckpt
from course_utils.checkpoint import CheckpointError, load_checkpoint, load_model_from_checkpoint, save_checkpoint
from course_utils.gpt import GPTConfig, GPTModel
from course_utils.lora import replace_linear_with_lora
from course_utils.train import make_optimizer

CFG = GPTConfig.tiny(vocab_size=100, context_length=8, emb_dim=16, n_heads=2, n_layers=1)


def gpt(seed: int = 0, cfg: GPTConfig = CFG) -> GPTModel:
    torch.manual_seed(seed)
    return GPTModel(cfg)


def edit_manifest(path, change) -> None:
    manifest = json.loads((path / "config.json").read_text())
    change(manifest)
    (path / "config.json").write_text(json.dumps(manifest))


def rehash(path, name: str) -> None:
    """Record a deliberately changed file's hash, so only the change itself is wrong."""
    edit_manifest(path, lambda m: m["sha256"].__setitem__(name, ckpt.sha256_of(path / name)))


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# --- what a save writes ----------------------------------------------------------------


def test_extra_defaults_to_an_empty_dict(tmp_path):
    save_checkpoint(tmp_path / "run", gpt())
    assert load_checkpoint(tmp_path / "run", gpt(1)) == {}


def test_a_non_contiguous_parameter_is_saved_and_restored(tmp_path):
    class Transposed(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.arange(12.0).reshape(3, 4).t())  # a (4, 3) view

    model = Transposed()
    assert not model.weight.is_contiguous()
    save_checkpoint(tmp_path / "t", model)
    fresh = Transposed()
    with torch.no_grad():
        fresh.weight.zero_()
    load_checkpoint(tmp_path / "t", fresh)
    assert torch.equal(fresh.weight, model.weight)


def test_saving_onto_a_file_is_refused_and_an_empty_directory_is_used(tmp_path):
    file = tmp_path / "notes.txt"
    file.write_text("keep me")
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        save_checkpoint(file, gpt())
    assert file.read_text() == "keep me"

    empty = tmp_path / "empty"
    empty.mkdir()
    save_checkpoint(empty, gpt())
    assert sorted(os.listdir(empty)) == ["config.json", "model.safetensors"]


def test_only_the_main_process_writes(tmp_path, monkeypatch):
    monkeypatch.setattr(ckpt, "is_main_process", lambda: False)
    assert save_checkpoint(tmp_path / "run", gpt()) == tmp_path / "run"
    assert os.listdir(tmp_path) == []


class Compiled(nn.Module):
    """Stands in for torch.compile's wrapper: the real model sits in ``_orig_mod``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self._orig_mod = model

    def forward(self, idx):
        return self._orig_mod(idx)


def test_a_wrapped_model_is_saved_and_loaded_as_the_plain_model(tmp_path):
    model = gpt(0)
    save_checkpoint(tmp_path / "run", Compiled(model))
    rebuilt = load_model_from_checkpoint(tmp_path / "run")  # plain names and the GPT's config were stored
    assert same_weights(rebuilt, model)
    target = Compiled(gpt(1))
    load_checkpoint(tmp_path / "run", target)
    assert same_weights(target._orig_mod, model)


# --- what a load checks --------------------------------------------------------------------


@pytest.fixture()
def saved(tmp_path):
    model = gpt(0)
    optimizer = make_optimizer(model)
    model(torch.randint(0, 100, (2, 4))).sum().backward()
    optimizer.step()
    return save_checkpoint(tmp_path / "good", model, optimizer)


def test_another_format_version_is_refused(saved):
    edit_manifest(saved, lambda m: m.__setitem__("format", 2))
    with pytest.raises(CheckpointError, match="format-1"):
        load_checkpoint(saved, gpt(1))


def test_an_unrecorded_or_missing_file_is_a_checkpoint_error(saved):
    edit_manifest(saved, lambda m: m["sha256"].pop("optimizer.pt"))
    model = gpt(1)
    with pytest.raises(CheckpointError, match="saved without it"):
        load_checkpoint(saved, model, make_optimizer(model))
    (saved / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors is missing"):
        load_checkpoint(saved, model)
    assert same_weights(model, gpt(1))


def test_a_tie_to_a_tensor_that_is_not_stored_is_refused(saved):
    edit_manifest(saved, lambda m: m["tied"].__setitem__("out_head.weight", "nowhere.weight"))
    with pytest.raises(CheckpointError, match="nowhere.weight"):
        load_checkpoint(saved, gpt(1))


def test_a_plain_checkpoint_does_not_load_into_a_lora_model(saved):
    lora = replace_linear_with_lora(gpt(1), rank=2, alpha=4)
    before = {k: v.clone() for k, v in lora.state_dict().items()}
    with pytest.raises(CheckpointError, match="missing from the checkpoint") as err:
        load_checkpoint(saved, lora)
    assert "replace_linear_with_lora" in str(err.value)
    assert all(torch.equal(before[k], v) for k, v in lora.state_dict().items())


class _Marker:
    """An object whose unpickling has a side effect: what a malicious file could do."""

    unpickled = False

    def __setstate__(self, state):
        type(self).unpickled = True


def test_optimizer_file_is_read_without_unpickling_objects(saved):
    state = torch.load(saved / "optimizer.pt", weights_only=True)
    state["param_groups"][0]["payload"] = _Marker()
    torch.save(state, saved / "optimizer.pt")
    rehash(saved, "optimizer.pt")
    model = gpt(1)
    with pytest.raises(CheckpointError, match="could not be read"):
        load_checkpoint(saved, model, make_optimizer(model))
    assert not _Marker.unpickled


@pytest.mark.parametrize("content", [["not", "a", "dict"], {"param_groups": [], "state": []}])
def test_optimizer_file_that_is_no_state_dict_is_refused(saved, content):
    torch.save(content, saved / "optimizer.pt")
    rehash(saved, "optimizer.pt")
    model = gpt(1)
    with pytest.raises(CheckpointError, match="does not hold an optimizer state_dict"):
        load_checkpoint(saved, model, make_optimizer(model))
    assert same_weights(model, gpt(1))


# --- rebuilding a model ------------------------------------------------------------------------


def test_load_model_from_checkpoint_needs_a_known_gpt_config(tmp_path):
    save_checkpoint(tmp_path / "linear", nn.Linear(3, 2))
    with pytest.raises(CheckpointError, match="no GPTConfig"):
        load_model_from_checkpoint(tmp_path / "linear")
    save_checkpoint(tmp_path / "gpt", gpt())
    edit_manifest(tmp_path / "gpt", lambda m: m["config"].__setitem__("n_experts", 8))
    with pytest.raises(CheckpointError, match="unknown GPTConfig"):
        load_model_from_checkpoint(tmp_path / "gpt")


@pytest.mark.parametrize("out_features, bias", [(100, True), (3, False), (3, True)])
def test_load_model_from_checkpoint_rebuilds_any_linear_head(tmp_path, out_features, bias):
    model = gpt(0)
    model.out_head = nn.Linear(CFG.emb_dim, out_features, bias=bias)
    save_checkpoint(tmp_path / "m", model)
    rebuilt = load_model_from_checkpoint(tmp_path / "m")
    assert rebuilt.out_head.out_features == out_features and (rebuilt.out_head.bias is not None) == bias
    assert same_weights(rebuilt, model)


def test_load_model_from_checkpoint_puts_the_model_where_asked(tmp_path):
    save_checkpoint(tmp_path / "m", gpt())
    rebuilt = load_model_from_checkpoint(tmp_path / "m", map_location="meta")
    assert {p.device.type for p in rebuilt.parameters()} == {"meta"} and not rebuilt.training


# --- all or nothing --------------------------------------------------------------------------


def test_a_save_moves_the_finished_directory_into_place(tmp_path, monkeypatch):
    """The directory written in full is the one that appears: renamed into place, not copied."""
    made = []
    real_mkdtemp = ckpt.tempfile.mkdtemp

    def mkdtemp(*args, **kwargs):
        path = real_mkdtemp(*args, **kwargs)
        made.append(os.stat(path).st_ino)
        return path

    monkeypatch.setattr(ckpt.tempfile, "mkdtemp", mkdtemp)
    model = gpt()
    for _ in range(2):  # a first save, then one replacing it
        made.clear()
        save_checkpoint(tmp_path / "run", model, make_optimizer(model))
        assert os.stat(tmp_path / "run").st_ino == made[0]
    assert os.listdir(tmp_path) == ["run"]


def test_first_save_flushes_every_file_before_the_checkpoint_appears(tmp_path, monkeypatch):
    flushed = []
    real_fsync = ckpt._fsync

    def fsync(path):
        flushed.append((path.name, (tmp_path / "run").exists()))
        real_fsync(path)

    monkeypatch.setattr(ckpt, "_fsync", fsync)
    model = gpt()
    save_checkpoint(tmp_path / "run", model, make_optimizer(model))
    assert sorted(flushed) == [("config.json", False), ("model.safetensors", False), ("optimizer.pt", False)]


def test_a_directory_that_appears_during_the_save_is_not_replaced(tmp_path, monkeypatch):
    """Checked again just before the swap: files put at the path meanwhile are never deleted."""
    target = tmp_path / "run"
    real_save_file = ckpt.safetensors.torch.save_file

    def save_file(*args, **kwargs):
        target.mkdir()
        (target / "cat.jpg").write_bytes(b"meow")  # someone else's files arrive mid-save
        return real_save_file(*args, **kwargs)

    monkeypatch.setattr(ckpt.safetensors.torch, "save_file", save_file)
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        save_checkpoint(target, gpt())
    assert os.listdir(target) == ["cat.jpg"] and os.listdir(tmp_path) == ["run"]
