#!/usr/bin/env bash
# GPU time of one training step by kernel, on the GPU machine:
#   scripts/gpu-profile.sh [BATCH] [AMP] [extra bench args...]
# Runs `maskrcnn bench train --profile-range` under Nsight Compute with
# collection off until the profiled step (one duration metric, no cache
# flush or clock lock, so kernels run as in training) and prints the
# kernels grouped by name, largest total first. Needs target/gpu.
set -uo pipefail
cd "$(dirname "$0")/.."
source scripts/gpu-env.sh
bs=${1:-16}; amp=${2:-bf16}; shift 2 2>/dev/null || shift $#
NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
[[ -n $NCU ]] || { echo "ncu not found"; exit 1; }
out=${OUT:-/tmp}/ncu-step-bs$bs-$amp.csv
"$NCU" --profile-from-start off --metrics gpu__time_duration.sum --cache-control none --clock-control none \
  --csv --page raw \
  "$B" bench train --batch "$bs" --amp "$amp" --iters 2 --profile-range --json "$@" > "$out"
python3 scripts/ncu_summary.py "$out"
