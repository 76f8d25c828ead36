# Two entry points: `make demo` and `make test`. Both create .venv on a fresh clone.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast install clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

# CPU torch first (the wheel is on disk here; an unpinned torch pulls a CUDA build).
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev,flower,dp,docs]"
	touch $(STAMP)

install: $(STAMP)

# One thread unless you set OMP_NUM_THREADS: these models are tiny, and two threads on a busy 2-core machine
# made the demo's trainings ten times slower (the README's table is measured this way).
demo: $(STAMP)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(BIN)/lightning-unlearn demo --config configs/digits_cnn.yaml

test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider -m "not slow"

clean:
	rm -rf $(VENV) outputs lightning_logs
