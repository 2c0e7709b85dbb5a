#!/usr/bin/env bash
# One entry point for people and CI. Each command installs what it needs first
# (idempotent: a second run only checks), so a fresh machine needs nothing else.
#
#   ./course.sh book     build the course site from the notebooks (HTML in _build/html/)
#   ./course.sh test     run the test suite, then every book notebook with nbval (offline, quick mode)
#   ./course.sh demo     pretrain a small GPT on "The Verdict", print losses and a sample
#   ./course.sh grade-demo  autograde a made-up class with nbgrader in a temporary folder; print the scores
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

jupyter_book() {  # jupyter-book of this Python (the package has no `python -m` entry point)
  "$PYTHON" -c 'from jupyter_book.cli.main import main; main()' "$@"
}

cmd=${1:-help}
shift || true
case "$cmd" in
  setup) setup ;;
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
    sed -n '2,9p' "$0"
    exit 2
    ;;
esac
