# vdisk: make demo | make test | make test-slow
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: all venv demo test test-slow qemu clean bench

all: test

# Debian's python3 lacks ensurepip until python3-venv is installed: install it with apt-get then
$(STAMP): pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV) || { rm -rf $(VENV); \
	  echo "$(PYTHON) -m venv failed: installing python3-venv"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq python3-venv && \
	  $(PYTHON) -m venv $(VENV); }
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet setuptools wheel "PyYAML>=5.1" "jsonschema>=3.2" "pytest>=7" "hypothesis>=6"
	touch $(STAMP)

# the venv sees the working tree: the package is installed from it on every run (cheap, no network)
venv: $(STAMP)
	$(PY) -m pip install --quiet --no-deps --no-build-isolation --force-reinstall . >/dev/null
	rm -rf build *.egg-info

qemu:
	@command -v qemu-img >/dev/null && command -v qemu-io >/dev/null || { \
	  echo "installing qemu-utils (the test oracle)"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq qemu-utils; }

demo: venv
	VDISK="$(CURDIR)/$(VENV)/bin/vdisk" PYTHON="$(CURDIR)/$(PY)" bash scripts/demo.sh

test: venv qemu
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

test-slow: venv qemu
	$(PY) -m pytest $(PYTEST_ARGS)

# vdisk against qemu-img on real guest disks (built once, cached outside the tree): docs/performance.md
bench: venv qemu
	$(PY) tests/bench/bench.py --vdisk "$(CURDIR)/$(VENV)/bin/vdisk" $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info demo .pytest_cache .hypothesis
