# rnnkern: `make demo` (the main job), `make test` (the tests), `make bench` (benchmarks).
# Each target first sets up .venv (torch, triton, build and test tools) and builds the extension
# in place; both steps are idempotent and skip work that is already done.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export CUDA_HOME ?= $(if $(wildcard /usr/local/cuda/bin/nvcc),/usr/local/cuda,)
export MAX_JOBS ?= $(shell nproc 2>/dev/null || echo 2)
TORCH_SPEC ?= torch==2.14.1
DEPS := $(TORCH_SPEC) triton numpy ninja pybind11 setuptools wheel build pytest pytest-benchmark \
        pytest-timeout expecttest matplotlib tqdm tensorboard
PYTEST_ARGS ?=

.PHONY: venv build demo test test-all bench step-trace gpu-prep emulator clean

$(VENV)/.deps-installed: Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install $(DEPS)
	touch $@

venv: $(VENV)/.deps-installed

# Incremental: ninja recompiles only what changed.
build: venv
	$(PY) setup.py -q build_ext --inplace

demo: build
	$(PY) -m rnnkern gradflow

test: build
	RNNKERN_REQUIRE_EXTENSION=1 $(PY) -m pytest -q $(PYTEST_ARGS)

test-all: build
	RNNKERN_REQUIRE_EXTENSION=1 $(PY) -m pytest -q -m "" $(PYTEST_ARGS)

bench: build
	$(PY) -m pytest -q bench --benchmark-only $(PYTEST_ARGS)

# The cluster kernels' phase timer for a GPU machine (scripts/step_trace.cu; nvcc only, no GPU needed):
# carry .gpu-bin to the device and scripts/gpu_check.sh's probe stage runs it.
step-trace:
	bash scripts/build_step_trace.sh .gpu-bin/step_trace

# Everything a GPU session carries to the device (`run` with carry [".whl", ".gpu-bin"]; see
# scripts/gpu_check.sh): the step tracer, and the wheels the device's python lacks (expecttest, for
# torch.library.opcheck), for its Python 3.12.
gpu-prep: step-trace venv
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_28_x86_64 -d .whl expecttest

# The persistent CUDA kernels on the CPU (scripts/emulator; host compiler and CUDA headers, no GPU):
# tests/test_emulated_kernels.py builds and runs it too.
emulator:
	bash scripts/emulator/build.sh build/emulator/emulate_layer

clean:
	rm -rf build rnnkern/*.so rnnkern/__pycache__
