"""A small CUDA case for compute-sanitizer: every cell, packed (with clipping) and padded (without),
norms on, forward and backward through the `cuda` backend's per-step and persistent kernels (and
`triton` when available); the kernels on clusters also with several batch tiles (float32, 11 samples).

    python3 scripts/sanitizer_case.py                       # memcheck: everything
    python3 scripts/sanitizer_case.py --kernels persistent,cluster,cluster-async,wide --dtypes float32 \
        --several-blocks wide                               # racecheck: the persistent kernels only
"""

import argparse
import os

import torch
from torch.nn.utils.rnn import pack_sequence

import rnnkern

CUDA_KERNELS = ("step", "persistent", "cluster", "cluster-async", "wide")

parser = argparse.ArgumentParser()
parser.add_argument("--kernels", default=",".join(CUDA_KERNELS),
                    help="RNNKERN_CUDA_KERNEL values to run (comma-separated); 'triton' adds that backend")
parser.add_argument("--dtypes", default="float32,float16")
parser.add_argument("--several-blocks", default="cluster,cluster-async,wide",
                    help="kernels that also run layers spread over several blocks (slower under racecheck)")
args = parser.parse_args()
kernels = args.kernels.split(",")
dtypes = [getattr(torch, name) for name in args.dtypes.split(",")]

torch.manual_seed(0)
runs = [("cuda", k) for k in kernels if k in CUDA_KERNELS and "cuda" in rnnkern.backends()]
if "triton" in rnnkern.backends() and args.kernels == parser.get_default("kernels"):
    runs.append(("triton", None))
for backend, kernel in runs:
    if kernel:
        os.environ["RNNKERN_CUDA_KERNEL"] = kernel
    layers = [(rnnkern.LSTM, {}, 7), (rnnkern.LSTM, {"proj_size": 3}, 7), (rnnkern.GRU, {}, 7),
              (rnnkern.RNN, {}, 7), (rnnkern.RNN, {"nonlinearity": "relu"}, 7)]
    if kernel in args.several_blocks.split(","):
        # H = 7 fits one block: also layers over several (wide: 16 units each, GRU 24, RNN 64; clusters:
        # 16 blocks, some without units, and RNN's backward product with several tiles a warp)
        layers += [(rnnkern.LSTM, {}, 40), (rnnkern.GRU, {}, 56), (rnnkern.RNN, {}, 136)]
    for cls, kw, hidden in layers:
        for dtype in dtypes:
            m = cls(5, hidden, num_layers=2, bidirectional=True, backend=backend, record_grad_norms=True,
                    hidden_grad_clip=0.5, **kw).to("cuda", dtype)
            seqs = [torch.randn(n, 5, device="cuda", dtype=dtype, requires_grad=True) for n in (6, 3, 5)]
            out, _ = m(pack_sequence(seqs, enforce_sorted=False))
            out.data.float().pow(2).sum().backward()
            # Without clipping the cluster kernels' backward takes another path (one exchange a step).
            m.hidden_grad_clip = None
            x = torch.randn(4, 3, 5, device="cuda", dtype=dtype, requires_grad=True)
            out, _ = m(x)
            out.float().sum().backward()
            assert m.grad_norms is not None and torch.isfinite(m.grad_norms.h).all()
            if hidden > 7 and dtype == torch.float32 and kernel in ("cluster", "cluster-async", "wide"):
                # 11 samples: exact float32's 4-row tiles make three clusters (groups) of 4, 4 and 3 rows
                x = torch.randn(4, 11, 5, device="cuda", dtype=dtype, requires_grad=True)
                out, _ = m(x)
                out.float().sum().backward()
torch.cuda.synchronize()
print("sanitizer case done:", runs, [str(d) for d in dtypes])
