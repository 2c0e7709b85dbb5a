"""Speed of the course's GPTModel against Hugging Face transformers' GPT2LMHeadModel.

Both models get the same configuration and the same weights (ours loaded from HF's
state dict with course_utils.pretrained.load_gpt2_state_dict) and run in this one
process, alternating (ours, HF, HF, ours, ...), so that a drift in machine speed hits
both alike. Each case prints median tokens/s with the spread (min-max), the ratio
ours/HF, and the extra memory each needed at its peak. The fp32 matmul rate of this
machine is measured in the same run, and the 1x1024 forward is reported as a share of it.

    python benchmarks/bench_gpt.py                  # GPT-2 small (124M), CPU, ~10 min on 2 cores
    python benchmarks/bench_gpt.py --size tiny      # seconds: what CI runs so the script cannot rot
    python benchmarks/bench_gpt.py --device cuda --bf16   # on a GPU: bf16 autocast, flash SDPA, fused AdamW
    python benchmarks/bench_gpt.py --size 124M --context 256 --cases longgen --repeats 1
        # generation to 2x and 4x the context length (see long_generation_cases)
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.nn.functional as F

from course_utils.device import tune_cpu_allocator
from course_utils.generate import generate, window_start
from course_utils.gpt import GPTConfig, GPTModel
from course_utils.pretrained import load_gpt2_state_dict
from course_utils.tokenizers import gpt2_tokenizer
from course_utils.train import calc_loss_batch, make_optimizer, prepare_device_for_training

PROMPT = "A lighthouse keeper counts the waves"  # every generation case starts from it

# peak dense bf16 / fp32 FLOP/s of some cards, for model FLOP utilization on a GPU
GPU_PEAK_FLOPS = {"H100": (989e12, 67e12), "H200": (989e12, 67e12), "A100": (312e12, 19.5e12)}


# --- memory ------------------------------------------------------------------------

def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # give freed heap back so RSS starts low
    except OSError:
        pass


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(key):
                return int(line.split()[1])
    raise KeyError(key)


class PeakMemory:
    """Extra memory a block of code needed at its peak, in MiB (CPU: RSS; GPU: allocator)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.mib = 0.0

    def __enter__(self):
        _trim()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")  # reset VmHWM (the peak RSS) to the current RSS
            self.start = _status_kib("VmRSS:") * 1024
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        else:
            peak = _status_kib("VmHWM:") * 1024
        self.mib = (peak - self.start) / 2**20


# --- the two models ------------------------------------------------------------------

def build_models(size: str, device: torch.device, drop_rate: float, context_length: int | None = None):
    from transformers import GPT2Config, GPT2LMHeadModel

    if size == "tiny":
        cfg = GPTConfig.tiny(context_length=256, qkv_bias=True, tie_weights=True, drop_rate=drop_rate)
    else:
        cfg = GPTConfig.gpt2(size, qkv_bias=True, tie_weights=True, drop_rate=drop_rate)
    if context_length is not None:
        cfg = cfg.replace(context_length=context_length)
    hf_cfg = GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.context_length, n_embd=cfg.emb_dim,
        n_layer=cfg.n_layers, n_head=cfg.n_heads, activation_function="gelu_new",
        resid_pdrop=drop_rate, embd_pdrop=drop_rate, attn_pdrop=drop_rate, layer_norm_epsilon=1e-5,
    )
    torch.manual_seed(0)
    hf_cfg._attn_implementation = "sdpa"  # HF's fastest CPU attention, as for ours
    hf = GPT2LMHeadModel(hf_cfg).to(device)
    assert hf.config._attn_implementation == "sdpa", hf.config._attn_implementation
    ours = GPTModel(cfg).to(device)
    load_gpt2_state_dict(ours, hf.state_dict())
    return cfg, ours, hf


def check_same_logits(ours, hf, cfg, device) -> float:
    idx = torch.randint(0, cfg.vocab_size, (2, min(64, cfg.context_length)), device=device)
    ours.eval(), hf.eval()
    with torch.inference_mode():
        diff = (ours(idx) - hf(idx).logits).abs().max().item()
    return diff


# --- cases ---------------------------------------------------------------------------

@dataclass
class Result:
    name: str
    tokens: int
    times: dict[str, list[float]] = field(default_factory=lambda: {"ours": [], "hf": []})
    memory: dict[str, float] = field(default_factory=lambda: {"ours": 0.0, "hf": 0.0})

    def rates(self, impl: str) -> list[float]:
        return [self.tokens / t for t in self.times[impl]]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_case(name: str, tokens: int, make_step: dict[str, Callable[[], Callable[[], None]]],
             repeats: int, warmup: int, device: torch.device, measure_memory: bool = True) -> Result:
    """Time ``repeats`` calls of each implementation's step, alternating the order.

    With ``measure_memory``, one extra untimed call per implementation measures its peak.
    """
    result = Result(name, tokens)
    steps = {impl: factory() for impl, factory in make_step.items()}  # build optimizers etc. once
    for impl, step in steps.items():
        for _ in range(warmup):
            step()
        if measure_memory:
            with PeakMemory(device) as mem:
                step()
            result.memory[impl] = mem.mib
    for r in range(repeats):
        order = ["ours", "hf"] if r % 2 == 0 else ["hf", "ours"]
        for impl in order:
            _sync(device)
            start = time.perf_counter()
            steps[impl]()
            _sync(device)
            result.times[impl].append(time.perf_counter() - start)
    del steps
    _trim()
    return result


def forward_case(ours, hf, cfg, batch, seq, device, autocast):
    idx = torch.randint(0, cfg.vocab_size, (batch, seq), device=device)

    def factory(model, is_hf):
        model.eval()

        def step():
            with torch.inference_mode(), autocast():
                out = model(idx)
                return out.logits if is_hf else out
        return lambda: step

    return {"ours": factory(ours, False), "hf": factory(hf, True)}


def train_case(ours, hf, cfg, batch, seq, device, autocast, course_optimizer: bool):
    idx = torch.randint(0, cfg.vocab_size, (batch, seq + 1), device=device)
    inputs, targets = idx[:, :-1], idx[:, 1:]

    def factory(model, is_hf, use_course_optimizer):
        def build():
            model.train()
            if use_course_optimizer:
                opt = make_optimizer(model, lr=4e-4, weight_decay=0.1)
            else:
                opt = torch.optim.AdamW(model.parameters(), lr=4e-4, weight_decay=0.1)

            def step():
                opt.zero_grad()
                with autocast():
                    out = model(inputs)
                    logits = out.logits if is_hf else out
                    loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
                loss.backward()
                opt.step()
            return step
        return build

    return {"ours": factory(ours, False, course_optimizer), "hf": factory(hf, True, False)}


# --- the course's training loop vs HF as a user would run it, in separate processes -----

WORKERS = ("ours-course", "hf-plain")


def worker_main(args: argparse.Namespace) -> None:
    """One fresh process timing ``args.steps`` training steps of one implementation.

    ours-course: the step of course_utils.train's loops (calc_loss_batch, make_optimizer,
    and the CPU allocator setting those loops apply). hf-plain: GPT2LMHeadModel with a
    plain torch.optim.AdamW in a default process, as a user of transformers would run it.
    Prints one JSON line: the step times and the extra memory at the peak.
    """
    import json

    device = torch.device(args.device)
    cfg, ours, hf = build_models(args.size, device, drop_rate=0.1)
    idx = torch.randint(0, cfg.vocab_size, (2, 257), device=device)
    inputs, targets = idx[:, :-1], idx[:, 1:]
    if args.worker == "ours-course":
        del hf
        model = ours.train()
        prepare_device_for_training(device)
        optimizer = make_optimizer(model, lr=4e-4, weight_decay=0.1)

        def step():
            optimizer.zero_grad()
            calc_loss_batch(inputs, targets, model, device).backward()
            optimizer.step()
    else:
        del ours
        model = hf.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=4e-4, weight_decay=0.1)

        def step():
            optimizer.zero_grad()
            logits = model(inputs).logits
            F.cross_entropy(logits.flatten(0, 1), targets.flatten()).backward()
            optimizer.step()
    times = []
    with PeakMemory(device) as mem:
        for i in range(args.steps + 2):  # two warm-up steps
            _sync(device)
            start = time.perf_counter()
            step()
            _sync(device)
            if i >= 2:
                times.append(time.perf_counter() - start)
    print(json.dumps({"times": times, "peak_mib": mem.mib}))


def course_loop_case(args: argparse.Namespace, rounds: int) -> Result:
    """Alternate fresh worker processes (ours, HF, HF, ours, ...) and pool their steps."""
    import json
    import subprocess

    result = Result("train step 2x256, course loop vs HF + AdamW (separate processes)", 512)
    for r in range(rounds):
        for impl in (WORKERS if r % 2 == 0 else WORKERS[::-1]):
            cmd = [sys.executable, __file__, "--worker", impl, "--size", args.size, "--device", args.device,
                   "--steps", str(args.steps)]
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            data = json.loads(out.stdout.strip().splitlines()[-1])
            key = "ours" if impl == "ours-course" else "hf"
            result.times[key].extend(data["times"])
            result.memory[key] = max(result.memory[key], data["peak_mib"])
    return result


def prompt_ids(device: torch.device) -> torch.Tensor:
    return torch.tensor([gpt2_tokenizer().encode(PROMPT)], device=device)  # (1, 6)


def generate_case(ours, hf, cfg, new_tokens, device, autocast):
    prompt = prompt_ids(device)

    def ours_factory():
        def step():
            with autocast():
                out = generate(ours, prompt, new_tokens, cfg.context_length, use_cache=True)
            assert out.shape[1] == prompt.shape[1] + new_tokens
        return step

    def hf_factory():
        hf.eval()

        def step():
            with torch.inference_mode(), autocast():
                out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                                  min_new_tokens=new_tokens, do_sample=False, use_cache=True, pad_token_id=50256)
            assert out.shape[1] == prompt.shape[1] + new_tokens
        return step

    return {"ours": ours_factory, "hf": hf_factory}


# --- generation past the context window ------------------------------------------------

def hf_windowed_greedy(hf, prompt: torch.Tensor, new_tokens: int, context: int, stride: int,
                       use_cache: bool = True) -> torch.Tensor:
    """Greedy decoding with transformers' GPT2LMHeadModel over the windows ours uses.

    ``generate`` of transformers cannot go past ``n_positions`` (the position embedding
    has no row for position n_positions), so this loop does what a user would: it feeds
    a window of at most ``context`` tokens chosen by course_utils.generate.window_start
    (the course's one window policy) and, with ``use_cache``, keeps HF's own cache while
    the window only grows, rebuilding it when the window moves.
    """
    idx, start, cache = prompt, max(0, prompt.shape[1] - context), None
    with torch.no_grad():
        for _ in range(new_tokens):
            new_start = window_start(idx.shape[1], start, context, stride)
            if not use_cache:
                out = hf(idx[:, new_start:], use_cache=False, logits_to_keep=1)
            elif cache is None or new_start != start:
                out = hf(idx[:, new_start:], use_cache=True, logits_to_keep=1)  # (re)build the cache
            else:
                out = hf(idx[:, -1:], cache=cache, use_cache=True, logits_to_keep=1)
            cache = out.cache if use_cache else None
            start = new_start
            idx = torch.cat([idx, out.logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return idx


class FedCounter:
    """Records how many tokens each forward call of a model receives."""

    def __init__(self, model: torch.nn.Module):
        self.fed: list[int] = []
        self.handle = model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, _module, args, _kwargs):
        self.fed.append(args[0].shape[1])

    def remove(self) -> None:
        self.handle.remove()


@dataclass
class LongRow:
    label: str
    result: Result
    fed_per_step: float
    same_tokens: bool


def long_generation_cases(ours, hf, cfg, device, multiples: list[int], repeats: int) -> list[LongRow]:
    """Greedy generation until the sequence is ``m`` times the context length.

    Two window policies, each run by both implementations on the same weights:
    stride ``context // 4`` (course_utils' default with a KV cache: the cache is
    rebuilt once every ``stride`` steps) and stride 1 (the plain sliding window, which
    re-feeds the whole window at every step once it is full: what course_utils' cached
    generate did before it had a stride, and what a user of transformers gets past
    n_positions with a window loop). Ours runs ``generate``; HF runs
    :func:`hf_windowed_greedy`, with its cache for stride > 1 and without for stride 1
    (the window then moves every step, so a cache would be rebuilt every step anyway).
    Runs alternate (ours, HF, HF, ours, ...); the first run of each also records the
    tokens, so that ours and HF are checked to agree, and the tokens ours fed per step.
    """
    prompt = prompt_ids(device)
    context, default_stride = cfg.context_length, max(1, cfg.context_length // 4)
    ours.eval(), hf.eval()
    rows = []
    for m in multiples:
        new = m * context - prompt.shape[1]
        for stride in (default_stride, 1):
            runs = {
                "ours": lambda: generate(ours, prompt, new, context, window_stride=stride),
                "hf": lambda: hf_windowed_greedy(hf, prompt, new, context, stride, use_cache=stride > 1),
            }
            label = (f"greedy to {m}x context ({new} new), stride {stride}"
                     + (" (default), KV cache" if stride > 1 else ": plain window re-fed each step"))
            result, outputs, counter = Result(label, new), {}, FedCounter(ours)
            for r in range(repeats):
                for impl in (["ours", "hf"] if r % 2 == 0 else ["hf", "ours"]):
                    _sync(device)
                    begin = time.perf_counter()
                    out = runs[impl]()
                    _sync(device)
                    result.times[impl].append(time.perf_counter() - begin)
                    outputs.setdefault(impl, out)
                    if impl == "ours":
                        counter.remove()
            fed = counter.fed[:new]  # the first run's steps
            rows.append(LongRow(label, result, sum(fed) / len(fed), torch.equal(outputs["ours"], outputs["hf"])))
            print(f"  {label}: ours {statistics.median(result.rates('ours')):.1f} tok/s, "
                  f"HF {statistics.median(result.rates('hf')):.1f} tok/s", flush=True)
    return rows


# --- matmul rate and FLOPs -----------------------------------------------------------------

def matmul_rate(device: torch.device, dtype=torch.float32, repeats: int = 10) -> float:
    """Median FLOP/s of the GEMM shapes a GPT-2-small forward at 1x1024 spends its time in."""
    shapes = [(1024, 768, 2304), (1024, 768, 3072), (1024, 3072, 768), (1024, 768, 50257)]
    rates = []
    for m, k, n in shapes:
        a = torch.randn(m, k, device=device, dtype=dtype)
        b = torch.randn(k, n, device=device, dtype=dtype)
        for _ in range(2):
            a @ b
        _sync(device)
        t = []
        for _ in range(repeats):
            start = time.perf_counter()
            a @ b
            _sync(device)
            t.append(time.perf_counter() - start)
        rates.append(2 * m * k * n / statistics.median(t))
    total_flops = sum(2 * m * k * n for m, k, n in shapes)
    return total_flops / sum(2 * m * k * n / r for (m, k, n), r in zip(shapes, rates))


def forward_flops(cfg: GPTConfig, seq: int) -> tuple[float, float]:
    """FLOPs of one forward over ``seq`` tokens (2 per multiply-add), counted two ways.

    Standard (PaLM / nanoGPT convention): 2 * N * seq + 4 * n_layers * emb_dim * seq^2,
    with N the parameters less the position embedding (the token embedding counts
    because it doubles as the output head), attention counted over the full T x T.
    Strict: only the matmuls a causal forward must do: every Linear weight, the head,
    and Q K^T and weights @ V over the lower triangle.
    """
    d, layers, vocab = cfg.emb_dim, cfg.n_layers, cfg.vocab_size
    block_params = layers * (12 * d * d + 13 * d)  # Linear weights + biases + LayerNorms
    n_params = vocab * d + block_params + 2 * d  # tied head, final norm
    standard = 2 * n_params * seq + 4 * layers * d * seq * seq
    strict = 2 * seq * (layers * 12 * d * d + d * vocab) + layers * 2 * seq * seq * d
    return standard, strict


# --- report ----------------------------------------------------------------------------

def fmt(rates: list[float]) -> str:
    return f"{statistics.median(rates):9.1f} ({min(rates):.0f}-{max(rates):.0f})"


def main(argv: list[str] | None = None) -> list[Result]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="124M", choices=["tiny", "124M", "355M"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per implementation and case")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--cases", default="forward,train,generate")
    parser.add_argument("--new-tokens", type=int, default=100)
    parser.add_argument("--context", type=int, default=None, help="override the context length (both models)")
    parser.add_argument("--multiples", default="2,4", help="longgen: generate to these multiples of the context")
    parser.add_argument("--worker", choices=WORKERS, help=argparse.SUPPRESS)  # internal: one isolated run
    parser.add_argument("--steps", type=int, default=3, help="timed steps per isolated worker process")
    args = parser.parse_args(argv)
    if args.worker:
        if args.threads:
            torch.set_num_threads(args.threads)
        worker_main(args)
        return []

    if args.threads:
        torch.set_num_threads(args.threads)
    # The course's training loops keep freed memory for reuse on the CPU; set it for the
    # whole process up front so that both models run under the same allocator.
    tuned = tune_cpu_allocator()
    device = torch.device(args.device)
    tiny = args.size == "tiny"
    repeats = args.repeats or (3 if tiny else 7)
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if args.bf16 else (
        lambda: torch.autocast(device.type, enabled=False))

    import transformers
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, device {device}, "
          f"{torch.get_num_threads()} threads, size {args.size}, {'bf16 autocast' if args.bf16 else 'fp32'}, "
          f"allocator {'tuned (both models)' if tuned else 'default'}")
    cfg, ours, hf = build_models(args.size, device, drop_rate=0.1, context_length=args.context)
    print(f"same weights: max |logits ours - HF| = {check_same_logits(ours, hf, cfg, device):.2e}")

    long_seq = min(1024, cfg.context_length)
    cases = args.cases.split(",")
    results: list[Result] = []
    if "forward" in cases:
        results.append(run_case(f"forward 1x{long_seq}", long_seq,
                                forward_case(ours, hf, cfg, 1, long_seq, device, autocast), repeats, 1, device))
        results.append(run_case("forward 8x128", 8 * 128,
                                forward_case(ours, hf, cfg, 8, 128, device, autocast), repeats, 1, device))
    if "train" in cases:
        results.append(run_case("train step 2x256, AdamW both", 512,
                                train_case(ours, hf, cfg, 2, 256, device, autocast, False), repeats, 2, device))
        results.append(run_case("train step 2x256, fused AdamW (course optimizer) vs HF AdamW", 512,
                                train_case(ours, hf, cfg, 2, 256, device, autocast, True), repeats, 2, device))
        if device.type == "cpu" and not args.bf16:
            results.append(course_loop_case(args, rounds=2 if tiny else 4))
    if "generate" in cases:
        results.append(run_case(f"greedy generate {args.new_tokens} tokens, KV cache", args.new_tokens,
                                generate_case(ours, hf, cfg, args.new_tokens, device, autocast),
                                max(3, repeats // 2), 1, device))

    long_rows = []
    if "longgen" in cases:
        long_rows = long_generation_cases(ours, hf, cfg, device, [int(m) for m in args.multiples.split(",")],
                                          max(1, repeats // 2))

    if results:
        print()
        print(f"| case | ours tok/s (min-max) | HF tok/s (min-max) | ours/HF | ours peak MiB | HF peak MiB |")
        print(f"|---|---|---|---|---|---|")
    for r in results:
        ratio = statistics.median(r.rates("ours")) / statistics.median(r.rates("hf"))
        print(f"| {r.name} | {fmt(r.rates('ours'))} | {fmt(r.rates('hf'))} | {ratio:.2f}x | "
              f"{r.memory['ours']:.0f} | {r.memory['hf']:.0f} |")

    if long_rows:
        print(f"\ncontext length {cfg.context_length}; generated tokens per second over the whole run "
              f"(prompt {prompt_ids(device).shape[1]} tokens)\n")
        print("| case | tokens fed per step (mean) | ours tok/s (min-max) | HF tok/s (min-max) | ours/HF | same tokens |")
        print("|---|---|---|---|---|---|")
        for row in long_rows:
            r = row.result
            ratio = statistics.median(r.rates("ours")) / statistics.median(r.rates("hf"))
            print(f"| {row.label} | {row.fed_per_step:.1f} | {fmt(r.rates('ours'))} | {fmt(r.rates('hf'))} | "
                  f"{ratio:.2f}x | {'yes' if row.same_tokens else 'no'} |")

    if results and results[0].name.startswith("forward 1x"):
        rate = matmul_rate(device)
        fwd = results[0]
        standard, strict = forward_flops(cfg, long_seq)
        print(f"\nfp32 matmul rate on GPT-2's GEMM shapes, measured now: {rate / 1e9:.0f} GFLOP/s")
        for impl in ("ours", "hf"):
            seconds = statistics.median(fwd.times[impl])
            print(f"forward 1x{long_seq}, {impl}: {standard / seconds / 1e9:.0f} GFLOP/s = "
                  f"{standard / seconds / rate:.0%} of the matmul rate (standard count; "
                  f"{strict / seconds / rate:.0%} counting only the causal matmuls)")
        if device.type == "cuda":
            name = torch.cuda.get_device_name(device)
            peak = next((v for k, v in GPU_PEAK_FLOPS.items() if k in name), None)
            if peak:
                p = peak[0] if args.bf16 else peak[1]
                ours_rate = standard / statistics.median(fwd.times["ours"])
                print(f"model FLOP utilization vs {name} peak {p / 1e12:.0f} TFLOP/s: ours {ours_rate / p:.1%}")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
