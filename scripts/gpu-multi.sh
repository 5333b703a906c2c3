#!/usr/bin/env bash
# Multi-GPU check on a 2-GPU machine (nvidia-h100-x2): the launch test
# (2 ranks take the mean-gradient step), then training throughput of the
# demo recipe at a global batch of 16 on 1 GPU and on 2 GPUs (`launch`).
#   scripts/gpu-multi.sh [ITERS]
set -uo pipefail
cd "$(dirname "$0")/.."
source scripts/gpu-env.sh
ITERS=${1:-200}
W=${WORK:-/tmp/multi}
nvidia-smi --query-gpu=index,name --format=csv,noheader
scripts/gpu-check.sh gpu_launch 2>&1 | grep -E "^test |test result: ok. [1-9]|panicked|worst|gpu-check" 
rm -rf "$W"; mkdir -p "$W"
"$B" synth --out "$W/data" --train 2000 --val 0 --size 480,640 --seed 0 >/dev/null
D="$W/data"
SETS=(--config configs/demo_gpu.toml
  --set "data.train_ann='$D/annotations/instances_train2017.json'" --set "data.train_images='$D/train2017'"
  --set solver.ims_per_batch=16 --set "solver.max_iter=$ITERS" --set solver.log_period=50
  --set solver.checkpoint_period=100000 --set solver.steps=[] --set test.eval_period=0)
for n in 1 2; do
  if [[ $n == 1 ]]; then
    CUDA_VISIBLE_DEVICES=0 "$B" train "${SETS[@]}" --output "$W/gpus$n" > "$W/gpus$n.log" 2>&1
  else
    "$B" launch --nproc-per-node 2 train "${SETS[@]}" --output "$W/gpus$n" > "$W/gpus$n.log" 2>&1
  fi
  echo "== $n GPU(s): exit $?"
  tail -4 "$W/gpus$n.log"
  # Steady state: images/s of the last logged windows (after warm-up).
  python3 -c "
import json
rows = [json.loads(l) for l in open('$W/gpus$n/metrics.jsonl') if 'images_per_s' in l]
tail = [r['images_per_s'] for r in rows[2:]] or [r['images_per_s'] for r in rows]
mean = lambda k: round(sum(r.get(k, 0) for r in rows[2:] or rows) / len(rows[2:] or rows), 1)
print('$n GPU(s): steady images/s', round(sum(tail) / len(tail), 1), 'loss', round(rows[-1]['loss'], 3),
      'peak GiB', round(rows[-1].get('max_memory_gib', 0), 1), 'data wait ms/step', mean('data_wait_ms'),
      'all-reduce ms/step', mean('allreduce_ms'))"
done
