# The two commands a newcomer needs: `make demo` and `make test`.
# Both create .venv and install the project into it when that has not been done
# (or when pyproject.toml changed since).

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.halo-embed-installed

.PHONY: demo test test-slow bench device-check device-wheels device-data install clean

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

# on a GPU machine: the cuda tests and the GPU benchmarks in one run (DRY_RUN=1: tiny sizes on the CPU).
# CIFAR_DATA=dir adds the full-width CIFAR-10 comparison (dir as ../shared/datasets: make device-data).
# WHEELS=.whl: a machine without a package index (the lent GPU machine): its own python3 and torch, plus
# the wheels `make device-wheels` downloaded here, installed under .device-site/.
DEVICE_ARGS = $(if $(DRY_RUN),--dry-run,) $(if $(CIFAR_DATA),--cifar-data $(CIFAR_DATA),)
ifeq ($(WHEELS),)
device-check: $(STAMP)
	$(BIN)/python benchmarks/device_check.py $(DEVICE_ARGS)
else
device-check:
	python3 -m pip install --quiet --no-index --no-deps --no-compile --upgrade --target .device-site $(WHEELS)/*.whl
	PYTHONPATH=$(CURDIR)/.device-site:$(CURDIR) python3 benchmarks/device_check.py $(DEVICE_ARGS)
endif

# here, before a GPU session: the wheels and data a device-check call carries (.whl/, .device-data/)
device-wheels: $(STAMP)
	PYTHON=$(BIN)/python bash benchmarks/device_wheels.sh

device-data:
	mkdir -p .device-data
	cp ../shared/datasets/cifar10-jpg.tar.gz ../shared/datasets/cifar100-partial.npz \
	   ../shared/datasets/svhn-partial.npz .device-data/

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q --run-slow

bench: $(STAMP)
	@for script in benchmarks/bench_*.py; do echo "== $$script"; $(BIN)/python $$script || exit 1; done
	@echo "results: benchmarks/results/*.json"

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .device-site
