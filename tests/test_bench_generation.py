"""The long-generation benchmark (``bench_gpt.py --cases longgen``) runs and stays honest.

Like tests/test_benchmarks.py, no speed is asserted. What is checked: both
implementations produced the same tokens over the same windows, and the cached
default feeds far fewer tokens per step than the plain sliding window.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_long_generation_tiny():
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_gpt.py"), "--size", "tiny", "--cases", "longgen",
         "--context", "24", "--multiples", "2", "--repeats", "1", "--threads", "1"],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in out.stdout.splitlines() if line.startswith("| greedy to 2x")]
    assert len(rows) == 2, out.stdout
    (strided, plain) = rows
    assert "stride 6 (default)" in strided[0] and "stride 1" in plain[0]
    assert all(row[5].strip() == "yes" for row in rows), out.stdout  # ours == HF, token for token
    # 2 x 24 - 6 = 42 steps: the prompt (6), 18 single tokens until the window is full, then
    # plain: 23 x 24 re-fed tokens; stride 6: 4 rebuilds of 24 - 6 + 1 = 19 tokens and 19 single tokens
    assert float(plain[1]) == round((6 + 18 + 23 * 24) / 42, 1), out.stdout
    assert float(strided[1]) == round((6 + 18 + 4 * 19 + 19) / 42, 1), out.stdout
