#!/usr/bin/env bash
# Builds, here, everything scripts/gpu-check.sh runs on the GPU machine: the
# release binary and the test executables, copied into target/gpu/ (carry
# `target/gpu` in the device call; the machine has no Rust toolchain).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release
rm -rf target/gpu && mkdir -p target/gpu/tests
cp target/release/maskrcnn target/gpu/maskrcnn
cargo test --release --no-run --message-format=json 2>/dev/null \
  | python3 -c '
import json, sys, shutil, os
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"]:
        name = m["target"]["name"] + "-" + m["target"]["kind"][0]
        shutil.copy(m["executable"], os.path.join("target/gpu/tests", name))
        print("test executable:", name)
'
# Symbols stripped: the device call carries at most 64 MiB with the tree.
command -v strip >/dev/null && strip target/gpu/maskrcnn target/gpu/tests/*
du -sh target/gpu
