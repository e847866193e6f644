#!/usr/bin/env bash
# Set up the environment, lint, then run the whole suite in one pytest call:
# the unit tests in tests/ and every chapter notebook in book/ (nbval, executed in tiny mode).
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k hygiene`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
start=$SECONDS
trap 'echo "test: finished in $((SECONDS - start)) s"' EXIT
source "$ROOT/scripts/setup.sh"
cd "$ROOT"

source "$ROOT/scripts/tiny_env.sh"
workers="${UOE_NB_TEST_WORKERS:-2}"

failed=0
echo "test: ruff check uoe_nb tests scripts benchmarks"
ruff check uoe_nb tests scripts benchmarks || failed=1
# Chapters: pyflakes rules, which also cover the full-mode branches that tiny mode never runs
# (an undefined name there would only show on a GPU), and code lines that fit the rendered page.
echo "test: ruff check --select F,E501 --line-length 88 book"
ruff check --select F,E501 --line-length 88 book || failed=1

# --dist loadscope keeps all cells of a notebook on one worker (one kernel per notebook; the
# default distribution would scatter them and break their shared state), and the tests of one
# module or class together.
echo "test: pytest tests book (UOE_NB_MODE=$UOE_NB_MODE, $workers workers)"
rc=0
python -m pytest -n "$workers" --dist loadscope -p no:cacheprovider \
  --nbval-lax --nbval-current-env tests book "$@" || rc=$?
if [[ $rc -eq 5 ]]; then
  echo "test: pytest collected no tests, which counts as a failure" >&2
  failed=1
elif [[ $rc -ne 0 ]]; then
  failed=1
fi

if [[ $failed -ne 0 ]]; then
  echo "test: FAILED" >&2
  exit 1
fi
echo "test: all passed"
