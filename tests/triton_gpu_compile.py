"""Compiles every Triton kernel specialisation the backend launches, for real GPU targets, on a
machine without a GPU (CI): the interpreter that runs the Triton tests there never compiles a kernel,
so a kernel that only breaks in Triton's compiler (types, layouts, constexpr branches) would
otherwise pass CI and fail on the first GPU.

    python tests/triton_gpu_compile.py record OUT.json   # run the backend under the interpreter, note launches
    python tests/triton_gpu_compile.py compile OUT.json 80 90   # compile each for sm_80, sm_90

`record` runs every cell in both kernel variants, with and without bias and projection, in float64,
float32 and float16, forward and backward, and notes each distinct (kernel, argument types,
constexprs); the bfloat16 and TF32 launches the interpreter cannot run are derived from the float16
and float32 ones. Used by tests/test_triton_gpu_compile.py.
"""

import importlib
import inspect
import itertools
import json
import os
import sys


def _record(path):
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: kernels are decorated then
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    import torch
    import triton.language as tl
    from triton.runtime import interpreter

    from rnnkern import _cells
    from rnnkern.backends.triton import BACKEND, _common

    ptr_types = {torch.float64: "*fp64", torch.float32: "*fp32", torch.float16: "*fp16",
                 torch.bfloat16: "*bf16", torch.int32: "*i32", torch.int64: "*i64"}

    def arg_type(value):
        if isinstance(value, torch.Tensor):
            return ptr_types[value.dtype]
        if isinstance(value, bool):
            return "i1"
        if isinstance(value, int):
            return "i32" if -2 ** 31 <= value < 2 ** 31 else "i64"
        if isinstance(value, float):
            return "fp32"
        raise TypeError(f"argument of type {type(value).__name__}")

    records = set()
    run = interpreter.InterpretedFunction.run

    def noting_run(self, *args, grid, warmup, **kwargs):
        names = list(inspect.signature(self.fn).parameters)
        signature = {name: arg_type(value) for name, value in zip(names, args)}
        constexprs = {k: ({"dtype": v.name} if isinstance(v, tl.dtype) else v) for k, v in kwargs.items()}
        records.add(json.dumps([self.fn.__module__, self.fn.__name__, signature, constexprs],
                               sort_keys=True))
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    interpreter.InterpretedFunction.run = noting_run
    _common.SETTINGS.max_block_cols = 32  # the GPU's tile widths (the interpreter's default is wider)
    gen = torch.Generator().manual_seed(0)
    for cell, variant, dtype, bias, proj in itertools.product(
            (_cells.LSTM, _cells.GRU, _cells.RNN_TANH, _cells.RNN_RELU), ("step", "loop"),
            (torch.float64, torch.float32, torch.float16), (False, True), (0, 3)):
        if proj and cell != _cells.LSTM:
            continue
        _common.SETTINGS.variant = variant
        gates, hidden, batch = _cells.GATES[cell], 5, 3
        size_h = proj or hidden

        def rand(*shape):
            return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()

        batch_sizes = torch.tensor([3, 3, 2], dtype=torch.int64)
        out, h_n, c_n = BACKEND.layer(
            cell, rand(8, gates * hidden), batch_sizes, rand(batch, size_h),
            rand(batch, hidden) if cell == _cells.LSTM else None, rand(gates * hidden, size_h),
            rand(gates * hidden) if bias else None, rand(size_h, hidden) if proj else None, False, 0.5,
            torch.zeros(2, 8, requires_grad=True))
        loss = out.double().sum() + h_n.double().sum() + (c_n.double().sum() if c_n is not None else 0)
        loss.backward()

    derived = set()
    for text in records:  # bfloat16 from float16, TF32 dots from float32 ones
        module, name, signature, constexprs = json.loads(text)
        if constexprs.get("DOT") == {"dtype": "fp16"}:
            derived.add(json.dumps([module, name, {k: ("*bf16" if v == "*fp16" else v) for k, v in signature.items()},
                                    {**constexprs, "DOT": {"dtype": "bf16"}}], sort_keys=True))
        if constexprs.get("DOT") == {"dtype": "fp32"} and constexprs.get("PREC") == "ieee":
            derived.add(json.dumps([module, name, signature, {**constexprs, "PREC": "tf32"}], sort_keys=True))
    with open(path, "w") as f:
        json.dump(sorted(records | derived), f)
    print(f"recorded {len(records)} launches, derived {len(derived - records)}")


def _compile(path, archs):
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("compile: unset TRITON_INTERPRET (the interpreter's kernels cannot be compiled)")
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    dtypes = {"fp64": tl.float64, "fp32": tl.float32, "fp16": tl.float16, "bf16": tl.bfloat16}
    with open(path) as f:
        records = [json.loads(text) for text in json.load(f)]
    failures = []
    for (module, name, signature, constexprs), arch in itertools.product(records, archs):
        kernel = getattr(importlib.import_module(module), name)
        values = {k: (dtypes[v["dtype"]] if isinstance(v, dict) else v) for k, v in constexprs.items()}
        try:
            triton.compile(ASTSource(kernel, {**signature, **{k: "constexpr" for k in values}}, values),
                           target=GPUTarget("cuda", int(arch), 32))
        except Exception as exc:  # noqa: BLE001 - every failure is reported, then the run fails
            failures.append(f"{name} sm_{arch} {constexprs}: {type(exc).__name__}: {str(exc)[:400]}")
    print(f"compiled {len(records)} specialisations for sm_{', sm_'.join(archs)}; {len(failures)} failed")
    for line in failures:
        print("FAILED", line)
    return 1 if failures else 0


if __name__ == "__main__":
    if sys.argv[1] == "record":
        _record(sys.argv[2])
    else:
        sys.exit(_compile(sys.argv[2], sys.argv[3:]))
