"""The persistent CUDA kernels run on the emulator (scripts/emulator), without a GPU: the extension's own
kernels, planner and launches compiled as plain C++, every GPU thread a fiber. Each case runs a layer's
forward and backward (with norms, clipping, packed lengths, both directions) and compares everything the
kernels produce with a float64 autograd oracle, and runs again in another scheduling order (other thread
interleavings between barriers, other st.async delivery orders), which must give the same bits.
Needs a host compiler and the CUDA toolkit's headers (CUDA_HOME), as the extension's build does; no GPU."""

import os
import platform
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CUDA_HOME = os.environ.get("CUDA_HOME", "/usr/local/cuda")
HAVE_TOOLS = os.path.exists(os.path.join(CUDA_HOME, "include", "cuda_runtime.h")) and shutil.which(
    os.environ.get("CXX", "g++"))

pytestmark = [
    pytest.mark.skipif(not HAVE_TOOLS, reason=f"needs the CUDA headers ({CUDA_HOME}/include) and a host compiler"),
    pytest.mark.skipif(platform.machine() != "x86_64", reason="the emulator's fibers switch stacks on x86-64 only"),
]

# Relative error allowed (|got - ref| / (1 + |ref|)). The oracle rounds h_{t-1} (and, for TF32, W_hh)
# in the products as the kernels do, so forward values agree to float32 rounding; the 16-bit and TF32
# backward products round the gate gradients too, which the oracle does not.
TOL = {"f64": 1e-10, "f32": 1e-5, "tf32": 1e-2, "f16": 2e-2, "bf16": 6e-2}
NORM_TOL = 1e-6  # the norms are float32 outputs


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    binary = tmp_path_factory.mktemp("emulator") / "emulate_layer"
    subprocess.run(["bash", "scripts/emulator/build.sh", str(binary)], cwd=ROOT, check=True, capture_output=True,
                   text=True, timeout=900)
    return binary


TYPES = {"d": np.float64, "f": np.float32, "h": np.float16, "q": np.int64}


def read_arrays(path):
    """The arrays emulate_layer wrote: name, type, shape and bytes of each."""
    data = Path(path).read_bytes()
    pos, out = 0, {}
    while pos < len(data):
        (n,) = struct.unpack_from("<I", data, pos)
        pos += 4
        name = data[pos:pos + n].decode()
        pos += n
        kind = chr(data[pos])
        pos += 1
        (rank,) = struct.unpack_from("<I", data, pos)
        pos += 4
        shape = struct.unpack_from(f"<{rank}q", data, pos)
        pos += 8 * rank
        count = int(np.prod(shape))
        if kind == "b":  # bfloat16: the upper half of a float32
            raw = np.frombuffer(data, np.uint16, count, pos)
            arr = (raw.astype(np.uint32) << 16).view(np.float32)
            pos += 2 * count
        else:
            dt = np.dtype(TYPES[kind])
            arr = np.frombuffer(data, dt, count, pos)
            pos += dt.itemsize * count
        out[name] = torch.from_numpy(arr.reshape(shape).copy())
    return out


def quantize(x, dtype):
    """x rounded as the kernels round a product's operand (straight-through: the gradient passes)."""
    if dtype in ("f64", "f32"):
        return x
    if dtype == "tf32":  # cvt.rna.tf32.f32: 10 mantissa bits, to nearest, ties away from zero
        q = ((x.float().view(torch.int32) + 0x1000) & ~0x1FFF).view(torch.float32).double()
    else:
        q = x.to(torch.float16 if dtype == "f16" else torch.bfloat16).double()
    return x + (q - x).detach()


def oracle(cell, a, dtype, reverse=False, clip=0.0):
    """The layer in float64 with autograd, on the inputs the kernels saw (packed rows, batch_sizes):
    out, h_n, c_n; the gradients of Σ out·grad_out + Σ h_n·grad_h_n + Σ c_n·grad_c_n with respect to
    xp (dgates_x), the recurrent pre-activations (GRU: dgates_h), h0 and c0; the per-row norms of
    ∂L/∂h_t and ∂L/∂c_t, ∂L/∂h_t clipped to `clip` before it flows back (design §2)."""
    d = {k: v.double() for k, v in a.items() if k not in ("batch_sizes", "offsets")}
    sizes, offsets = a["batch_sizes"].tolist(), a["offsets"].tolist()
    steps = len(sizes)
    xp = d["xp"].clone().requires_grad_()
    h0 = d["h0"].clone().requires_grad_()
    c0 = d["c0"].clone().requires_grad_() if cell == "lstm" else None
    w = quantize(d["w_hh"], dtype) if dtype == "tf32" else d["w_hh"]
    norm_g = torch.zeros(xp.shape[0], dtype=torch.float64)
    norm_c = torch.zeros(xp.shape[0], dtype=torch.float64)
    outs, hps, h_n, c_n = [None] * steps, [None] * steps, [None] * sizes[0], [None] * sizes[0]
    prev_h = prev_c = None
    for t in (range(steps - 1, -1, -1) if reverse else range(steps)):
        n, r0 = sizes[t], offsets[t]
        m = 0 if prev_h is None else min(n, prev_h.shape[0])  # samples continuing from the step before
        h_prev = torch.cat([prev_h[:m], h0[m:n]]) if m else h0[:n]
        hq = quantize(h_prev, dtype)
        if dtype in ("f16", "bf16"):
            h_prev = hq  # stored in the layer's dtype between steps
        x = xp[r0:r0 + n]
        hp = hq @ w.T + d["b_hh"]
        if cell == "gru":
            hp.retain_grad()
            hps[t] = hp
            xr, xz, xn = x.chunk(3, 1)
            hr, hz, hn = hp.chunk(3, 1)
            r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
            h = (1 - z) * torch.tanh(xn + r * hn) + z * h_prev
        elif cell == "lstm":
            c_prev = torch.cat([prev_c[:m], c0[m:n]]) if m else c0[:n]
            i, f, g, o = (x + hp).chunk(4, 1)
            c = torch.sigmoid(f) * c_prev + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
        else:
            h = torch.tanh(x + hp) if cell == "tanh" else torch.relu(x + hp)

        def record_and_clip(g, r0=r0, n=n):
            norm = g.norm(dim=1)
            norm_g[r0:r0 + n] = norm.detach()
            if clip > 0:
                g = g * torch.where(norm > clip, clip / norm, torch.ones_like(norm))[:, None]
            return g

        h.register_hook(record_and_clip)
        if cell == "lstm":
            c.register_hook(lambda g, r0=r0, n=n: norm_c.__setitem__(slice(r0, r0 + n), g.norm(dim=1).detach()))
        outs[t] = h
        ending = range(n) if reverse and t == 0 else range(sizes[t + 1] if t + 1 < steps else 0, n)
        for b in ([] if reverse and t > 0 else ending):
            h_n[b] = h[b]
            if cell == "lstm":
                c_n[b] = c[b]
        prev_h, prev_c = h, (c if cell == "lstm" else None)
    res = {"out": torch.cat(outs), "h_n": torch.stack(h_n)}
    loss = (res["out"] * d["grad_out"]).sum() + (res["h_n"] * d["grad_h_n"]).sum()
    if cell == "lstm":
        res["c_n"] = torch.stack(c_n)
        loss = loss + (res["c_n"] * d["grad_c_n"]).sum()
    loss.backward()
    res.update(dgates_x=xp.grad, grad_h0=h0.grad, norm_g=norm_g)
    if cell == "lstm":
        res.update(grad_c0=c0.grad, norm_c=norm_c)
    if cell == "gru":
        res["dgates_h"] = torch.cat([hps[t].grad for t in range(steps)])
    return {k: v.detach() for k, v in res.items()}


def test_fast_division(emulator):
    """The kernels' divisions by launch constants (cuda::FastDiv) agree with / and % (a spread of
    divisors up to 2^31 - 1, each with small, boundary, largest and random dividends)."""
    proc = subprocess.run([str(emulator), "--check-division"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith("division ok"), proc.stdout


def run(emulator, tmp_path, case, *extra, schedule=1):
    path = tmp_path / f"out-{schedule}.bin"
    proc = subprocess.run([str(emulator), case, *extra, "--schedule-seed", str(schedule), "--out", str(path)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{case} {extra}: exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    plan = dict(f.split("=") for f in proc.stdout.splitlines()[0].split()[1:])
    return path, {k: int(v) for k, v in plan.items()}


# (case, extra arguments, what the plan must be: the multi-block exchanges are what matters)
CASES = [
    # every cell, dtype and exchange at least once; clusters of several blocks
    ("lstm:f64:cluster/4:5:40:4", (), {"cluster": 4}),
    ("lstm:f32:cluster:3:40:5:0.7", ("--reverse",), {"cluster": 16}),
    ("lstm:tf32:async/8:17:48:4", ("--lengths", "4,4,4,3,3,3,3,2,2,2,2,1,1,1,1,1,1"), {"exchange": 1}),
    ("lstm:f16:cluster/4:20:64:3:0.5", (), {"cluster": 4}),
    ("lstm:bf16:async:5:48:4", ("--reverse",), {"exchange": 1}),
    ("lstm:f64:wide:6:40:4:0.4", (), {"exchange": 2}),
    ("lstm:f16:wide:3:64:3", ("--lengths", "3,2,1", "--reverse"), {"exchange": 2}),
    ("gru:f64:async/4:5:24:4", ("--lengths", "4,3,3,1,1"), {"exchange": 1}),
    ("gru:f32:cluster/2:7:40:3:0.6", (), {"cluster": 2}),
    ("gru:tf32:cluster:3:24:4", ("--reverse",), {"tf32": 1}),
    ("gru:f16:async/4:17:48:3:0.5", (), {"exchange": 1}),
    ("gru:bf16:cluster/4:5:64:4", ("--lengths", "4,4,2,2,1"), {"cluster": 4}),
    ("gru:f32:wide:5:40:3", ("--reverse",), {"exchange": 2}),
    ("tanh:f64:cluster:5:40:4:0.5", (), {}),
    ("tanh:f32:async/16:33:40:3", ("--lengths", ",".join(["3"] * 11 + ["2"] * 11 + ["1"] * 11)), {"exchange": 1}),
    ("tanh:bf16:async/4:17:64:5", (), {"exchange": 1}),
    ("tanh:f16:cluster/1:5:40:4", (), {"cluster": 1}),
    ("tanh:tf32:wide:5:160:3:0.3", (), {"exchange": 2}),
    ("relu:f64:async:3:40:4", ("--reverse",), {"exchange": 1}),
    ("relu:f32:cluster/4:20:24:4", ("--lengths", ",".join(["4"] * 5 + ["3"] * 5 + ["1"] * 10)), {"cluster": 4}),
    ("relu:f16:cluster:5:48:3:0.5", (), {}),
    ("relu:tf32:async/4:20:16:2", (), {"exchange": 1}),
    # the forward product (W_hh's 16-row tiles by the batch's 8-row tiles) with K split over the warps
    # its few items leave idle (forward_mma_splits): 4 parts (RNN H256 on 16 blocks: one tile of W_hh);
    # 2 parts of four batch tiles (32-row tiles: more samples than one-block clusters of 16 rows fit at
    # once; K has 2 steps); batch tiles in two groups, the second ragged (4 + 3 tiles of 8 rows,
    # then fewer with packed rows: 4 + 0, 3), two items a warp
    ("tanh:f16:cluster:16:256:3", (), {"cluster": 16, "units": 16}),
    ("relu:bf16:async/2:1500:32:2", ("--reverse",), {"cluster": 2, "tile_rows": 32}),
    ("lstm:f16:async/2@64:50:64:3", ("--lengths", ",".join(["3"] * 20 + ["2"] * 10 + ["1"] * 20)),
     {"cluster": 2, "units": 32, "tile_rows": 50}),
    ("gru:bf16:cluster/4@64:61:96:2", ("--reverse",), {"cluster": 4, "units": 24, "tile_rows": 61}),
    # two tensor-core tiles a warp (two accumulators each): the forward's (LSTM 32 units a block), the
    # backward's (H128)
    ("lstm:f16:async/2:5:64:3", ("--reverse",), {"cluster": 2, "units": 32}),
    ("lstm:bf16:cluster/2:3:128:2:0.5", (), {"cluster": 2, "units": 64}),
    # the recorded norms' row sums by shuffles over segments of a row's lanes, several partial sums a
    # row and block (norm_slots): whole warps (64, 96 units), 16 and 8 lanes (48, 24 units); with the
    # squares kept for after phase C (one pass of pairs) or in the phases (two), wide; a ragged H (a
    # last block of 58 units: one thread a row everywhere)
    ("lstm:f16:async/2:4:128:3", (), {"cluster": 2, "units": 64}),
    ("gru:f16:cluster/2:5:192:3", ("--reverse",), {"cluster": 2, "units": 96}),
    ("lstm:f16:async/4:3:192:3", (), {"cluster": 4, "units": 48}),
    ("gru:f16:wide:5:192:3", (), {"exchange": 2, "units": 24}),
    ("tanh:f16:wide:5:192:3", (), {"exchange": 2, "units": 64}),
    ("lstm:f16:async/4:3:250:3", (), {"cluster": 4, "units": 64}),
    # several (row, unit) pairs a thread (the first two prefetched a step ahead, kPrefetchPairs; the
    # LSTM backward one): 4 a thread (64 units x 16 rows), 2 or 1 with packed rows
    ("lstm:f32:cluster/2@16:31:128:3:0.5", (), {"cluster": 2, "units": 64, "tile_rows": 16}),
    ("gru:bf16:async/2:32:128:3", ("--lengths", ",".join(["3"] * 12 + ["2"] * 10 + ["1"] * 10)), {"units": 64}),
    # batch tiles below 16 rows: exact float32's default of 4 (four clusters at B16), 8 rows (two),
    # 16-bit's default of 8 and 3-row tiles on the tensor cores (RNNKERN_TILE_ROWS=4; each tile padded
    # to one 16-row MMA tile)
    ("lstm:f32:async:16:64:3:0.5", ("--lengths", ",".join(["3"] * 9 + ["2"] * 4 + ["1"] * 3)),
     {"cluster": 16, "blocks": 64, "tile_rows": 4}),
    ("gru:f32:cluster@8:16:64:3", ("--reverse",), {"cluster": 16, "blocks": 32, "tile_rows": 8}),
    ("tanh:f16:async:13:64:3:0.5", (), {"cluster": 8, "blocks": 16, "tile_rows": 7}),
    ("gru:f16:async@4:9:48:3", ("--reverse",), {"cluster": 8, "blocks": 24, "tile_rows": 3}),
    # every step full and more than three steps: the kernels prefetch the rows of the step three
    # ahead into L2, up to the last rows of xp, grad_out, the workspace and out (whose ends the
    # emulator reads, against each buffer's guard page)
    ("lstm:f32:async:16:64:6", (), {"cluster": 16, "blocks": 64, "tile_rows": 4}),
    ("gru:f16:async:16:48:6", ("--reverse",), {"cluster": 8, "blocks": 16, "tile_rows": 8}),
    # norms off (the kernels skip their exchange); one block; the grid-wide kernels (persistent.cu)
    ("lstm:f32:cluster/4:5:40:4", ("--no-norms",), {"cluster": 4}),
    ("gru:f64:async/4:5:40:3:0.5", ("--no-norms",), {"exchange": 1}),
    # (wide without norms: no barrier in a step before phase B, which raced the prologue's zeros of
    # dc_next on an H100 and here)
    ("lstm:f16:wide:5:64:3", ("--no-norms",), {"exchange": 2}),
    ("gru:f32:wide:4:40:3:0.5", ("--no-norms", "--reverse"), {"exchange": 2}),
    # the wide forward's h_t as tagged words (the cases above) checked word by word where a row is not
    # whole 16-byte vectors (f16 H70), and through `out` with a grid barrier every step (--wide-barrier)
    ("gru:f16:wide:5:70:4", ("--lengths", "4,3,3,2,1"), {"exchange": 2}),
    ("lstm:bf16:wide:3:64:3", ("--lengths", "3,2,1", "--reverse", "--wide-barrier"), {"exchange": 2}),
    ("tanh:f32:wide:4:100:3:0.5", ("--wide-barrier",), {"exchange": 2}),
    ("lstm:f64:grid:5:40:4:0.5", ("--lengths", "4,4,3,2,1"), {"cluster": 0}),
    ("gru:f32:grid:3:24:3", ("--reverse",), {"cluster": 0}),
]


@pytest.mark.parametrize("case,extra,expect", CASES, ids=[f"{c}{' '.join(e)[:30]}" for c, e, _ in CASES])
def test_emulated_layer_matches_float64_oracle(emulator, tmp_path, case, extra, expect):
    cell, dtype = case.split(":")[:2]
    fields = case.split(":")
    clip = float(fields[6]) if len(fields) > 6 else 0.0
    first, plan = run(emulator, tmp_path, case, *extra, schedule=1)
    for key, value in expect.items():
        assert plan[key] == value, (case, plan)
    if "cluster" not in expect and plan["cluster"] > 0:
        assert plan["cluster"] > 1, plan  # an exchange between blocks
    second, _ = run(emulator, tmp_path, case, *extra, schedule=2)
    assert first.read_bytes() == second.read_bytes(), "another scheduling order changed the results"
    got = read_arrays(first)
    ref = oracle(cell, got, dtype, reverse="--reverse" in extra, clip=clip)
    if "--no-norms" in extra:
        assert "norm_g" not in got
        ref.pop("norm_g"), ref.pop("norm_c", None)
    for name, want in ref.items():
        tol = NORM_TOL if name.startswith("norm") and dtype in ("f64", "f32") else TOL[dtype]
        err = ((got[name].double() - want).abs() / (1 + want.abs())).max().item()
        assert err <= tol, f"{name}: {err:.2e} > {tol:.0e}"
