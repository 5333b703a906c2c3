#!/usr/bin/env bash
# The main job. Until training lands, it shows the environment and the
# resolved default configuration (the R50-FPN recipe).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=target/release/maskrcnn
echo "== maskrcnn env"
"$BIN" env
echo
echo "== maskrcnn config (defaults)"
"$BIN" config
