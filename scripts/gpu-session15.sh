#!/usr/bin/env bash
# One device call: the GPU tests the real-data change touches (box-only
# parity on CUDA, step graphs with mask-less instances, graph memory), then
# the COCO-like end-to-end runs and the autotuning bench of gpu-realdata.sh.
set -uo pipefail
cd "$(dirname "$0")/.."
source scripts/gpu-env.sh
export MASKRCNN_PYTHON=${MASKRCNN_PYTHON:-python3} MASKRCNN_BIN=$B
t=target/gpu/tests
echo "== GPU tests"
timeout 300 bash -c "
  $t/maskrcnn-lib --test-threads=1 gpu_ 2>&1 | grep -E '^test |test result'
  $t/train_parity-test --test-threads=1 gpu_ 2>&1 | grep -E '^test |test result|gradients compared|loss_'
  $t/inference_parity-test --test-threads=1 gpu_box_only 2>&1 | grep -E '^test |test result|detections matched'
  $t/trainer-test --test-threads=1 gpu_fused 2>&1 | grep -E '^test |test result'
" || echo "GPU tests: timed out or failed ($?)"
echo "== realdata e2e"
OLD=${OLD:-} ITERS=${ITERS:-150} TRAIN_IMAGES=${TRAIN_IMAGES:-1500} timeout 330 scripts/gpu-realdata.sh e2e || echo "e2e: stopped ($?)"
echo "== bench train --data (COCO-like, from scratch, bs16 bf16)"
for tune in false true; do
  timeout 90 "$B" bench train --data /tmp/realdata/coco --batch 16 --amp bf16 --iters 60 --json \
    --set 'model.norm="bn"' --set model.trainable_layers=5 --set "precision.cudnn_benchmark=$tune" 2>&1 | grep img_per_s
done
echo "== realdata bench (synthetic batches)"
SKIP_PEER=1 BENCH_ITERS=20 timeout 150 scripts/gpu-realdata.sh bench 2>&1 | grep -E '^--|img_per_s|^==' | head -20
