"""One small, repeatable GPU case for the profilers (scripts/gpu_check.sh, stage "profile").

    python3 scripts/profile_case.py CELL KERNEL DTYPE [T B H]
      CELL: lstm | gru | rnn_tanh;  KERNEL: an RNNKERN_CUDA_KERNEL value;  DTYPE: float32 | float16

Runs a few warm-up forward+backward calls, then three more between cudaProfilerStart/Stop, so that
`nsys profile --capture-range=cudaProfilerApi` and `ncu --profile-from-start off` see only those.
What it is for (bench/NOTES.md): the persistent kernels' fixed per-step cost (the cluster kernels'
~3.5 us per forward step in float16 whatever the exchange).
"""

import os
import sys

import torch

import rnnkern

CLASSES = {"lstm": (rnnkern.LSTM, {}), "gru": (rnnkern.GRU, {}), "rnn_tanh": (rnnkern.RNN, {"nonlinearity": "tanh"})}


def main(argv):
    cell, kernel, dtype_name = argv[:3]
    steps, batch, hidden = (int(v) for v in (argv[3:6] if len(argv) >= 6 else (64, 16, 256)))
    os.environ["RNNKERN_CUDA_KERNEL"] = kernel
    torch.backends.cuda.matmul.allow_tf32 = False
    dtype = getattr(torch, dtype_name)
    cls, kwargs = CLASSES[cell]
    torch.manual_seed(0)
    module = cls(hidden, hidden, backend="cuda", record_grad_norms=True, **kwargs).to("cuda", dtype)
    x = torch.randn(steps, batch, hidden, device="cuda", dtype=dtype, requires_grad=True)
    dout = torch.randn(steps, batch, hidden, device="cuda", dtype=dtype)

    def step():
        out, _ = module(x)
        out.backward(dout)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()
    print(rnnkern.explain(module, x))


if __name__ == "__main__":
    main(sys.argv[1:])
