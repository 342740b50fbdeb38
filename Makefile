# The two commands a newcomer needs: `make demo` and `make test`.
# Both create .venv and install the project into it when that has not been done
# (or when pyproject.toml changed since).

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.halo-embed-installed

.PHONY: demo test test-slow bench device-check install clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/halo-embed demo

test: $(STAMP)
	$(BIN)/python -m pytest -q
	$(BIN)/python benchmarks/device_check.py --dry-run

# on a GPU machine: the cuda tests and the GPU benchmarks in one run (DRY_RUN=1: tiny sizes on the CPU)
device-check: $(STAMP)
	$(BIN)/python benchmarks/device_check.py $(if $(DRY_RUN),--dry-run,)

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q --run-slow

bench: $(STAMP)
	@for script in benchmarks/bench_*.py; do echo "== $$script"; $(BIN)/python $$script || exit 1; done
	@echo "results: benchmarks/results/*.json"

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
