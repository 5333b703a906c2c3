#!/usr/bin/env bash
# Multi-GPU check on a 2-GPU machine (nvidia-h200-x2): the launch test
# (2 ranks take the mean-gradient step), then training throughput of the
# demo recipe on 1 GPU and on 2 GPUs (`launch`) at the same batch per GPU
# (PER_GPU, default "8 16"): efficiency = 2-GPU images/s / (2 x 1-GPU).
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
  --set "solver.max_iter=$ITERS" --set solver.log_period=50
  --set solver.checkpoint_period=100000 --set solver.steps=[] --set test.eval_period=0)
# The same batch per GPU on 1 and 2 GPUs (global batch = per-GPU batch x GPUs).
for per in ${PER_GPU:-8 16}; do
for n in 1 2; do
  run="$W/bs${per}-gpus$n"
  if [[ $n == 1 ]]; then
    CUDA_VISIBLE_DEVICES=0 "$B" train "${SETS[@]}" --set solver.ims_per_batch=$per --output "$run" > "$run.log" 2>&1
  else
    "$B" launch --nproc-per-node 2 train "${SETS[@]}" --set solver.ims_per_batch=$((2 * per)) --output "$run" > "$run.log" 2>&1
  fi
  echo "== $per per GPU, $n GPU(s): exit $?"
  tail -2 "$run.log"
  # Steady state: images/s of the last logged windows (after warm-up).
  python3 -c "
import json
rows = [json.loads(l) for l in open('$run/metrics.jsonl') if 'images_per_s' in l]
tail = [r['images_per_s'] for r in rows[2:]] or [r['images_per_s'] for r in rows]
mean = lambda k: round(sum(r.get(k, 0) for r in rows[2:] or rows) / len(rows[2:] or rows), 1)
print('$per per GPU, $n GPU(s): steady images/s', round(sum(tail) / len(tail), 1), 'loss', round(rows[-1]['loss'], 3),
      'step ms', mean('step_ms'), 'data wait ms/step', mean('data_wait_ms'), 'all-reduce ms/step', mean('allreduce_ms'))"
done
done
