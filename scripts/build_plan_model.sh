#!/usr/bin/env bash
# Builds scripts/plan_model.cu (the cluster kernels' planner on a modelled Hopper GPU; no GPU needed)
# into $1 (default .gpu-bin/plan_model): the planner's translation unit by nvcc, the model by the host
# compiler, linked against the shared CUDA runtime, whose planner calls the model's definitions replace.
set -eu
out=${1:-.gpu-bin/plan_model}
mkdir -p "$(dirname "$out")"
cuda=${CUDA_HOME:-/usr/local/cuda}
defines="-D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__
  -D__CUDA_NO_HALF2_OPERATORS__"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$cuda/bin/nvcc" -std=c++20 -O1 $defines --expt-relaxed-constexpr -gencode=arch=compute_90,code=sm_90 \
  -Icsrc/include -Icsrc/cuda -c csrc/cuda/persistent_cluster.cu -o "$tmp/planner.o"
${CXX:-g++} -std=c++20 -O1 $defines -x c++ -I"$cuda/include" -Icsrc/include -Icsrc/cuda -Iscripts -c scripts/plan_model.cu \
  -o "$tmp/model.o"
${CXX:-g++} "$tmp/model.o" "$tmp/planner.o" -L"$cuda/lib64" -lcudart -Wl,-rpath,"$cuda/lib64" -o "$out"
