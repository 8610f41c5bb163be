# Quick start:  make demo   (main job on a built-in default)
#               make test   (test suite)
# Each target creates .venv, installs the pinned set and builds the native library when missing.
# The install needs about 8 GiB (torch's CUDA wheels). pip keeps every wheel it downloads until the
# command ends, so the large pinned wheels (torch, triton, nvidia-*) go in one pip call each: the peak
# stays near the installed size plus one wheel instead of plus all of them (~3.5 GiB). --no-cache-dir
# keeps no second copy in ~/.cache; TMPDIR puts pip's unpacking on the venv's disk, not a small /tmp.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.flowpert-installed
# torch threads wait passively: busy-waiting OpenMP threads stall when other work shares the cores
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: demo test test-slow lint bench install clean

$(STAMP): requirements.txt constraints.txt setup.py $(wildcard CMakeLists.txt cmake/*.cmake cmake/*.py csrc/*.h csrc/*.cpp csrc/cuda/*)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	mkdir -p $(VENV)/tmp
	for pin in $$(grep -E '^(torch|triton|nvidia-[a-z0-9-]+)==' constraints.txt); do \
	  TMPDIR=$(VENV)/tmp $(PY) -m pip install -q --no-cache-dir --no-deps "$$pin" || exit 1; done
	TMPDIR=$(VENV)/tmp $(PY) -m pip install -q --no-cache-dir -r requirements.txt -c constraints.txt
	TMPDIR=$(VENV)/tmp $(PY) -m pip install -q --no-cache-dir --no-build-isolation --no-deps -e .
	rm -rf $(VENV)/tmp
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/flowpert demo

test: $(STAMP)
	$(PY) -m pytest -q tests

lint: $(STAMP)
	$(VENV)/bin/ruff check .

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow tests || [ $$? -eq 5 ]  # exit 5: no slow tests selected

bench: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) benchmarks/estimators.py
	$(PY) benchmarks/noise.py
	$(PY) benchmarks/energies.py
	OMP_NUM_THREADS=1 $(PY) benchmarks/move.py
	OMP_NUM_THREADS=1 $(PY) benchmarks/inverse.py

clean:
	rm -rf $(VENV) build *.egg-info
