#!/usr/bin/env bash
# Set up the environment, then build the book, executing every chapter. HTML lands in _build/html.
# Any Sphinx warning or notebook error fails the build. Extra arguments go to jupyter-book.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup.sh"
cd "$ROOT"

source "$ROOT/scripts/tiny_env.sh"

start=$SECONDS
echo "build_book: UOE_NB_MODE=$UOE_NB_MODE OMP_NUM_THREADS=$OMP_NUM_THREADS"
# --all rebuilds every page: an incremental build can pass while a chapter fails.
jupyter-book build . --all -W -n --keep-going "$@"
echo "build_book: HTML in $ROOT/_build/html ($((SECONDS - start)) s)"
