// The one TORCH_LIBRARY block of rnnkern: the schemas of every C++/CUDA op (see docs/internals.md).
// CPU kernels register in csrc/cpu/, CUDA kernels in csrc/cuda/; fake kernels and autograd are
// registered from Python (rnnkern/backends/_layer_ops.py, called by rnnkern/_ext.py).
#include <Python.h>

#include <torch/library.h>

#include "cpu/pointwise.h"
#ifdef RNNKERN_WITH_CUDA
#include "cuda/kernels.h"
#endif

#ifndef RNNKERN_CUDA_ARCHS
#define RNNKERN_CUDA_ARCHS ""
#endif

// csrc/direct_calls.cpp: the layer ops called directly, for plain eager autograd.
extern "C" PyObject* rnnkern_call_layer_forward(PyObject*, PyObject* const*, Py_ssize_t);
extern "C" PyObject* rnnkern_call_layer_backward(PyObject*, PyObject* const*, Py_ssize_t);

namespace {

PyObject* compiled_cuda_archs(PyObject*, PyObject*) {
  // ";"-separated compute capabilities the CUDA kernels were compiled for; "" without CUDA.
  return PyUnicode_FromString(RNNKERN_CUDA_ARCHS);
}

PyObject* gemm_paths(PyObject*, PyObject*) {
  // How the per-step products run on each device (build_info): the BLAS called directly, or ATen; on
  // the CPU, bfloat16 layers' by MKL's bfloat16 GEMM or on float32 copies of the weights.
  // cpu_packed: whether torch's BLAS packs weights (MKL: a large float32 W_hh once per call), or not.
  const char* bf16 =
      rnnkern::cpu_native_16bit_gemm(rnnkern::DType::BF16) ? "mkl-bfloat16" : "float32-weights";
  const char* packed = rnnkern::cpu_has_packed_gemm() ? "mkl-packed" : "none";
#ifdef RNNKERN_WITH_CUDA
  return Py_BuildValue("{s:s,s:s,s:s,s:s}", "cpu", rnnkern::cpu_gemm_path(), "cpu_bfloat16", bf16,
                       "cpu_packed", packed, "cuda", rnnkern::cuda::cuda_gemm_path());
#else
  return Py_BuildValue("{s:s,s:s,s:s}", "cpu", rnnkern::cpu_gemm_path(), "cpu_bfloat16", bf16, "cpu_packed",
                       packed);
#endif
}

PyMethodDef module_methods[] = {
    {"gemm_paths", gemm_paths, METH_NOARGS,
     "How the per-step products run per device: 'blas'/'cublas' (called directly) or 'aten'."},
    {"compiled_cuda_archs", compiled_cuda_archs, METH_NOARGS,
     "Compute capabilities the CUDA kernels were compiled for (';'-separated; '' if none)."},
    {"call_layer_forward",
     reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(rnnkern_call_layer_forward)), METH_FASTCALL,
     "rnnkern::rnn_layer_forward's arguments, positionally: the op below autograd, called directly "
     "(plain eager calls only)."},
    {"call_layer_backward",
     reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(rnnkern_call_layer_backward)), METH_FASTCALL,
     "rnnkern::rnn_layer_backward's arguments, positionally: the op below autograd, called directly "
     "(plain eager calls only)."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

// An importable module, so that `import rnnkern._C` loads the library and runs the registrations.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "rnnkern compiled kernels", -1,
                                   module_methods};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(rnnkern, m) {
  // One layer, one direction, the whole time loop. cell: 0 LSTM, 1 GRU, 2 RNN_TANH, 3 RNN_RELU.
  m.def(
      "rnn_layer_forward(int cell, Tensor xp, Tensor batch_sizes, Tensor h0, Tensor? c0, "
      "Tensor w_hh, Tensor? b_hh, Tensor? w_hr, bool reverse, float clip, Tensor? norm_probe) "
      "-> (Tensor out, Tensor h_n, Tensor c_n, Tensor workspace)");
  m.def(
      "rnn_layer_backward(int cell, Tensor grad_out, Tensor grad_h_n, Tensor? grad_c_n, "
      "Tensor batch_sizes, Tensor h0, Tensor? c0, Tensor w_hh, Tensor? b_hh, Tensor? w_hr, "
      "bool reverse, float clip, bool record_norms, Tensor out, Tensor workspace) "
      "-> (Tensor grad_xp, Tensor grad_h0, Tensor grad_c0, Tensor grad_w_hh, Tensor grad_b_hh, "
      "Tensor grad_w_hr, Tensor norms)");
  // Which CUDA recurrence kernel runs a layer (rnnkern.explain): [persistent (0/1), reason code,
  // blocks, units per block, shared memory forward, shared memory backward, auto's limit on the
  // multiply-adds per block and step, blocks per cluster or group (0: the grid-wide kernels), exchange
  // (persistent.h: Exchange), TF32 (0/1), copies of the cluster kernels' backward buffers (Plan::copies;
  // meaningless for the other kernels)]. CUDA builds only.
  m.def(
      "cuda_kernel_plan(int cell, ScalarType dtype, int batch, int hidden, bool has_proj, "
      "int device) -> int[]");
}
