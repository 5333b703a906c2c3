#!/usr/bin/env bash
# Multi-GPU launch paths and faults on this machine's GPUs, one job:
#   1. two "nodes" x 1 GPU: two launches on one machine (--nnodes 2,
#      --node-rank 0/1, one GPU each) train together and both exit 0;
#   2. one rank SIGKILLed mid-run on all GPUs: every rank must exit
#      (non-zero) within 60 s, the cause named;
#   3. --resume on all GPUs from a checkpoint written on 2.
#   scripts/gpu-faults.sh
set -uo pipefail
cd "$(dirname "$0")/.."
source scripts/gpu-env.sh
G=$(nvidia-smi --query-gpu=index --format=csv,noheader | wc -l)
W=${WORK:-/tmp/faults}
rm -rf "$W"; mkdir -p "$W"
"$B" synth --out "$W/data" --train 400 --val 0 --size 480,640 --seed 0 >/dev/null
D="$W/data"
COMMON=(--config configs/demo_gpu.toml
  --set "data.train_ann='$D/annotations/instances_train2017.json'" --set "data.train_images='$D/train2017'"
  --set test.eval_period=0 --set solver.steps=[])

echo "== 1. two nodes x 1 GPU"
for r in 0 1; do
  CUDA_VISIBLE_DEVICES=$r "$B" launch --nnodes 2 --node-rank $r --master-addr 127.0.0.1 --master-port 29533 \
    --nproc-per-node 1 train "${COMMON[@]}" --set solver.ims_per_batch=16 --set solver.reference_batch=16 --set solver.max_iter=60 \
    --set solver.log_period=20 --set solver.checkpoint_period=100000 --output "$W/nodes" > "$W/node$r.log" 2>&1 &
  pids[$r]=$!
done
for r in 0 1; do wait "${pids[$r]}"; echo "node $r: exit $?"; done
grep -E "rank 1/2|rank 0/2" "$W"/node*.log | head -2
tail -1 "$W/nodes/metrics.jsonl"

echo "== 2. a rank killed mid-run on $G GPUs"
"$B" launch --nproc-per-node "$G" train "${COMMON[@]}" --set solver.ims_per_batch=$((8 * G)) --set solver.reference_batch=$((8 * G)) \
  --set solver.max_iter=100000 --set solver.log_period=10 --set solver.checkpoint_period=100000 \
  --output "$W/kill" > "$W/kill.log" 2>&1 &
launch=$!
for _ in $(seq 600); do [[ -s $W/kill/metrics.jsonl ]] && break; sleep 0.5; done
victim=$(cat "/proc/$launch/task/$launch/children" | awk '{print $NF}')
kill -9 "$victim"; t0=$(date +%s.%N)
wait "$launch"; code=$?
echo "launch exit $code, $(python3 -c "print(round($(date +%s.%N) - $t0, 1))") s after kill -9 of one rank"
grep -E "failed|lost rank|error" "$W/kill.log" | head -3

echo "== 3. --resume on $G GPUs from a checkpoint written on 2"
RES=("${COMMON[@]}" --set solver.ims_per_batch=16 --set solver.reference_batch=16 --set solver.checkpoint_period=50 --set solver.log_period=50)
"$B" launch --nproc-per-node 2 train "${RES[@]}" --set solver.max_iter=100 --output "$W/resume" > "$W/resume2.log" 2>&1
echo "2 GPUs to iteration 100: exit $?"
"$B" launch --nproc-per-node "$G" train "${RES[@]}" --set solver.max_iter=200 --resume --output "$W/resume" \
  > "$W/resume$G.log" 2>&1
echo "$G GPUs resumed to iteration 200: exit $?"
grep -iE "resum" "$W/resume$G.log" | head -2
tail -1 "$W/resume/metrics.jsonl"
