"""Device selection, seeding, the environment line, and the CPU allocator setting."""
from __future__ import annotations

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
    monkeypatch.delenv("COURSE_DEVICE")
    expected = "cuda" if torch.cuda.is_available() else None
    if expected:
        assert best_device().type == expected
    else:
        assert best_device().type in {"cpu", "mps"}


def test_seed_everything_repeats_draws():
    seed_everything(7)
    a = torch.rand(3)
    seed_everything(7)
    assert torch.equal(a, torch.rand(3))


def test_environment_report_names_torch_and_mode(monkeypatch):
    monkeypatch.setenv("COURSE_SMOKE", "1")
    line = environment_report(torch.device("cpu"))
    assert f"torch {torch.__version__}" in line and "quick mode ON" in line and "cpu" in line


@pytest.mark.parametrize("value,expected", [("1", True), ("true", True), ("0", False), ("", False)])
def test_smoke_mode_and_pick(monkeypatch, value, expected):
    monkeypatch.setenv("COURSE_SMOKE", value)
    assert smoke_mode() is expected
    assert pick("full", "smoke") == ("smoke" if expected else "full")


FAULTS_SCRIPT = textwrap.dedent(
    """
    import resource, sys, torch
    from course_utils.device import tune_cpu_allocator
    if sys.argv[1] == "tuned":
        assert tune_cpu_allocator()
    def faults_of_one_step():
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        x = torch.ones(64, 1024, 1024)  # 256 MiB, allocated and freed like an activation
        del x
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    faults_of_one_step()  # the first allocation always faults its pages in
    print(min(faults_of_one_step() for _ in range(3)))
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc allocator setting is Linux-only")
def test_tuned_allocator_reuses_memory_without_page_faults():
    def faults(mode: str) -> int:
        out = subprocess.run([sys.executable, "-c", FAULTS_SCRIPT, mode], capture_output=True, text=True, check=True)
        return int(out.stdout.strip())

    pages = 256 * 1024 * 1024 // 4096
    assert faults("default") > pages // 2  # glibc hands the block back and faults it in again
    assert faults("tuned") < pages // 100  # the freed block is reused as it is
