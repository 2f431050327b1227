# The two entry points of the README: `make bench` and `make test`.
# Both create a virtual environment (.venv) with PyTorch and the test/bench tools, build
# the extension into it (pip install --no-build-isolation -e .), then run.
#   TORCH=...        the torch requirement (default: the CPU build 2.13.0; `TORCH=torch`
#                    takes the newest, a CUDA build on Linux)
#   FORCE_CUDA=1     compile the CUDA kernels even without a visible GPU
#   ARGS=...         extra arguments for pytest / the benchmark
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
CUDA_HOME ?= /usr/local/cuda
PY := $(VENV)/bin/python
BUILT := $(VENV)/.flame_ext-built
SOURCES := setup.py $(wildcard csrc/*.h csrc/*.cpp csrc/*/*.h csrc/*/*.cuh csrc/*/*.cpp csrc/*/*.cu)

.PHONY: bench test install clean

bench: $(BUILT)
	$(PY) bench/run.py $(ARGS)

test: $(BUILT)
	$(PY) -m pytest -q tests $(ARGS)

install: $(BUILT)

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel

$(BUILT): $(PY) $(SOURCES)
	$(PY) -m pip install -q "$(TORCH)" numpy scipy pytest hypothesis matplotlib tqdm ninja
	CUDA_HOME=$(CUDA_HOME) $(PY) -m pip install -q --no-build-isolation -e .
	touch $@

clean:
	rm -rf build flame_ext/_C*.so *.egg-info
