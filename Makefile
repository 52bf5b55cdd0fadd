# `make run` and `make test` set everything up on a fresh machine, then run.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test bench install clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch first, pinned: on these machines torch==2.13.0 is the CPU build on local disk; any other spec
# would download a multi-GB CUDA build. pyproject accepts a range, so the pin is only for fresh setups.
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/ferry run

test: $(STAMP)
	$(BIN)/python -m pytest tests

bench: $(STAMP)
	$(BIN)/python -m bench.engine_vs_hf
	$(BIN)/python bench/serving.py
	$(BIN)/python -m bench.report

clean:
	rm -rf $(VENV) build *.egg-info
