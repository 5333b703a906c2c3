#!/usr/bin/env bash
# What a user with COCO-like data gets from the defaults, on the GPU machine:
#   scripts/gpu-realdata.sh [tests|e2e|data|bench|all]     (several: "tests e2e")
# One device call runs them in order within BUDGET_S (default 560) seconds.
# tests: the CUDA tests of the real-data path (box-only parity with
#        torchvision's Faster R-CNN, the library's GPU tests: step graphs
#        with mask-less instances, graph memory, kernels).
# data:  `bench train --data` on the e2e's COCO-like set, from scratch,
#        bs16 bf16, autotuning off and on.
# bench: `bench train` bs16 bf16 with cuDNN autotuning on and off, frozen
#        (the bench's default) and from scratch (trainable BN, every stage),
#        beside torchvision's peer in the same call (steady-state rate).
# e2e:   `synth --profile coco` (COCO's categories, sizes, counts), then
#        `train` with the defaults (800/1333, bs16, from scratch) for
#        ${ITERS:-200} iterations with autotuning on and off: the first
#        iterations' time, the steady step, time outside steady steps
#        (unsteady_s), GPU memory held (reserved_gib) and graphs recorded;
#        with OLD=path/to/an/older/maskrcnn the same run of that binary too.
# Needs target/gpu (scripts/gpu-build.sh) and, for bench, .peer/peer_torchvision.py.
set -uo pipefail
cd "$(dirname "$0")/.."
source scripts/gpu-env.sh
what=${*:-all}
[[ $what == all ]] && what="tests e2e data bench"
has() { [[ " $what " == *" $1 "* ]]; }
W=${WORK:-/tmp/realdata}
mkdir -p "$W"
export MASKRCNN_PYTHON=${MASKRCNN_PYTHON:-python3} MASKRCNN_BIN=$B
deadline=$((SECONDS + ${BUDGET_S:-560}))
# At most $1 seconds, and no later than the deadline.
left() { local l=$((deadline - SECONDS)); (( l > $1 )) && echo "$1" || echo $(( l > 5 ? l : 5 )); }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
if has tests; then
  echo "== GPU tests of the real-data path"
  t=target/gpu/tests
  timeout "$(left 200)" bash -c "
    $t/train_parity-test --test-threads=1 gpu_ 2>&1 | grep -E '^test |test result|gradients compared|loss_'
    $t/inference_parity-test --test-threads=1 gpu_box_only 2>&1 | grep -E '^test |test result|detections matched'
    $t/maskrcnn-lib --test-threads=1 gpu_ 2>&1 | grep -E '^test |test result'
  " || echo "GPU tests: timed out or failed ($?)"
fi
if has e2e || has data; then
  D="$W/coco"
  if [[ ! -f $D/annotations/instances_train2017.json ]]; then
    t0=$SECONDS
    "$B" synth --profile coco --out "$D" --train "${TRAIN_IMAGES:-3000}" --val "${VAL_IMAGES:-100}" --seed 1 >/dev/null
    echo "== synth --profile coco: $((SECONDS - t0)) s"
  fi
  DATA=(--set "data.train_ann='$D/annotations/instances_train2017.json'" --set "data.train_images='$D/train2017'"
    --set "data.val_ann='$D/annotations/instances_val2017.json'" --set "data.val_images='$D/val2017'")
  its=${ITERS:-200}
  run() { # name binary extra-args...
    local name=$1 bin=$2; shift 2
    local out="$W/$name"; rm -rf "$out"
    local t0=$(date +%s.%N)
    timeout "$(left 200)" "$bin" train "${DATA[@]}" --set "solver.max_iter=$its" --set solver.log_period=10 \
      --set solver.checkpoint_period=100000 "$@" --output "$out" > "$out.log" 2>&1
    local rc=$?
    echo "== $name: exit $rc, $(python3 -c "import time; print(round(time.time() - $t0, 1))") s wall"
    python3 - "$out/metrics.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if '"loss"' in l]
evals = [json.loads(l) for l in open(sys.argv[1]) if 'bbox_ap' in l]
def at(i):
    return next((r for r in rows if r["iteration"] >= i), rows[-1])
first = at(50)
steady = [r["step_ms"] for r in rows if r["iteration"] > rows[-1]["iteration"] // 2]
print(f"  first 50 iterations: {first['seconds']:.1f} s; steady step {sum(steady)/len(steady):.0f} ms "
      f"({16000/(sum(steady)/len(steady)):.1f} img/s); total train {rows[-1]['seconds']:.1f} s")
last = rows[-1]
print("  " + ", ".join(f"{k} {last[k]:.2f}" if isinstance(last.get(k), float) else f"{k} {last.get(k)}"
      for k in ["max_memory_gib", "reserved_gib", "graphs_recorded", "graph_replays", "unsteady_steps",
                "unsteady_s", "data_wait_ms", "gpu_busy", "syncs_per_step"]))
print("  reserved_gib over time:", [round(r.get("reserved_gib", -1), 1) for r in rows[::4]])
if last.get("reserved_gib") and last.get("max_memory_gib"):
    print(f"  held / step peak at the end: {last['reserved_gib'] / last['max_memory_gib']:.2f}")
for e in evals:
    print(f"  eval @ {e['iteration']}: bbox AP {e['bbox_ap']:.4f}")
PY
    grep -E "WARN|ERROR" "$out.log" | grep -v "data check" | head -5
  }
  if has e2e; then
    for tune in ${TUNES:-true false}; do
      run "defaults-cudnn-$tune" "$B" --set "precision.cudnn_benchmark=$tune"
    done
  fi
  if has e2e && [[ -n ${OLD:-} ]]; then
    # The binary before this change: the same run, its settings spelled out.
    run "old-cudnn-true" "$OLD" --set model.num_classes=81 --set 'precision.amp="bf16"' --set dataloader.workers=15 \
      --set "solver.steps=[$((its * 2 / 3)), $((its * 8 / 9))]"
  fi
  if has data; then
    echo "== bench train --data (COCO-like, from scratch, bs16 bf16)"
    for tune in ${DATA_TUNES:-false true}; do
      timeout "$(left 90)" "$B" bench train --data "$D" --batch 16 --amp bf16 --iters 50 --json \
        --set 'model.norm="bn"' --set model.trainable_layers=5 --set "precision.cudnn_benchmark=$tune" 2>&1 | grep img_per_s
    done
  fi
fi
if has bench; then
  echo "== bench train bs16 bf16: autotuning on/off, frozen / from scratch"
  for recipe in frozen scratch; do
    extra=()
    [[ $recipe == scratch ]] && extra=(--set 'model.norm="bn"' --set model.trainable_layers=5)
    for tune in true false; do
      echo "-- $recipe cudnn_benchmark=$tune"
      timeout "$(left 60)" "$B" bench train --batch 16 --amp bf16 --iters "${BENCH_ITERS:-30}" --json --set "precision.cudnn_benchmark=$tune" "${extra[@]}"
    done
  done
  if [[ ${SKIP_PEER:-0} != 1 ]]; then
    echo "== peer_torchvision.py train bs16 bf16 (frozen)"
    (cd .peer && python3 -c '
import json, torch, peer_torchvision as p
torch.backends.cudnn.benchmark = True
torch.backends.cuda.matmul.allow_tf32 = True
torch.backends.cudnn.allow_tf32 = True
print(json.dumps(p.train_bench(16, "bf16", True)))')
  fi
fi
