#!/usr/bin/env bash
# Multi-GPU training throughput on one machine: the launch test (2 ranks
# take the mean-gradient step), then `maskrcnn train` on 1 GPU and through
# `launch` on N GPUs at the same batch per GPU (global batch = per-GPU
# batch x GPUs), steady-state images/s, step time, data wait and all-reduce
# time per step, and the efficiency against one GPU; at the end the loss
# curves of runs with the same global batch (1 GPU at N x B, N GPUs at B).
#   scripts/gpu-multi.sh [ITERS]
# Environment:
#   GPUS="1 2"        GPU counts to run (1 first: the reference)
#   PER_GPU="8 16"    batches per GPU
#   SIZE=480,640      synthetic image sizes; 480,640 trains the demo recipe
#                     (fp16, five scales), 800,1333 the benchmark's setting
#                     (short side 800, long side <= 1333, bf16)
#   AUTOTUNE=true     cuDNN autotuning at 800,1333 (false: every new shape
#                     starts at once; runs of a few hundred steps are
#                     otherwise dominated by autotuning ~30 shapes)
#   TRAIN_IMAGES=2000 synthetic training images
#   LAUNCH_TEST=1     0 skips the 2-rank launch test at the start
#   BUCKET_MB=25      solver.allreduce_bucket_mb of the multi-GPU runs, one
#                     run per value ("0 25": one all-reduce after the
#                     backward, then 25-MiB buckets overlapping it)
set -uo pipefail
cd "$(dirname "$0")/.."
source scripts/gpu-env.sh
ITERS=${1:-200}
GPUS=${GPUS:-1 2}
PER_GPU=${PER_GPU:-8 16}
SIZE=${SIZE:-480,640}
W=${WORK:-/tmp/multi}
nvidia-smi --query-gpu=index,name --format=csv,noheader
[[ ${LAUNCH_TEST:-1} == 1 ]] && scripts/gpu-check.sh gpu_launch 2>&1 | grep -E "^test |test result: ok. [1-9]|panicked|worst|gpu-check"
rm -rf "$W"; mkdir -p "$W"
"$B" synth --out "$W/data" --train "${TRAIN_IMAGES:-2000}" --val 0 --size "$SIZE" --seed 0 >/dev/null
D="$W/data"
SETS=(--config configs/demo_gpu.toml
  --set "data.train_ann='$D/annotations/instances_train2017.json'" --set "data.train_images='$D/train2017'"
  --set "solver.max_iter=$ITERS" --set solver.log_period=50
  --set solver.checkpoint_period=100000 --set solver.steps=[] --set test.eval_period=0)
if [[ $SIZE == 800,1333 ]]; then
  SETS+=(--set 'input.min_size=[800]' --set input.max_size=1333 --set 'precision.amp="bf16"'
    --set "precision.cudnn_benchmark=${AUTOTUNE:-true}")
fi
for per in $PER_GPU; do
  one=""
  for n in $GPUS; do
    for mb in $([[ $n == 1 ]] && echo 25 || echo ${BUCKET_MB:-25}); do
      run="$W/bs${per}-gpus$n"; [[ $n != 1 && ${BUCKET_MB:-25} != 25 ]] && run="$run-mb$mb"
      t0=$SECONDS
      if [[ $n == 1 ]]; then
        CUDA_VISIBLE_DEVICES=0 "$B" train "${SETS[@]}" --set solver.ims_per_batch=$per --set solver.reference_batch=$per --output "$run" > "$run.log" 2>&1
      else
        "$B" launch --nproc-per-node "$n" train "${SETS[@]}" --set solver.ims_per_batch=$((n * per)) --set solver.reference_batch=$((n * per)) \
          --set solver.allreduce_bucket_mb=$mb --output "$run" > "$run.log" 2>&1
      fi
      echo "== $per per GPU, $n GPU(s), buckets $mb MiB: exit $?, $((SECONDS - t0)) s"
      tail -2 "$run.log"
      # Steady state: the logged windows after the first two (warm-up); the
      # last half of the windows (every shape recorded by then).
      rate=$(python3 -c "
import json
rows = [json.loads(l) for l in open('$run/metrics.jsonl') if 'images_per_s' in l]
steady = rows[2:] or rows
mean = lambda k, rs=steady: round(sum(r.get(k, 0) or 0 for r in rs) / len(rs), 2)
late = rows[len(rows) // 2:]
print(mean('images_per_s'), 'img/s, step', mean('step_ms'), 'ms, data wait', mean('data_wait_ms'),
      'ms, all-reduce', mean('allreduce_ms'), 'ms (exposed on the GPU', mean('allreduce_gpu_ms'),
      'ms), loss', round(rows[-1]['loss'], 3),
      '| last half', mean('images_per_s', late), 'img/s, GPU busy', mean('gpu_busy', late),
      '| replays', rows[-1].get('graph_replays'), 'redone', rows[-1].get('steps_redone'))")
      echo "$per per GPU, $n GPU(s), buckets $mb MiB: $rate"
      # Every rank's own GPU and all-reduce time per step (ranks/rank<R>.jsonl
      # beside rank 0's metrics.jsonl): a slow rank shows as a longer GPU time
      # and the others' longer all-reduce (they wait for it).
      [[ -d $run/ranks ]] && python3 -c "
import glob, json
files = ['$run/metrics.jsonl'] + sorted(glob.glob('$run/ranks/rank*.jsonl'))
for rank, f in enumerate(files):
    rows = [json.loads(l) for l in open(f) if 'images_per_s' in l][2:]
    if rows:
        m = lambda k: round(sum(r.get(k, 0) or 0 for r in rows) / len(rows), 2)
        print(f'  rank {rank}: step', m('step_ms'), 'ms, GPU', m('gpu_ms'), 'ms, all-reduce', m('allreduce_ms'),
              'ms, exposed', m('allreduce_gpu_ms'), 'ms, data wait', m('data_wait_ms'), 'ms')"
      r=${rate%% *}
      if [[ $n == 1 ]]; then one=$r; elif [[ -n $one ]]; then
        python3 -c "print('  efficiency vs 1 GPU: %.3f (%.2fx)' % ($r / ($n * $one), $r / $one))"
      fi
    done
  done
done
# Loss curves at the same global batch (1 GPU at N x B against N GPUs at B).
python3 - "$W" <<'PY'
import glob, json, os, re, sys
runs = {}
for d in glob.glob(os.path.join(sys.argv[1], 'bs*-gpus*')):
    m = re.search(r'bs(\d+)-gpus(\d+)$', d)
    if m and os.path.exists(os.path.join(d, 'metrics.jsonl')):
        rows = [json.loads(l) for l in open(os.path.join(d, 'metrics.jsonl')) if '"loss"' in l]
        runs[(int(m[1]) * int(m[2]), int(m[2]))] = {r['iteration']: r['loss'] for r in rows}
for (glob_bs, n), curve in sorted(runs.items()):
    one = runs.get((glob_bs, 1))
    if n > 1 and one:
        its = sorted(set(curve) & set(one))
        print(f'loss at global batch {glob_bs}, 1 GPU vs {n} GPUs:',
              ', '.join(f'{i}: {one[i]:.3f}/{curve[i]:.3f}' for i in its))
PY
