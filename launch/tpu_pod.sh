#!/usr/bin/env bash
# Run a displacement_jax command on every worker of a Cloud TPU VM (single host or pod slice).
#
#   launch/tpu_pod.sh [flags] -- python -m displacement_jax.train --config=configs/x.py --config.output_dir=/tmp/run
#
# Steps: reuse the TPU VM if `describe` finds it, else create it; copy the package (a tarball of this
# checkout, or `--install=pip` to pip-install it from PIP_SPEC) onto every worker (--worker=all); install
# jax[tpu] and the package; run the same command on all workers (JAX initialises multi-host itself);
# collect the output directory from worker 0 (gsutil rsync to --gcs, or scp to --collect-to).
# --dry-run prints every gcloud command (prefixed '+ ') and runs none.
#
# Flags (environment variable in brackets):
#   --project P          [TPU_PROJECT]        GCP project
#   --zone Z             [TPU_ZONE]           default us-central2-b
#   --accelerator-type A [TPU_ACCELERATOR]    default v4-8 (v4-32, v5litepod-16, ...)
#   --version V          [TPU_VERSION]        TPU VM runtime, default tpu-ubuntu2204-base
#   --tpu-name N         [TPU_NAME]           default displacement-jax
#   --install copy|pip   [TPU_INSTALL]        copy this checkout (default) or pip install PIP_SPEC
#   --output-dir D       [TPU_OUTPUT_DIR]     remote output dir to collect (default: value of --config.output_dir)
#   --gcs gs://bucket/p  [TPU_GCS]            collect with gsutil rsync from worker 0
#   --collect-to DIR     [TPU_COLLECT_TO]     collect with scp from worker 0 (default ./tpu_outputs)
#   --spot                                    create a spot VM
#   --delete                                  delete the TPU VM at the end
#   --dry-run                                 print the commands only
set -euo pipefail

PROJECT="${TPU_PROJECT:-}"
ZONE="${TPU_ZONE:-us-central2-b}"
ACCEL="${TPU_ACCELERATOR:-v4-8}"
VERSION="${TPU_VERSION:-tpu-ubuntu2204-base}"
NAME="${TPU_NAME:-displacement-jax}"
INSTALL="${TPU_INSTALL:-copy}"
PIP_SPEC="${PIP_SPEC:-displacement_jax}"
OUTPUT_DIR="${TPU_OUTPUT_DIR:-}"
GCS="${TPU_GCS:-}"
COLLECT_TO="${TPU_COLLECT_TO:-./tpu_outputs}"
SPOT=0
DELETE=0
DRY_RUN=0

usage() { sed -n '2,26p' "$0" | sed 's/^# \{0,1\}//'; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --project) PROJECT="$2"; shift 2 ;;
    --zone) ZONE="$2"; shift 2 ;;
    --accelerator-type) ACCEL="$2"; shift 2 ;;
    --version) VERSION="$2"; shift 2 ;;
    --tpu-name) NAME="$2"; shift 2 ;;
    --install) INSTALL="$2"; shift 2 ;;
    --output-dir) OUTPUT_DIR="$2"; shift 2 ;;
    --gcs) GCS="$2"; shift 2 ;;
    --collect-to) COLLECT_TO="$2"; shift 2 ;;
    --spot) SPOT=1; shift ;;
    --delete) DELETE=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) echo "error: unknown flag $1 (put the command to run after --)" >&2; exit 2 ;;
  esac
done

if [[ $# -eq 0 ]]; then
  echo "error: no command given; usage: $0 [flags] -- python -m displacement_jax.train --config=..." >&2
  exit 2
fi
if [[ "$INSTALL" != copy && "$INSTALL" != pip ]]; then
  echo "error: --install must be copy or pip, got '$INSTALL'" >&2
  exit 2
fi
if [[ -z "$PROJECT" && $DRY_RUN -eq 0 ]]; then
  echo "error: --project (or TPU_PROJECT) is required" >&2
  exit 2
fi
PROJECT="${PROJECT:-my-project}"
CMD="$(printf '%q ' "$@")"
if [[ -z "$OUTPUT_DIR" ]]; then
  for a in "$@"; do
    case "$a" in --config.output_dir=*) OUTPUT_DIR="${a#--config.output_dir=}" ;; esac
  done
fi

COMMON=(--zone="$ZONE" --project="$PROJECT")
REMOTE_DIR='~/displacement_jax'

# shellcheck source=launch/lib.sh
source "$(cd "$(dirname "$0")" && pwd)/lib.sh"   # quote_args, run (print, and run unless --dry-run)

on_all_workers() {
  run gcloud compute tpus tpu-vm ssh "$NAME" "${COMMON[@]}" --worker=all --command="$1"
}

# 1. Create or reuse the TPU VM.
echo "+ gcloud compute tpus tpu-vm describe $NAME ${COMMON[*]}"
if [[ $DRY_RUN -eq 0 ]] && gcloud compute tpus tpu-vm describe "$NAME" "${COMMON[@]}" >/dev/null 2>&1; then
  echo "reusing TPU VM $NAME"
else
  [[ $DRY_RUN -eq 1 ]] && echo "# (if describe fails:)"
  CREATE=(gcloud compute tpus tpu-vm create "$NAME" "${COMMON[@]}" --accelerator-type="$ACCEL" --version="$VERSION")
  [[ $SPOT -eq 1 ]] && CREATE+=(--spot)
  run "${CREATE[@]}"
fi

# 2. Put the package on every worker and install it with jax[tpu].
if [[ "$INSTALL" == copy ]]; then
  ROOT="$(cd "$(dirname "$0")/.." && pwd)"
  TARBALL="/tmp/displacement_jax_src.tar.gz"
  run tar -czf "$TARBALL" -C "$ROOT" --exclude=.venv --exclude=runs --exclude=.git --exclude='*.pyc' .
  run gcloud compute tpus tpu-vm scp "$TARBALL" "$NAME:~/" "${COMMON[@]}" --worker=all
  on_all_workers "mkdir -p $REMOTE_DIR && tar -xzf ~/displacement_jax_src.tar.gz -C $REMOTE_DIR && pip install -q -U 'jax[tpu]' && pip install -q -e $REMOTE_DIR"
else
  on_all_workers "pip install -q -U 'jax[tpu]' && pip install -q -U '$PIP_SPEC' && mkdir -p $REMOTE_DIR"
fi

# 3. The same command on all workers (jax.distributed initialises from the TPU metadata).
on_all_workers "cd $REMOTE_DIR && HF_HUB_ENABLE_HF_TRANSFER=0 $CMD"

# 4. Collect the outputs from worker 0 (process 0 writes metrics, plots and the HF export).
if [[ -n "$OUTPUT_DIR" ]]; then
  REMOTE_OUT="$OUTPUT_DIR"
  [[ "$REMOTE_OUT" != /* ]] && REMOTE_OUT="$REMOTE_DIR/$OUTPUT_DIR"
  if [[ -n "$GCS" ]]; then
    run gcloud compute tpus tpu-vm ssh "$NAME" "${COMMON[@]}" --worker=0 \
      --command="gsutil -m rsync -r $REMOTE_OUT ${GCS%/}/$(basename "$OUTPUT_DIR")"
  else
    run mkdir -p "$COLLECT_TO"
    run gcloud compute tpus tpu-vm scp --recurse "$NAME:$REMOTE_OUT" "$COLLECT_TO/" "${COMMON[@]}" --worker=0
  fi
else
  echo "# no --output-dir and no --config.output_dir=... in the command: nothing to collect"
fi

# 5. Optionally delete the VM.
if [[ $DELETE -eq 1 ]]; then
  run gcloud compute tpus tpu-vm delete "$NAME" "${COMMON[@]}" --quiet
fi
