#!/usr/bin/env bash
# One call on a lent GPU machine: build, GPU tests, compute-sanitizer, benchmarks.
# Writes under $OUT (or ./gpu-out): env.txt, build.log, tests-{cuda,triton}.log, sanitizer.log, bench.log, the
# benchmark JSON. Uses the machine's python3 (torch + CUDA + triton there; nothing is installed except
# the wheels carried in .whl/, e.g. expecttest for torch.library.opcheck).
# Call it with RNNKERN_COMMIT=$(git rev-parse --short=12 HEAD) (the machine gets no .git) and carry
# .whl, made once here with: echo /.whl/ >> .git/info/exclude; python3 -m pip download --no-deps
#   --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
#   -d .whl expecttest
# Budget (stages are time-boxed): build ~30 s there, tests 2 x 200 s, sanitizer 90 s, bench ~150 s:
# about 11 min with the machine start, inside the 15 min a session gets.
set -u
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export MAX_JOBS=${MAX_JOBS:-16} RNNKERN_CUDA_ARCHS=${RNNKERN_CUDA_ARCHS:-90}
STAGES=${STAGES:-"build tests sanitizer bench"}
T_TESTS=${T_TESTS:-200} T_SAN=${T_SAN:-90} T_BENCH=${T_BENCH:-200}

if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

{
  date -u; echo "commit ${RNNKERN_COMMIT:-unknown}"; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__); print(torch.cuda.get_device_properties(0))"
  nvcc --version | tail -2
} > "$OUT/env.txt" 2>&1

stage() { case " $STAGES " in *" $1 "*) return 0;; esac; return 1; }
status=0

if stage build; then
  start=$(date +%s)
  python3 setup.py -q build_ext --inplace > "$OUT/build.log" 2>&1 || { echo "BUILD FAILED"; tail -50 "$OUT/build.log"; exit 1; }
  echo "build: $(( $(date +%s) - start )) s"
  python3 -c "import rnnkern, json; print(json.dumps(rnnkern.build_info()))" | tee -a "$OUT/build.log"
fi

if stage tests; then
  # Most important first; -v so that a time-boxed (killed) run still names every result. Two runs,
  # so that slow Triton JIT compilation cannot starve the CUDA results.
  ORDER="tests/test_layer_op_compiled.py tests/test_modules.py tests/test_gradnorms.py tests/test_layer_op_triton.py tests/"
  for part in cuda triton; do
    start=$(date +%s)
    if [ $part = cuda ]; then sel="not triton"; else sel="triton"; fi
    timeout "$T_TESTS" python3 -m pytest -v --timeout 120 -p no:cacheprovider -m "gpu or not slow" \
      -k "$sel" -rfE $ORDER ${PYTEST_ARGS:-} > "$OUT/tests-$part.log" 2>&1
    rc=$?; [ $rc -ne 0 ] && status=1
    echo "tests ($part): rc=$rc $(( $(date +%s) - start )) s :: $(grep -c ' PASSED' "$OUT/tests-$part.log") passed, $(grep -c ' FAILED' "$OUT/tests-$part.log") failed :: $(tail -1 "$OUT/tests-$part.log" | cut -c1-150)"
  done
fi

if stage sanitizer; then
  start=$(date +%s)
  timeout "$T_SAN" compute-sanitizer --tool memcheck --error-exitcode 9 python3 scripts/sanitizer_case.py \
    > "$OUT/sanitizer.log" 2>&1
  rc=$?; [ $rc -ne 0 ] && status=1
  echo "sanitizer memcheck: rc=$rc $(( $(date +%s) - start )) s :: $(grep -E 'ERROR SUMMARY' "$OUT/sanitizer.log" | tail -1)"
fi

if stage bench; then
  start=$(date +%s)
  RNNKERN_BENCH_GRID=${RNNKERN_BENCH_GRID:-gpu-quick} RNNKERN_BENCH_OUT="$OUT" \
    timeout "$T_BENCH" python3 -m pytest -q -p no:cacheprovider bench --benchmark-disable-gc \
    > "$OUT/bench.log" 2>&1
  rc=$?; [ $rc -ne 0 ] && status=1
  echo "bench: rc=$rc $(( $(date +%s) - start )) s :: $(tail -1 "$OUT/bench.log")"
fi

echo "--- failures ---"
grep -hE "(FAILED|ERROR)" "$OUT"/tests-*.log 2>/dev/null | cut -c1-220 | head -40
exit $status
