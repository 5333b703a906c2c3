#!/usr/bin/env bash
# The main job: synthetic COCO-format data -> train -> evaluate -> pictures.
# On a CUDA machine the R50-FPN preset (configs/demo_gpu.toml) trains; on a
# CPU a light R18 preset (configs/demo_cpu.toml) finishes in a few minutes.
# Output: $DEMO_OUT (default demo-output/).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${MASKRCNN_BIN:-target/release/maskrcnn}
OUT=${DEMO_OUT:-demo-output}
started=$(date +%s)

if "$BIN" env | grep -Eq "^CUDA available +true"; then
  DEVICE=cuda; PRESET=configs/demo_gpu.toml; TRAIN=2000; VAL=200; SIZE=480,640; DRAW_THRESH=0.5
else
  # After the CPU preset's few minutes of training an image's best detections score 0.4-1.0.
  DEVICE=cpu; PRESET=configs/demo_cpu.toml; TRAIN=600; VAL=50; SIZE=128,192; DRAW_THRESH=0.3
fi
echo "== device: $DEVICE, preset: $PRESET"
"$BIN" env | head -4

echo "== maskrcnn synth ($TRAIN train + $VAL val images, sides $SIZE px)"
rm -rf "$OUT"
"$BIN" synth --out "$OUT/data" --train "$TRAIN" --val "$VAL" --size "$SIZE" --seed 0 >/dev/null
DATA=(--set "data.train_ann='$OUT/data/annotations/instances_train2017.json'"
      --set "data.train_images='$OUT/data/train2017'"
      --set "data.val_ann='$OUT/data/annotations/instances_val2017.json'"
      --set "data.val_images='$OUT/data/val2017'")

echo "== maskrcnn train"
"$BIN" train --config "$PRESET" "${DATA[@]}" --output "$OUT/train" --device "$DEVICE" --overwrite

echo "== maskrcnn eval (final weights on the validation set)"
"$BIN" eval --ann "$OUT/data/annotations/instances_val2017.json" --images "$OUT/data/val2017" \
  --weights "$OUT/train/model_final.safetensors" --config "$PRESET" --device "$DEVICE" \
  --out "$OUT/val_detections.json" --metrics "$OUT/val_metrics.json"

echo "== maskrcnn predict --draw (four validation images)"
mapfile -t IMAGES < <(ls "$OUT/data/val2017"/*.jpg | head -4)
"$BIN" predict --weights "$OUT/train/model_final.safetensors" --config "$PRESET" --device "$DEVICE" \
  --draw "$OUT/pictures" --draw-thresh "$DRAW_THRESH" "${IMAGES[@]}"

echo
echo "demo finished in $(( $(date +%s) - started )) s"
echo "pictures:   $OUT/pictures/"
echo "metrics:    $OUT/val_metrics.json, training log $OUT/train/metrics.jsonl"
echo "weights:    $OUT/train/model_final.safetensors"
