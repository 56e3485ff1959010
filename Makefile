# potluck's entry point: every target sets up what is missing first (the project-local Python
# venv that holds libtorch), points tch at it and calls cargo.
#
#   make demo    the built-in demo on the embedded `shapes` data set
#   make test    the whole test suite (what CI runs, after `make lint`)
#   make build   the release binary, target/release/potluck
#   make lint    rustfmt and clippy, warnings are errors
#   make venv-pytorch   PyTorch importable from Python too (for scripts/compare-pytorch.py)
#
# CUDA=1 installs the full torch wheel (with its CUDA libraries) and builds the `cuda` feature.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
TORCH_VERSION := 2.13.0
CUDA ?= 0

ifeq ($(CUDA),1)
TORCH_PIP := torch==$(TORCH_VERSION)
FLAVOUR := cuda
FEATURES := --features cuda
else
# The CPU set: torch's own wheel without its ~3 GB of CUDA libraries; the two small NVIDIA
# packages are needed even on the CPU (libtorch_cpu links libcudart and libcupti).
TORCH_PIP := --no-deps torch==$(TORCH_VERSION) nvidia-cuda-runtime==13.0.96 nvidia-cuda-cupti==13.0.85
FLAVOUR := cpu
FEATURES :=
endif

STAMP := $(VENV)/.torch-$(TORCH_VERSION)-$(FLAVOUR)
# Resolved when a recipe runs, after the venv exists.
LIBTORCH = $(firstword $(wildcard $(CURDIR)/$(VENV)/lib/python3*/site-packages/torch))
CARGO = LIBTORCH=$(LIBTORCH) cargo

.PHONY: all venv venv-pytorch build demo test lint fmt clean-venv

all: build

venv: $(STAMP)

$(STAMP):
	@echo "setting up libtorch: pip install torch==$(TORCH_VERSION) ($(FLAVOUR)) into $(VENV)"
	test -x $(VENV)/bin/pip || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet $(TORCH_PIP)
	rm -f $(VENV)/.torch-*
	touch $@

# PyTorch's Python side (for scripts/compare-pytorch.py and reference values): torch's own
# dependencies (~3 GB of CUDA libraries it imports even on the CPU) into the same venv, so the
# Python side runs the very same libtorch as the binary.
venv-pytorch: $(STAMP)
	$(VENV)/bin/pip install --quiet torch==$(TORCH_VERSION) numpy

build: $(STAMP)
	$(CARGO) build --release $(FEATURES) -p potluck

demo: build
	./target/release/potluck demo

test: $(STAMP)
	$(CARGO) nextest run --workspace --release $(FEATURES) --no-fail-fast

lint: $(STAMP)
	cargo fmt --all --check
	$(CARGO) clippy --workspace --all-targets $(FEATURES) -- -D warnings

fmt:
	cargo fmt --all

clean-venv:
	rm -rf $(VENV)
