"""Device selection, seeding, the environment line, and the CPU allocator setting."""
from __future__ import annotations

import json
import random
import subprocess
import sys
import textwrap

import pytest
import torch

from course_utils.device import best_device, environment_report, seed_everything
from course_utils.settings import pick, smoke_mode


def test_best_device_honours_override(monkeypatch):
    monkeypatch.setenv("COURSE_DEVICE", "cpu")
    assert best_device() == torch.device("cpu")
    monkeypatch.setenv("COURSE_DEVICE", " cuda:1 ")  # any device string, spaces ignored; not checked for existence
    assert best_device() == torch.device("cuda", 1)
    monkeypatch.delenv("COURSE_DEVICE")
    expected = "cuda" if torch.cuda.is_available() else None
    if expected:
        assert best_device().type == expected
    else:
        assert best_device().type in {"cpu", "mps"}


def test_best_device_prefers_cuda_then_reliable_mps_then_cpu(monkeypatch):
    import course_utils.device as device

    monkeypatch.delenv("COURSE_DEVICE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(device, "mps_is_reliable", lambda: True)
    assert best_device() == torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert best_device() == torch.device("mps")
    monkeypatch.setattr(device, "mps_is_reliable", lambda: False)
    assert best_device() == torch.device("cpu")


@pytest.mark.parametrize(
    "version,available,reliable",
    [("2.4.1", True, False), ("2.5.0", True, True), ("2.13.0+cpu", True, True), ("3.0.0a0", True, True), ("2.13.0", False, False)],
)
def test_mps_is_trusted_only_from_release_2_5(monkeypatch, version, available, reliable):
    import course_utils.device as device

    monkeypatch.setattr(torch, "__version__", version)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: available)
    assert device.mps_is_reliable() is reliable


@pytest.mark.parametrize("version,parsed", [("2.13.0+cpu", (2, 13)), ("2.5.0a0+git123", (2, 5)), ("10.1", (10, 1))])
def test_torch_version_parsing(monkeypatch, version, parsed):
    import course_utils.device as device

    monkeypatch.setattr(torch, "__version__", version)
    assert device._torch_version() == parsed


def _draws() -> tuple:
    try:
        import numpy
    except ImportError:  # numpy is optional: its seeding is then not tested
        numpy = None
    return torch.rand(3).tolist(), random.random(), numpy.random.rand() if numpy is not None else None


def test_seed_everything_repeats_draws():
    seed_everything(7)
    a = torch.rand(3)
    seed_everything(7)
    assert torch.equal(a, torch.rand(3))


@pytest.mark.parametrize("which", [0, 1, 2], ids=["torch", "random", "numpy"])
def test_seed_everything_seeds_torch_python_and_numpy(which):
    if which == 2:
        pytest.importorskip("numpy")
    seed_everything(11)
    first = _draws()[which]
    _draws()  # move every generator on
    seed_everything(11)
    assert _draws()[which] == first, "the same seed must repeat the draws"
    seed_everything(12)
    assert _draws()[which] != first, "another seed must give other draws"


def test_seed_everything_default_seed_is_123():
    seed_everything()
    default = _draws()
    seed_everything(123)
    assert _draws() == default


def test_environment_report_names_torch_and_mode(monkeypatch):
    monkeypatch.setenv("COURSE_SMOKE", "1")
    line = environment_report(torch.device("cpu"))
    assert f"torch {torch.__version__}" in line and "quick mode ON" in line and "cpu" in line
    monkeypatch.setenv("COURSE_SMOKE", "0")
    line = environment_report(torch.device("cpu"))
    assert line.endswith("| quick mode off")
    assert f"device cpu ({torch.get_num_threads()} threads)" in line
    assert line.startswith(f"python {sys.version_info.major}.{sys.version_info.minor}.")
    tiktoken = pytest.importorskip("tiktoken")
    assert f"tiktoken {tiktoken.__version__}" in line


def test_environment_report_picks_the_best_device_by_default(monkeypatch):
    monkeypatch.setenv("COURSE_DEVICE", "cpu")
    assert "device cpu (" in environment_report()


@pytest.mark.parametrize(
    "value,expected",
    [("1", True), ("true", True), ("TRUE", True), (" yes ", True), ("on", True), ("0", False), ("", False), ("no", False), ("2", False)],
)
def test_smoke_mode_and_pick(monkeypatch, value, expected):
    monkeypatch.setenv("COURSE_SMOKE", value)
    assert smoke_mode() is expected
    assert pick("full", "smoke") == ("smoke" if expected else "full")


def test_smoke_mode_off_when_unset(monkeypatch):
    monkeypatch.delenv("COURSE_SMOKE", raising=False)
    assert smoke_mode() is False and pick(10, 1) == 10


# What tune_cpu_allocator claims, observed through glibc's own statistics (mallinfo2):
# a 64 MiB block is served by mmap by default (above every mmap threshold glibc would
# pick), and from the heap once tuned, where it stays after free() for reuse. Counts of
# blocks and bytes, not timings or page faults: the same on every glibc machine. (The
# page faults this saves are measured, not asserted, by benchmarks/bench_allocator.py.)
ALLOCATOR_SCRIPT = textwrap.dedent(
    """
    import ctypes, json
    import course_utils.device as device

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in
                    "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    malloc, free, info = libc.malloc, libc.free, libc.mallinfo2
    BLOCK = 64 << 20

    def mmapped():  # blocks mmapped while a 64 MiB block is held
        before = info()
        block = malloc(BLOCK)
        during = info()
        free(block)
        return during.hblks - before.hblks

    def heap_kept():  # heap bytes still held after a 64 MiB block is freed at once (the top of the heap: trimmable)
        before = info()
        free(malloc(BLOCK))
        return info().arena - before.arena

    report = {"default_mmapped": mmapped()}
    report["first"] = device.tune_cpu_allocator()
    report["flag"] = device._allocator_tuned
    report["tuned_kept"] = heap_kept()  # the heap grows by the block and is not trimmed back
    report["tuned_mmapped"] = mmapped()
    report["reused_growth"] = heap_kept()  # the kept memory serves the next block: no growth
    def no_libc(*args, **kwargs):
        raise AssertionError("a second call must not touch libc again")
    ctypes.CDLL = no_libc
    report["second"] = device.tune_cpu_allocator()
    print(json.dumps(report))
    """
)


def _has_mallinfo2() -> bool:
    import ctypes

    try:
        return hasattr(ctypes.CDLL("libc.so.6"), "mallinfo2")  # glibc 2.33 and later
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux") or not _has_mallinfo2(), reason="needs glibc 2.33+ (mallinfo2)")
def test_tune_cpu_allocator_serves_large_blocks_from_a_kept_heap_and_is_idempotent():
    out = subprocess.run([sys.executable, "-c", ALLOCATOR_SCRIPT], capture_output=True, text=True, check=True)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["default_mmapped"] == 1, f"glibc should mmap a 64 MiB block by default: {report}"
    assert report["first"] is True and report["flag"] is True
    assert report["tuned_mmapped"] == 0, f"tuned: no block may be mmapped (M_MMAP_MAX = 0): {report}"
    # the heap grows by the block (not by some padding) and is not trimmed back after free (M_TRIM_THRESHOLD)
    assert 64 << 20 <= report["tuned_kept"] < 2 * (64 << 20), f"tuned: freed heap is kept: {report}"
    assert report["reused_growth"] == 0, f"the kept heap is reused: {report}"
    assert report["second"] is True


def test_tune_cpu_allocator_declines_where_glibc_is_absent(monkeypatch):
    import course_utils.device as device

    monkeypatch.setattr(device, "_allocator_tuned", False)
    monkeypatch.setattr(device.ctypes, "CDLL", lambda *a, **k: pytest.fail("libc must not be loaded here"))
    monkeypatch.setattr(device.sys, "platform", "darwin")
    assert device.tune_cpu_allocator() is False
    monkeypatch.setattr(device.sys, "platform", "linux")
    monkeypatch.setattr(device.platform, "libc_ver", lambda *a, **k: ("musl", "1.2"))
    assert device.tune_cpu_allocator() is False
    assert device._allocator_tuned is False
