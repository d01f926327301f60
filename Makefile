# `make demo` and `make test` set up .venv on first use, then run: the demo needs only the base
# install; the tests add the torch, tfds, dev and zoo extras (`make setup`: the same, no run).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip install --quiet --disable-pip-version-check

.PHONY: setup demo test clean

setup: $(VENV)/.installed

$(VENV)/.installed-base: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) -e .
	touch $@

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) -e '.[torch,tfds,dev,zoo]'
	touch $(VENV)/.installed-base $@

demo: $(VENV)/.installed-base
	$(BIN)/python run.py

test: setup
	$(BIN)/python -m pytest tests

clean:
	rm -rf $(VENV)
