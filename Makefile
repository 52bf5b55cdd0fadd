# `make run` and `make test` set everything up on a fresh machine, then run.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test bench bench-smoke install browser clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch first, pinned: on these machines torch==2.13.0 is the CPU build on local disk; any other spec
# would download a multi-GB CUDA build. pyproject accepts a range, so the pin is only for fresh setups.
# The CPU kernels are compiled here (python -m ferry.ops, a few minutes cold), not at the first engine start.
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test]"
	$(BIN)/python -m ferry.ops
	touch $(STAMP)

install: $(STAMP) browser

# the browser tests (tests/e2e/test_webui.py) drive the distribution's chromium through Playwright's Python
# package; never `playwright install` (it downloads a browser from a CDN). Idempotent; skips without apt or root.
browser:
	@if command -v chromium >/dev/null 2>&1; then :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		apt-get install -y -q chromium >/dev/null || (apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null) \
		|| echo "make: could not install chromium with apt-get; the browser tests will skip"; \
	else echo "make: no apt-get (or not root): chromium not installed; the browser tests will skip"; fi

run: $(STAMP)
	$(BIN)/ferry run

test: $(STAMP) browser
	$(BIN)/python -m pytest tests

# every scenario of bench/ at its default size (~40 min on 2 idle cores, plus ~40 min the first time to build
# the peers into bench/.cache/), then the README summary and the docs/ tables; see bench/README.md
bench: $(STAMP)
	$(BIN)/python -m bench all

# every scenario at its tiny --smoke size (a few minutes), results in bench/.cache/smoke/: checks the code only
bench-smoke: $(STAMP)
	$(BIN)/python -m bench all --smoke

clean:
	rm -rf $(VENV) build *.egg-info
