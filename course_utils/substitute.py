"""OpenAI's GPT-2 when it can be had, an honestly labelled stand-in when it cannot.

Chapters 5-7 and appendices E and F start from OpenAI's pretrained weights. Online,
:func:`pretrained_or_substitute` loads them through :mod:`course_utils.pretrained`
and the notebook reports GPT-2's real results. Offline (no network, or
``HF_HUB_OFFLINE=1`` with nothing cached) it does not fail and does not pretend: it
pretrains a small GPT from scratch on The Verdict, the course's own unlabeled text,
returns that instead, and says so loudly (:meth:`PretrainedChoice.show` puts a warning
box in the notebook's output, which the site shows too). Nothing in a notebook changes
between the two cases.

The stand-in has GPT-2's tokenizer and vocabulary, so every later step (classification
head, instruction fine-tuning, LoRA) runs on it unchanged; it is only much smaller and
has read one short story instead of 40 GB of web text, so its numbers are far below
GPT-2's.
"""
from __future__ import annotations

import hashlib
import html
import json
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import torch

from .data import create_dataloader
from .datasets import load_the_verdict
from .device import best_device, seed_everything
from .gpt import GPTConfig, GPTModel, count_parameters
from .pretrained import (
    GPT2_CHECKPOINTS,
    WEIGHTS_FILENAME,
    _checkpoint_name,
    download_gpt2,
    gpt2_config,
    gpt2_repo_id,
    load_gpt2_file,
)
from .settings import pick
from .tokenizers import gpt2_tokenizer
from .train import fit, calc_loss_batch, count_tokens, make_optimizer

CACHE_ENV = "COURSE_CACHE_DIR"  # where the trained stand-in is kept between runs
HUB_ENDPOINT_ENV = "HF_ENDPOINT"  # huggingface_hub's own variable for a mirror of the Hub
DEFAULT_HUB = "https://huggingface.co"
PROBE_TIMEOUT_S = 3.0


def substitute_config() -> GPTConfig:
    """The stand-in's shape: GPT-2's vocabulary and layout, 4 blocks of width 256.

    About 16M parameters, 13M of them the (tied) token embedding; in quick mode
    (``COURSE_SMOKE=1``) it shrinks to 2 blocks of width 64.
    """
    return pick(
        GPTConfig(context_length=256, emb_dim=256, n_heads=4, n_layers=4, drop_rate=0.0, qkv_bias=True, tie_weights=True),
        GPTConfig.tiny(context_length=64, qkv_bias=True, tie_weights=True),
    )


@dataclass
class PretrainedChoice:
    """What :func:`pretrained_or_substitute` loaded, and how to say so."""

    model: GPTModel
    is_gpt2: bool  # True: OpenAI's weights; False: the stand-in
    label: str  # one line naming the model, e.g. for plot titles and tables
    notice: str = ""  # why the stand-in was used and what that means; empty for GPT-2
    details: dict[str, float] = field(default_factory=dict)  # the stand-in's training figures

    def show(self) -> None:
        """Print which model this is; offline, also a warning box (HTML) for notebooks and the site."""
        if self.is_gpt2:
            print(f"Loaded {self.label}.")
            return
        text = f"NOTICE: not GPT-2. {self.notice}"
        try:
            from IPython import get_ipython
            from IPython.display import display
        except ImportError:  # plain Python: the text is all there is
            print(text)
            return
        if get_ipython() is None:
            print(text)
            return
        box = (
            '<div class="admonition warning"><p class="admonition-title">'
            "Offline: these results are not GPT-2's</p>"
            f"<p>{html.escape(self.notice)}</p></div>"
        )
        display({"text/html": box, "text/plain": text}, raw=True)


def hub_reachable(timeout: float = PROBE_TIMEOUT_S) -> bool:
    """True when a TCP connection to the Hugging Face Hub (or ``HF_ENDPOINT``) opens in time.

    A quick probe, so that an offline reader waits seconds, not the half a minute of
    retries a download attempt spends before giving up.
    """
    url = urlparse(os.environ.get(HUB_ENDPOINT_ENV, DEFAULT_HUB))
    host = url.hostname or "huggingface.co"
    port = url.port or (80 if url.scheme == "http" else 443)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _cached_weights(name: str) -> bool:
    """True when the Hub cache already holds the checkpoint (no network needed then)."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(gpt2_repo_id(name), WEIGHTS_FILENAME)
    return isinstance(found, str)


_SUBSTITUTES: dict[tuple, tuple[dict[str, torch.Tensor], dict[str, float]]] = {}


def cache_dir() -> Path:
    """``$COURSE_CACHE_DIR``, else ``~/.cache/llms-from-scratch``: the stand-in is trained once per machine."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "llms-from-scratch")


def _cache_file(key: tuple) -> Path:
    digest = hashlib.sha256(repr((key, torch.__version__)).encode()).hexdigest()[:16]
    return cache_dir() / f"stand-in-{digest}.safetensors"


def _read_cached(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, float]] | None:
    """The cached weights and figures, or None when absent or unreadable (a broken file is removed)."""
    from safetensors import safe_open

    if not path.exists():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            figures = {k: float(v) for k, v in json.loads(f.metadata()["figures"]).items()}
            state = {name: f.get_tensor(name) for name in f.keys()}
        return state, figures
    except Exception:  # truncated or foreign file: train again rather than load it
        path.unlink(missing_ok=True)
        return None


def _write_cached(path: Path, state: dict[str, torch.Tensor], figures: dict[str, float]) -> None:
    """Write atomically (a temporary file renamed into place), so a crash leaves no half file."""
    from safetensors.torch import save_file

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        unique = {name: t.contiguous().clone() for name, t in state.items()}  # tied weights: separate copies
        save_file(unique, str(tmp), metadata={"figures": json.dumps(figures)})
        os.replace(tmp, path)
    except OSError:  # a read-only home: the stand-in is simply trained again next time
        pass


def train_substitute(
    cfg: GPTConfig | None = None,
    num_epochs: int | None = None,
    seed: int = 123,
    device: torch.device | str = "cpu",
    use_cache: bool = True,
) -> tuple[GPTModel, dict[str, float]]:
    """Pretrain the stand-in on The Verdict (deterministic) and return it in eval mode.

    The run is chapter 5's, scaled down: windows of the full context with stride equal to
    the context, AdamW at 1e-3, ``num_epochs`` epochs (10, or 2 in quick mode). The
    result is memoised for the process, so a notebook that asks twice trains once.
    Returns the model and its figures: parameters, steps, final train loss, seconds.
    """
    cfg = cfg or substitute_config()
    num_epochs = num_epochs if num_epochs is not None else pick(10, 2)
    key = (repr(cfg), num_epochs, seed, str(device))
    cached = _read_cached(_cache_file(key)) if use_cache and key not in _SUBSTITUTES else None
    if cached is not None:
        _SUBSTITUTES[key] = (cached[0], {**cached[1], "from_cache": 1.0})
    if key not in _SUBSTITUTES:
        seed_everything(seed)
        model = GPTModel(cfg)
        tokenizer = gpt2_tokenizer()
        text = load_the_verdict()
        loader = create_dataloader(
            text, batch_size=4, max_length=cfg.context_length, stride=cfg.context_length,
            shuffle=True, drop_last=True, tokenizer=tokenizer,
        )
        optimizer = make_optimizer(model, lr=1e-3, weight_decay=0.1)
        start = time.perf_counter()
        history = fit(
            model.to(device), loader, loader, optimizer, device,  # evaluated before and after only
            num_epochs=num_epochs, eval_every=10**9, eval_batches=len(loader),
            loss_fn=calc_loss_batch, count=count_tokens, unit="tokens",
            show_progress=False, log=False,
        )
        figures = {
            "parameters": float(count_parameters(model)),
            "steps": float(history.steps_done),
            "train_loss": float(history.metrics["train_loss"][-1]),
            "seconds": time.perf_counter() - start,
            "from_cache": 0.0,
        }
        _SUBSTITUTES[key] = ({k: v.detach().cpu().clone() for k, v in model.state_dict().items()}, figures)
        if use_cache:
            _write_cached(_cache_file(key), *_SUBSTITUTES[key])
    state, figures = _SUBSTITUTES[key]
    model = GPTModel(cfg)
    model.load_state_dict(state)  # tied weights: the head and the embedding share one tensor again
    return model.to(device).eval(), dict(figures)


def pretrained_or_substitute(name: str = "gpt2", device: torch.device | str | None = None) -> PretrainedChoice:
    """OpenAI's GPT-2 ``name`` ("gpt2", "gpt2-medium", ... or "124M", ...) if it can be loaded, else the stand-in.

    Online, or with the weights in the Hub cache, this is
    :func:`course_utils.pretrained.load_pretrained_gpt2`. When the Hub cannot be reached
    and nothing is cached, it returns :func:`train_substitute`'s model, with a notice that
    says why and what the numbers mean. Errors other than "cannot download" (a corrupt
    file, a wrong shape) are raised, not papered over.
    """
    device = device if device is not None else best_device()
    hub_name = _checkpoint_name(name)  # "355M" -> "gpt2-medium"; an unknown name is a clear ValueError
    size = GPT2_CHECKPOINTS[hub_name]
    reason = ""
    offline_flag = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}
    if _cached_weights(hub_name) or (not offline_flag and hub_reachable()):
        try:
            model = GPTModel(gpt2_config(hub_name))
            load_gpt2_file(download_gpt2(hub_name), model)
            return PretrainedChoice(model.to(device).eval(), True, f"OpenAI GPT-2 {size} ({hub_name})")
        except RuntimeError as err:  # download_gpt2's "cannot be reached": fall back below
            if "cannot be reached" not in str(err):
                raise
            reason = "the download failed"
    else:
        reason = "HF_HUB_OFFLINE is set" if offline_flag else "the Hugging Face Hub cannot be reached"
    model, figures = train_substitute(device=device)
    cfg = model.cfg
    millions = figures["parameters"] / 1e6
    label = f"stand-in GPT ({millions:.0f}M parameters, {cfg.n_layers} blocks of width {cfg.emb_dim}), pretrained on The Verdict"
    notice = (
        f"OpenAI's GPT-2 {size} weights could not be loaded ({reason}), so this notebook continues with a "
        f"{label}: {figures['steps']:.0f} training steps, final training loss {figures['train_loss']:.2f} "
        f"({'trained once on this machine in' if figures.get('from_cache') else 'trained just now, in'} "
        f"{figures['seconds']:.0f} s{' and loaded from the cache' if figures.get('from_cache') else ''}). It has GPT-2's tokenizer and layout but has read one short story, so "
        f"every result below is far below what GPT-2 gives. Run the notebook with internet access to get "
        f"GPT-2's results; nothing in it needs to change."
    )
    return PretrainedChoice(model, False, label, notice, figures)


__all__ = ["PretrainedChoice", "cache_dir", "hub_reachable", "pretrained_or_substitute", "substitute_config", "train_substitute"]
