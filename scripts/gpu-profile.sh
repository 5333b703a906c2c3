#!/usr/bin/env bash
# GPU time of one training step by kernel, on the GPU machine:
#   scripts/gpu-profile.sh [BATCH] [AMP] [extra bench args...]
#       `maskrcnn bench train --profile-range` (800 × 1000-1333 images)
#   scripts/gpu-profile.sh e2e
#       iteration 30 of `maskrcnn train` on the 512-px recipe of
#       scripts/gpu-e2e.sh (synthetic COCO, batch 16, bf16)
# Runs under Nsight Compute with collection off until the profiled step (one
# duration metric, no cache flush or clock lock, so kernels run as in
# training) and prints the kernels grouped by name, largest total first.
# Environment: ITER=N profiles iteration N of the e2e run (default 30; later
# iterations have trained proposals); KERNEL=REGEX instead prints Nsight
# Compute's speed-of-light, occupancy, memory and warp-stall sections for
# the kernels matching REGEX in that step. Needs target/gpu.
set -uo pipefail
cd "$(dirname "$0")/.."
source scripts/gpu-env.sh
NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
[[ -n $NCU ]] || { echo "ncu not found"; exit 1; }
ncu_run() {
  if [[ -n ${KERNEL:-} ]]; then
    "$NCU" --profile-from-start off --kernel-name "regex:$KERNEL" --section SpeedOfLight --section Occupancy \
      --section MemoryWorkloadAnalysis --section WarpStateStats --section LaunchStats "$@"
  else
    "$NCU" --profile-from-start off --metrics gpu__time_duration.sum --cache-control none --clock-control none \
      --csv --page raw "$@"
  fi
}
ITER=${ITER:-30}
if [[ ${1:-} == e2e ]]; then
  W=${WORK:-/tmp/profile-e2e}
  rm -rf "$W"; mkdir -p "$W"
  "$B" synth --out "$W/data" --train 400 --val 20 --size 384,512 --seed 0 >/dev/null
  D="$W/data"
  out=${OUT:-/tmp}/ncu-train-e2e.csv
  ncu_run "$B" train --config configs/demo_gpu.toml \
    --set "data.train_ann='$D/annotations/instances_train2017.json'" --set "data.train_images='$D/train2017'" \
    --set "data.val_ann='$D/annotations/instances_val2017.json'" --set "data.val_images='$D/val2017'" \
    --set 'input.min_size=[512]' --set input.max_size=683 --set solver.ims_per_batch=16 --set solver.reference_batch=16 \
    --set 'precision.amp="bf16"' --set dataloader.workers=8 --set solver.max_iter=$((ITER + 2)) --set 'solver.steps=[]' \
    --set test.eval_period=0 --set solver.checkpoint_period=100000 --profile-iter "$ITER" \
    --output "$W/out" > "$out" 2>"$W/train.err"
else
  bs=${1:-16}; amp=${2:-bf16}; shift 2 2>/dev/null || shift $#
  out=${OUT:-/tmp}/ncu-step-bs$bs-$amp.csv
  ncu_run "$B" bench train --batch "$bs" --amp "$amp" --iters 2 --profile-range --json "$@" > "$out"
fi
if [[ -n ${KERNEL:-} ]]; then cat "$out"; else python3 scripts/ncu_summary.py "$out"; fi
