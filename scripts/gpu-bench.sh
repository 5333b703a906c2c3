#!/usr/bin/env bash
# Benchmarks on the GPU machine, ours beside the peer in the same call:
#   scripts/gpu-bench.sh [train|step|infer|data|v2|eval|all]
# `step` is the training step's headline settings only (bs16 bf16, bs16
# fp16, bs8 fp16, NHWC), ours then the peer's. `v2` times torchvision's v2
# architecture (configs/maskrcnn_r50_fpn_v2.toml from scratch: BatchNorm
# everywhere, every stage trainable) beside the peer's --v2 model. `eval`
# times `eval --weights --images` over N=${EVAL_IMAGES:-5000} 480x640 JPEGs
# (100 detections with masks each, bbox + segm scoring included).
# Needs target/gpu (scripts/gpu-build.sh) and .peer/peer_torchvision.py (a
# copy of ../shared/bench/peer_torchvision.py) carried along.
set -uo pipefail
cd "$(dirname "$0")/.."
source scripts/gpu-env.sh
what=${1:-all}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
if [[ $what == data || $what == all ]]; then
  echo "== bench data (800..1333 px JPEGs, $(nproc) cores)"
  "$B" bench data --batch 8 --iters 60 --workers "$(nproc)" --size 800,1333 --json
  "$B" bench data --batch 8 --iters 30 --workers 2 --size 800,1333 --json
fi
if [[ $what == train || $what == all ]]; then
  echo "== bench train (ours)"
  for cfg in "8 fp16 true" "8 bf16 true" "16 fp16 true" "16 bf16 true" "8 off false" "8 fp16 false"; do
    set -- $cfg
    "$B" bench train --batch "$1" --amp "$2" --iters 20 --set "precision.channels_last=$3" --json
  done
  echo "== peer_torchvision.py train"
  python3 .peer/peer_torchvision.py train
  # The peer's default list leaves batch 16 bf16 out; its own function, same settings.
  (cd .peer && python3 -c '
import json, torch, peer_torchvision as p
torch.backends.cudnn.benchmark = True
torch.backends.cuda.matmul.allow_tf32 = True
torch.backends.cudnn.allow_tf32 = True
print(json.dumps(p.train_bench(16, "bf16", True)))')
fi
if [[ $what == step ]]; then
  echo "== bench train (ours)"
  for cfg in "16 bf16" "16 fp16" "8 fp16"; do
    set -- $cfg
    "$B" bench train --batch "$1" --amp "$2" --iters 20 --json
  done
  echo "== peer_torchvision.py train (same settings)"
  (cd .peer && python3 -c '
import json, torch, peer_torchvision as p
torch.backends.cudnn.benchmark = True
torch.backends.cuda.matmul.allow_tf32 = True
torch.backends.cudnn.allow_tf32 = True
for bs, amp in [(16, "bf16"), (16, "fp16"), (8, "fp16")]:
    print(json.dumps(p.train_bench(bs, amp, True)), flush=True)
    torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats()')
fi
if [[ $what == v2 ]]; then
  echo "== bench train / infer, v2 preset (ours)"
  V2=(--config configs/maskrcnn_r50_fpn_v2.toml --set 'model.norm="bn"' --set model.trainable_layers=5)
  for cfg in "8 fp16" "16 bf16"; do
    set -- $cfg
    "$B" bench train --batch "$1" --amp "$2" --iters 20 --json "${V2[@]}"
  done
  for cfg in "1 fp16" "8 fp16"; do
    set -- $cfg
    "$B" bench infer --batch "$1" --amp "$2" --json "${V2[@]}"
  done
  echo "== peer_torchvision.py --v2 (same settings)"
  (cd .peer && python3 -c '
import sys
sys.argv.append("--v2")
import json, torch, peer_torchvision as p
torch.backends.cudnn.benchmark = True
torch.backends.cuda.matmul.allow_tf32 = True
torch.backends.cudnn.allow_tf32 = True
for bs, amp in [(8, "fp16"), (16, "bf16")]:
    print(json.dumps(p.train_bench(bs, amp, True)), flush=True)
    torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats()
for bs in [1, 8]:
    print(json.dumps(p.infer_bench(bs, "fp16")), flush=True)')
fi
if [[ $what == eval ]]; then
  n=${EVAL_IMAGES:-5000}
  E=/tmp/eval-bench
  rm -rf "$E"
  python3 scripts/make_eval_dataset.py "$E" "$n" 480x640 >/dev/null
  echo "== eval --weights --images: $n images 480x640, bs 8 fp16, 100 detections each"
  TIMEFORMAT="eval: %R s wall in total"
  time "$B" eval --ann "$E/gt.json" --weights "$E/weights.safetensors" \
    --images "$E/images" --set test.ims_per_batch=8 --set 'precision.amp="fp16"' --set roi_heads.score_thresh=0 \
    --out "$E/dets.json" --metrics "$E/metrics.json" 2>&1 | tail -32
fi
if [[ $what == infer || $what == all ]]; then
  echo "== bench infer (ours)"
  for cfg in "1 off" "1 fp16" "8 fp16"; do
    set -- $cfg
    "$B" bench infer --batch "$1" --amp "$2" --json
  done
  # What users run: detections above 0.05 only; and without CUDA graphs.
  "$B" bench infer --batch 8 --amp fp16 --score-thresh 0.05 --json
  "$B" bench infer --batch 1 --amp fp16 --set precision.cuda_graphs=false --json
  echo "== peer_torchvision.py infer"
  python3 .peer/peer_torchvision.py infer
fi
