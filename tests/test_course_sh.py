"""The install decisions of ./course.sh, checked offline (nothing is downloaded here).

Which bugs these catch: installing into the system Python (PEP 668 refuses it on
Debian/Ubuntu) instead of a project venv; ignoring an active venv or $PYTHON; pulling
the multi-GB CUDA build of torch on a Linux machine without a GPU, or replacing a torch
the user installed; re-running pip on every command although nothing changed (the
stamp); a silent failure when venv support is missing.
"""
from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPT = REPO_ROOT / "course.sh"

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="course.sh is a bash script")


def run(args: list[str], env_changes: dict[str, str | None], timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    for key in ("PYTHON", "VIRTUAL_ENV", "COURSE_TORCH", "COURSE_VENV", "COURSE_STAMP_DIR"):
        env.pop(key, None)
    for key, value in env_changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=timeout)


def plan(env_changes: dict[str, str | None]) -> dict[str, str]:
    result = run(["plan"], env_changes)
    assert result.returncode == 0, result.stderr
    return dict(line.split(": ", 1) for line in result.stdout.strip().splitlines())


@pytest.fixture(scope="module")
def bare_venv(tmp_path_factory) -> Path:
    """A virtual environment without torch, made the way course.sh makes one."""
    path = tmp_path_factory.mktemp("env") / "venv"
    stamps = tmp_path_factory.mktemp("stamps")
    result = run(["plan"], {"COURSE_VENV": str(path), "COURSE_STAMP_DIR": str(stamps)})
    assert result.returncode == 0, result.stderr
    return path


def fake_nvidia_smi(folder: Path, works: bool) -> str:
    tool = folder / "nvidia-smi"
    tool.write_text("#!/bin/sh\n" + ("echo 'GPU 0: Fake GPU'\nexit 0\n" if works else "exit 9\n"))
    tool.chmod(tool.stat().st_mode | stat.S_IEXEC)
    return f"{folder}{os.pathsep}{os.environ['PATH']}"


def test_without_python_or_venv_a_project_venv_is_created_and_used(bare_venv, tmp_path):
    assert (bare_venv / "bin" / "python").exists()
    found = plan({"COURSE_VENV": str(bare_venv), "COURSE_STAMP_DIR": str(tmp_path)})
    assert found["python"] == f"{bare_venv}/bin/python"
    assert found["install"] == "needed"


def test_linux_without_gpu_gets_the_cpu_build(bare_venv, tmp_path):
    if not sys.platform.startswith("linux"):
        pytest.skip("the CPU-build rule is for Linux")
    path = fake_nvidia_smi(tmp_path, works=False)
    assert plan({"COURSE_VENV": str(bare_venv), "PATH": path})["torch"] == "cpu"


def test_a_gpu_or_the_gpu_flag_keeps_pypis_default_build(bare_venv, tmp_path):
    path = fake_nvidia_smi(tmp_path, works=True)
    assert plan({"COURSE_VENV": str(bare_venv), "PATH": path})["torch"] == "default"
    assert plan({"COURSE_VENV": str(bare_venv), "COURSE_TORCH": "cuda"})["torch"] == "default"
    assert plan({"COURSE_VENV": str(bare_venv), "COURSE_TORCH": "cpu", "PATH": path})["torch"] == "cpu"


def test_an_active_venv_is_used_and_no_project_venv_is_made(bare_venv, tmp_path):
    unused = tmp_path / "should-not-exist"
    found = plan({"VIRTUAL_ENV": str(bare_venv), "COURSE_VENV": str(unused)})
    assert found["python"] == f"{bare_venv}/bin/python"
    assert not unused.exists()


def test_python_variable_wins_and_an_installed_torch_is_kept(tmp_path):
    unused = tmp_path / "should-not-exist"
    found = plan({"PYTHON": sys.executable, "COURSE_VENV": str(unused), "COURSE_TORCH": "cuda"})
    assert found["python"] == sys.executable
    assert found["torch"] == "keep"  # torch imports here, whatever build it is
    assert not unused.exists()


def expected_stamp(python: str) -> tuple[str, str]:
    digest = hashlib.sha256((REPO_ROOT / "requirements.txt").read_bytes() + (REPO_ROOT / "pyproject.toml").read_bytes()).hexdigest()
    prefix = subprocess.run([python, "-c", "import sys; print(sys.prefix)"], capture_output=True, text=True).stdout.strip()
    return hashlib.sha256(prefix.encode()).hexdigest()[:16], digest


def test_a_matching_stamp_skips_the_install(tmp_path):
    name, digest = expected_stamp(sys.executable)
    (tmp_path / name).write_text(digest + "\n")
    env = {"PYTHON": sys.executable, "COURSE_STAMP_DIR": str(tmp_path)}
    assert plan(env)["install"].startswith("up to date")
    result = run(["setup"], env)
    assert result.returncode == 0, result.stderr
    assert "Installing" not in result.stderr  # pip was not run

    (tmp_path / name).write_text("0" * 64 + "\n")  # requirements changed since the stamp
    assert plan(env)["install"] == "needed"


def test_missing_venv_support_is_a_clear_error(tmp_path):
    result = run(["plan"], {"COURSE_VENV": str(tmp_path / "venv"), "COURSE_BASE_PYTHON": "false"})
    assert result.returncode == 1
    assert "python3-venv" in result.stderr and "PYTHON=" in result.stderr
    assert not (tmp_path / "venv").exists()
