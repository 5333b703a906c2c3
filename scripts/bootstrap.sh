#!/usr/bin/env bash
# Creates the project-local Python environment `.venv` that holds libtorch
# (torch 2.11.0 from PyPI, which tch 0.24 links against; nvidia-cuda-crt adds
# the CUDA headers the shim needs beside torch's) and the oracles the
# tests compare with (torchvision 0.26.0, pycocotools). Idempotent: a venv
# whose packages already match is left alone, so a warm run costs < 1 s.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=.venv
STAMP="$VENV/.maskrcnn-bootstrap"
REQS="torch==2.11.0 torchvision==0.26.0 pycocotools==2.0.11 safetensors numpy pillow nvidia-cuda-crt==13.0.88"

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$REQS" ]; then
  exit 0
fi

PY=${PYTHON:-}
if [ -z "$PY" ]; then
  # A name on PATH may be a shim (pyenv) for a version that is not active:
  # take the first that actually runs and is new enough for torch 2.11.
  for cand in python3.12 python3.11 python3.10 python3; do
    if "$cand" -c 'import sys, venv; sys.exit(sys.version_info < (3, 10))' >/dev/null 2>&1; then
      PY=$cand; break
    fi
  done
fi
[ -n "$PY" ] || { echo "bootstrap: no python3 found (need Python >= 3.10 to install torch 2.11)" >&2; exit 1; }

echo "bootstrap: creating $VENV with $($PY --version) and installing: $REQS" >&2
start=$(date +%s)
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip
# shellcheck disable=SC2086
"$VENV/bin/python" -m pip install -q --disable-pip-version-check $REQS
"$VENV/bin/python" - <<'PY'
import torch, torchvision, pycocotools
assert torch.__version__.split("+")[0] == "2.11.0", torch.__version__
assert torchvision.__version__.split("+")[0] == "0.26.0", torchvision.__version__
PY
echo "$REQS" > "$STAMP"
echo "bootstrap: done in $(( $(date +%s) - start )) s" >&2
