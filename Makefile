# `make demo` and `make test` set everything up in .venv on first use, then run.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo test clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[torch,tfds,dev,zoo]'
	touch $@

demo: setup
	$(BIN)/python run.py

test: setup
	$(BIN)/python -m pytest tests

clean:
	rm -rf $(VENV)
