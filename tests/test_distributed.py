"""Tests for course_utils.distributed: the helpers in one process and in two real gloo
processes, and real DDP training with 2 CPU processes against one process.

The helper test spawns two processes (torch.multiprocessing, gloo on the loopback
interface) that join one process group through torchrun's environment variables and
report what every helper returned; a helper that ignores the other process (a mean
not divided by the world size, a loader that does not shard, a barrier that does not
wait) gives a wrong figure there, which a single process cannot show.

The torchrun test starts ``tests/ddp_script.py`` on two gloo processes over the
loopback interface, then runs the same script's training function here in one
process with twice the per-process batch. Both see the same global batches (see
the script's docstring), so every logged loss must agree to within float32
rounding. Tolerance: 1e-4 relative (measured differences are around 1e-7).
"""
from __future__ import annotations

import inspect
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from course_utils import distributed as D
from course_utils.data import build_loader

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent

RTOL = 1e-4
TIMEOUT_S = 120


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_single_process_helpers_are_no_ops(monkeypatch):
    for name in D.TORCHRUN_ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("LOCAL_RANK", "3")  # read only inside a process group
    assert not D.launched_by_torchrun()
    assert not D.is_distributed()
    assert (D.rank(), D.world_size(), D.local_rank(), D.is_main_process()) == (0, 1, 0, True)
    assert isinstance(D.setup_distributed(), torch.device)
    assert not D.is_distributed(), "setup_distributed must not start a group outside torchrun"
    model = nn.Linear(2, 2)
    assert D.wrap_model(model, "cpu") is model
    assert D.unwrap_model(model) is model
    assert D.all_reduce_mean(torch.tensor(2.5)) == 2.5
    assert D.all_reduce_sum(7) == 7.0
    total = D.all_reduce_tensor_sum(torch.tensor([1.5, 2.0], dtype=torch.float32))
    assert total.dtype == torch.float64 and total.device.type == "cpu" and total.tolist() == [1.5, 2.0]
    mine = torch.tensor([1.0, 2.0], dtype=torch.float64)
    total = D.all_reduce_tensor_sum(mine)
    total += 1  # a new tensor, as documented: the caller's stays as it was
    assert mine.tolist() == [1.0, 2.0]
    D.barrier()  # harmless without a group
    D.cleanup_distributed()


def test_launched_by_torchrun_needs_all_five_variables(monkeypatch):
    for name in D.TORCHRUN_ENV_VARS:
        monkeypatch.setenv(name, "0")
    assert D.launched_by_torchrun()
    monkeypatch.delenv("MASTER_PORT")
    assert not D.launched_by_torchrun()


def test_unwrap_model_sees_through_compile_and_ddp_like_wrappers():
    inner = nn.Linear(2, 2)

    class Compiled(nn.Module):  # what torch.compile returns keeps the model as _orig_mod
        def __init__(self, mod):
            super().__init__()
            self._orig_mod = mod

    assert D.unwrap_model(Compiled(Compiled(inner))) is inner


def test_distributed_loader_in_one_process_covers_the_dataset_in_a_seeded_order():
    dataset = TensorDataset(torch.arange(10))
    plain = D.distributed_loader(dataset, batch_size=3, shuffle=False)
    assert isinstance(plain.sampler, DistributedSampler) and plain.sampler.num_replicas == 1
    assert [b[0].tolist() for b in plain] == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]  # drop_last: no short batch
    shuffled = D.distributed_loader(dataset, batch_size=5, shuffle=True, seed=1)
    epoch0 = [b[0].tolist() for b in shuffled]
    assert sorted(sum(epoch0, [])) == list(range(10)) and sum(epoch0, []) != list(range(10))
    assert [b[0].tolist() for b in shuffled] == epoch0, "same epoch, same order"
    assert [b[0].tolist() for b in D.distributed_loader(dataset, batch_size=5, shuffle=True, seed=1)] == epoch0
    assert [b[0].tolist() for b in D.distributed_loader(dataset, batch_size=5, shuffle=True, seed=2)] != epoch0
    D.set_epoch(shuffled, 1)
    assert [b[0].tolist() for b in shuffled] != epoch0, "set_epoch reshuffles"
    rebuilt = D.distributed_loader(DataLoader(dataset, batch_size=2), shuffle=False)
    assert rebuilt.batch_size == 2 and len(rebuilt) == 5
    with pytest.raises(ValueError, match="batch_size"):
        D.distributed_loader(dataset)


def test_distributed_loader_reuses_an_existing_loaders_settings():
    dataset = TensorDataset(torch.arange(10))

    def doubled(batch):
        return torch.stack([item[0] for item in batch]) * 2

    source = DataLoader(dataset, batch_size=4, drop_last=False, collate_fn=doubled)
    rebuilt = D.distributed_loader(source, shuffle=False)
    assert [b.tolist() for b in rebuilt] == [[0, 2, 4, 6], [8, 10, 12, 14], [16, 18]]  # drop_last=False kept
    assert [b.tolist() for b in D.distributed_loader(source, batch_size=5, drop_last=True, shuffle=False)] == [
        [0, 2, 4, 6, 8], [10, 12, 14, 16, 18],
    ]


def test_set_epoch_leaves_other_samplers_alone():
    loader = DataLoader(TensorDataset(torch.arange(4)), batch_size=2, shuffle=True)
    D.set_epoch(loader, 3)  # a RandomSampler has no epoch: nothing to do, no error
    sharded = D.distributed_loader(TensorDataset(torch.arange(4)), batch_size=2)
    D.set_epoch(sharded, 3)
    assert sharded.sampler.epoch == 3


WORLD = 2  # processes in the spawned group
SPAWN_TIMEOUT_S = 90


def _batches(loader) -> list[list[int]]:
    return [batch[0].tolist() for batch in loader]


def _helpers_worker(rank: int, port: int, out_dir: str) -> None:
    """One of two processes: join a gloo group as under torchrun, report what each helper returns."""
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    if Path("/sys/class/net/lo").exists():
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    report: dict = {"launched": D.launched_by_torchrun()}
    backend = "gloo" if torch.cuda.is_available() else None  # None picks gloo on a CPU-only machine
    device = D.setup_distributed(backend=backend)
    try:
        report["device"] = str(device)
        report["again"] = str(D.setup_distributed(backend=backend))  # the group exists: joined once, not again
        report["backend"] = torch.distributed.get_backend()
        report["ids"] = [D.is_distributed(), D.rank(), D.world_size(), D.local_rank(), D.is_main_process()]

        value = torch.tensor(float(rank + 1), dtype=torch.float64)  # rank r contributes r + 1
        report["mean"] = D.all_reduce_mean(value)
        report["value_after"] = value.item()  # the caller's tensor is not reduced in place
        report["sum"] = D.all_reduce_sum(rank + 1)
        total = D.all_reduce_tensor_sum(torch.tensor([rank, 10.0 * rank + 1.0]))
        report["tensor_sum"] = [total.tolist(), str(total.dtype), str(total.device)]

        dataset = TensorDataset(torch.arange(11))
        report["plain"] = _batches(D.distributed_loader(dataset, batch_size=2, shuffle=False))
        shuffled = D.distributed_loader(dataset, batch_size=2, shuffle=True, seed=5)
        report["epoch0"] = _batches(shuffled)
        report["epoch0_again"] = _batches(shuffled)
        D.set_epoch(shuffled, 1)
        report["epoch1"] = _batches(shuffled)
        report["auto"] = _batches(build_loader(dataset, 2))  # shard=None: sharded inside a process group
        report["unsharded"] = _batches(build_loader(dataset, 2, shard=False))

        torch.manual_seed(0)
        model = D.wrap_model(nn.Linear(3, 1), "cpu")
        report["wrapped"] = [type(model).__name__, model.broadcast_buffers, D.unwrap_model(model) is model.module]
        model(torch.full((1, 3), float(rank + 1))).sum().backward()  # d(sum)/dW = the input: 1s on rank 0, 2s on rank 1
        report["grad"] = model.module.weight.grad.flatten().tolist()

        norm = nn.BatchNorm1d(2)
        norm.running_mean.fill_(rank + 1.0)  # a buffer that differs between the ranks
        wrapped_norm = D.wrap_model(norm, "cpu")
        report["buffer_at_wrap"] = norm.running_mean.tolist()
        wrapped_norm(torch.arange(8.0).view(4, 2) * (rank + 1))  # a training forward moves the running mean
        report["buffer_after_forward"] = norm.running_mean.tolist()

        D.barrier()
        if rank == 1:
            time.sleep(1.0)  # rank 1 reaches the next barrier a second late ...
        start = time.perf_counter()
        D.barrier()  # ... and rank 0 must wait for it there
        report["barrier_wait_s"] = time.perf_counter() - start
    finally:
        D.cleanup_distributed()
    report["distributed_after_cleanup"] = D.is_distributed()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(report), encoding="utf-8")


def _spawn(fn, args: tuple, nprocs: int, timeout_s: float) -> None:
    context = mp.spawn(fn, args=args, nprocs=nprocs, join=False)
    deadline = time.monotonic() + timeout_s
    while not context.join(timeout=1):  # re-raises a worker's exception
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the {nprocs} processes did not finish within {timeout_s} s (a hang in a collective?)")


@pytest.fixture(scope="module")
def two_process_reports(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("ddp_helpers")
    _spawn(_helpers_worker, (free_port(), str(out)), nprocs=WORLD, timeout_s=SPAWN_TIMEOUT_S)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]


def test_two_processes_join_one_group_with_their_own_ranks(two_process_reports):
    for r, report in enumerate(two_process_reports):
        assert report["launched"] and report["device"] == report["again"] == "cpu"
        assert report["backend"] == "gloo"
        assert report["ids"] == [True, r, WORLD, r, r == 0]  # is_distributed, rank, world_size, local_rank, main
        assert report["distributed_after_cleanup"] is False


def test_two_process_reductions_combine_both_values(two_process_reports):
    for r, report in enumerate(two_process_reports):
        assert report["mean"] == 1.5, "mean of 1 and 2: the sum divided by the world size"
        assert report["value_after"] == r + 1
        assert report["sum"] == 3.0
        assert report["tensor_sum"] == [[1.0, 12.0], "torch.float64", "cpu"]


def test_two_process_loaders_split_each_batch_between_the_ranks(two_process_reports):
    dataset = TensorDataset(torch.arange(11))
    r0, r1 = two_process_reports
    # drop_last: 11 samples give 5 per rank; rank r takes positions r, r + 2, ...; no short batch
    assert r0["plain"] == [[0, 2], [4, 6]] and r1["plain"] == [[1, 3], [5, 7]]
    # the same seeded permutation on both ranks: together, batch k is one process's batch k at twice the size
    single = D.distributed_loader(dataset, batch_size=4, shuffle=True, seed=5)
    for epoch in (0, 1):
        D.set_epoch(single, epoch)
        expected = _batches(single)
        got = [sorted(a + b) for a, b in zip(r0[f"epoch{epoch}"], r1[f"epoch{epoch}"])]
        assert got == [sorted(b) for b in expected], f"epoch {epoch}"
        assert not set(sum(r0[f"epoch{epoch}"], [])) & set(sum(r1[f"epoch{epoch}"], []))
    for report in (r0, r1):
        assert report["epoch0_again"] == report["epoch0"] and report["epoch1"] != report["epoch0"]
    # build_loader shards by itself inside a group (no drop_last: the sampler repeats sample 0 to even out) ...
    assert r0["auto"] == [[0, 2], [4, 6], [8, 10]] and r1["auto"] == [[1, 3], [5, 7], [9, 0]]
    # ... unless told not to
    assert r0["unsharded"] == r1["unsharded"] == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [10]]


def test_two_process_ddp_averages_gradients_and_barrier_waits(two_process_reports):
    for report in two_process_reports:
        assert report["wrapped"] == ["DistributedDataParallel", False, True]
        assert report["grad"] == [1.5, 1.5, 1.5], "DDP averages the two ranks' gradients (1 and 2)"
    assert two_process_reports[0]["barrier_wait_s"] > 0.5, "rank 0 must wait at the barrier for rank 1"


def test_two_process_buffers_are_synced_at_wrap_only(two_process_reports):
    """What wrap_model's docstring says about buffers."""
    r0, r1 = two_process_reports
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters:
        assert r0["buffer_at_wrap"] == r1["buffer_at_wrap"] == [1.0, 1.0], "rank 0's buffers, copied once at wrap"
    else:
        assert (r0["buffer_at_wrap"], r1["buffer_at_wrap"]) == ([1.0, 1.0], [2.0, 2.0])
    assert r0["buffer_after_forward"] != r1["buffer_after_forward"], "no syncing before each forward pass"


def test_gpt_model_has_no_buffers():
    """wrap_model's docstring relies on it: nothing to keep in sync between processes."""
    from course_utils.gpt import GPTConfig, GPTModel

    assert list(GPTModel(GPTConfig.tiny()).buffers()) == []


def test_ddp_on_two_cpu_processes_matches_one_process(tmp_path):
    sys.path.insert(0, str(TESTS_DIR))
    import ddp_script  # the script the torchrun processes run (imported here: it needs the training loops)

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
        # a row before training and one after every step (eval_every=1); tokens counted over both processes
        assert ddp[loop]["step"] == single[loop]["step"] == list(range(n_steps + 1))
        assert ddp[loop]["seen"] == single[loop]["seen"] == [tokens_per_step * s for s in range(n_steps + 1)]
        for key in ("train_loss", "val_loss"):
            a, b = torch.tensor(ddp[loop]["metrics"][key]), torch.tensor(single[loop]["metrics"][key])
            assert a.shape == b.shape == (n_steps + 1,)
            torch.testing.assert_close(a, b, rtol=RTOL, atol=0.0, msg=f"{loop}/{key}: DDP {a.tolist()} vs one process {b.tolist()}")
            max_rel = max(max_rel, ((a - b).abs() / b.abs()).max().item())
        # the losses must move, or agreeing would prove nothing
        assert ddp[loop]["metrics"]["train_loss"][-1] < ddp[loop]["metrics"]["train_loss"][0]
        assert len(ddp[loop]["samples"]) == ddp_script.EPOCHS, "rank 0 samples once per epoch"
    assert ddp["scheduled"]["lr"] == pytest.approx(single["scheduled"]["lr"])
    assert len(set(ddp["scheduled"]["lr"])) > 2, "the schedule must change the rate"
    print(f"max relative loss difference DDP vs one process: {max_rel:.2e}")
