#!/usr/bin/env bash
# End-to-end training speed on one GPU: our `maskrcnn train`, then
# torchvision's trainer (scripts/peer_train_coco.py), one after the other so
# each has every CPU core, on the same synthetic COCO data and recipe: from
# scratch, images 384-512 px, short side 512, long side <= 683, batch 16,
# bf16, channels-last, 8 loader workers, SECONDS of training each, evaluated
# at the end (test size 544/800). Prints images/s, the GPU's busy share
# (`nvidia-smi dmon` "sm", mean over the run), our data wait and syncs per
# step, and both APs (scored by `maskrcnn eval`). With EVERY and ITERS both
# train ITERS iterations (time budget SECONDS as a cap) and evaluate every
# EVERY: the AP-vs-iteration curves side by side.
#   scripts/gpu-e2e.sh [SECONDS] [EVERY] [ITERS]
set -uo pipefail
cd "$(dirname "$0")/.."
source scripts/gpu-env.sh
S=${1:-90}; EVERY=${2:-0}; ITERS=${3:-100000}
# An iteration cap below the recipe's LR steps: no decay within it (as the peer's 2200/2700).
STEPS=$([ "$ITERS" -lt 2700 ] && echo "--set solver.steps=[]")
# PEER=0 runs ours only.
PEER=${PEER:-1}
W=${WORK:-/tmp/e2e}
rm -rf "$W"; mkdir -p "$W"
"$B" synth --out "$W/data" --train 2000 --val 200 --size 384,512 --seed 0 >/dev/null
D="$W/data"
dmon() { nvidia-smi dmon -s u -d 1 > "$1" 2>&1 & echo $!; }
sm_mean() { awk '$1 ~ /^[0-9]+$/ && $2 ~ /^[0-9]+$/ { s += $2; n++ } END { if (n) printf "%.1f", s / n; else print "n/a" }' "$1"; }

p=$(dmon "$W/ours.dmon")
"$B" train --config configs/demo_gpu.toml \
  --set "data.train_ann='$D/annotations/instances_train2017.json'" --set "data.train_images='$D/train2017'" \
  --set "data.val_ann='$D/annotations/instances_val2017.json'" --set "data.val_images='$D/val2017'" \
  --set 'input.min_size=[512]' --set input.max_size=683 --set solver.ims_per_batch=16 --set solver.reference_batch=16 \
  --set 'precision.amp="bf16"' --set dataloader.workers=8 \
  --set "solver.max_iter=$ITERS" --set "solver.max_seconds=$S" --set "test.eval_period=$EVERY" $STEPS \
  --set solver.checkpoint_period=100000 --set solver.log_period=50 \
  --output "$W/ours" > "$W/ours.log" 2>&1
echo "ours exit $?"
kill "$p"
if [[ $PEER == 1 ]]; then
p=$(dmon "$W/tv.dmon")
PEER_BATCH=16 PEER_AMP=bf16 PEER_MIN_SIZES=512 PEER_MAX_SIZE=683 PEER_WORKERS=8 PEER_MAX_ITER=$ITERS \
  python3 scripts/peer_train_coco.py "$D" "$W/tv" "$S" "$([ "$EVERY" -gt 0 ] && echo "$EVERY" || echo 100000000)" > "$W/tv.log" 2>&1
echo "torchvision exit $?"
kill "$p"
fi

echo "== ours"
python3 - "$W/ours" <<'PY'
import json, sys
out = sys.argv[1]
s = json.load(open(f"{out}/summary.json"))
rows = [json.loads(l) for l in open(f"{out}/metrics.jsonl")]
steps = [r for r in rows if "data_wait_ms" in r]
last = steps[-1] if steps else {}
# Steady state: the log windows after the first (recording, autotuning).
steady = steps[1:] or steps
mean = lambda k: round(sum(r.get(k, 0) for r in steady) / max(len(steady), 1), 3)
evals = [r for r in rows if "bbox_ap" in r]
print(json.dumps(dict(iterations=s.get("iterations"), images_per_s=round(s.get("images_per_s", 0), 1),
                      steady_images_per_s=mean("images_per_s"), step_ms=mean("step_ms"), gpu_ms=mean("gpu_ms"),
                      gpu_busy=mean("gpu_busy"), data_wait_ms=mean("data_wait_ms"),
                      loader_ms_per_batch=mean("loader_ms_per_batch"), loader_ready_ahead=mean("loader_ready_ahead"),
                      syncs_per_step=last.get("syncs_per_step"), graph_replays=last.get("graph_replays"),
                      steps_redone=last.get("steps_redone"), mask_rows=last.get("mask_rows"),
                      final_eval=evals[-1] if evals else None)))
for e in evals:
    print(f"ours iter {e['iteration']} train_s {round(e['seconds'], 1)} bbox_ap {round(e['bbox_ap'], 4)} segm_ap {round(e['segm_ap'], 4)}")
PY
echo "GPU busy (sm %, mean): $(sm_mean "$W/ours.dmon")"
[[ $PEER == 1 ]] || { tail -3 "$W/ours.log"; exit 0; }
echo "== torchvision"
tail -1 "$W/tv.log"
for f in $(ls "$W"/tv/dets_iter_*.json | sort -V); do
  "$B" eval --ann "$D/annotations/instances_val2017.json" --results "$f" --metrics "$W/tv/metrics.json" > /dev/null 2>&1
  python3 -c "import json; m=json.load(open('$W/tv/metrics.json')); print('torchvision', '$(basename "$f" .json)', 'bbox_ap', round(m['bbox']['stats'][0],4), 'segm_ap', round(m['segm']['stats'][0],4))"
done
echo "GPU busy (sm %, mean): $(sm_mean "$W/tv.dmon")"
