# The two entry points of the README: `make bench` and `make test`.
# Both create a virtual environment (.venv) with PyTorch and the test/bench tools (smplx
# among them: the reference flame_ext.compat.smplx is tested and benchmarked against),
# build the extension into it (pip install --no-build-isolation -e .), then run.
# `make test` also runs `make test-kernels`: the CUDA kernels executed on the CPU by the
# SIMT runtime (csrc/simt/), built with AddressSanitizer and UBSan (tools/build_simt.py).
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
SOURCES := setup.py $(wildcard csrc/*.h csrc/*.cpp csrc/*/*.h csrc/*/*.cuh csrc/*/*_cpu.cpp csrc/*/*.cu)
SIMT_DIR := build/simt-asan
SIMT_LIB := $(SIMT_DIR)/flame_ext_simt_asan.so
SIMT_SOURCES := tools/build_simt.py $(wildcard csrc/*.h csrc/simt/* csrc/*/*.h csrc/*/*.cuh csrc/*/*.cu)
# The sanitizer runtime must be the first library of the test process.
SIMT_ENV = LD_PRELOAD="$$($(PY) tools/build_simt.py --print-preload)" \
	ASAN_OPTIONS=detect_leaks=0 UBSAN_OPTIONS=print_stacktrace=1 \
	FLAME_EXT_SIMT_LIB=$(abspath $(SIMT_LIB))

.PHONY: bench test test-kernels install clean

bench: $(BUILT)
	$(PY) bench/run.py $(ARGS)

test: $(BUILT) $(SIMT_LIB)
	$(PY) -m pytest -q tests --ignore=tests/kernels $(ARGS)
	$(SIMT_ENV) $(PY) -m pytest -q tests/kernels $(ARGS)

test-kernels: $(BUILT) $(SIMT_LIB)
	$(SIMT_ENV) $(PY) -m pytest -q tests/kernels $(ARGS)

$(SIMT_LIB): $(BUILT) $(SIMT_SOURCES)
	MAX_JOBS=2 $(PY) tools/build_simt.py --sanitize --out $(SIMT_DIR)

install: $(BUILT)

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel

$(BUILT): $(PY) $(SOURCES)
	$(PY) -m pip install -q "$(TORCH)" numpy scipy pytest hypothesis matplotlib tqdm ninja smplx
	CUDA_HOME=$(CUDA_HOME) $(PY) -m pip install -q --no-build-isolation -e .
	touch $@

clean:
	rm -rf build flame_ext/_C*.so *.egg-info
