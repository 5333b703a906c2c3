#!/usr/bin/env bash
# A short device call: the GPU tests of what changed most (box-only parity
# on CUDA, the step graphs' unit tests), then one COCO-like run with the
# defaults (graph memory release on real shape variety).
set -uo pipefail
cd "$(dirname "$0")/.."
source scripts/gpu-env.sh
export MASKRCNN_PYTHON=${MASKRCNN_PYTHON:-python3} MASKRCNN_BIN=$B
t=target/gpu/tests
deadline=$((SECONDS + ${BUDGET_S:-300}))
left() { local l=$((deadline - SECONDS)); (( l > $1 )) && echo "$1" || echo $(( l > 5 ? l : 5 )); }
echo "== GPU tests"
timeout "$(left 150)" bash -c "
  $t/train_parity-test --test-threads=1 gpu_box_only 2>&1 | grep -E '^test |test result|gradients compared|loss_'
  $t/maskrcnn-lib --test-threads=1 gpu_ 2>&1 | grep -E '^test |test result'
  $t/inference_parity-test --test-threads=1 gpu_box_only 2>&1 | grep -E '^test |test result|detections matched'
" || echo "GPU tests: timed out or failed ($?)"
echo "== realdata e2e ($((deadline - SECONDS)) s left)"
TUNES=${TUNES:-true} ITERS=${ITERS:-100} TRAIN_IMAGES=${TRAIN_IMAGES:-800} VAL_IMAGES=40 timeout "$(left 250)" scripts/gpu-realdata.sh e2e || echo "e2e: stopped ($?)"
