#!/usr/bin/env bash
# One entry point for people and CI. Each command installs what it needs first
# (idempotent: a second run only checks), so a fresh machine needs nothing else.
#
#   ./course.sh book     build the course site from the notebooks (HTML in _build/html/)
#   ./course.sh test     run the test suite, then every book notebook with nbval (offline, quick mode)
#   ./course.sh demo     pretrain a small GPT on "The Verdict", print losses and a sample
#   ./course.sh grade-demo  autograde a made-up class with nbgrader in a temporary folder; print the scores
#   ./course.sh setup    install only (--gpu: the CUDA build of torch; --cpu: the CPU build; --force: reinstall)
#   ./course.sh plan     say which Python and torch build setup would use, and whether anything is to install
set -euo pipefail
cd "$(dirname "$0")"
# Which Python: $PYTHON if set; else the active virtual environment; else the project's
# own .venv (created on first use). Never the system Python: Debian/Ubuntu refuse pip
# installs there (PEP 668), and the course should not mix with system packages.
VENV_DIR=${COURSE_VENV:-.venv}
TORCH_VERSION=2.13.0
TORCH_CPU_INDEX=${COURSE_TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}
STAMP_DIR=${COURSE_STAMP_DIR:-.cache/install}

say() { printf '==> %s\n' "$*" >&2; }

choose_python() {
  if [ -n "${PYTHON:-}" ]; then
    say "Python: $PYTHON (from \$PYTHON)"
  elif [ -n "${VIRTUAL_ENV:-}" ] && [ -x "$VIRTUAL_ENV/bin/python" ]; then
    PYTHON="$VIRTUAL_ENV/bin/python"
    say "Python: $PYTHON (the active virtual environment)"
  else
    if [ ! -x "$VENV_DIR/bin/python" ]; then
      local base=${COURSE_BASE_PYTHON:-python3}
      say "Creating a virtual environment in $VENV_DIR (with $base)"
      if ! "$base" -m venv "$VENV_DIR"; then
        rm -rf "$VENV_DIR"
        echo "course.sh: could not create $VENV_DIR with '$base -m venv'. On Debian/Ubuntu install it with" >&2
        echo "  sudo apt install python3-venv" >&2
        echo "or point PYTHON at a Python 3.10+ whose packages you may install into (PYTHON=/path/to/python ./course.sh ...)." >&2
        exit 1
      fi
    fi
    PYTHON="$VENV_DIR/bin/python"
    say "Python: $PYTHON (the project's virtual environment; remove $VENV_DIR to start afresh)"
  fi
}

# The stamp records what was installed: the hash of the files that define the install
# and the environment it went into. When it matches, setup does nothing (about a second).
install_hash() {
  cat requirements.txt pyproject.toml | "$PYTHON" -c 'import hashlib, sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())'
}
stamp_file() {
  local prefix
  prefix=$("$PYTHON" -c 'import sys; print(sys.prefix)')
  printf '%s/%s' "$STAMP_DIR" "$(printf '%s' "$prefix" | "$PYTHON" -c 'import hashlib, sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest()[:16])')"
}
installed_ok() {  # the stamp matches and the key packages are still there (found, not imported: fast)
  local stamp
  stamp=$(stamp_file)
  [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$(install_hash)" ] \
    && "$PYTHON" -c 'import importlib.util as u, sys; sys.exit(any(u.find_spec(m) is None for m in ("torch", "tiktoken", "nbgrader", "course_utils")))' 2>/dev/null
}

# torch: keep one that is installed (a CUDA build you chose stays); otherwise the CPU build
# on Linux without an NVIDIA GPU (about 200 MB instead of about 2.7 GB of CUDA wheels),
# PyPI's default build elsewhere or with --gpu.
torch_plan() {  # prints: keep | cpu | default
  if "$PYTHON" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("torch") is None)' 2>/dev/null; then echo keep; return; fi
  case "${COURSE_TORCH:-auto}" in
    cuda|gpu) echo default; return ;;
    cpu) echo cpu; return ;;
  esac
  if [ "$(uname -s)" = Linux ] && ! (command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1); then
    echo cpu
  else
    echo default
  fi
}

pip_install() { "$PYTHON" -m pip install --disable-pip-version-check --progress-bar on "$@"; }

install_torch() {
  case "$(torch_plan)" in
    keep)
      say "torch $("$PYTHON" -c 'import torch; print(torch.__version__)') is installed: kept" ;;
    cpu)
      say "Installing torch $TORCH_VERSION, CPU build (about 200 MB; --gpu for the CUDA build)"
      if ! pip_install --timeout 20 --retries 1 --index-url "$TORCH_CPU_INDEX" "torch==$TORCH_VERSION"; then
        say "PyTorch's CPU index ($TORCH_CPU_INDEX) did not answer: installing torch $TORCH_VERSION from the default index"
        pip_install "torch==$TORCH_VERSION"
      fi ;;
    default)
      say "Installing torch $TORCH_VERSION from the default index (on Linux with CUDA: about 2.7 GB)"
      pip_install "torch==$TORCH_VERSION" ;;
  esac
}

setup() {
  for arg in "$@"; do
    case "$arg" in
      --gpu) COURSE_TORCH=cuda ;;
      --cpu) COURSE_TORCH=cpu ;;
      --force) rm -f "$(stamp_file)" ;;
    esac
  done
  if installed_ok; then
    return 0
  fi
  local start=$SECONDS
  "$PYTHON" -m pip --version >/dev/null 2>&1 || "$PYTHON" -m ensurepip --upgrade
  install_torch
  say "Installing the pinned packages of requirements.txt (about 150 MB the first time)"
  pip_install -r requirements.txt
  say "Installing this repository in editable mode (import course_utils)"
  pip_install --no-deps -e .
  mkdir -p "$STAMP_DIR"
  install_hash > "$(stamp_file)"
  say "Installed in $(( SECONDS - start )) s; later commands skip this step until requirements.txt or pyproject.toml change"
}

jupyter_book() {  # jupyter-book of this Python (the package has no `python -m` entry point)
  "$PYTHON" -c 'from jupyter_book.cli.main import main; main()' "$@"
}

cmd=${1:-help}
shift || true
case "$cmd" in
  setup|plan|demo|book|test|grade-demo) choose_python ;;
esac
case "$cmd" in
  setup) setup "$@" ;;
  plan)
    echo "python: $PYTHON"
    echo "torch: $(torch_plan)"
    if installed_ok; then echo "install: up to date ($(stamp_file))"; else echo "install: needed"; fi
    ;;
  demo)
    setup
    "$PYTHON" -m course_utils.demo "$@"
    ;;
  book)
    setup
    start=$(date +%s)
    # -W: any warning fails the build; -n: also warn on unresolved references. The pages
    # show the outputs committed with the notebooks (see README, "The course site").
    jupyter_book build -W -n --keep-going . "$@"
    echo "Site built in $(( $(date +%s) - start )) s: open _build/html/index.html (or index.html under --path-output)"
    ;;
  test)
    setup
    export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 MPLBACKEND=Agg
    if [ $# -gt 0 ]; then  # with arguments, pytest runs just those
      exec "$PYTHON" -m pytest -q "$@"
    fi
    status=0
    "$PYTHON" -m pytest -q tests/ || status=$?  # exit code 5 (nothing collected) counts as a failure here
    if compgen -G "book/*.ipynb" > /dev/null; then
      # every notebook in quick mode, with the inline plot backend readers get (no MPLBACKEND);
      # the outputs of cells marked `# NBVAL_CHECK_OUTPUT` must match the committed ones
      env -u MPLBACKEND COURSE_SMOKE=1 "$PYTHON" -m pytest -q --nbval-lax --nbval-current-env \
        --nbval-sanitize-with nbval_sanitize.cfg --nbval-cell-timeout=900 book/ || status=$?
    else
      echo "book/ holds no notebooks: nothing for nbval to run"
    fi
    exit "$status"
    ;;
  grade-demo)
    setup
    COURSE_SMOKE=${COURSE_SMOKE:-1} "$PYTHON" -m course_utils.grading.demo "$@"
    ;;
  *)
    sed -n '2,10p' "$0"
    exit 2
    ;;
esac
