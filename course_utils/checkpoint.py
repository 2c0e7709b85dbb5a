"""Saving and restoring training state safely (chapter 5).

A checkpoint is a directory::

    my_run/
        model.safetensors   the model's tensors (a tied matrix stored once)
        optimizer.pt        optional: ``optimizer.state_dict()`` via ``torch.save``
        config.json         what is needed to rebuild and to trust the rest:
                            {"format": 1,
                             "config": GPTConfig fields (or null for other models),
                             "out_head": {"out_features": ..., "bias": ...},
                             "tied": {"out_head.weight": "tok_emb.weight", ...},
                             "sha256": {"model.safetensors": ..., "optimizer.pt": ...},
                             "extra": your JSON-serialisable dict (epoch, losses, ...)}

Why this shape:

* **No pickle for weights.** safetensors files hold only tensors, so loading one
  cannot run code. The optimizer state is nested Python data, so it goes through
  ``torch.save``, and is read back with ``torch.load(weights_only=True)``, which
  accepts tensors and plain containers only.
* **Tied weights.** safetensors refuses two names for one storage. We store the
  shared tensor once under its first name and record the other names in ``tied``;
  loading copies *into* the model's existing parameters, so a tie survives.
* **All or nothing.** A save writes a hidden temporary directory next to the
  target and renames it into place only when every file is written and flushed.
  A failed save leaves nothing behind and an earlier checkpoint untouched.
* **Checked before use.** ``config.json`` records each file's sha256, so a
  truncated or overwritten file is caught before parsing. Shapes, names and the
  optimizer's layout are all checked before anything is copied, so a failed load
  leaves the model and optimizer as they were.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import nn

from .distributed import is_main_process, unwrap_model
from .download import sha256_of
from .gpt import GPTConfig, GPTModel

FORMAT_VERSION = 1
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
CONFIG_FILE = "config.json"
# optimizer state entries that have one value per parameter element
_PER_ELEMENT_STATE = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer")


class CheckpointError(ValueError):
    """A checkpoint is missing, damaged, or does not fit the model/optimizer given."""


# --- saving ------------------------------------------------------------------------


def _split_shared(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Keep one name per shared tensor; return (tensors to store, alias -> stored name)."""
    tensors: dict[str, torch.Tensor] = {}
    tied: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, tensor in state.items():
        key = (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.stride())
        if tensor.numel() > 0 and key in seen:
            tied[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = tensor.detach().to("cpu").contiguous()
    return tensors, tied


def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _head_info(model: nn.Module) -> dict[str, Any] | None:
    head = getattr(model, "out_head", None)
    if isinstance(head, nn.Linear):
        return {"out_features": head.out_features, "bias": head.bias is not None}
    return None


def _check_replaceable(path: Path) -> None:
    """Refuse to overwrite anything but an empty directory or an earlier checkpoint."""
    if path.exists() and (not path.is_dir() or (any(path.iterdir()) and not (path / CONFIG_FILE).is_file())):
        raise CheckpointError(
            f"{path} exists and is not a checkpoint directory; refusing to replace it. "
            f"Choose another path or remove it yourself."
        )


def _move_into_place(tmp: Path, path: Path) -> None:
    """Rename the finished temporary directory to ``path``, replacing an old checkpoint."""
    if not path.exists():
        os.rename(tmp, path)
        return
    _check_replaceable(path)
    backup = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
    old = backup / "checkpoint"
    os.rename(path, old)
    try:
        os.rename(tmp, path)
    except BaseException:
        os.rename(old, path)  # put the previous checkpoint back
        shutil.rmtree(backup, ignore_errors=True)
        raise
    shutil.rmtree(backup, ignore_errors=True)


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` (and ``optimizer``, and ``extra``) to the directory ``path``.

    ``extra`` must be JSON-serialisable (numbers, strings, lists, dicts): it is
    stored in ``config.json`` and returned by :func:`load_checkpoint`. A DDP-wrapped
    model is unwrapped. Under ``torchrun`` only rank 0 writes; other ranks return
    at once (add a :func:`course_utils.distributed.barrier` before they read it).
    An existing checkpoint at ``path`` is replaced only after the new one is complete.
    """
    path = Path(path)
    if not is_main_process():
        return path
    plain = unwrap_model(model)
    cfg = getattr(plain, "cfg", None)
    manifest: dict[str, Any] = {
        "format": FORMAT_VERSION,
        "config": dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else None,
        "out_head": _head_info(plain),
        "extra": extra if extra is not None else {},
    }
    try:
        json.dumps(manifest)
    except TypeError as err:
        raise TypeError(f"extra must be JSON-serialisable (numbers, strings, lists, dicts): {err}") from err
    tensors, tied = _split_shared(plain.state_dict())
    manifest["tied"] = tied

    _check_replaceable(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        safetensors.torch.save_file(tensors, str(tmp / MODEL_FILE), metadata={"format": "pt"})
        files = [MODEL_FILE]
        if optimizer is not None:
            torch.save(optimizer.state_dict(), tmp / OPTIMIZER_FILE)
            files.append(OPTIMIZER_FILE)
        manifest["sha256"] = {name: sha256_of(tmp / name) for name in files}
        (tmp / CONFIG_FILE).write_text(json.dumps(manifest, indent=2), encoding="utf-8")
        for name in [*files, CONFIG_FILE]:
            _fsync(tmp / name)
        _move_into_place(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


# --- loading -----------------------------------------------------------------------


def _read_manifest(path: Path) -> dict[str, Any]:
    config_path = path / CONFIG_FILE
    if not config_path.is_file():
        raise CheckpointError(
            f"{config_path} not found: {path} is not a checkpoint directory written by "
            f"save_checkpoint. Check the path."
        )
    try:
        manifest = json.loads(config_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{config_path} is damaged ({err}); restore it or save the checkpoint again.") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_VERSION:
        raise CheckpointError(
            f"{config_path} is not a format-{FORMAT_VERSION} checkpoint manifest; save the checkpoint "
            f"again with this version of course_utils."
        )
    return manifest


def _verified_file(path: Path, name: str, manifest: dict[str, Any]) -> Path:
    """The file ``name`` after checking it exists and has the recorded sha256."""
    file = path / name
    expected = manifest.get("sha256", {}).get(name)
    if expected is None:
        raise CheckpointError(f"{path} has no {name} recorded in {CONFIG_FILE}; it was saved without it.")
    if not file.is_file():
        raise CheckpointError(f"{file} is missing; restore it or save the checkpoint again.")
    actual = sha256_of(file)
    if actual != expected:
        raise CheckpointError(
            f"{file} is damaged: its sha256 is {actual}, but {CONFIG_FILE} recorded {expected} "
            f"(truncated, overwritten, or from another checkpoint). Restore it or save the checkpoint again."
        )
    return file


def _read_model_state(path: Path, manifest: dict[str, Any], map_location: str | torch.device) -> dict[str, torch.Tensor]:
    file = _verified_file(path, MODEL_FILE, manifest)
    try:
        state = safetensors.torch.load_file(str(file), device=str(torch.device(map_location)))
    except Exception as err:  # safetensors raises its own error type for bad headers
        raise CheckpointError(f"{file} could not be read as safetensors ({err}); save the checkpoint again.") from err
    for alias, source in manifest.get("tied", {}).items():
        if source not in state:
            raise CheckpointError(f"{path / CONFIG_FILE} ties {alias!r} to {source!r}, which {file} lacks.")
        state[alias] = state[source]
    return state


def _check_model_state(file: Path, state: dict[str, torch.Tensor], model: nn.Module) -> None:
    """Raise if the stored tensors do not match the model's names and shapes."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = [
        f"{name}: checkpoint {tuple(state[name].shape)} vs model {tuple(expected[name].shape)}"
        for name in expected
        if name in state and state[name].shape != expected[name].shape
    ]
    if not (missing or unexpected or wrong_shape):
        return
    problems = []
    if wrong_shape:
        problems.append(f"{len(wrong_shape)} shape mismatch(es), e.g. " + "; ".join(wrong_shape[:3]))
    if missing:
        problems.append(f"{len(missing)} tensor(s) missing from the checkpoint, e.g. {missing[:3]}")
    if unexpected:
        problems.append(f"{len(unexpected)} tensor(s) the model does not have, e.g. {unexpected[:3]}")
    hint = "Build the model with the checkpoint's configuration, e.g. load_model_from_checkpoint(path)."
    if any("lora" in name for name in unexpected + missing):
        hint = "LoRA checkpoints need replace_linear_with_lora(model, rank, alpha) before loading (or after, to match)."
    raise CheckpointError(f"{file} does not fit this model: " + " | ".join(problems) + f". {hint}")


def _read_optimizer_state(
    path: Path, manifest: dict[str, Any], optimizer: torch.optim.Optimizer, map_location: str | torch.device
) -> dict[str, Any]:
    file = _verified_file(path, OPTIMIZER_FILE, manifest)
    try:
        saved = torch.load(file, map_location=map_location, weights_only=True)
    except Exception as err:
        raise CheckpointError(f"{file} could not be read ({err}); save the checkpoint again.") from err
    groups = optimizer.param_groups
    saved_groups = saved.get("param_groups") if isinstance(saved, dict) else None
    if not isinstance(saved_groups, list) or not isinstance(saved.get("state"), dict):
        raise CheckpointError(f"{file} does not hold an optimizer state_dict; save the checkpoint again.")
    saved_sizes = [len(g["params"]) for g in saved_groups]
    sizes = [len(g["params"]) for g in groups]
    if saved_sizes != sizes:
        raise CheckpointError(
            f"{file} is for an optimizer with parameter groups of sizes {saved_sizes}, but this optimizer "
            f"has {sizes}. Create the optimizer the same way (same model, same trainable parameters)."
        )
    for saved_group, group in zip(saved_groups, groups):
        for saved_id, param in zip(saved_group["params"], group["params"]):
            for key, value in saved["state"].get(saved_id, {}).items():
                if key in _PER_ELEMENT_STATE and torch.is_tensor(value) and value.shape != param.shape:
                    raise CheckpointError(
                        f"{file}: optimizer state {key!r} has shape {tuple(value.shape)} but its parameter "
                        f"has shape {tuple(param.shape)}. Create the optimizer for the same model."
                    )
    return saved


def load_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    map_location: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Restore ``model`` (and ``optimizer``) from the directory ``path``; return ``extra``.

    Everything is read and checked first (hashes, names, shapes, the optimizer's
    layout); only then are values copied into the existing parameters. Any problem
    raises :class:`CheckpointError` naming the file and leaves ``model`` and
    ``optimizer`` unchanged. ``map_location`` is where tensors are read to before
    being copied to wherever the model's parameters live.
    """
    path = Path(path)
    manifest = _read_manifest(path)
    plain = unwrap_model(model)
    state = _read_model_state(path, manifest, map_location)
    _check_model_state(path / MODEL_FILE, state, plain)
    optimizer_state = _read_optimizer_state(path, manifest, optimizer, map_location) if optimizer is not None else None

    with torch.no_grad():
        plain.load_state_dict(state, strict=True)  # copies into existing tensors: ties survive
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
    return manifest.get("extra", {})


def load_model_from_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> GPTModel:
    """Rebuild a :class:`GPTModel` from its stored config and load its weights.

    Handles plain GPTs and classifiers (a smaller ``out_head``). The model comes back
    on ``map_location`` in eval mode. LoRA models: build the GPT, apply
    ``replace_linear_with_lora`` as in training, then call :func:`load_checkpoint`.
    """
    path = Path(path)
    manifest = _read_manifest(path)
    fields = manifest.get("config")
    if fields is None:
        raise CheckpointError(
            f"{path / CONFIG_FILE} has no GPTConfig (the model was not a GPTModel); build the model "
            f"yourself and call load_checkpoint(path, model)."
        )
    try:
        cfg = GPTConfig(**fields)
    except TypeError as err:
        raise CheckpointError(f"{path / CONFIG_FILE} holds an unknown GPTConfig ({err}); update course_utils.") from err
    model = GPTModel(cfg)
    head = manifest.get("out_head")
    if head and (head["out_features"] != cfg.vocab_size or head["bias"]):
        model.out_head = nn.Linear(cfg.emb_dim, head["out_features"], bias=head["bias"])  # classifier head
    load_checkpoint(path, model, map_location="cpu")
    return model.to(map_location).eval()
