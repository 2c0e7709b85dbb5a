#!/usr/bin/env bash
# One entry point for people and CI. Each command installs what it needs first
# (idempotent: a second run only checks), so a fresh machine needs nothing else.
#
#   ./course.sh demo     pretrain a small GPT on "The Verdict", print losses and a sample
#   ./course.sh test     run the test suite (offline, quick mode)
#   ./course.sh setup    install only
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}

setup() {
  # torch first, pinned: 2.13.0 is the CPU build (a bare `torch` would pull a multi-GB CUDA build).
  # On a CUDA machine, install the matching torch build yourself first; see README "Using a GPU".
  if ! "$PYTHON" -c "import torch" 2>/dev/null; then
    "$PYTHON" -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
  fi  # an existing torch (e.g. a CUDA build you installed) is kept
  "$PYTHON" -m pip install --quiet --disable-pip-version-check -r requirements.txt
  "$PYTHON" -m pip install --quiet --disable-pip-version-check --no-deps -e .
}

cmd=${1:-help}
shift || true
case "$cmd" in
  setup) setup ;;
  demo)
    setup
    "$PYTHON" -m course_utils.demo "$@"
    ;;
  test)
    setup
    export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 MPLBACKEND=Agg
    "$PYTHON" -m pytest -q "$@"
    ;;
  *)
    sed -n '2,9p' "$0"
    exit 2
    ;;
esac
