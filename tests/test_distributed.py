"""Tests for course_utils.distributed: real DDP with 2 CPU processes against one process.

The torchrun test starts ``tests/ddp_script.py`` on two gloo processes over the
loopback interface, then runs the same script's training function here in one
process with twice the per-process batch. Both see the same global batches (see
the script's docstring), so every logged loss must agree to within float32
rounding. Tolerance: 1e-4 relative (measured differences are around 1e-7).
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from course_utils import distributed as D

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent
sys.path.insert(0, str(TESTS_DIR))
import ddp_script  # noqa: E402  (the script the torchrun processes run)

RTOL = 1e-4
TIMEOUT_S = 120


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_single_process_helpers_are_no_ops(monkeypatch):
    for name in D.TORCHRUN_ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    assert not D.is_distributed()
    assert (D.rank(), D.world_size(), D.is_main_process()) == (0, 1, True)
    assert isinstance(D.setup_distributed(), torch.device)
    assert not D.is_distributed(), "setup_distributed must not start a group outside torchrun"
    model = nn.Linear(2, 2)
    assert D.wrap_model(model, "cpu") is model
    assert D.unwrap_model(model) is model
    assert D.all_reduce_mean(torch.tensor(2.5)) == 2.5
    assert D.all_reduce_sum(7) == 7.0
    D.cleanup_distributed()  # harmless without a group


def test_distributed_loader_in_one_process_covers_the_dataset_in_a_seeded_order():
    dataset = torch.utils.data.TensorDataset(torch.arange(10))
    plain = D.distributed_loader(dataset, batch_size=3, shuffle=False)
    assert [b[0].tolist() for b in plain] == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]  # drop_last: no short batch
    shuffled = D.distributed_loader(dataset, batch_size=5, shuffle=True, seed=1)
    epoch0 = [b[0].tolist() for b in shuffled]
    assert sorted(sum(epoch0, [])) == list(range(10)) and sum(epoch0, []) != list(range(10))
    assert [b[0].tolist() for b in shuffled] == epoch0, "same epoch, same order"
    D.set_epoch(shuffled, 1)
    assert [b[0].tolist() for b in shuffled] != epoch0, "set_epoch reshuffles"
    rebuilt = D.distributed_loader(torch.utils.data.DataLoader(dataset, batch_size=2), shuffle=False)
    assert rebuilt.batch_size == 2 and len(rebuilt) == 5


def test_ddp_on_two_cpu_processes_matches_one_process(tmp_path):
    out = tmp_path / "ddp_losses.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO_ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    if sys.platform.startswith("linux") and Path("/sys/class/net/lo").exists():
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # keep gloo on the loopback interface
    for name in D.TORCHRUN_ENV_VARS:
        env.pop(name, None)
    command = [
        sys.executable, "-m", "torch.distributed.run",
        f"--nproc_per_node={ddp_script.N_PROCESSES}", "--nnodes=1",
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
        str(TESTS_DIR / "ddp_script.py"), "--out", str(out),
    ]
    try:
        proc = subprocess.run(command, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"torchrun did not finish within {TIMEOUT_S} s (a hang in a collective?):\n{err.stderr}")
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    ddp = json.loads(out.read_text())
    assert ddp["world_size"] == 2

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in each torchrun process: same kernels, same rounding
    try:
        single = ddp_script.run(per_rank_batch=ddp_script.PER_RANK_BATCH * ddp_script.N_PROCESSES)
    finally:
        torch.set_num_threads(threads)
    assert single["world_size"] == 1

    n_steps = ddp_script.EPOCHS * ddp_script.N_TRAIN // (ddp_script.PER_RANK_BATCH * ddp_script.N_PROCESSES)
    tokens_per_step = ddp_script.PER_RANK_BATCH * ddp_script.N_PROCESSES * ddp_script.MAX_LENGTH
    max_rel = 0.0
    for loop in ("simple", "scheduled"):
        assert ddp[loop]["tokens_seen"] == single[loop]["tokens_seen"] == [tokens_per_step * (s + 1) for s in range(n_steps)]
        for key in ("train_losses", "val_losses"):
            a, b = torch.tensor(ddp[loop][key]), torch.tensor(single[loop][key])
            assert a.shape == b.shape == (n_steps,)
            torch.testing.assert_close(a, b, rtol=RTOL, atol=0.0, msg=f"{loop}/{key}: DDP {a.tolist()} vs one process {b.tolist()}")
            max_rel = max(max_rel, ((a - b).abs() / b.abs()).max().item())
        # the losses must move, or agreeing would prove nothing
        assert ddp[loop]["train_losses"][-1] < ddp[loop]["train_losses"][0]
    assert ddp["scheduled"]["track_lrs"] == pytest.approx(single["scheduled"]["track_lrs"])
    print(f"max relative loss difference DDP vs one process: {max_rel:.2e}")
