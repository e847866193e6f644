#!/usr/bin/env bash
# Create .venv (if missing) and install uoe_nb with the book and test extras into it.
# Run it, or source it from another script: afterwards .venv/bin is first on PATH.
# A stamp file in .venv makes a second run instant while pyproject.toml and the
# constraints are unchanged. Override the interpreter with UOE_NB_PYTHON, the venv with UOE_NB_VENV.
if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  set -euo pipefail
fi

UOE_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
UOE_VENV="${UOE_NB_VENV:-$UOE_ROOT/.venv}"
UOE_STAMP="$UOE_VENV/.uoe_nb_installed"

# Everything runs offline: models and data come from the repository or are built locally.
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
export TOKENIZERS_PARALLELISM="${TOKENIZERS_PARALLELISM:-false}"

uoe_pick_python() {
  if [[ -n "${UOE_NB_PYTHON:-}" ]]; then echo "$UOE_NB_PYTHON"
  elif command -v python3.11 >/dev/null 2>&1; then echo python3.11
  else echo python3
  fi
}

uoe_has_gpu() {
  command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1
}

uoe_has_cuda_torch() {
  "$UOE_VENV/bin/python" -c 'import sys, torch; sys.exit(0 if torch.version.cuda else 1)' >/dev/null 2>&1
}

uoe_stamp_fresh() {
  [[ -x "$UOE_VENV/bin/python" && -f "$UOE_STAMP" ]] || return 1
  local f
  for f in pyproject.toml constraints/cpu.txt scripts/setup.sh; do
    [[ "$UOE_STAMP" -nt "$UOE_ROOT/$f" ]] || return 1
  done
}

uoe_install() {
  if [[ ! -x "$UOE_VENV/bin/python" ]]; then
    local py
    py="$(uoe_pick_python)"
    echo "setup: creating $UOE_VENV with $py"
    "$py" -m venv "$UOE_VENV"
  fi
  local pip=("$UOE_VENV/bin/python" -m pip)
  "${pip[@]}" install -q --upgrade pip

  # On a CPU machine pin torch to the tested CPU release. Where a GPU or a CUDA torch is
  # present, keep whatever CUDA torch is there (pyproject.toml only asks for torch>=2.4).
  local constraint=()
  if ! uoe_has_cuda_torch && ! uoe_has_gpu; then
    constraint=(-c "$UOE_ROOT/constraints/cpu.txt")
    echo "setup: CPU machine, installing torch from constraints/cpu.txt"
    "${pip[@]}" install -q torch "${constraint[@]}"
  else
    echo "setup: GPU or CUDA torch found, keeping the installed torch"
  fi
  echo "setup: installing uoe_nb[book,test] (editable)"
  (cd "$UOE_ROOT" && "${pip[@]}" install -q -e ".[book,test]" "${constraint[@]}")
  touch "$UOE_STAMP"
}

if uoe_stamp_fresh; then
  echo "setup: $UOE_VENV is up to date"
elif ! (set -euo pipefail; uoe_install); then
  echo "setup: installation failed, see the pip output above" >&2
  return 1 2>/dev/null || exit 1
fi

export VIRTUAL_ENV="$UOE_VENV"
export PATH="$UOE_VENV/bin:$PATH"
