#!/usr/bin/env bash
# One device call (at most ~9.5 min): the GPU tests the real-data change
# touches (box-only parity on CUDA, step graphs, graph memory), then the
# COCO-like end-to-end runs of gpu-realdata.sh, bench train --data with
# autotuning off/on, and the synthetic autotuning bench if time is left.
set -uo pipefail
cd "$(dirname "$0")/.."
source scripts/gpu-env.sh
export MASKRCNN_PYTHON=${MASKRCNN_PYTHON:-python3} MASKRCNN_BIN=$B
t=target/gpu/tests
deadline=$((SECONDS + ${BUDGET_S:-560}))
left() { local l=$((deadline - SECONDS)); (( l > $1 )) && echo "$1" || echo $(( l > 5 ? l : 5 )); }
echo "== GPU tests"
timeout "$(left 200)" bash -c "
  $t/train_parity-test --test-threads=1 gpu_ 2>&1 | grep -E '^test |test result|gradients compared|loss_'
  $t/inference_parity-test --test-threads=1 gpu_box_only 2>&1 | grep -E '^test |test result|detections matched'
  $t/maskrcnn-lib --test-threads=1 gpu_ 2>&1 | grep -E '^test |test result'
" || echo "GPU tests: timed out or failed ($?)"
echo "== realdata e2e"
OLD=${OLD:-} ITERS=${ITERS:-150} TRAIN_IMAGES=${TRAIN_IMAGES:-1500} timeout "$(left 270)" scripts/gpu-realdata.sh e2e || echo "e2e: stopped ($?)"
echo "== bench train --data (COCO-like, from scratch, bs16 bf16)"
for tune in false true; do
  timeout "$(left 60)" "$B" bench train --data /tmp/realdata/coco --batch 16 --amp bf16 --iters 50 --json \
    --set 'model.norm="bn"' --set model.trainable_layers=5 --set "precision.cudnn_benchmark=$tune" 2>&1 | grep img_per_s
done
echo "== realdata bench (synthetic batches), $((deadline - SECONDS)) s left"
SKIP_PEER=1 BENCH_ITERS=20 timeout "$(left 150)" scripts/gpu-realdata.sh bench 2>&1 | grep -E '^--|img_per_s|^==' | head -20
