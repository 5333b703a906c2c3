#!/usr/bin/env bash
# The training comparison on a 2-GPU machine: our R50-FPN (configs/demo_gpu.toml)
# on GPU 0 and torchvision with the same recipe (scripts/peer_train_coco.py)
# on GPU 1, at the same time, on the same synthetic COCO data, each for
# SECONDS of training (evaluation excluded), evaluated every EVERY iterations
# and at the end; all detections scored by `maskrcnn eval` (= pycocotools).
#   scripts/gpu-train-compare.sh [SECONDS] [EVERY]
set -uo pipefail
cd "$(dirname "$0")/.."
source scripts/gpu-env.sh
SECONDS_BUDGET=${1:-300}; EVERY=${2:-500}
W=${WORK:-/tmp/compare}
rm -rf "$W"; mkdir -p "$W"
nvidia-smi --query-gpu=index,name --format=csv,noheader
"$B" synth --out "$W/data" --train 2000 --val 200 --size 480,640 --seed 0 >/dev/null
D="$W/data"
CUDA_VISIBLE_DEVICES=0 "$B" train --config configs/demo_gpu.toml \
  --set "data.train_ann='$D/annotations/instances_train2017.json'" --set "data.train_images='$D/train2017'" \
  --set "data.val_ann='$D/annotations/instances_val2017.json'" --set "data.val_images='$D/val2017'" \
  --set solver.max_iter=100000 --set "solver.max_seconds=$SECONDS_BUDGET" --set "test.eval_period=$EVERY" \
  --set solver.checkpoint_period=100000 --set solver.log_period=100 \
  --output "$W/ours" > "$W/ours.log" 2>&1 &
ours=$!
CUDA_VISIBLE_DEVICES=1 python3 scripts/peer_train_coco.py "$D" "$W/tv" "$SECONDS_BUDGET" "$EVERY" > "$W/tv.log" 2>&1 &
tv=$!
wait $ours; echo "ours exit $?"; wait $tv; echo "torchvision exit $?"
echo "== ours"; tail -12 "$W/ours.log"
echo "== ours eval points"; grep bbox_ap "$W/ours/metrics.jsonl"
echo "== torchvision"; tail -3 "$W/tv.log"
for f in $(ls "$W"/tv/dets_iter_*.json | sort -V); do
  it=$(basename "$f" .json | sed 's/dets_iter_//')
  secs=$(grep "\"dets_iter_$it.json\"" "$W/tv/log.jsonl" | python3 -c 'import json,sys; print(round(json.loads(sys.stdin.readline())["seconds"],1))')
  "$B" eval --ann "$D/annotations/instances_val2017.json" --results "$f" --metrics "$W/tv/metrics_$it.json" > /dev/null 2>&1
  python3 -c "import json; m=json.load(open('$W/tv/metrics_$it.json')); print('torchvision iter $it train_s $secs bbox_ap', round(m['bbox']['stats'][0],4), 'segm_ap', round(m['segm']['stats'][0],4))"
done
