"""rnnkern.explain: which backend and which kernel run a module on an input, and why."""

from __future__ import annotations

import os

import torch

from . import _cells, _compat, _ext
from . import backends as _backends
from .functional import concurrent_directions, layer_wavefront_steps

# csrc/cuda/persistent.h, enum Decline.
_DECLINE = {
    1: "proj_size > 0: the projection runs on the per-step kernels",
    2: "empty layer",
    3: "the device has no cooperative launches",
    4: "W_hh does not fit in the multiprocessors' shared memory",
    5: "not enough co-resident blocks for a grid-wide barrier",
    6: "RNNKERN_CUDA_KERNEL=step",
    8: "the device has no thread-block clusters (RNNKERN_CUDA_KERNEL=cluster, cluster-async and wide need "
       "sm_90 or newer)",
}
# csrc/cuda/persistent.h, enum Exchange: how a cluster kernel's blocks exchange state each step.
_WIDE = "cooperative launch; the layer's W_hh is spread over more blocks than one cluster holds"
_EXCHANGE = {
    0: "in distributed shared memory with the cluster barrier",
    1: "in distributed shared memory by st.async stores completing on each receiver's mbarriers (no "
       "cluster barrier per step)",
    2: f"through L2 ({_WIDE}): the forward's h_t as tagged words that each reader checks, no barrier; "
       "the backward's partial sums with grid barriers",
}
# The wide forward with RNNKERN_WIDE_EXCHANGE=barrier (csrc/cuda/layer_cuda.cpp).
_GRID_EXCHANGE_BARRIERS = f"through L2 with grid barriers ({_WIDE}; RNNKERN_WIDE_EXCHANGE=barrier)"
_GRID_EXCHANGE = 2


def _exchange_text(exchange: int) -> str:
    if exchange == _GRID_EXCHANGE and os.environ.get("RNNKERN_WIDE_EXCHANGE", "") == "barrier":
        return _GRID_EXCHANGE_BARRIERS
    return _EXCHANGE.get(exchange, f"by exchange {exchange}")

# Decline 7 (auto's size rule): formatted with the layer's numbers, see _heuristic_reason.
_HEURISTIC = 7


def _why_cluster() -> str:
    forced = os.environ.get("RNNKERN_CUDA_KERNEL", "auto")
    capped = os.environ.get("RNNKERN_CLUSTER_BLOCKS", "")
    cap = f", RNNKERN_CLUSTER_BLOCKS={capped}" if capped and forced != "wide" else ""
    rows = os.environ.get("RNNKERN_TILE_ROWS", "")
    cap += f", RNNKERN_TILE_ROWS={rows}" if rows else ""
    if forced in ("cluster", "cluster-async", "wide"):
        return f"RNNKERN_CUDA_KERNEL={forced}{cap}"
    return ("chosen by auto: float32 or 16-bit, W_hh fits in one cluster (or, wide, across up to every SM), "
            "tiles of at most 16 batch rows and every tile's blocks running at once; measured faster than "
            f"the per-step and grid-wide kernels, bench/NOTES.md{cap}")


def _exact_over_tf32(dtype, small_tiles) -> str:
    """Why a float32 layer on clusters has exact products although torch allows TF32 (auto's
    exact_beats_tf32, csrc/cuda/persistent_cluster.cu); '' where that does not apply."""
    if dtype != torch.float32 or not torch.backends.cuda.matmul.allow_tf32 or not small_tiles:
        return ""
    return ("exact float32 products although torch allows TF32 matmuls (on tiles below 16 rows they "
            "measured faster than TF32's 16-row tiles, bench/NOTES.md); ")


def _heuristic_reason(batch, gates, units, hidden, limit) -> str:
    work = batch * gates * units * hidden
    return (f"auto measured the per-step kernels faster at this size: the persistent kernel's work per "
            f"block and step, B x gates x ceil(H / SMs) x H = {work} multiply-adds, is above {limit} "
            f"(bench/NOTES.md; force it with RNNKERN_CUDA_KERNEL=persistent)")


def explain(module, input, hx=None) -> str:
    """A few lines saying which backend runs ``module(input, hx)`` and, on CUDA, which recurrence
    kernel (persistent or per-step) runs each layer, and why. The input is checked as the module's
    forward checks it (torch.nn's exception for input it rejects); nothing is computed."""
    if not hasattr(module, "_prepare"):
        raise TypeError(f"rnnkern.explain takes an rnnkern module (rnnkern.LSTM, GRU or RNN, or one that "
                        f"rnnkern.convert made), not {type(module).__name__}")
    autocast, parsed = module._prepare(input, hx)
    data = parsed[3]
    requested = _backends.check_name(module.backend)
    backend, context = module._call_backend(data, [data, parsed[7], parsed[8], *parsed[9]],
                                            _compat.functorch_transforms())
    lines = [f"{type(module).__name__}: backend {backend.name!r}"
             + (f" (chosen by auto under {context}: the fused backends' derivatives are autograd's "
                f"backward only)" if context else " (chosen by auto)" if requested == "auto" else " (requested)")
             + f" for {data.device.type} {str(data.dtype)[6:]} input"
             + (f" (torch.autocast runs this call in {str(autocast.compute_dtype)[6:]})"
                if autocast and torch.is_autocast_enabled(autocast.device_type) else
                f" (computed in {str(autocast.compute_dtype)[6:]}, the dtype of c0, which torch.nn keeps)"
                if autocast else "")]
    if requested == "auto" and context is None:
        for name in _backends._AUTO_ORDER.get(data.device.type, []):
            if name == backend.name:
                break
            reason = _backends.get(name).unsupported_reason(data.device, data.dtype)
            lines.append(f"  not {name!r}: {reason}")
    if backend.name == "cuda":
        batch = parsed[7].shape[1]
        cell = _cells.from_mode(module.mode)
        plan = torch.ops.rnnkern.cuda_kernel_plan(cell, data.dtype, batch, module.hidden_size,
                                                 module.proj_size > 0, data.device.index or 0)
        persistent, reason, blocks, units, smem_fwd, smem_bwd, limit, cluster, exchange, tf32, _copies = plan
        if persistent and cluster:
            tiles = blocks // cluster
            rows = -(-batch // tiles)  # a tile's rows at most (the plan's tile_rows)
            products = ("the recurrent products on TF32 tensor cores (torch allows TF32 matmuls); " if tf32
                        else _exact_over_tf32(data.dtype, rows < 16))
            kind, group = (("wide", "group") if exchange == _GRID_EXCHANGE else ("cluster", "cluster"))
            lines.append(
                f"  every layer: persistent {kind} kernel ({_why_cluster()}), one launch per "
                f"layer and direction; {tiles} {group}(s) of {cluster} blocks, one per tile of up to "
                f"{rows} batch rows, each block {units} hidden units with W_hh resident in "
                f"shared memory "
                f"({smem_fwd // 1024} KiB forward, {smem_bwd // 1024} KiB backward per block; at least half "
                f"an SM's where every tile runs at once, so that no two blocks share an SM); {products}"
                f"state exchanged {_exchange_text(exchange)}")
        elif persistent:
            lines.append(
                f"  every layer: persistent kernel, one launch per layer and direction; {blocks} "
                f"blocks × {units} hidden units, W_hh resident in shared memory "
                f"({smem_fwd // 1024} KiB forward, {smem_bwd // 1024} KiB backward per block)")
        else:
            why = (_heuristic_reason(batch, _cells.GATES[cell], units, module.hidden_size, limit)
                   if reason == _HEURISTIC else _DECLINE.get(reason, f"reason {reason}"))
            lines.append(f"  every layer: per-step kernels (cuBLAS GEMM + fused step kernel), because {why}")
    elif backend.name == "cpu":
        if data.dtype in (torch.float16, torch.bfloat16):
            path = _ext.load().gemm_paths()["cpu_bfloat16"]
            native = data.dtype == torch.bfloat16 and path == "mkl-bfloat16"
            product = ("MKL's bfloat16 GEMM (this CPU has bfloat16 dot products)" if native else
                       "a float32 BLAS GEMM on float32 copies of the weights (exact for 16-bit operands)")
            lines.append(f"  per step: {product} into float32, rounded to {str(data.dtype)[6:]}, + one fused "
                         f"parallel pass (gate math, workspace and cell state in float32)")
        else:
            # (csrc/cpu/layer_cpu.cpp, cpu_pack_weight: its rule and RNNKERN_CPU_PACKED_WEIGHTS)
            setting = os.environ.get("RNNKERN_CPU_PACKED_WEIGHTS", "")
            packed = (data.dtype == torch.float32 and not setting.startswith("0")
                      and _ext.load().gemm_paths().get("cpu_packed") == "mkl-packed")
            where = ("" if setting.startswith("1") else
                     " where it has 2^17 elements or more and the batch more than one row")
            weights = f"; W_hh packed once by MKL for 8 steps or more{where}" if packed else ""
            lines.append(f"  per step: a BLAS GEMM (torch's own BLAS{weights}) into a preallocated buffer + "
                         "one fused parallel pass")
    lines += _stack_lines(module, data)
    return "\n".join(lines)


def _stack_lines(module, data) -> list:
    """How the layers and directions are scheduled (rnnkern/functional.py), where not one after another."""
    directions = 2 if module.bidirectional else 1
    steps = layer_wavefront_steps(data, module.num_layers, directions, float(module.dropout), module.training)
    if steps:
        where = "each layer on its own CUDA stream" if data.is_cuda else "one after another on the CPU"
        return [f"  layers: a wavefront of {steps}-step chunks ({where}; RNNKERN_LAYER_WAVEFRONT={steps})"]
    if concurrent_directions(data, directions):
        return ["  directions: both at once, the reverse one on a side stream (RNNKERN_CONCURRENT_DIRECTIONS=1)"]
    return []
