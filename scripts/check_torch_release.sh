#!/usr/bin/env bash
# Compatibility check against another torch release, on the CPU: by default torch 2.11.0, the release on
# the lent GPU machines (CI and .venv use 2.14.1), so that an incompatibility costs minutes here rather
# than device time there. Steps:
#   1. a fresh venv (PYTHON) with TORCH_SPEC, the build and test tools, and EXTRA_SPEC;
#   2. a copy of the working tree (tracked files and untracked ones git does not ignore), built in place:
#      the CPU kernels, and the CUDA kernels where CUDA_HOME has nvcc (compiled against that torch's
#      headers, for RNNKERN_CUDA_ARCHS, default 90);
#   3. the test suite there (RNNKERN_REQUIRE_EXTENSION=1 pytest tests/ $PYTEST_ARGS).
# The venv of a CUDA build of torch takes ~5 GB: the work folder is removed at the end unless --keep.
# Usage: scripts/check_torch_release.sh [--keep]
# Environment: PYTHON (default python3), TORCH_SPEC (default torch==2.11.0), EXTRA_SPEC (default
# "numpy<2.4": Triton 3.6's interpreter, which torch 2.11 pins, converts one-element arrays to Python
# ints, which NumPy 2.4 refuses), MAX_JOBS (default 2), PYTEST_ARGS.
# Measured 2026-11-27 on the 2-core machine: ~2 min of installs, ~2 min of build, ~7 min of tests.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.11.0}
EXTRA_SPEC=${EXTRA_SPEC-numpy<2.4}
export MAX_JOBS=${MAX_JOBS:-2} RNNKERN_CUDA_ARCHS=${RNNKERN_CUDA_ARCHS:-90}
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi
# shellcheck source=work_folder.sh
source "$ROOT/scripts/work_folder.sh"
make_work_folder torch-release "$@"

step "fresh venv with $TORCH_SPEC $EXTRA_SPEC"
"$PYTHON" -m venv "$WORK/venv"
PY=$WORK/venv/bin/python
# setuptools >= 77 reads pyproject's SPDX license string (a venv's bundled one may be older)
# shellcheck disable=SC2086
"$PY" -m pip install -q "$TORCH_SPEC" $EXTRA_SPEC "setuptools>=77" wheel ninja pybind11 triton pytest \
    pytest-benchmark pytest-timeout expecttest matplotlib tqdm tensorboard 2>&1 | grep -v "^WARNING: Location" || true
"$PY" -c "import torch, numpy; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'numpy', numpy.__version__)"

step "copy of the working tree"
mkdir "$WORK/src"
git -C "$ROOT" ls-files -z --cached --others --exclude-standard \
    | tar -C "$ROOT" --null --ignore-failed-read -T - -cf - 2>/dev/null | tar -C "$WORK/src" -xf -

step "build (CUDA_HOME=${CUDA_HOME:-none})"
(cd "$WORK/src" && "$PY" setup.py -q build_ext --inplace > "$WORK/build.log" 2>&1) \
    || { tail -40 "$WORK/build.log"; echo "FAIL: the build against $TORCH_SPEC" >&2; exit 1; }
(cd "$WORK/src" && "$PY" -c "import rnnkern, json; print(json.dumps(rnnkern.build_info()))")

step "tests"
# shellcheck disable=SC2086
(cd "$WORK/src" && RNNKERN_REQUIRE_EXTENSION=1 "$PY" -m pytest -q -p no:cacheprovider tests/ ${PYTEST_ARGS:-})
step "passed against $TORCH_SPEC"
