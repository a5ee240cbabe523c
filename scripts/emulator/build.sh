#!/usr/bin/env bash
# Builds the emulator (scripts/emulator/README.md): the persistent kernels and their planner and
# launches (csrc/cuda/persistent*.cu) compiled as plain C++ against cuda_emulation.h, linked with the
# fiber runtime and emulate_layer.cpp into $1 (default build/emulator/emulate_layer). Needs the CUDA
# toolkit's headers (CUDA_HOME) and a host compiler; no GPU, no nvcc, no CUDA runtime library.
#   bash scripts/emulator/build.sh [OUT]
set -eu
out=${1:-build/emulator/emulate_layer}
mkdir -p "$(dirname "$out")"
cuda=${CUDA_HOME:-/usr/local/cuda}
cxx=${CXX:-g++}
flags="-std=c++20 -O1 -g0 -DRNNKERN_EMULATE -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__
  -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__ -x c++ -include scripts/emulator/cuda_emulation.h
  -Iscripts/emulator/include -Iscripts/emulator -Iscripts -Icsrc/include -Icsrc/cuda -I$cuda/include"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
jobs=${MAX_JOBS:-$(nproc)}
pids=""
for src in scripts/emulator/fibers.cpp scripts/emulator/emulate_layer.cpp csrc/cuda/persistent.cu csrc/cuda/persistent_cluster*.cu; do
  while [ "$(jobs -rp | wc -l)" -ge "$jobs" ]; do wait -n || true; done
  $cxx $flags -c "$src" -o "$tmp/$(basename "$src").o" &
  pids="$pids $!"
done
status=0
for pid in $pids; do wait "$pid" || status=1; done
[ $status -eq 0 ] || { echo "emulator: build failed" >&2; exit 1; }
$cxx "$tmp"/*.o -o "$out"
echo "built $out"
