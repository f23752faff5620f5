#!/usr/bin/env bash
# Bootstrap a virtual environment and run a job.
#   ./dev.sh demo    the default recipe end to end on the built-in SmolLM2-135M (about 11 minutes on 2 cores)
#   ./dev.sh test    run the test suite
#   ./dev.sh bench   run the benchmarks in bench/
# Needs only Python 3.11 (PYTHON=... to pick another interpreter).
set -euo pipefail
cd "$(dirname "$0")"
PYTHON="${PYTHON:-python3.11}"
VENV="${VENV:-.venv}"
STAMP="$VENV/.ztt-installed"

if [ ! -f "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ]; then
  "$PYTHON" -m venv "$VENV"
  # a pinned CPU torch first: a looser requirement would pull a multi-GB CUDA build
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check "torch==${TORCH_VERSION:-2.13.0}"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e ".[test]"
  touch "$STAMP"
fi

job="${1:-help}"
shift || true
case "$job" in
  demo)
    "$VENV/bin/ztt" run recipes/smollm2-135m-shakespeare.yaml "$@" ;;
  test)
    "$VENV/bin/python" -m pytest "$@" ;;
  bench)
    "$VENV/bin/python" bench/attention.py "$@"
    "$VENV/bin/python" bench/convert.py "$@"
    "$VENV/bin/python" bench/overhead.py --readme docs/results.md
    "$VENV/bin/python" bench/compare.py bench/compare.yaml --readme docs/results.md
    "$VENV/bin/python" bench/compare.py bench/compare-cpu-high.yaml --readme docs/results.md ;;
  *)
    echo "usage: ./dev.sh {demo|test|bench} [args...]" >&2
    exit 2 ;;
esac
