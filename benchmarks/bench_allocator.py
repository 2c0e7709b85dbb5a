"""Page faults and time of CPU training steps, with and without the allocator setting.

    python benchmarks/bench_allocator.py              # tiny GPT, 8 x 64 tokens, 3 + 5 steps
    python benchmarks/bench_allocator.py --size 124M --batch 2 --seq 256
    python benchmarks/bench_allocator.py --steps 1 --warmup 1   # seconds, for CI

:func:`course_utils.device.tune_cpu_allocator` keeps freed memory in glibc's heap, so
a training step can reuse the previous step's blocks instead of mapping fresh pages
(each new 4 KiB page costs a fault and the kernel zeroes it). This script measures
that: each setting runs in its own process (the setting cannot be undone), takes
``--warmup`` steps and then reports the minor page faults and the wall time of each of
the next ``--steps`` steps. The figures depend on the machine, the glibc release and
the sizes, so they are printed, never asserted (the tests only check that the setting
is applied: tests/test_device.py).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

CHILD = "--child"


def _measure(mode: str, size: str, batch: int, seq: int, warmup: int, steps: int) -> dict:
    """Run in a child process: train ``warmup + steps`` steps, return per-step faults and seconds."""
    import resource

    import torch
    import torch.nn.functional as F

    from course_utils.device import tune_cpu_allocator
    from course_utils.gpt import GPTConfig, GPTModel

    applied = tune_cpu_allocator() if mode == "tuned" else False
    torch.manual_seed(0)
    cfg = GPTConfig.tiny() if size == "tiny" else GPTConfig.gpt2(size, drop_rate=0.0)
    model = GPTModel(cfg)
    optimizer = torch.optim.AdamW(model.parameters())
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq + 1))

    def step() -> tuple[int, float]:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        start = time.perf_counter()
        optimizer.zero_grad()
        logits = model(tokens[:, :-1])
        F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
        optimizer.step()
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before, time.perf_counter() - start

    for _ in range(warmup):  # the first steps fault their memory in with either setting
        step()
    faults, seconds = zip(*(step() for _ in range(steps)))
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"mode": mode, "applied": applied, "faults": list(faults), "seconds": list(seconds), "peak_mib": peak_mib}


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="tiny", help='"tiny" or a GPT-2 size such as "124M"')
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument(CHILD, choices=["default", "tuned"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sizes = (args.size, args.batch, args.seq, args.warmup, args.steps)
    if args.child:
        print(json.dumps(_measure(args.child, *sizes)))
        return

    print(f"model {args.size}, batch {args.batch} x {args.seq} tokens, {args.warmup} warm-up steps, "
          f"then {args.steps} measured steps; one process per setting")
    print("| allocator | faults per step (median, min-max) | s per step (median) | peak RSS MiB |")
    print("|---|---|---|---|")
    results = {}
    for mode in ("default", "tuned"):
        child_args = [f"--size={args.size}", f"--batch={args.batch}", f"--seq={args.seq}",
                      f"--warmup={args.warmup}", f"--steps={args.steps}", CHILD, mode]
        out = subprocess.run([sys.executable, __file__, *child_args], capture_output=True, text=True, check=True)
        result = json.loads(out.stdout.strip().splitlines()[-1])
        results[mode] = result
        faults = sorted(result["faults"])
        seconds = sorted(result["seconds"])
        label = mode if mode == "default" else f"tuned (applied: {result['applied']})"
        print(f"| {label} | {faults[len(faults) // 2]} ({faults[0]}-{faults[-1]}) | "
              f"{seconds[len(seconds) // 2]:.3f} | {result['peak_mib']:.0f} |")
    default = sorted(results["default"]["faults"])[len(results["default"]["faults"]) // 2]
    tuned = sorted(results["tuned"]["faults"])[len(results["tuned"]["faults"]) // 2]
    print(f"median faults per step, tuned / default: {tuned / max(default, 1):.3f}")


if __name__ == "__main__":
    main(sys.argv[1:])
