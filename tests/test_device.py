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
    import torch.nn.functional as F
    from course_utils.device import tune_cpu_allocator
    from course_utils.gpt import GPTConfig, GPTModel
    if sys.argv[1] == "tuned":
        assert tune_cpu_allocator()
    torch.manual_seed(0)
    model = GPTModel(GPTConfig.tiny())
    optimizer = torch.optim.AdamW(model.parameters())
    x = torch.randint(0, 50257, (8, 65))  # logits of 8 x 64 x 50257 floats: a 100 MB block each step
    def faults_of_one_step():
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        optimizer.zero_grad()
        F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten()).backward()
        optimizer.step()
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    for _ in range(3):  # warm-up: the first steps fault their memory in either way
        faults_of_one_step()
    print(sum(faults_of_one_step() for _ in range(3)))
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc allocator setting is Linux-only")
def test_tuned_allocator_saves_most_page_faults_of_training_steps():
    def faults(mode: str) -> int:
        out = subprocess.run([sys.executable, "-c", FAULTS_SCRIPT, mode], capture_output=True, text=True, check=True)
        return int(out.stdout.strip())

    default, tuned = faults("default"), faults("tuned")
    # glibc maps and unmaps every large block: ~100k faults per step here (seen 113k-120k)
    assert default > 150_000, default
    # reused heap memory: mostly 0 per step, with an occasional re-fault of one block (seen 0-25k)
    assert tuned < default // 4, (tuned, default)
