#!/usr/bin/env bash
# The scaling run for a 4- or 8-GPU machine (nvidia-h200-x8 / -x4), one job:
#   1. training throughput on 1, 2, 4 (and 8) GPUs at 8 and 16 images per
#      GPU, 800 x 1000-1333 synthetic images, bf16, channels-last
#      (scripts/gpu-multi.sh with SIZE=800,1333): images/s, efficiency vs
#      1 GPU, step, data-wait and all-reduce time per step;
#   2. end to end: the demo recipe at global batch 64 (8 per GPU on 8 GPUs;
#      learning rate 0.02 x 64/16, warm-up 4x longer), evaluated every EVERY
#      iterations: AP against time and iterations;
#   3. launch paths and faults (scripts/gpu-faults.sh): two "nodes", one
#      rank SIGKILLed mid-run (every rank must exit within 60 s, the cause
#      named), --resume on all GPUs from a checkpoint written on 2.
#   scripts/gpu-scale.sh [ITERS] [E2E_SECONDS] [EVERY]
set -uo pipefail
cd "$(dirname "$0")/.."
source scripts/gpu-env.sh
ITERS=${1:-150}; E2E_S=${2:-240}; EVERY=${3:-250}
G=$(nvidia-smi --query-gpu=index --format=csv,noheader | wc -l)
COUNTS="1 2"; [[ $G -ge 4 ]] && COUNTS="$COUNTS 4"; [[ $G -ge 8 ]] && COUNTS="$COUNTS 8"
W=${WORK:-/tmp/scale}
rm -rf "$W"; mkdir -p "$W"
echo "== 1. throughput on $COUNTS GPUs"
WORK="$W/tp" GPUS="$COUNTS" SIZE=800,1333 scripts/gpu-multi.sh "$ITERS"

echo "== 2. end to end on $G GPUs, global batch $((8 * G))"
"$B" synth --out "$W/data" --train 4000 --val 200 --size 480,640 --seed 0 >/dev/null
D="$W/data"
DATA=(--set "data.train_ann='$D/annotations/instances_train2017.json'" --set "data.train_images='$D/train2017'"
  --set "data.val_ann='$D/annotations/instances_val2017.json'" --set "data.val_images='$D/val2017'")
LR=$(python3 -c "print(0.02 * 8 * $G / 16)")
"$B" launch --nproc-per-node "$G" train --config configs/demo_gpu.toml "${DATA[@]}" \
  --set solver.ims_per_batch=$((8 * G)) --set "solver.base_lr=$LR" --set solver.warmup_iters=800 \
  --set solver.steps=[] --set solver.max_iter=100000 --set "solver.max_seconds=$E2E_S" \
  --set "test.eval_period=$EVERY" --set solver.checkpoint_period=100000 --output "$W/e2e" > "$W/e2e.log" 2>&1
echo "exit $?"
python3 - "$W/e2e/metrics.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
for r in rows:
    if 'bbox_ap' in r:
        print('iteration', r.get('iteration'), 'seconds', round(r.get('seconds', 0), 1),
              'bbox AP', round(r['bbox_ap'], 4), 'segm AP', round(r.get('segm_ap', 0), 4))
rates = [r['images_per_s'] for r in rows if 'images_per_s' in r][2:]
print('steady images/s', round(sum(rates) / max(len(rates), 1), 1))
PY

echo "== 3. launch paths and faults on $G GPUs"
WORK="$W/faults" scripts/gpu-faults.sh
