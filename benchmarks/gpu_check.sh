#!/usr/bin/env bash
# GPU check (issue 18): ResNet-56 BLKD at bf16-mixed on one GPU, MFU against the card's dense bf16 peak.
#
#   bash benchmarks/gpu_check.sh             # on a machine with an NVIDIA GPU: well under 8 minutes
#   bash benchmarks/gpu_check.sh --dry-run   # anywhere: CPU, fp32, tiny nets and a few steps (the test runs this)
#
# 1. benchmarks/throughput.py: kdl fit vs a plain PyTorch loop, ResNet-56, bf16-mixed, in one process;
# 2. benchmarks/profile_step.py: the BLKD step (ResNet-56 teacher -> ResNet-20 student) phase by phase;
# both print "% of the peak" = MFU, model FLOPs (torch.utils.flop_counter) x steps/s / the card's bf16 peak.
# PYTHON (default .venv/bin/python) and BATCH (default 256) can be set from the environment.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if [[ "${1:-}" == "--dry-run" ]]; then
  echo "gpu_check: dry run on the CPU (fp32, resnet8, 2 steps); no MFU claim"
  "$PY" -m benchmarks.throughput --net resnet8 --batch 16 --image-size 16 --epochs 1 --repeats 1 \
    --warmup-steps 1 --limit-batches 3 --peak-flops 1e11
  "$PY" -m benchmarks.profile_step --scenarios blkd --net resnet8 --teacher-net resnet8 --batch 16 \
    --image-size 16 --steps 2 --warmup-steps 1 --repeats 1 --peak-flops 1e11
  echo "gpu_check: dry run OK"
  exit 0
fi

NAME=$("$PY" -c "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')")
if [[ -z "$NAME" ]]; then
  echo "gpu_check: no CUDA device visible to torch (use --dry-run on a CPU machine)" >&2
  exit 2
fi
# dense (no sparsity) bf16 tensor-core peaks in FLOP/s, from the vendors' data sheets
case "$NAME" in
  *H200*) PEAK=989e12 ;;
  *H100*PCIe*) PEAK=756e12 ;;
  *H100*NVL*) PEAK=835e12 ;;
  *H100*) PEAK=989e12 ;;  # SXM
  *A100*) PEAK=312e12 ;;
  *L40S*) PEAK=362e12 ;;
  *A10G*) PEAK=70e12 ;;
  *) echo "gpu_check: no bf16 peak known for '$NAME'; add it to the table in $0" >&2; exit 2 ;;
esac
BATCH=${BATCH:-256}
echo "gpu_check: $NAME, bf16 peak $PEAK FLOP/s, batch $BATCH"
# digits has 1,293 training images: at batch 256, 5 steps an epoch; more epochs give more timed steps
timeout 240 "$PY" -m benchmarks.throughput --net resnet56 --batch "$BATCH" --epochs 6 --repeats 2 --warmup-steps 1 \
  --accelerator gpu --precision bf16-mixed --peak-flops "$PEAK"
timeout 200 "$PY" -m benchmarks.profile_step --scenarios blkd blkd-cached --net resnet20 --teacher-net resnet56 \
  --batch 128 --steps 6 --warmup-steps 3 --repeats 2 --accelerator gpu --precision bf16-mixed --peak-flops "$PEAK"
echo "gpu_check: done (MFU = the '% of the peak' lines above; the issue's goal is >= 40%)"
