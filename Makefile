# fastdiff — set up, test, demo and benchmark.
# TORCH_SPEC picks the torch build: the default is the CPU wheel; on a CUDA machine use e.g.
#   make test TORCH_SPEC="torch==2.13.0 --index-url <PyTorch CUDA wheel index>"
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fastdiff-installed

.PHONY: setup test demo bench gpu-check lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider tests

demo: $(STAMP)
	$(VENV)/bin/fastdiff demo

bench: $(STAMP)
	$(PY) -m benchmarks.summary

# GPU day one: kernel accuracy and speed, PD update and round, NVTX (a dry CPU run without CUDA)
gpu-check: $(STAMP)
	$(PY) -m benchmarks.gpu_check --out runs/gpu-check

lint: $(STAMP)
	$(VENV)/bin/ruff check fastdiff kernels tests benchmarks

clean:
	rm -rf $(VENV) runs .cache
