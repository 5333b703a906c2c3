# The README's commands. Every target bootstraps `.venv` (libtorch + oracles)
# on first use; cargo finds libtorch through it (LIBTORCH_USE_PYTORCH=1).
SHELL := /bin/bash
VENV := $(CURDIR)/.venv
export VIRTUAL_ENV := $(VENV)
export PATH := $(VENV)/bin:$(PATH)
export LIBTORCH_USE_PYTORCH := 1
# The oracle scripts in tests/reference run with this interpreter.
export MASKRCNN_PYTHON := $(VENV)/bin/python
BIN := target/release/maskrcnn

.PHONY: setup build demo test lint gpu-build fmt

setup:
	@scripts/bootstrap.sh

build: setup
	cargo build --release

# The main job.
demo: build
	scripts/demo.sh

# The test suite (CPU; GPU-only tests skip, and the last line counts them).
SKIP_LOG := $(CURDIR)/target/skipped-gpu-tests.txt
test: setup
	@mkdir -p target && rm -f $(SKIP_LOG)
	@MASKRCNN_SKIP_LOG=$(SKIP_LOG) cargo test --release --workspace -- --test-threads=2; rc=$$?; \
	  n=$$(sort -u $(SKIP_LOG) 2>/dev/null | wc -l); \
	  if [ "$$n" -gt 0 ]; then echo "$$n GPU tests skipped: no CUDA device here (listed in target/skipped-gpu-tests.txt; scripts/gpu-check.sh runs them on a GPU machine)"; fi; \
	  exit $$rc

lint: setup
	cargo fmt --all -- --check
	cargo clippy --release --workspace --all-targets -- -D warnings

fmt:
	cargo fmt --all

# Builds what scripts/gpu-check.sh runs on the GPU machine: the release binary
# and the test executables, listed in target/gpu-tests.txt.
gpu-build: setup
	scripts/gpu-build.sh
