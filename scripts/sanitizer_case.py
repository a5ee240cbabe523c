"""A small CUDA case for compute-sanitizer: every cell, packed and padded, norms and clipping on,
forward and backward through the `cuda` backend's per-step and persistent kernels (and `triton` when
available)."""

import os

import torch
from torch.nn.utils.rnn import pack_sequence

import rnnkern

torch.manual_seed(0)
backends = [b for b in ("cuda", "triton") if b in rnnkern.backends()]
runs = [(b, k) for b in backends
        for k in (("step", "persistent", "persistent-v4") if b == "cuda" else (None,))]
for backend, kernel in runs:
    if kernel:
        os.environ["RNNKERN_CUDA_KERNEL"] = kernel
    for cls, kw in [(rnnkern.LSTM, {}), (rnnkern.LSTM, {"proj_size": 3}), (rnnkern.GRU, {}),
                    (rnnkern.RNN, {}), (rnnkern.RNN, {"nonlinearity": "relu"})]:
        for dtype in (torch.float32, torch.float16):
            m = cls(5, 7, num_layers=2, bidirectional=True, backend=backend, record_grad_norms=True,
                    hidden_grad_clip=0.5, **kw).to("cuda", dtype)
            seqs = [torch.randn(n, 5, device="cuda", dtype=dtype, requires_grad=True) for n in (6, 3, 5)]
            out, _ = m(pack_sequence(seqs, enforce_sorted=False))
            out.data.float().pow(2).sum().backward()
            x = torch.randn(4, 3, 5, device="cuda", dtype=dtype, requires_grad=True)
            out, _ = m(x)
            out.float().sum().backward()
            assert m.grad_norms is not None and torch.isfinite(m.grad_norms.h).all()
torch.cuda.synchronize()
print("sanitizer case done:", runs)
