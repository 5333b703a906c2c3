#!/usr/bin/env bash
# Runs on the GPU machine (no Rust toolchain there): prints `maskrcnn env` and
# runs every test executable built by scripts/gpu-build.sh, which on CUDA
# also runs the GPU tests (they skip on CPU). Usage from the repo root:
#   scripts/gpu-check.sh            # env + all tests
#   scripts/gpu-check.sh FILTER     # only tests whose name contains FILTER
set -uo pipefail
cd "$(dirname "$0")/.."
# libtorch: the machine's torch (the path differs between machine kinds).
TORCH_LIB=/opt/torch/.venv/lib/python3.12/site-packages/torch/lib
[[ -d $TORCH_LIB ]] || TORCH_LIB=$(python3 -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')
export LD_LIBRARY_PATH=$TORCH_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
# The oracle scripts use the machine's python (torch, torchvision there).
export MASKRCNN_PYTHON=${MASKRCNN_PYTHON:-python3}
export MASKRCNN_BIN=${MASKRCNN_BIN:-$PWD/target/gpu/maskrcnn}
filter=${1:-}
echo "== maskrcnn env"
target/gpu/maskrcnn env || exit 1
status=0
for t in target/gpu/tests/*; do
  echo "== $(basename "$t")"
  "$t" --test-threads=1 $filter || status=1
done
echo "== gpu-check: $([ $status = 0 ] && echo PASS || echo FAIL)"
exit $status
