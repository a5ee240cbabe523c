#!/usr/bin/env bash
# Builds scripts/step_trace.cu (the cluster kernels with RNNKERN_STEP_TRACE, standalone: no torch) into
# $1 (default .gpu-bin/step_trace), for sm_90. nvcc only, so it builds on a machine without a GPU and
# the binary can be carried to one (scripts/gpu_check.sh runs it in the "probe" stage). ~1 min on 2 cores.
# $out.sources records the sources' digest (step_trace_sources), so that gpu_check.sh rebuilds a
# carried binary whose sources have changed since.
#   bash scripts/build_step_trace.sh [OUT]       # build
#   bash scripts/build_step_trace.sh --digest    # print the sources' digest
set -eu
step_trace_sources() {
  cat scripts/step_trace.cu scripts/cuda_check.h scripts/layer_case.h scripts/build_step_trace.sh csrc/cuda/*.cu csrc/cuda/*.cuh csrc/cuda/*.h \
    csrc/include/rnnkern/*.h | sha256sum | cut -c1-16
}
if [ "${1:-}" = "--digest" ]; then step_trace_sources; exit 0; fi
out=${1:-.gpu-bin/step_trace}
mkdir -p "$(dirname "$out")"
nvcc=${CUDA_HOME:-/usr/local/cuda}/bin/nvcc
flags="-std=c++20 -O3 -DNDEBUG -DRNNKERN_STEP_TRACE -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__
  -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__ --expt-relaxed-constexpr
  -gencode=arch=compute_90,code=sm_90 -Icsrc/include -Icsrc/cuda"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# The translation units side by side (each cell's cluster kernels take ~20 s).
pids=""
for src in scripts/step_trace.cu csrc/cuda/persistent.cu csrc/cuda/persistent_cluster*.cu; do
  $nvcc $flags -c "$src" -o "$tmp/$(basename "$src").o" &
  pids="$pids $!"
done
status=0
for pid in $pids; do wait "$pid" || status=1; done
[ $status -eq 0 ] || { echo "step_trace: build failed" >&2; exit 1; }
$nvcc -gencode=arch=compute_90,code=sm_90 "$tmp"/*.o -o "$out"
step_trace_sources > "$out.sources"
echo "built $out ($(cat "$out.sources"))"
