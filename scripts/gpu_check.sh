#!/usr/bin/env bash
# One-shot GPU check of the compiled cuda backend, for a lent device machine (run from the repo root):
# builds rnnkern._C for the local GPU only, then runs the GPU op tests and the module suite on "cuda".
# Writes the log to $OUT/gpu_check.log when OUT is set.
set -uo pipefail
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} RNNKERN_CUDA_ARCHS=${RNNKERN_CUDA_ARCHS:-90} MAX_JOBS=${MAX_JOBS:-16}
export PYTHONUNBUFFERED=1 RNNKERN_BUILD_CUDA=1
PY=${PY:-python3}
LOG=${OUT:-/tmp}/gpu_check.log
{
  start=$(date +%s)
  $PY setup.py -q build_ext --inplace 2>&1 | grep -v -E "Wunknown-pragmas|psabi|#pragma unroll" || exit 1
  echo "build: $(( $(date +%s) - start )) s"
  $PY -c "import rnnkern, json; print(json.dumps(rnnkern.build_info()))"
  $PY -m pytest -q -x -m gpu tests/test_layer_op_compiled.py -p no:cacheprovider
  $PY -m pytest -q tests/test_modules.py -k cuda -p no:cacheprovider
} 2>&1 | tee "$LOG"
