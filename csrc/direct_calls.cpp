// Direct calls of the layer ops for plain eager autograd (rnnkern/backends/_layer_ops.py, EagerLayer):
// the same ops through the C++ dispatcher below autograd, as `torch.ops.rnnkern.<op>` under
// `_AutoDispatchBelowAutograd` runs them, without the Python-side operator call (the JIT's
// argument-by-argument conversion against the schema, its __torch_function__ check: ~35k instructions
// a call, twice the CPU kernel's own work in a one-step layer). Every device's kernel (CPU, CUDA) and
// the profiler's record of the op stay as they are; tracing, modes and tensor subclasses never come
// here (runs_eager), they take the op.
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include <optional>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace rnnkern {
namespace {

using Tensor = at::Tensor;
using OptTensor = std::optional<at::Tensor>;

// Argument readers by the C++ type the op's signature takes; a wrong type is a TypeError naming the
// argument as the schema does (an internal caller's mistake).
template <typename T>
struct ArgFrom;

template <>
struct ArgFrom<const Tensor&> {
  static Tensor read(PyObject* obj, const c10::Argument& arg) {
    if (!THPVariable_Check(obj)) {
      PyErr_Format(PyExc_TypeError, "rnnkern direct call: %s must be a Tensor", arg.name().c_str());
      throw python_error();
    }
    return THPVariable_Unpack(obj);
  }
};

template <>
struct ArgFrom<const OptTensor&> {
  static OptTensor read(PyObject* obj, const c10::Argument& arg) {
    if (obj == Py_None) return std::nullopt;
    return ArgFrom<const Tensor&>::read(obj, arg);
  }
};

template <>
struct ArgFrom<int64_t> {
  static int64_t read(PyObject* obj, const c10::Argument&) {
    const long long value = PyLong_AsLongLong(obj);
    if (value == -1 && PyErr_Occurred()) throw python_error();
    return value;
  }
};

template <>
struct ArgFrom<bool> {
  static bool read(PyObject* obj, const c10::Argument&) {
    const int value = PyObject_IsTrue(obj);
    if (value < 0) throw python_error();
    return value != 0;
  }
};

template <>
struct ArgFrom<double> {
  static double read(PyObject* obj, const c10::Argument&) {
    const double value = PyFloat_AsDouble(obj);
    if (value == -1.0 && PyErr_Occurred()) throw python_error();
    return value;
  }
};

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
struct DirectCall;

// Reads the Python arguments as the op's signature takes them (with the GIL), calls the op through the
// dispatcher below autograd without the GIL, and returns its tensors as a tuple.
template <typename... Results, typename... Args>
struct DirectCall<std::tuple<Results...>(Args...)> {
  using Signature = std::tuple<Results...>(Args...);

  static PyObject* run(const char* op_name, const char* py_name, PyObject* const* args, Py_ssize_t nargs) {
    if (nargs != static_cast<Py_ssize_t>(sizeof...(Args))) {
      PyErr_Format(PyExc_TypeError, "%s takes %zu arguments (%zd given)", py_name, sizeof...(Args), nargs);
      throw python_error();
    }
    return run_indexed(op_name, args, std::index_sequence_for<Args...>{});
  }

 private:
  template <size_t... I>
  static PyObject* run_indexed(const char* op_name, PyObject* const* args, std::index_sequence<I...>) {
    // (found at the first call: the schemas are registered when the library loads, before any call)
    static const auto handle =
        c10::Dispatcher::singleton().findSchemaOrThrow(op_name, "").template typed<Signature>();
    const std::vector<c10::Argument>& schema_args = handle.schema().arguments();
    // (a braced list: the arguments are read left to right, so the first bad one is reported)
    const std::tuple<std::decay_t<Args>...> values{ArgFrom<Args>::read(args[I], schema_args[I])...};
    std::tuple<Results...> results;
    {
      pybind11::gil_scoped_release no_gil;
      at::AutoDispatchBelowAutograd below_autograd;
      results = handle.call(std::get<I>(values)...);
    }
    return wrap_results(std::move(results));
  }
};

}  // namespace
}  // namespace rnnkern

// rnn_layer_forward's arguments, positionally -> (out, h_n, c_n, workspace).
extern "C" PyObject* rnnkern_call_layer_forward(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  return rnnkern::DirectCall<rnnkern::ForwardSignature>::run("rnnkern::rnn_layer_forward",
                                                            "call_layer_forward", args, nargs);
  END_HANDLE_TH_ERRORS
}

// rnn_layer_backward's arguments, positionally -> (grad_xp, grad_h0, grad_c0, grad_w_hh, grad_b_hh,
// grad_w_hr, norms).
extern "C" PyObject* rnnkern_call_layer_backward(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  return rnnkern::DirectCall<rnnkern::BackwardSignature>::run("rnnkern::rnn_layer_backward",
                                                             "call_layer_backward", args, nargs);
  END_HANDLE_TH_ERRORS
}
