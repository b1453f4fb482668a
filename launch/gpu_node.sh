#!/usr/bin/env bash
# Single-node GPU run: install jax[cuda12] and this package, set XLA flags, run a train/score command.
#
#   launch/gpu_node.sh [--dry-run] [--no-install] [--venv DIR] -- python -m displacement_jax.train --config=configs/x.py
#   launch/gpu_node.sh -- python -m displacement_jax.train --config=configs/sorry.py:model=llama3_8b_instruct,variant=all
#
# With no command after --, runs `python -m displacement_jax.train "$CONFIG"` from the CONFIG variable.
# Environment: CUDA_VISIBLE_DEVICES (GPUs to use), XLA_MEM_FRACTION (default 0.9), EXTRA_XLA_FLAGS.
# --dry-run prints every command (prefixed '+ ') and the exported environment, runs nothing.
set -euo pipefail

DRY_RUN=0
INSTALL=1
VENV="${VENV:-}"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY_RUN=1; shift ;;
    --no-install) INSTALL=0; shift ;;
    --venv) VENV="$2"; shift 2 ;;
    -h|--help) sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    --) shift; break ;;
    *) echo "error: unknown flag $1 (put the command to run after --)" >&2; exit 2 ;;
  esac
done
if [[ $# -eq 0 ]]; then
  if [[ -z "${CONFIG:-}" ]]; then
    echo "error: no command after -- and no CONFIG=configs/<name>.py set" >&2
    exit 2
  fi
  set -- python -m displacement_jax.train "--config=$CONFIG"
fi

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
# shellcheck source=launch/lib.sh
source "$ROOT/launch/lib.sh"   # quote_args, run
export_var() {
  echo "+ export $1=$(quote_args "$2")"
  export "$1=$2"
}

if [[ -n "$VENV" ]]; then
  [[ -d "$VENV" ]] || run python3 -m venv "$VENV"
  if [[ $DRY_RUN -eq 0 ]]; then source "$VENV/bin/activate"; else echo "+ source $VENV/bin/activate"; fi
fi
if [[ $INSTALL -eq 1 ]]; then
  run python -m pip install -q -U "jax[cuda12]"
  run python -m pip install -q -e "$ROOT"
fi

export_var XLA_PYTHON_CLIENT_MEM_FRACTION "${XLA_MEM_FRACTION:-0.9}"
export_var XLA_FLAGS "--xla_gpu_enable_latency_hiding_scheduler=true --xla_gpu_enable_triton_gemm=false ${EXTRA_XLA_FLAGS:-}"
export_var TF_CPP_MIN_LOG_LEVEL 1
run python -c "import jax; print('devices:', jax.devices())"
cd "$ROOT"
run "$@"
