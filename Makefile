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

# The test suite (CPU; GPU-only tests skip with a message).
test: setup
	cargo test --release --workspace -- --test-threads=2

lint: setup
	cargo fmt --all -- --check
	cargo clippy --release --workspace --all-targets -- -D warnings

fmt:
	cargo fmt --all

# Builds what scripts/gpu-check.sh runs on the GPU machine: the release binary
# and the test executables, listed in target/gpu-tests.txt.
gpu-build: setup
	scripts/gpu-build.sh
