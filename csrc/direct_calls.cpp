// Direct calls of the layer ops for plain eager autograd (rnnkern/backends/_layer_ops.py, EagerLayer):
// the same ops through the C++ dispatcher below autograd, as `torch.ops.rnnkern.<op>` under
// `_AutoDispatchBelowAutograd` runs them, without the Python-side operator call (the JIT's
// argument-by-argument conversion against the schema, its __torch_function__ check: ~35k instructions
// a call, twice the CPU kernel's own work in a one-step layer). Every device's kernel (CPU, CUDA) and
// the profiler's record of the op stay as they are; tracing, modes and tensor subclasses never come
// here (runs_eager), they take the op.
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include <optional>
#include <tuple>

namespace rnnkern {
namespace {

using Tensor = at::Tensor;
using OptTensor = std::optional<at::Tensor>;

// Argument readers; each throws a TypeError naming the argument (an internal caller's mistake).
Tensor tensor_arg(PyObject* obj, const char* name) {
  if (!THPVariable_Check(obj)) {
    PyErr_Format(PyExc_TypeError, "rnnkern direct call: %s must be a Tensor", name);
    throw python_error();
  }
  return THPVariable_Unpack(obj);
}

OptTensor optional_tensor_arg(PyObject* obj, const char* name) {
  if (obj == Py_None) return std::nullopt;
  return tensor_arg(obj, name);
}

int64_t int_arg(PyObject* obj, const char* name) {
  const long long value = PyLong_AsLongLong(obj);
  if (value == -1 && PyErr_Occurred()) throw python_error();
  (void)name;
  return value;
}

bool bool_arg(PyObject* obj, const char* name) {
  const int value = PyObject_IsTrue(obj);
  if (value < 0) throw python_error();
  (void)name;
  return value != 0;
}

double float_arg(PyObject* obj, const char* name) {
  const double value = PyFloat_AsDouble(obj);
  if (value == -1.0 && PyErr_Occurred()) throw python_error();
  (void)name;
  return value;
}

template <typename Tuple, size_t... I>
PyObject* wrap_tuple(Tuple&& results, std::index_sequence<I...>) {
  PyObject* tuple = PyTuple_New(sizeof...(I));
  if (tuple == nullptr) throw python_error();
  PyObject* items[] = {THPVariable_Wrap(std::move(std::get<I>(results)))...};
  for (size_t i = 0; i < sizeof...(I); ++i) {
    if (items[i] == nullptr) {
      Py_DECREF(tuple);
      for (size_t j = i + 1; j < sizeof...(I); ++j) Py_XDECREF(items[j]);
      throw python_error();
    }
    PyTuple_SET_ITEM(tuple, i, items[i]);
  }
  return tuple;
}

template <typename... T>
PyObject* wrap_results(std::tuple<T...>&& results) {
  return wrap_tuple(std::move(results), std::index_sequence_for<T...>{});
}

// The ops' C++ signatures, as csrc/ops.cpp declares their schemas.
using ForwardSignature = std::tuple<Tensor, Tensor, Tensor, Tensor>(
    int64_t, const Tensor&, const Tensor&, const Tensor&, const OptTensor&, const Tensor&, const OptTensor&,
    const OptTensor&, bool, double, const OptTensor&);
using BackwardSignature = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>(
    int64_t, const Tensor&, const Tensor&, const OptTensor&, const Tensor&, const Tensor&, const OptTensor&,
    const Tensor&, const OptTensor&, const OptTensor&, bool, double, bool, const Tensor&, const Tensor&);

template <typename Signature>
const c10::TypedOperatorHandle<Signature>& layer_op(const char* name) {
  // (found at the first call: the schemas are registered when the library loads, before any call)
  static const auto handle =
      c10::Dispatcher::singleton().findSchemaOrThrow(name, "").template typed<Signature>();
  return handle;
}

void check_count(Py_ssize_t got, Py_ssize_t want, const char* name) {
  if (got != want) {
    PyErr_Format(PyExc_TypeError, "%s takes %zd arguments (%zd given)", name, want, got);
    throw python_error();
  }
}

}  // namespace
}  // namespace rnnkern

// rnn_layer_forward's arguments, positionally -> (out, h_n, c_n, workspace).
extern "C" PyObject* rnnkern_call_layer_forward(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  using namespace rnnkern;
  check_count(nargs, 11, "call_layer_forward");
  const int64_t cell = int_arg(args[0], "cell");
  const Tensor xp = tensor_arg(args[1], "xp");
  const Tensor batch_sizes = tensor_arg(args[2], "batch_sizes");
  const Tensor h0 = tensor_arg(args[3], "h0");
  const OptTensor c0 = optional_tensor_arg(args[4], "c0");
  const Tensor w_hh = tensor_arg(args[5], "w_hh");
  const OptTensor b_hh = optional_tensor_arg(args[6], "b_hh");
  const OptTensor w_hr = optional_tensor_arg(args[7], "w_hr");
  const bool reverse = bool_arg(args[8], "reverse");
  const double clip = float_arg(args[9], "clip");
  const OptTensor norm_probe = optional_tensor_arg(args[10], "norm_probe");
  std::tuple<Tensor, Tensor, Tensor, Tensor> results;
  {
    pybind11::gil_scoped_release no_gil;
    at::AutoDispatchBelowAutograd below_autograd;
    results = layer_op<ForwardSignature>("rnnkern::rnn_layer_forward")
                  .call(cell, xp, batch_sizes, h0, c0, w_hh, b_hh, w_hr, reverse, clip, norm_probe);
  }
  return wrap_results(std::move(results));
  END_HANDLE_TH_ERRORS
}

// rnn_layer_backward's arguments, positionally -> (grad_xp, grad_h0, grad_c0, grad_w_hh, grad_b_hh,
// grad_w_hr, norms).
extern "C" PyObject* rnnkern_call_layer_backward(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  using namespace rnnkern;
  check_count(nargs, 15, "call_layer_backward");
  const int64_t cell = int_arg(args[0], "cell");
  const Tensor grad_out = tensor_arg(args[1], "grad_out");
  const Tensor grad_h_n = tensor_arg(args[2], "grad_h_n");
  const OptTensor grad_c_n = optional_tensor_arg(args[3], "grad_c_n");
  const Tensor batch_sizes = tensor_arg(args[4], "batch_sizes");
  const Tensor h0 = tensor_arg(args[5], "h0");
  const OptTensor c0 = optional_tensor_arg(args[6], "c0");
  const Tensor w_hh = tensor_arg(args[7], "w_hh");
  const OptTensor b_hh = optional_tensor_arg(args[8], "b_hh");
  const OptTensor w_hr = optional_tensor_arg(args[9], "w_hr");
  const bool reverse = bool_arg(args[10], "reverse");
  const double clip = float_arg(args[11], "clip");
  const bool record_norms = bool_arg(args[12], "record_norms");
  const Tensor out = tensor_arg(args[13], "out");
  const Tensor workspace = tensor_arg(args[14], "workspace");
  std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> results;
  {
    pybind11::gil_scoped_release no_gil;
    at::AutoDispatchBelowAutograd below_autograd;
    results = layer_op<BackwardSignature>("rnnkern::rnn_layer_backward")
                  .call(cell, grad_out, grad_h_n, grad_c_n, batch_sizes, h0, c0, w_hh, b_hh, w_hr, reverse,
                        clip, record_norms, out, workspace);
  }
  return wrap_results(std::move(results));
  END_HANDLE_TH_ERRORS
}
