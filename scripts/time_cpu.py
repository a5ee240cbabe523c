"""Quick CPU timing of the cpu backend's layer op against torch.nn (fwd+bwd, float32, one layer).

Not the benchmark suite (bench/): a developer's check. Ours = the input projection (one addmm, as the
Python driver does it) + rnnkern::rnn_layer_forward/backward; torch.nn = the same-size single-layer module.
Reports the minimum over interleaved repetitions (robust to a loaded machine).
Usage: python scripts/time_cpu.py [--threads N] [--reps R]
"""

import argparse
import statistics
import time

import torch

from rnnkern import _cells
from rnnkern.backends import get

CONFIGS_ALL = [  # (cell, T, B, H)
    ("LSTM", 100, 64, 256),
    ("GRU", 100, 64, 256),
    ("RNN_TANH", 100, 64, 256),
    ("LSTM", 200, 16, 512),
    ("LSTM", 50, 32, 128),
]
CONFIGS = CONFIGS_ALL


def bench(fns, reps):
    """Times the functions interleaved (so that load from other processes hits all alike);
    returns the minimum and the median of each, in ms."""
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    for _ in range(reps):
        for k, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            times[k].append((time.perf_counter() - t0) * 1e3)
    return [(min(t), statistics.median(t)) for t in times]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--only", type=int, default=None, help="index of one config to run")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    backend = get("cpu")
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, isa {torch.backends.cpu.get_cpu_capability()}")
    print(f"{'config':28s} {'torch.nn':>9s} {'ours':>9s} {'ratio':>6s} {'ours+norms':>10s} {'ratio':>6s} {'norm ovh':>8s}")
    for mode, T, B, H in (CONFIGS if args.only is None else [CONFIGS[args.only]]):
        torch.manual_seed(0)
        cell = _cells.from_mode(mode)
        G = _cells.GATES[cell]
        if mode == "LSTM":
            m = torch.nn.LSTM(H, H)
        elif mode == "GRU":
            m = torch.nn.GRU(H, H)
        else:
            m = torch.nn.RNN(H, H, nonlinearity="tanh")
        x = torch.randn(T, B, H, requires_grad=True)
        h0 = torch.zeros(B, H, requires_grad=True)
        c0 = torch.zeros(B, H, requires_grad=True) if mode == "LSTM" else None
        bs = torch.full((T,), B, dtype=torch.long)
        hx = (h0[None], c0[None]) if mode == "LSTM" else h0[None]

        def run_nn():
            out, _ = m(x, hx)
            out.sum().backward()

        def run_ours(record):
            xp = torch.addmm(m.bias_ih_l0, x.reshape(T * B, H), m.weight_ih_l0.t())
            probe = torch.zeros(2, T * B, requires_grad=True) if record else None
            out, h_n, c_n = backend.layer(cell, xp, bs, h0, c0, m.weight_hh_l0, m.bias_hh_l0, None,
                                          False, 0.0, probe)
            out.sum().backward()

        (t_nn, _), (t_ours, _), (t_norm, _) = bench(
            [run_nn, lambda: run_ours(False), lambda: run_ours(True)], args.reps)
        name = f"{mode} T={T} B={B} H={H}"
        print(f"{name:28s} {t_nn:9.1f} {t_ours:9.1f} {t_ours / t_nn:6.2f} {t_norm:10.1f} {t_norm / t_nn:6.2f} "
              f"{(t_norm / t_ours - 1) * 100:7.1f}%")
        del G


if __name__ == "__main__":
    main()
