#!/usr/bin/env bash
# Runs on the GPU machine (no Rust toolchain there): prints `maskrcnn env` and
# runs every test executable built by scripts/gpu-build.sh, which on CUDA
# also runs the GPU tests (they skip on CPU). Usage from the repo root:
#   scripts/gpu-check.sh            # env + all tests
#   scripts/gpu-check.sh FILTER     # only tests whose name contains FILTER
set -uo pipefail
cd "$(dirname "$0")/.."
source scripts/gpu-env.sh
# The oracle scripts use the machine's python (torch, torchvision there).
export MASKRCNN_PYTHON=${MASKRCNN_PYTHON:-python3}
export MASKRCNN_BIN=$B
# On the GPU machine a GPU test that would skip (no CUDA, no NVRTC) fails.
export MASKRCNN_REQUIRE_CUDA=1
filter=${1:-}
# Everything is also written to $OUT/gpu-check.log when the device call sets
# OUT: a call cut off by its time limit still brings the log back.
if [[ -n ${OUT:-} ]]; then exec > >(tee "$OUT/gpu-check.log") 2>&1; fi
echo "== maskrcnn env"
"$B" env || exit 1
status=0
for t in target/gpu/tests/*; do
  echo "== $(basename "$t")"
  "$t" --test-threads=1 $filter || status=1
done
echo "== gpu-check: $([ $status = 0 ] && echo PASS || echo FAIL)"
exit $status
