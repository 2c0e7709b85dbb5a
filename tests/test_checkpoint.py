"""Tests for course_utils.checkpoint: round trips, tied weights, damaged files, atomic saves."""
from __future__ import annotations

import json
import os

import pytest
import safetensors.torch
import torch

from course_utils import checkpoint as ckpt
from course_utils.checkpoint import CheckpointError, load_checkpoint, load_model_from_checkpoint, save_checkpoint
from course_utils.classify import add_classification_head
from course_utils.gpt import GPTConfig, GPTModel
from course_utils.lora import replace_linear_with_lora
from course_utils.train import calc_loss_batch, make_optimizer

CFG = GPTConfig.tiny(vocab_size=300, context_length=16)  # a small vocabulary keeps files tiny


def model_and_optimizer(seed: int, cfg: GPTConfig = CFG, steps: int = 1):
    """A model and its AdamW after ``steps`` training steps on random tokens."""
    torch.manual_seed(seed)
    model = GPTModel(cfg)
    optimizer = make_optimizer(model, lr=1e-3)
    for _ in range(steps):
        inputs = torch.randint(0, cfg.vocab_size, (2, 8))
        optimizer.zero_grad()
        calc_loss_batch(inputs, inputs.roll(-1, dims=1), model, "cpu").backward()
        optimizer.step()
    return model, optimizer


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in model.state_dict().items()}


def assert_unchanged(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), f"{name} was modified by a failed load"


# --- round trips ---------------------------------------------------------------------


def test_round_trip_restores_weights_optimizer_state_and_extra(tmp_path):
    model, optimizer = model_and_optimizer(seed=0, steps=2)
    path = save_checkpoint(tmp_path / "run", model, optimizer, extra={"epoch": 3, "losses": [1.5, 1.25]})
    assert sorted(os.listdir(path)) == ["config.json", "model.safetensors", "optimizer.pt"]

    restored, restored_opt = model_and_optimizer(seed=1, steps=0)  # different weights, empty state
    extra = load_checkpoint(path, restored, restored_opt)
    assert extra == {"epoch": 3, "losses": [1.5, 1.25]}
    for name, tensor in model.state_dict().items():
        assert torch.equal(restored.state_dict()[name], tensor), name

    saved_state, loaded_state = optimizer.state_dict(), restored_opt.state_dict()
    assert saved_state["param_groups"] == loaded_state["param_groups"]
    assert saved_state["state"].keys() == loaded_state["state"].keys()
    for idx, entry in saved_state["state"].items():
        for key, value in entry.items():
            assert torch.equal(loaded_state["state"][idx][key], value), f"state[{idx}][{key}]"

    # one more identical step from each gives identical weights: training resumes exactly
    inputs = torch.randint(0, CFG.vocab_size, (2, 8))
    for m, opt in ((model, optimizer), (restored, restored_opt)):
        opt.zero_grad()
        calc_loss_batch(inputs, inputs.roll(-1, dims=1), m, "cpu").backward()
        opt.step()
    for (name, a), (_, b) in zip(model.named_parameters(), restored.named_parameters()):
        assert torch.equal(a, b), f"{name} diverged after resuming"


def test_load_model_from_checkpoint_rebuilds_the_config(tmp_path):
    model, _ = model_and_optimizer(seed=0, cfg=CFG.replace(n_layers=3), steps=0)
    save_checkpoint(tmp_path / "m", model)
    rebuilt = load_model_from_checkpoint(tmp_path / "m")
    assert rebuilt.cfg == model.cfg and not rebuilt.training
    idx = torch.randint(0, CFG.vocab_size, (1, 6))
    model.eval()
    assert torch.equal(rebuilt(idx), model(idx))


def test_classifier_checkpoint_rebuilds_its_head(tmp_path):
    torch.manual_seed(0)
    model = add_classification_head(GPTModel(CFG.replace(tie_weights=True)), num_classes=2)
    save_checkpoint(tmp_path / "clf", model)
    rebuilt = load_model_from_checkpoint(tmp_path / "clf")
    assert rebuilt.out_head.weight.shape == (2, CFG.emb_dim)
    assert rebuilt.out_head.weight is not rebuilt.tok_emb.weight
    idx = torch.randint(0, CFG.vocab_size, (2, 5))
    model.eval()
    assert torch.equal(rebuilt(idx), model(idx))


def test_tied_weights_are_stored_once_and_stay_tied(tmp_path):
    model, optimizer = model_and_optimizer(seed=0, cfg=CFG.replace(tie_weights=True))
    save_checkpoint(tmp_path / "tied", model, optimizer)
    stored = safetensors.torch.load_file(str(tmp_path / "tied" / "model.safetensors"))
    assert "tok_emb.weight" in stored and "out_head.weight" not in stored
    manifest = json.loads((tmp_path / "tied" / "config.json").read_text())
    assert manifest["tied"] == {"out_head.weight": "tok_emb.weight"}

    restored, restored_opt = model_and_optimizer(seed=5, cfg=CFG.replace(tie_weights=True), steps=0)
    load_checkpoint(tmp_path / "tied", restored, restored_opt)
    assert restored.out_head.weight is restored.tok_emb.weight, "the tie must survive loading"
    assert torch.equal(restored.tok_emb.weight, model.tok_emb.weight)
    rebuilt = load_model_from_checkpoint(tmp_path / "tied")
    assert rebuilt.out_head.weight is rebuilt.tok_emb.weight


def test_lora_model_round_trip(tmp_path):
    torch.manual_seed(0)
    model = replace_linear_with_lora(GPTModel(CFG), rank=2, alpha=4)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora.B"):
                p.normal_()
    save_checkpoint(tmp_path / "lora", model)
    with pytest.raises(CheckpointError, match="replace_linear_with_lora"):
        load_model_from_checkpoint(tmp_path / "lora")
    torch.manual_seed(1)
    fresh = replace_linear_with_lora(GPTModel(CFG), rank=2, alpha=4)
    load_checkpoint(tmp_path / "lora", fresh)
    for name, tensor in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], tensor), name


# --- damaged and mismatched checkpoints ------------------------------------------------


@pytest.fixture()
def saved(tmp_path):
    model, optimizer = model_and_optimizer(seed=0)
    return save_checkpoint(tmp_path / "good", model, optimizer)


def test_truncated_model_file_raises_and_leaves_the_model_alone(saved):
    file = saved / "model.safetensors"
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    model, optimizer = model_and_optimizer(seed=9, steps=0)
    before = snapshot(model)
    with pytest.raises(CheckpointError, match="model.safetensors is damaged") as err:
        load_checkpoint(saved, model, optimizer)
    assert str(saved) in str(err.value) and "save the checkpoint again" in str(err.value)
    assert_unchanged(model, before)
    assert optimizer.state_dict()["state"] == {}


def test_garbage_model_file_raises_even_with_a_matching_hash(saved):
    """Bytes that pass the hash check (manifest edited too) still fail parsing cleanly."""
    file = saved / "model.safetensors"
    file.write_bytes(os.urandom(4096))
    manifest = json.loads((saved / "config.json").read_text())
    manifest["sha256"]["model.safetensors"] = ckpt.sha256_of(file)
    (saved / "config.json").write_text(json.dumps(manifest))
    model, _ = model_and_optimizer(seed=9, steps=0)
    before = snapshot(model)
    with pytest.raises(CheckpointError, match="could not be read as safetensors"):
        load_checkpoint(saved, model)
    assert_unchanged(model, before)


def test_truncated_optimizer_file_raises_before_touching_the_model(saved):
    file = saved / "optimizer.pt"
    file.write_bytes(file.read_bytes()[:100])
    model, optimizer = model_and_optimizer(seed=9, steps=0)
    before = snapshot(model)
    with pytest.raises(CheckpointError, match="optimizer.pt is damaged"):
        load_checkpoint(saved, model, optimizer)
    assert_unchanged(model, before)


def test_garbage_config_raises(saved):
    (saved / "config.json").write_bytes(b"\x00\xffnot json")
    with pytest.raises(CheckpointError, match="config.json is damaged"):
        load_checkpoint(saved, GPTModel(CFG))


def test_wrong_shape_checkpoint_raises_and_leaves_the_model_alone(saved):
    other = GPTModel(CFG.replace(emb_dim=32, n_heads=2))
    before = snapshot(other)
    with pytest.raises(CheckpointError, match="does not fit this model") as err:
        load_checkpoint(saved, other)
    message = str(err.value)
    assert "tok_emb.weight: checkpoint (300, 64) vs model (300, 32)" in message
    assert "load_model_from_checkpoint" in message
    assert_unchanged(other, before)


def test_mismatched_optimizer_raises_and_leaves_the_model_alone(saved):
    model = GPTModel(CFG)
    model.tok_emb.weight.requires_grad = False  # one parameter fewer in the optimizer
    optimizer = make_optimizer(model)
    before = snapshot(model)
    with pytest.raises(CheckpointError, match="parameter groups of sizes"):
        load_checkpoint(saved, model, optimizer)
    assert_unchanged(model, before)


def test_wrongly_shaped_optimizer_state_raises_and_leaves_model_and_optimizer_alone(saved):
    """Same number of parameters per group, but one moment tensor has another shape.

    torch's own Optimizer.load_state_dict checks only the group sizes, so without
    load_checkpoint's shape check this would load, and fail (or silently broadcast)
    at the next step.
    """
    file = saved / "optimizer.pt"
    state = torch.load(file, weights_only=True)
    first = state["param_groups"][0]["params"][0]
    good_shape = tuple(state["state"][first]["exp_avg"].shape)
    state["state"][first]["exp_avg"] = torch.zeros(good_shape[0] + 1, *good_shape[1:])
    torch.save(state, file)
    manifest = json.loads((saved / "config.json").read_text())
    manifest["sha256"]["optimizer.pt"] = ckpt.sha256_of(file)  # a consistent file, so only the shape is wrong
    (saved / "config.json").write_text(json.dumps(manifest))

    model, optimizer = model_and_optimizer(seed=9, steps=1)  # an optimizer with state of its own
    before = snapshot(model)
    opt_before = {idx: {k: v.clone() for k, v in entry.items()} for idx, entry in optimizer.state_dict()["state"].items()}
    with pytest.raises(CheckpointError, match="exp_avg") as err:
        load_checkpoint(saved, model, optimizer)
    assert f"shape {(good_shape[0] + 1, *good_shape[1:])}" in str(err.value) and str(file) in str(err.value)
    assert_unchanged(model, before)
    opt_after = optimizer.state_dict()["state"]
    assert opt_after.keys() == opt_before.keys()
    for idx, entry in opt_before.items():
        for key, value in entry.items():
            assert torch.equal(opt_after[idx][key], value), f"optimizer state[{idx}][{key}] changed"


def test_missing_directory_and_missing_optimizer(tmp_path, saved):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nowhere", GPTModel(CFG))
    model, _ = model_and_optimizer(seed=0, steps=0)
    save_checkpoint(tmp_path / "no_opt", model)
    with pytest.raises(CheckpointError, match="optimizer.pt"):
        load_checkpoint(tmp_path / "no_opt", model, make_optimizer(model))


# --- atomic saves --------------------------------------------------------------------


def test_failed_save_leaves_nothing_behind_and_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    old_model, old_opt = model_and_optimizer(seed=0)
    path = save_checkpoint(tmp_path / "run", old_model, old_opt, extra={"epoch": 1})
    old_bytes = {name: (path / name).read_bytes() for name in os.listdir(path)}

    def fail_mid_save(*args, **kwargs):
        raise OSError("disk full")

    new_model, new_opt = model_and_optimizer(seed=1)
    monkeypatch.setattr(torch, "save", fail_mid_save)  # model.safetensors is already written by then
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, new_model, new_opt, extra={"epoch": 2})
    assert os.listdir(tmp_path) == ["run"], "no temporary files may be left behind"
    assert {name: (path / name).read_bytes() for name in os.listdir(path)} == old_bytes

    fresh = GPTModel(CFG)
    assert load_checkpoint(path, fresh) == {"epoch": 1}
    assert torch.equal(fresh.tok_emb.weight, old_model.tok_emb.weight)


def test_failed_first_save_leaves_no_directory(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.safetensors.torch, "save_file", fail)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path / "run", GPTModel(CFG))
    assert os.listdir(tmp_path) == []


def test_failed_swap_restores_the_old_checkpoint(tmp_path, monkeypatch):
    old_model, _ = model_and_optimizer(seed=0, steps=0)
    path = save_checkpoint(tmp_path / "run", old_model, extra={"which": "old"})
    real_rename = os.rename

    def rename(src, dst):
        if str(src).endswith(".tmp"):  # moving the new checkpoint into place fails
            raise OSError("interrupted")
        return real_rename(src, dst)

    monkeypatch.setattr(ckpt.os, "rename", rename)
    with pytest.raises(OSError, match="interrupted"):
        save_checkpoint(path, model_and_optimizer(seed=1, steps=0)[0], extra={"which": "new"})
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["run"]
    assert load_checkpoint(path, GPTModel(CFG)) == {"which": "old"}


def test_overwrite_replaces_and_refuses_foreign_directories(tmp_path):
    model, _ = model_and_optimizer(seed=0, steps=0)
    save_checkpoint(tmp_path / "run", model, extra={"v": 1})
    save_checkpoint(tmp_path / "run", model, extra={"v": 2})
    assert load_checkpoint(tmp_path / "run", GPTModel(CFG)) == {"v": 2}
    assert os.listdir(tmp_path) == ["run"]

    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "cat.jpg").write_bytes(b"meow")
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        save_checkpoint(foreign, model)
    assert os.listdir(foreign) == ["cat.jpg"]


def test_extra_must_be_json(tmp_path):
    with pytest.raises(TypeError, match="JSON-serialisable"):
        save_checkpoint(tmp_path / "run", GPTModel(CFG), extra={"tensor": torch.zeros(1)})
    assert os.listdir(tmp_path) == []
