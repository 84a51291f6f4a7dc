# embedpipe — `make run` embeds the sample corpus with the embedded local server; `make test` runs
# the test suite. Both set up the virtual environment first (idempotent; re-run when pyproject changes).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: setup run test bench bench-cache bench-scale lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --quiet -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

run: setup
	$(BIN)/python -m pipeline.demo

test: setup
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

bench: setup
	$(BIN)/python -m tests.bench $(BENCH_ARGS)

bench-cache: setup
	$(BIN)/python -m tests.bench_cache $(BENCH_ARGS)

bench-scale: setup
	$(BIN)/python -m tests.bench_scale $(BENCH_ARGS)

lint: setup
	$(BIN)/python -m pip install --quiet ruff==0.17.6 mypy==2.4.1
	$(BIN)/ruff check pipeline transforms tests examples
	$(BIN)/mypy pipeline transforms

clean:
	rm -rf $(VENV) out build *.egg-info .pytest_cache .hypothesis
