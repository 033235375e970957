# Everything a newcomer needs: `make demo` trains on the built-in digits data, `make test` runs
# the test suite. Both create the local virtual environment (.venv) on first use.
# torch is pinned to the CPU build 2.13.0 here only; pyproject.toml accepts a wide range.

VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: install demo test lint format clean device-carry device-check

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "torch==2.13.0" -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/generalist demo

test: $(STAMP)
	$(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

format: $(STAMP)
	$(VENV)/bin/ruff format src tests benchmarks
	$(VENV)/bin/ruff check --fix src tests benchmarks

# The lent GPU machine has no network and sees only this checkout: `make device-carry` puts
# the CIFAR-10 subset and pyautoattack's code (its wheel is 42 MB, almost all an example model,
# so only the package's .py files) into .carry/, which the `run` call names in `carry`.
CIFAR_SUBSET ?= ../shared/data/cifar10-subset

device-carry: $(STAMP)
	rm -rf .carry/cifar10-subset .carry/site .carry/wheels
	mkdir -p .carry/site
	cp -r $(CIFAR_SUBSET) .carry/cifar10-subset
	$(PY) -m pip download --quiet --no-deps --only-binary=:all: -d .carry/wheels pyautoattack==0.2.0
	$(PY) -c "import sys, zipfile; z = zipfile.ZipFile(sys.argv[1]); \
	z.extractall(sys.argv[2], [n for n in z.namelist() if n.startswith('pyautoattack/') \
	and n.endswith('.py') and '/examples/' not in n])" .carry/wheels/pyautoattack-0.2.0-*.whl .carry/site
	rm -rf .carry/wheels
	du -sh .carry

# The GPU check in its CPU-sized form (tiny models and data, every code path): CI may run it.
device-check: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) benchmarks/device_check.py --device cpu --quick --out device-check

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache
