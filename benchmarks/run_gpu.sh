#!/usr/bin/env bash
# The GPU figures of BENCHMARKS.md (issue "Benchmarks", part 3). Run on a machine with one GPU:
#   bash benchmarks/run_gpu.sh            # appends rows to BENCHMARKS.md
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-BENCHMARKS.md}
python -m benchmarks.gpu_mfu --task=dpo   --shape=olmo-1b   --seq=512 --batch=8  --remat=1 --append="$OUT"
python -m benchmarks.gpu_mfu --task=dpo   --shape=olmo-1b   --seq=512 --batch=8  --remat=1 --attention=cudnn --append="$OUT" || true
python -m benchmarks.gpu_mfu --task=score --shape=olmo-1b   --seq=512 --batch=32 --append="$OUT"
python -m benchmarks.gpu_mfu --task=score --shape=olmo-1b   --seq=512 --batch=32 --attention=cudnn --append="$OUT" || true
python -m benchmarks.gpu_mfu --task=dpo   --shape=olmo-1b   --seq=512 --batch=8  --remat=1 --packing=1 --append="$OUT"
python -m benchmarks.gpu_mfu --task=score --shape=olmo-1b   --seq=512 --batch=32 --packing=1 --append="$OUT"
python -m benchmarks.gpu_mfu --task=fit   --shape=llama3-8b --seq=512 --remat=1 --max_batch=64 --append="$OUT"
