"""OpenAI's pretrained GPT-2 weights, loaded into our own :class:`GPTModel`.

The course builds GPT-2's architecture from scratch; this module proves it by
reading the weights OpenAI published (as stored on the Hugging Face Hub) into that
model, unchanged. Three things differ between their checkpoint and our modules:

* names: ``h.3.mlp.c_fc.weight`` is our ``trf_blocks.3.ff.layers.0.weight``;
* layout: GPT-2 used "Conv1D" layers that store weights as (in, out), while
  ``nn.Linear`` stores (out, in), so those weights are transposed;
* packing: one ``c_attn`` matrix holds the query, key and value projections side
  by side; we cut it into thirds for ``W_query``, ``W_key`` and ``W_value``.

:func:`gpt2_weight_map` writes that correspondence down as one table, and
:func:`load_gpt2_state_dict` checks every name and shape before copying anything,
so a failed load never leaves a model half overwritten.
"""
from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

import torch

from .gpt import GPTConfig, GPTModel

# OpenAI's four released sizes: Hugging Face model name -> our size name.
GPT2_CHECKPOINTS: dict[str, str] = {
    "gpt2": "124M",
    "gpt2-medium": "355M",
    "gpt2-large": "774M",
    "gpt2-xl": "1558M",
}
HF_ORGANISATION = "openai-community"  # the Hub account that hosts OpenAI's GPT-2 files
WEIGHTS_FILENAME = "model.safetensors"
GPT2_HEAD_DIM = 64  # every GPT-2 size uses 64-wide attention heads (768 = 12 x 64, ...)

_PREFIX = "transformer."  # GPT2LMHeadModel nests the network under this name
# The causal-mask buffers older checkpoints saved next to the weights: not learned.
_MASK_BUFFER = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)")
_LAYER_KEY = re.compile(r"h\.(\d+)\.")


def _checkpoint_name(name: str) -> str:
    """Turn "gpt2-medium", "355M" or "openai-community/gpt2-medium" into "gpt2-medium"."""
    if name.startswith(HF_ORGANISATION + "/"):
        name = name[len(HF_ORGANISATION) + 1:]
    if name in GPT2_CHECKPOINTS:
        return name
    by_size = {size: hf_name for hf_name, size in GPT2_CHECKPOINTS.items()}
    if name in by_size:
        return by_size[name]
    choices = ", ".join(f"{n!r} ({s})" for n, s in GPT2_CHECKPOINTS.items())
    raise ValueError(f"Unknown GPT-2 checkpoint {name!r}; choose one of {choices}, or a size such as '124M'.")


def gpt2_repo_id(name: str = "gpt2") -> str:
    """The Hugging Face repository holding a GPT-2 size, e.g. "openai-community/gpt2"."""
    return f"{HF_ORGANISATION}/{_checkpoint_name(name)}"


def gpt2_config(name: str = "gpt2") -> GPTConfig:
    """The :class:`GPTConfig` that matches one of OpenAI's checkpoints.

    ``name`` is a Hub name ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl") or a size
    ("124M", "355M", "774M", "1558M"). OpenAI trained with biases on the query, key and
    value projections and with the output head tied to the token embedding, over a
    1024-token context; dropout is off because these weights are used for inference
    and fine-tuning sets its own rate.
    """
    size = GPT2_CHECKPOINTS[_checkpoint_name(name)]
    return GPTConfig.gpt2(size, qkv_bias=True, tie_weights=True, drop_rate=0.0, context_length=1024)


def download_gpt2(name: str = "gpt2", cache_dir: str | os.PathLike | None = None) -> Path:
    """Fetch ``model.safetensors`` of a GPT-2 size and return its local path.

    ``huggingface_hub.hf_hub_download`` does the work: it keeps one copy in the Hub
    cache (``~/.cache/huggingface/hub`` unless ``HF_HOME``/``HF_HUB_CACHE`` or
    ``cache_dir`` say otherwise), resumes interrupted downloads, shows a progress bar,
    and with ``HF_HUB_OFFLINE=1`` answers from the cache alone. Sizes: about 0.5 GB
    (124M), 1.5 GB (355M), 3.2 GB (774M) and 6.4 GB (1558M).

    Raises:
        RuntimeError: the file is not cached and the Hub cannot be reached.
    """
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    repo_id = gpt2_repo_id(name)
    try:
        local = hf_hub_download(repo_id, WEIGHTS_FILENAME, cache_dir=cache_dir)
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as err:
        where = cache_dir if cache_dir is not None else "the Hugging Face cache (HF_HOME)"
        raise RuntimeError(
            f"{repo_id}/{WEIGHTS_FILENAME} is not in {where} and the Hub cannot be reached "
            f"({type(err).__name__}). To fix it, either: (1) connect to the internet once "
            f"(and unset HF_HUB_OFFLINE) and run again, the file is then cached for later; "
            f"(2) copy {WEIGHTS_FILENAME} from a machine that has it and call "
            f"load_gpt2_file(path_to_file); or (3) point HF_HOME (or cache_dir) at a "
            f"Hugging Face cache that already holds {repo_id}."
        ) from err
    return Path(local)


class WeightRule(NamedTuple):
    """How one tensor of a Hugging Face GPT-2 checkpoint fills one of our parameters."""

    hf_key: str  # name in the checkpoint, without the "transformer." prefix
    ours: str  # parameter name in GPTModel
    transpose: bool = False  # Conv1D stores (in, out); nn.Linear wants (out, in)
    part: int | None = None  # c_attn only: which third, 0 query, 1 key, 2 value


def gpt2_weight_map(n_layers: int, qkv_bias: bool = True) -> list[WeightRule]:
    """The checkpoint-to-model table for a GPT-2 with ``n_layers`` blocks.

    Transposed (Conv1D) weights: ``c_attn``, ``attn.c_proj``, ``mlp.c_fc``, ``mlp.c_proj``.
    Everything else (embeddings, LayerNorm scale/shift, biases) is copied as is. The
    output head is not in the table: :func:`load_gpt2_state_dict` handles it, because
    GPT-2 ties it to ``wte``.
    """
    rules = [
        WeightRule("wte.weight", "tok_emb.weight"),  # (vocab, emb)
        WeightRule("wpe.weight", "pos_emb.weight"),  # (context, emb)
    ]
    for i in range(n_layers):
        h, b = f"h.{i}.", f"trf_blocks.{i}."
        for part, proj in enumerate(("W_query", "W_key", "W_value")):
            rules.append(WeightRule(h + "attn.c_attn.weight", b + f"att.{proj}.weight", True, part))
            if qkv_bias:
                rules.append(WeightRule(h + "attn.c_attn.bias", b + f"att.{proj}.bias", False, part))
        rules += [
            WeightRule(h + "ln_1.weight", b + "norm1.scale"),
            WeightRule(h + "ln_1.bias", b + "norm1.shift"),
            WeightRule(h + "attn.c_proj.weight", b + "att.out_proj.weight", True),
            WeightRule(h + "attn.c_proj.bias", b + "att.out_proj.bias"),
            WeightRule(h + "ln_2.weight", b + "norm2.scale"),
            WeightRule(h + "ln_2.bias", b + "norm2.shift"),
            WeightRule(h + "mlp.c_fc.weight", b + "ff.layers.0.weight", True),  # widen to 4 x emb
            WeightRule(h + "mlp.c_fc.bias", b + "ff.layers.0.bias"),
            WeightRule(h + "mlp.c_proj.weight", b + "ff.layers.2.weight", True),  # back to emb
            WeightRule(h + "mlp.c_proj.bias", b + "ff.layers.2.bias"),
        ]
    rules += [
        WeightRule("ln_f.weight", "final_norm.scale"),
        WeightRule("ln_f.bias", "final_norm.shift"),
    ]
    return rules


def _strip_prefix(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys without "transformer.", and without the causal-mask buffers."""
    plain: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        name = key[len(_PREFIX):] if key.startswith(_PREFIX) else key
        if _MASK_BUFFER.fullmatch(name):
            continue  # a fixed lower-triangular mask, which our attention builds itself
        if name in plain:
            raise ValueError(
                f"The state dict holds {name!r} twice, with and without the {_PREFIX!r} prefix; "
                f"keep only one of them."
            )
        plain[name] = tensor
    return plain


def _checkpoint_dims(sd: Mapping[str, torch.Tensor]) -> str:
    """A short description of the checkpoint's size, for error messages."""
    layers = {int(m.group(1)) for k in sd if (m := _LAYER_KEY.match(k))}
    parts = [f"{len(layers)} blocks"]
    if "wte.weight" in sd and sd["wte.weight"].dim() == 2:
        vocab, emb = sd["wte.weight"].shape
        parts = [f"emb_dim {emb}", f"vocab {vocab}"] + parts
    if "wpe.weight" in sd and sd["wpe.weight"].dim() == 2:
        parts.append(f"context {sd['wpe.weight'].shape[0]}")
    return ", ".join(parts)


def _model_dims(cfg: GPTConfig) -> str:
    return f"emb_dim {cfg.emb_dim}, vocab {cfg.vocab_size}, {cfg.n_layers} blocks, context {cfg.context_length}"


def _listing(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def _expected_hf_shape(rule: WeightRule, ours: torch.Size) -> tuple[int, ...]:
    """The shape the checkpoint tensor must have to fill a parameter of shape ``ours``."""
    shape = list(reversed(ours)) if rule.transpose else list(ours)
    if rule.part is not None:
        shape[-1] *= 3  # query, key and value side by side along the output dimension
    return tuple(shape)


def _converted(rule: WeightRule, tensor: torch.Tensor) -> torch.Tensor:
    """The checkpoint tensor in our layout: the right third of c_attn, transposed if Conv1D."""
    if rule.part is not None:
        width = tensor.shape[-1] // 3
        tensor = tensor[..., rule.part * width:(rule.part + 1) * width]
    return tensor.T if rule.transpose else tensor


def load_gpt2_state_dict(model: GPTModel, state_dict: Mapping[str, torch.Tensor]) -> GPTModel:
    """Copy a Hugging Face GPT-2 state dict into ``model`` in place; return the model.

    Accepts keys with or without the ``transformer.`` prefix, ignores the
    ``h.N.attn.bias``/``masked_bias`` mask buffers, and takes the output head from
    ``lm_head.weight`` when present, else from ``wte.weight`` (GPT-2 ties the two).

    Every key and shape is checked before the first copy, so on error the model is
    left exactly as it was.

    Raises:
        ValueError: a key is missing or unexpected, a shape does not match (usually a
            config of another GPT-2 size), or the checkpoint has query/key/value biases
            that the model was built without.
    """
    sd = _strip_prefix(state_dict)
    cfg = model.cfg
    model_has_qkv_bias = model.trf_blocks[0].att.W_query.bias is not None if cfg.n_layers else cfg.qkv_bias
    bias_keys = sorted(k for k in sd if k.endswith("attn.c_attn.bias"))
    if bias_keys and not model_has_qkv_bias:
        raise ValueError(
            f"The checkpoint has query/key/value biases ({bias_keys[0]}) but the model was built "
            f"with qkv_bias=False. Build it with GPTConfig(..., qkv_bias=True), e.g. gpt2_config(name)."
        )

    rules = gpt2_weight_map(cfg.n_layers, qkv_bias=model_has_qkv_bias)
    tied = model.out_head.weight is model.tok_emb.weight
    head, wte = sd.get("lm_head.weight"), sd.get("wte.weight")
    if head is not None:
        if tied and wte is not None and head.shape == wte.shape and not torch.equal(head, wte):
            raise ValueError(
                "lm_head.weight differs from wte.weight, but the model ties its output head to "
                "the token embedding. Build it with tie_weights=False to load both."
            )
        # (tied: lm_head equals wte, so copying it into the shared matrix changes nothing)
        rules.append(WeightRule("lm_head.weight", "out_head.weight"))
    elif not tied:
        rules.append(WeightRule("wte.weight", "out_head.weight"))  # GPT-2 reuses wte as its head

    used = {rule.hf_key for rule in rules}
    missing = sorted({rule.hf_key for rule in rules if rule.hf_key not in sd})
    unexpected = sorted(k for k in sd if k not in used)
    if missing or unexpected:
        problems = []
        if missing:
            problems.append(f"missing keys: {_listing(missing)}")
        if unexpected:
            problems.append(f"unexpected keys: {_listing(unexpected)}")
        raise ValueError(
            f"The state dict does not fit this GPT model ({'; '.join(problems)}). "
            f"Checkpoint: {_checkpoint_dims(sd)}; model: {_model_dims(cfg)}. Is it a GPT-2 "
            f"checkpoint, complete, and is the config the right GPT-2 size?"
        )

    plan: list[tuple[torch.Tensor, torch.Tensor]] = []
    mismatches: dict[str, str] = {}  # one line per checkpoint key (c_attn fills three parameters)
    for rule in rules:
        param = model.get_parameter(rule.ours)
        found = tuple(sd[rule.hf_key].shape)
        expected = _expected_hf_shape(rule, param.shape)
        if found == expected:
            plan.append((param, _converted(rule, sd[rule.hf_key])))
        elif rule.hf_key not in mismatches:
            how = " before transposing (Conv1D weights are stored (in, out))" if rule.transpose else ""
            if rule.part is not None:
                how += ", query, key and value side by side"
            mismatches[rule.hf_key] = (
                f"{rule.hf_key} has shape {found} but the model needs {expected}{how}, "
                f"to fill {rule.ours} of shape {tuple(param.shape)}"
            )
    if mismatches:
        lines = list(mismatches.values())
        shown = "\n  ".join(lines[:3]) + (f"\n  ... and {len(lines) - 3} more" if len(lines) > 3 else "")
        raise ValueError(
            f"Shape mismatch, nothing was copied:\n  {shown}\nCheckpoint: {_checkpoint_dims(sd)}; "
            f"model: {_model_dims(cfg)}. Is the config the right GPT-2 size (see gpt2_config)?"
        )

    with torch.no_grad():
        for param, value in plan:
            param.copy_(value)  # also casts to the model's dtype and device
    return model


def _config_from_state_dict(sd: Mapping[str, torch.Tensor]) -> GPTConfig:
    """Rebuild a GPTConfig from a (prefix-free) GPT-2 state dict's shapes.

    The head count is not stored in the weights; all of OpenAI's sizes use 64-wide
    heads, so ``n_heads = emb_dim // 64``.
    """
    if "wte.weight" not in sd or "wpe.weight" not in sd:
        raise ValueError(
            "Cannot tell the model size: the file has no wte.weight/wpe.weight. Is it a GPT-2 "
            "checkpoint? Otherwise build the GPTModel yourself and pass it as model=."
        )
    vocab_size, emb_dim = sd["wte.weight"].shape
    if emb_dim % GPT2_HEAD_DIM:
        raise ValueError(
            f"emb_dim {emb_dim} is not a multiple of GPT-2's head width {GPT2_HEAD_DIM}, so the "
            f"number of heads is unknown; build the GPTModel yourself and pass it as model=."
        )
    n_layers = len({int(m.group(1)) for k in sd if (m := _LAYER_KEY.match(k))})
    tied = "lm_head.weight" not in sd or torch.equal(sd["lm_head.weight"], sd["wte.weight"])
    return GPTConfig(
        vocab_size=vocab_size,
        context_length=sd["wpe.weight"].shape[0],
        emb_dim=emb_dim,
        n_heads=emb_dim // GPT2_HEAD_DIM,
        n_layers=n_layers,
        drop_rate=0.0,
        qkv_bias="h.0.attn.c_attn.bias" in sd,
        tie_weights=tied,
    )


def load_gpt2_file(path: str | os.PathLike, model: GPTModel | None = None) -> GPTModel:
    """Load a GPT-2 ``.safetensors`` file into ``model`` (built from the file if None).

    Without a model, the config is read off the tensors' shapes: vocabulary and width
    from ``wte``, context from ``wpe``, depth from the ``h.N`` blocks, 64-wide heads.
    Pass a model for anything that is not one of OpenAI's sizes.
    """
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"No weights file at {path}. Get one with download_gpt2(name) or copy "
            f"{WEIGHTS_FILENAME} of openai-community/gpt2 (or another size) there."
        )
    state_dict = load_file(str(path))
    if model is None:
        model = GPTModel(_config_from_state_dict(_strip_prefix(state_dict)))
    return load_gpt2_state_dict(model, state_dict)


def load_pretrained_gpt2(name: str = "gpt2", device: torch.device | str | None = None) -> GPTModel:
    """OpenAI's GPT-2 of the given size, in our GPTModel, in eval mode.

    Downloads the weights on first use (see :func:`download_gpt2`). ``device`` defaults
    to :func:`course_utils.device.best_device`.
    """
    from .device import best_device

    model = GPTModel(gpt2_config(name))
    load_gpt2_file(download_gpt2(name), model)
    return model.to(device if device is not None else best_device()).eval()


__all__ = [
    "GPT2_CHECKPOINTS",
    "WeightRule",
    "download_gpt2",
    "gpt2_config",
    "gpt2_repo_id",
    "gpt2_weight_map",
    "load_gpt2_file",
    "load_gpt2_state_dict",
    "load_pretrained_gpt2",
]
