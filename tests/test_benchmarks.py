"""The benchmark scripts run end to end with tiny configs, so they cannot rot.

Speed itself is never asserted here (timings belong in printed benchmarks, not tests);
what is checked is that every case ran, produced positive rates, and that both models
were given the same weights.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str) -> str:
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_bench_gpt_tiny_runs_every_case():
    out = _run("bench_gpt.py", "--size", "tiny", "--repeats", "1", "--new-tokens", "8")
    diff = float(out.split("max |logits ours - HF| = ")[1].split()[0])
    assert diff < 1e-4, out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "tok/s" not in line]
    assert len(rows) == 6, out
    for row in rows:
        ratio = float(row.split("|")[4].strip().rstrip("x"))
        assert ratio > 0, row
    assert "of the matmul rate" in out


def test_pretrain_ch5_tiny_runs():
    out = _run("pretrain_ch5.py", "--tiny")
    assert "whole job:" in out and "peak RSS" in out


def test_bench_allocator_tiny_runs_both_settings():
    out = _run("bench_allocator.py", "--steps", "1", "--warmup", "1")
    rows = [line for line in out.splitlines() if line.startswith("| default") or line.startswith("| tuned")]
    assert len(rows) == 2, out
    assert "applied: True" in rows[1], "on glibc the setting must apply"
    assert "tuned / default" in out
