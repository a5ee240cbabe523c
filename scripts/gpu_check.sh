#!/usr/bin/env bash
# One call on a lent GPU machine: build, GPU tests, compute-sanitizer, benchmarks.
# Writes under $OUT (or ./gpu-out): env.txt, build.log, sanitizer.log, bench-<grid>.log, the benchmark JSON and
# test-logs.tgz (the per-shard test logs, and the profiler reports of the optional "profile" stage).
# Back here, scripts/collect_gpu_results.py <files_at of each call> files them under bench/results.
# Uses the machine's python3 (torch + CUDA + triton there; nothing is installed except the wheels
# carried in .whl/, e.g. expecttest for torch.library.opcheck).
# Call it with RNNKERN_COMMIT=$(git rev-parse --short=12 HEAD) (the machine gets no .git) and carry
# .whl and .gpu-bin, both made here (a fresh checkout has neither) by `make gpu-prep`: the wheels
# (expecttest) and the step tracer.
# Budget (stages are time-boxed): build ~20 s there, tests ~150 s (SHARDS=8 side by side, with the
# sanitizer beside them), bench ~80 s: measured 258 s on an H200 (2026-11-26), plus ~30 s of machine
# start. Since then the cluster variant (tests and bench), the paired norm-cost timings, the probe
# (~15 s) and racecheck (beside the tests) were added: ~5.5 min measured (2026-11-26, run 2). Then the
# cluster-async kernels (a fourth CUDA variant of the module suite, smoke, racecheck, bench), TF32
# cluster cases and the bidirectional timings: expect ~6.5 min with T_TESTS=240. Then the wide kernels
# (a fifth variant; the bench times them only where the cluster kernels decline): ~7.5 min with
# T_TESTS=300. Then the step tracer in the probe stage (seconds; carried in .gpu-bin, else built
# beside the extension) and smoke timings of the kernels on clusters only: ~8 min for
# STAGES="build smoke probe tests sanitizer" with T_TESTS=300, then ~3.5 min for the bench (gpu-quick;
# RNNKERN_BENCH_GRID="gpu-quick gpu-targets": ~1.5 min more, estimated).
# Measured on an H200 (2026-11-27): STAGES="build smoke tests sanitizer" with TIME_KERNELS=" "
# TRITON_OP_SHARDS=0 SHARDS=12 T_TESTS=210 253 s (build 38, smoke checks 12, tests 184, the sanitizers
# beside them); then at once on the same machine STAGES="smoke bench" SMOKE_CHECK=0
# TIME_KERNELS=cluster-async RNNKERN_BENCH_GRID="gpu-targets gpu-quick" 225 s (targets 68, quick 142).
# The cluster kernels are compiled one cell per translation unit, side by side: the build's longest
# unit ~20 s on 2 cores here (the single unit before took ~60 s).
set -u
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export MAX_JOBS=${MAX_JOBS:-16} RNNKERN_CUDA_ARCHS=${RNNKERN_CUDA_ARCHS:-90}
STAGES=${STAGES:-"build smoke probe tests sanitizer bench"}
T_TESTS=${T_TESTS:-240} T_SAN=${T_SAN:-150} T_BENCH=${T_BENCH:-200}

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

# The step tracer (scripts/step_trace.cu, run in the probe stage): carried in .gpu-bin (make
# step-trace here: no device time), else built here beside the extension (~25 s, its units side by side).
TRACE_BIN=.gpu-bin/step_trace; trace_pid=""
if stage probe && [ "$(cat $TRACE_BIN.sources 2>/dev/null)" != "$(bash scripts/build_step_trace.sh --digest)" ]; then
  rm -f $TRACE_BIN $TRACE_BIN.sources  # (a failed build must not leave a stale one to run)
  bash scripts/build_step_trace.sh $TRACE_BIN > "$OUT/step_trace_build.log" 2>&1 &
  trace_pid=$!
fi

if stage build; then
  start=$(date +%s)
  python3 setup.py -q build_ext --inplace > "$OUT/build.log" 2>&1 || { echo "BUILD FAILED"; tail -50 "$OUT/build.log"; exit 1; }
  echo "build: $(( $(date +%s) - start )) s"
  python3 -c "import rnnkern, json; print(json.dumps(rnnkern.build_info()))" | tee -a "$OUT/build.log"
fi

# Kernels that hang in the smoke stage are left out of the tests, the sanitizers and the bench, so that
# one hung kernel does not cost the rest of the run (each is named in smoke.txt).
KERNELS="step persistent cluster cluster-async wide"  # RNNKERN_CUDA_KERNEL values
HUNG=""
if stage smoke; then
  # Each CUDA recurrence kernel on every cell and dtype against torch.nn in float64, one time-boxed process
  # per kernel side by side (scripts/persistent_smoke.py), then a few timings one kernel at a time.
  start=$(date +%s)
  declare -A smoke_pid
  # (SMOKE_CHECK=0: the timings only, for a second call on the same machine after a checked one)
  [ "${SMOKE_CHECK:-1}" = 0 ] && KERNELS_CHECKED="" || KERNELS_CHECKED=$KERNELS
  for k in $KERNELS_CHECKED; do
    PYTHONPATH=$PWD timeout 90 python3 scripts/persistent_smoke.py check $k > "$OUT/smoke-$k.txt" 2>&1 &
    smoke_pid[$k]=$!
  done
  for k in $KERNELS_CHECKED; do
    wait ${smoke_pid[$k]}; rc=$?
    [ $rc -eq 124 ] && HUNG="$HUNG $k"
    [ $rc -ne 0 ] && status=1
    echo "smoke $k: rc=$rc" >> "$OUT/smoke.txt"; cat "$OUT/smoke-$k.txt" >> "$OUT/smoke.txt"; rm -f "$OUT/smoke-$k.txt"
  done
  # Timings of the kernels on clusters only (the per-step and grid-wide ones: measured in earlier runs,
  # and the bench times them): TIME_KERNELS.
  for k in ${TIME_KERNELS:-cluster cluster-async wide}; do
    case " $HUNG " in *" $k "*) continue;; esac
    PYTHONPATH=$PWD timeout 40 python3 scripts/persistent_smoke.py time $k >> "$OUT/smoke.txt" 2>&1
  done
  grep -E "rc=|MISMATCH|time |Error|error" "$OUT/smoke.txt" | cut -c1-200
  echo "smoke: $(( $(date +%s) - start )) s; hung:${HUNG:- none}"
fi
SKIP_K=""; SKIP_BENCH=""; RACE_KERNELS=""
for k in $HUNG; do
  SKIP_K="${SKIP_K:+$SKIP_K and }not $k"; SKIP_BENCH="$SKIP_BENCH,cuda:$k"
done
for k in persistent cluster cluster-async wide; do
  case " $HUNG " in *" $k "*) ;; *) RACE_KERNELS="${RACE_KERNELS:+$RACE_KERNELS,}$k";; esac
done
export RNNKERN_BENCH_SKIP=${SKIP_BENCH#,}

if stage probe; then
  # Floors of a persistent step on this GPU (scripts/persistent_probe.cu): barriers and exchanges alone.
  start=$(date +%s)
  nvcc -O3 -std=c++17 -gencode=arch=compute_90,code=sm_90 scripts/persistent_probe.cu -o /tmp/persistent_probe \
    > "$OUT/probe.txt" 2>&1 && timeout 60 /tmp/persistent_probe >> "$OUT/probe.txt" 2>&1 || status=1
  cat "$OUT/probe.txt"
  # Then where the cluster kernels' steps spend their time, phase by phase (bench/NOTES.md).
  if [ -n "$trace_pid" ]; then wait $trace_pid || { status=1; tail -5 "$OUT/step_trace_build.log"; }; fi
  hung_list=$(echo $HUNG | tr ' ' ',')
  timeout 120 $TRACE_BIN ${hung_list:+--skip=$hung_list} > "$OUT/step_trace.txt" 2>&1 || status=1
  python3 scripts/step_trace_table.py "$OUT/step_trace.txt" > "$OUT/step_trace.md" 2>&1
  cut -c1-400 "$OUT/step_trace.txt"
  # The wide forwards again with the grid barrier every step (RNNKERN_WIDE_EXCHANGE=barrier), against
  # the tagged words of the run above.
  case " $HUNG " in *" wide "*) ;; *)
    RNNKERN_WIDE_EXCHANGE=barrier timeout 30 $TRACE_BIN lstm:f16:wide:16:768:512 gru:f16:wide:16:768:512 \
      > "$OUT/step_trace_barrier.txt" 2>&1 || status=1
    python3 scripts/step_trace_table.py "$OUT/step_trace_barrier.txt" > "$OUT/step_trace_barrier.md" 2>&1
    cut -c1-400 "$OUT/step_trace_barrier.txt";;
  esac
  echo "probe: $(( $(date +%s) - start )) s"
fi

# compute-sanitizer TOOL on scripts/sanitizer_case.py ARGS..., in the background; NAME.log, NAME.status.
sanitize() {
  local name=$1 tool=$2; shift 2
  ( start=$(date +%s)
    PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} timeout "$T_SAN" compute-sanitizer --tool "$tool" --error-exitcode 9 \
      python3 scripts/sanitizer_case.py "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    echo "sanitizer $tool: rc=$rc $(( $(date +%s) - start )) s :: $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$OUT/$name.log" | tail -1)" \
      > "$OUT/$name.status"
    exit $rc ) &
}

if stage sanitizer; then
  # Beside the tests (the sanitizers slow their own process only): memcheck on everything, racecheck
  # (shared-memory hazards) on the persistent kernels in a small float32 case.
  sanitize sanitizer memcheck
  san_pid=$!
  sanitize racecheck racecheck --kernels "${RACE_KERNELS:-step}" --dtypes float32 --several-blocks wide
  race_pid=$!
fi

if stage tests; then
  # The GPU-marked tests of every file, plus the Triton op tests (on the GPU when one is present), in
  # SHARDS processes side by side (tests/conftest.py: RNNKERN_TEST_SHARD): the tests are latency-bound
  # and the machine's cores idle otherwise. -v so that a time-boxed (killed) run still names every result.
  start=$(date +%s)
  TIMEOUT_ARG=""; python3 -c "import pytest_timeout" 2>/dev/null && TIMEOUT_ARG="--timeout 150"
  SHARDS=${SHARDS:-8}
  pids=""
  for i in $(seq 0 $((SHARDS - 1))); do
    RNNKERN_TEST_SHARD=$i/$SHARDS timeout "$T_TESTS" python3 -m pytest -v $TIMEOUT_ARG -p no:cacheprovider \
      -m "gpu and not slow" -rfE --ignore tests/test_layer_op_triton.py ${SKIP_K:+-k "$SKIP_K"} tests/ ${PYTEST_ARGS:-} \
      > "$OUT/tests-gpu-$i.log" 2>&1 &
    pids="$pids $!"
  done
  # (TRITON_OP_SHARDS=0 leaves the Triton op tests out: the longest shards, ~170 s, for a rerun of
  # CUDA-only changes)
  for i in $(seq 0 $((${TRITON_OP_SHARDS:-2} - 1))); do
    RNNKERN_TEST_SHARD=$i/${TRITON_OP_SHARDS:-2} timeout "$T_TESTS" python3 -m pytest -v $TIMEOUT_ARG -p no:cacheprovider \
      -m "not slow" -rfE tests/test_layer_op_triton.py ${PYTEST_ARGS:-} > "$OUT/tests-tritonop-$i.log" 2>&1 &
    pids="$pids $!"
  done
  for pid in $pids; do wait $pid || status=1; done
  for f in "$OUT"/tests-*.log; do
    echo "$(basename $f): $(grep -c ' PASSED' $f) passed, $(grep -c ' FAILED' $f) failed, $(grep -c ' ERROR' $f) errors :: $(tail -1 $f | cut -c1-120)"
  done
  echo "tests: $(( $(date +%s) - start )) s; total $(cat "$OUT"/tests-*.log | grep -c ' PASSED') passed, $(cat "$OUT"/tests-*.log | grep -c ' FAILED') failed"
fi

if stage sanitizer; then
  wait $san_pid || status=1
  wait $race_pid || status=1
  cat "$OUT/sanitizer.status" "$OUT/racecheck.status"
fi

if stage bench; then
  # RNNKERN_BENCH_GRID: one grid or several ("gpu-quick gpu-targets"), one after another, each with its
  # own results file and bench-<grid>.log, each time-boxed by T_BENCH.
  for grid in ${RNNKERN_BENCH_GRID:-gpu-quick}; do
    start=$(date +%s)
    RNNKERN_BENCH_GRID=$grid RNNKERN_BENCH_OUT="$OUT" \
      timeout "$T_BENCH" python3 -m pytest -q -p no:cacheprovider bench --benchmark-disable-gc \
      > "$OUT/bench-$grid.log" 2>&1
    rc=$?; [ $rc -ne 0 ] && status=1
    echo "bench $grid: rc=$rc $(( $(date +%s) - start )) s :: $(tail -1 "$OUT/bench-$grid.log")"
  done
fi

if stage stress; then
  # Not in the default STAGES: the tests that run layers on several CUDA streams (the layer wavefront,
  # concurrent directions), over and over in STRESS_PROCS processes for T_STRESS seconds, for a rare
  # cross-stream failure (one wrong weight gradient in a suite run under load, 2026-11-27: bench/NOTES.md).
  start=$(date +%s); end=$(( start + ${T_STRESS:-100} ))
  for i in $(seq 1 ${STRESS_PROCS:-12}); do
    ( while [ $(date +%s) -lt $end ]; do
        timeout 120 python3 -m pytest -q -p no:cacheprovider -m gpu -rf \
          -k "wavefront_on_streams or concurrent_directions" tests/test_modules.py 2>&1 | grep -E "passed|failed|^FAILED"
      done > "$OUT/stress-$i.txt" ) &
  done
  wait
  cat "$OUT"/stress-*.txt > "$OUT/stress.txt"; rm -f "$OUT"/stress-*.txt
  failed=$(grep -c "^FAILED" "$OUT/stress.txt")
  [ "$failed" -ne 0 ] && status=1
  echo "stress: $(( $(date +%s) - start )) s; $(grep -c passed "$OUT/stress.txt") runs, $failed failed cases"
  grep "^FAILED" "$OUT/stress.txt" | sort | uniq -c | head -20
fi

if stage profile; then
  # Not in the default STAGES: STAGES="build profile" when a run has time for it (~3 min). Kernel
  # timelines (nsys) of the per-step and cluster LSTM, and Nsight Compute's view of one cluster
  # forward and one cluster backward launch in float16 (B=16, H=256): where the fixed ~3.5 us per
  # forward step goes (bench/NOTES.md, run 2: barrier fence, L2 latency after it, or the cell chain).
  start=$(date +%s)
  if command -v nsys >/dev/null 2>&1; then
    for case in "lstm step float16" "lstm cluster float16" "lstm cluster-async float16" "lstm cluster float32"; do
      name=$(echo $case | tr ' ' '-')
      PYTHONPATH=$PWD timeout 120 nsys profile --capture-range=cudaProfilerApi --stats=true -o "$OUT/nsys-$name" \
        python3 scripts/profile_case.py $case > "$OUT/nsys-$name.txt" 2>&1 || status=1
      rm -f "$OUT/nsys-$name".nsys-rep "$OUT/nsys-$name".sqlite
    done
  else
    echo "profile: no nsys on this machine"
  fi
  if command -v ncu >/dev/null 2>&1; then
    # (wide at H=768, the size it is for: 48 blocks; the others at H=256)
    for kernel in cluster cluster-async wide; do
      shape=""; [ $kernel = wide ] && shape="64 16 768"
      for pass in forward backward; do
        PYTHONPATH=$PWD timeout 150 ncu --profile-from-start off --kernel-name regex:cluster_${pass}_kernel \
          --launch-count 1 --section SpeedOfLight --section WarpStateStats --section SchedulerStats \
          --section MemoryWorkloadAnalysis --section LaunchStats \
          python3 scripts/profile_case.py lstm $kernel float16 $shape > "$OUT/ncu-$kernel-$pass.txt" 2>&1 || status=1
      done
    done
  else
    echo "profile: no ncu on this machine"
  fi
  echo "profile: $(( $(date +%s) - start )) s"
fi

# The device tool brings back a few files only: the per-shard logs travel as one archive.
tar -czf "$OUT/test-logs.tgz" -C "$OUT" $(cd "$OUT" && ls tests-*.log sanitizer.log racecheck.log nsys-*.txt ncu-*.txt \
  sanitizer.status racecheck.status 2>/dev/null) 2>/dev/null \
  && rm -f "$OUT"/tests-*.log "$OUT"/sanitizer.log "$OUT"/racecheck.log "$OUT"/nsys-*.txt "$OUT"/ncu-*.txt "$OUT"/*.status
echo "--- failures ---"
tar -xOzf "$OUT/test-logs.tgz" 2>/dev/null | grep -E "(FAILED|ERROR)" | cut -c1-220 | head -40
exit $status
