"""The layer driver shared by every backend.

``run_stack`` runs a whole (multi-layer, possibly bidirectional) recurrent stack on rows in the
packed layout of docs/internals.md: per layer and direction it computes the input projection of all
timesteps as one GEMM, hands the recurrence to the backend's layer op, and applies dropout between
layers as torch.nn does. Argument parsing and validation live in rnnkern/modules.py.
"""

from __future__ import annotations

import contextlib
import itertools
import os
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import _cells


# (w_ih [G*H, I], w_hh [G*H, P], b_ih [G*H] | None, b_hh [G*H] | None, w_hr [P, H] | None)
LayerWeights = Tuple[Tensor, Tensor, Optional[Tensor], Optional[Tensor], Optional[Tensor]]


def input_projection(x: Tensor, w_ih: Tensor, b_ih: Optional[Tensor]) -> Tensor:
    """xp = x @ w_ihᵀ + b_ih for all rows at once: [N, I] -> [N, G*H]. (linear: for 2-D rows ATen's mm or
    addmm on w_ihᵀ, one call from Python instead of two.)"""
    return torch.nn.functional.linear(x, w_ih, b_ih)


_SIDE_STREAMS: Dict[Tuple[int, int], "torch.cuda.Stream"] = {}


def concurrent_directions(rows: Tensor, num_directions: int) -> bool:
    """Whether run_stack runs a bidirectional layer's reverse direction on a side stream, beside the
    forward one: CUDA input, RNNKERN_CONCURRENT_DIRECTIONS=1 (off by default until measured, bench/
    NOTES.md), and not while torch.compile traces (its graph orders the ops itself)."""
    return (num_directions == 2 and rows.is_cuda
            and os.environ.get("RNNKERN_CONCURRENT_DIRECTIONS", "0") == "1"
            and not torch.compiler.is_compiling())


def _side_stream(device: torch.device, slot: int = 0) -> "torch.cuda.Stream":
    """The side stream number `slot` of a CUDA device (made once)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if (index, slot) not in _SIDE_STREAMS:
        _SIDE_STREAMS[index, slot] = torch.cuda.Stream(device=index)
    return _SIDE_STREAMS[index, slot]


def layer_wavefront_steps(rows: Tensor, num_layers: int, num_directions: int, dropout: float,
                          training: bool) -> int:
    """The chunk length (in steps) of run_stack's layer wavefront, or 0 for none.

    RNNKERN_LAYER_WAVEFRONT=S (S > 0; off by default until measured, bench/NOTES.md) cuts each layer's
    sequence into chunks of S steps, each one layer op whose initial state is the previous chunk's
    final state, so that layer l runs chunk k while layer l + 1 runs chunk k - 1: on CUDA each layer
    on its own stream (and, by autograd's stream rule, the backward in the reverse wavefront); on the
    CPU one after the other (the same results: that is how the tests check it). Only where a layer's
    chunk depends on the layer below's same chunk alone: one direction, several layers, no dropout
    between them (its random draws would follow the chunks, not torch.nn's order), not while
    torch.compile traces.
    """
    if num_directions != 1 or num_layers < 2:
        return 0  # (before reading the environment: most stacks are one layer, and every call asks)
    value = os.environ.get("RNNKERN_LAYER_WAVEFRONT", "0")
    try:
        steps = int(value)
    except ValueError:
        raise ValueError(f"RNNKERN_LAYER_WAVEFRONT must be a number of steps (0: off), not {value!r}") from None
    if steps <= 0 or (dropout != 0 and training) or torch.compiler.is_compiling():
        return 0
    return steps


def _split_biases(cell: int, b_ih: Optional[Tensor], b_hh: Optional[Tensor]):
    """(the input projection's bias, the bias the layer op adds)."""
    if cell != _cells.GRU and b_ih is not None and b_hh is not None:
        # LSTM/RNN: both biases add to the same pre-activations, so the step kernels add their sum and
        # the input projection is a plain GEMM (a CPU addmm first copies the broadcast bias into its
        # whole [N, G*H] output, and its backward sums that gradient again); autograd hands the one
        # bias gradient to both. GRU's b_hn is inside r ⊙ (…).
        return None, b_ih + b_hh
    return b_ih, b_hh


def _from_main_stream(layer_weights: LayerWeights) -> LayerWeights:
    """A layer's weights (or its input and states) as views made on the current (main) stream, for a
    layer that runs on a side stream. Autograd runs each backward node on the stream its forward op
    ran on: the weights' gradients from the side stream's ops are then summed by these views' nodes
    on the main stream, handed over with autograd's events as the layer's input gradients are, and
    the leaves' gradients accumulate on the main stream, which backward() synchronises with its caller.
    (Without the views the leaves' accumulation ran on the side stream: one wrong `weight_ih_l0` gradient,
    a partial sum, in a GPU suite run under load, not reproduced in 2,408 runs since: bench/NOTES.md.)"""
    return tuple(None if w is None else w.view_as(w) for w in layer_weights)


def _used_on(stream: "torch.cuda.Stream", *tensors: Optional[Tensor]) -> None:
    """Tell the caching allocator that `stream` reads these tensors, made on another stream. It reuses
    a freed block on the stream that allocated it without waiting for other streams; the side streams'
    ops save their inputs for the backward, whose ops run on the same side stream and release them
    there, so without this a block (the input rows, h0, c0) could be handed to a new tensor on the main
    stream while a queued backward op on the side stream had yet to read it."""
    for t in tensors:
        if t is not None and t.numel() > 0:
            t.record_stream(stream)


def _run_wavefront(cell, rows, batch_sizes, h0, c0, weights, backend, clip, norm_probes, steps):
    """run_stack for one direction and several layers, in chunks of `steps` steps
    (layer_wavefront_steps). Returns what run_stack returns."""
    sizes = batch_sizes.tolist()
    T = len(sizes)
    offsets = list(itertools.accumulate(sizes, initial=0))
    chunks = [(t0, min(t0 + steps, T)) for t0 in range(0, T, steps)]
    cuda = rows.is_cuda
    main = torch.cuda.current_stream(rows.device) if cuda else None
    x_chunks = [rows[offsets[t0]:offsets[t1]] for t0, t1 in chunks]
    below: List = [None] * len(chunks)  # CUDA: the event after the layer below's chunk k
    on_side: List[Tensor] = []          # made on a layer's stream, used (and freed) on the main one
    h_n: List[Tensor] = []
    c_n: List[Tensor] = []
    for layer, (layer_weights,) in enumerate(weights):
        stream = _side_stream(rows.device, 1 + layer) if cuda else None
        if cuda:
            layer_weights = _from_main_stream(layer_weights)
            stream.wait_stream(main)  # the layer's states and weights, made on the main stream
            _used_on(stream, h0, c0, rows if layer == 0 else None)  # (the layers above: x_chunks below)
        w_ih, w_hh, b_ih, b_hh, w_hr = layer_weights
        # (the layer's states taken on the main stream, as its weights: their leaves' gradients then
        # accumulate there, see _from_main_stream)
        h_state, c_state = h0[layer], None if c0 is None else c0[layer]
        with torch.cuda.stream(stream) if cuda else contextlib.nullcontext():
            x_bias, bias = _split_biases(cell, b_ih, b_hh)  # once per layer, for all its chunks
            outs: List[Tensor] = []
            ended_h: List[Tensor] = []
            ended_c: List[Tensor] = []
            for k, (t0, t1) in enumerate(chunks):
                if below[k] is not None:
                    stream.wait_event(below[k])
                    x_chunks[k].record_stream(stream)
                xp = input_projection(x_chunks[k], w_ih, x_bias)
                alive = sizes[t0]  # samples at the chunk's first step (sorted by length: a prefix)
                rows_k = slice(offsets[t0], offsets[t1])
                probe = None if norm_probes is None else norm_probes[layer][0][:, rows_k]
                out, hn, cn = backend.layer(
                    cell, xp, batch_sizes[t0:t1], h_state[:alive], None if c_state is None else c_state[:alive],
                    w_hh, bias, w_hr, False, clip, probe, xp_source=(x_chunks[k], w_ih, x_bias))
                if cuda:
                    below[k] = torch.cuda.Event()
                    below[k].record(stream)
                # The samples alive after the chunk go on from its final state; the others ended in it.
                after = sizes[t1] if t1 < T else 0
                outs.append(out)
                ended_h.append(hn[after:alive])
                h_state = hn
                if cell == _cells.LSTM:
                    ended_c.append(cn[after:alive])
                    c_state = cn
            # Final states in sample order: the samples of later chunks lived longer (sorted by length).
            h_n.append(torch.cat(ended_h[::-1], 0))
            c_n.append(torch.cat(ended_c[::-1], 0) if cell == _cells.LSTM else hn.new_zeros(0))
            if layer == len(weights) - 1:
                x = torch.cat(outs, 0)
        x_chunks = outs
        on_side += [h_n[-1], c_n[-1]]
    if cuda:
        on_side.append(x)
        for layer in range(len(weights)):
            main.wait_stream(_side_stream(rows.device, 1 + layer))
        for t in on_side:
            if t.numel() > 0:
                t.record_stream(main)
    h_stack = torch.stack(h_n, 0)
    c_stack = torch.stack(c_n, 0) if cell == _cells.LSTM else None
    return x, h_stack, c_stack


def run_stack(
    cell: int,
    rows: Tensor,
    batch_sizes: Tensor,
    h0: Tensor,
    c0: Optional[Tensor],
    weights: Sequence[Sequence[LayerWeights]],
    *,
    dropout: float,
    training: bool,
    backend,
    clip: float,
    norm_probes: Optional[Sequence[Sequence[object]]],
) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """Run every layer and direction.

    Args:
        cell: a cell id of rnnkern._cells.
        rows: [N, I] input rows (packed layout; padded input is batch_sizes = [B] * T).
        batch_sizes: [T] int64 CPU tensor, non-increasing.
        h0: [L * D, B, P] initial hidden states (sorted batch order); c0: [L * D, B, H] or None.
        weights: weights[layer][direction] = LayerWeights.
        dropout, training: torch.nn's dropout between layers (not after the last).
        backend: the Backend object that runs the recurrences.
        clip: hidden_grad_clip, <= 0 for none.
        norm_probes: norm_probes[layer][direction] [2, N] float32, whose gradients receive the norms
            (_compat.norm_probes), or None; for a one-layer, one-direction stack whose backend's
            delivers_norms_directly allows it, [[a _compat.NormSink]] instead.

    Returns:
        out [N, D * P], h_n [L * D, B, P], c_n [L * D, B, H] (LSTM) or None.

    With layer_wavefront_steps(), the layers of a one-direction stack run in a wavefront of chunks
    (_run_wavefront). With concurrent_directions(), each layer's reverse direction (its input projection, recurrence
    and, through autograd, which runs a backward op on its forward op's stream, their backward) runs
    on a side stream beside the forward direction: the persistent kernels occupy a few SMs each.
    """
    num_layers = len(weights)
    num_directions = len(weights[0])
    wavefront = layer_wavefront_steps(rows, num_layers, num_directions, dropout, training)
    if wavefront and batch_sizes.numel() > 0:
        return _run_wavefront(cell, rows, batch_sizes, h0, c0, weights, backend, clip, norm_probes,
                              wavefront)
    concurrent = concurrent_directions(rows, num_directions)
    x = rows
    h_n: List[Tensor] = []
    c_n: List[Tensor] = []

    def direction_layer(layer: int, direction: int, layer_weights: LayerWeights, x, h0, c0):
        w_ih, w_hh, b_ih, b_hh, w_hr = layer_weights
        index = layer * num_directions + direction
        x_bias, bias = _split_biases(cell, b_ih, b_hh)
        xp = input_projection(x, w_ih, x_bias)
        return backend.layer(
            cell, xp, batch_sizes, h0[index], None if c0 is None else c0[index],
            w_hh, bias, w_hr, direction == 1, clip,
            None if norm_probes is None else norm_probes[layer][direction], xp_source=(x, w_ih, x_bias))

    for layer in range(num_layers):
        if concurrent:
            main, side = torch.cuda.current_stream(x.device), _side_stream(x.device)
            reverse_weights = _from_main_stream(weights[layer][1])
            # (the input and states too: a leaf's gradient accumulates on the stream of its first use)
            reverse_inputs = _from_main_stream((x, h0, c0))
            side.wait_stream(main)  # the layer's inputs, made on the main stream
            _used_on(side, x, h0, c0)
            with torch.cuda.stream(side):
                reverse = direction_layer(layer, 1, reverse_weights, *reverse_inputs)
            results = [direction_layer(layer, 0, weights[layer][0], x, h0, c0), reverse]
            main.wait_stream(side)
            for t in reverse:  # made on the side stream, used (and freed) on the main one
                if t is not None and t.numel() > 0:
                    t.record_stream(main)
        else:
            results = [direction_layer(layer, d, weights[layer][d], x, h0, c0) for d in range(num_directions)]
        outs = [out for out, _, _ in results]
        h_n += [hn for _, hn, _ in results]
        c_n += [cn for _, _, cn in results]
        x = outs[0] if num_directions == 1 else torch.cat(outs, dim=1)
        if dropout != 0 and training and layer < num_layers - 1:
            # ATen's op, as torch.nn's RNNs apply it (the same masks; its RuntimeError for p outside [0, 1])
            x = torch.dropout(x, dropout, True)
    if (num_directions == 1 and backend.saves_output and x.device.type == "cpu"
            and (x.requires_grad or torch.jit.is_tracing())):
        # The layer op saved x for its backward: the caller gets a copy, which it may change in place
        # before the backward (out += residual), as torch.nn's CPU RNNs allow (cuDNN saves its output
        # too and raises then, as the CUDA backend does). ~0.5 % of a forward+backward. (A trace takes
        # the copy in any grad mode: torch.jit.trace checks its graph against one traced under no_grad.)
        x = x.clone()
    h_stack = torch.stack(h_n, 0)
    c_stack = torch.stack(c_n, 0) if cell == _cells.LSTM else None
    return x, h_stack, c_stack


def batch_size_list(batch_sizes: Tensor, num_rows: int, batch: int) -> List[int]:
    """batch_sizes [T] as a Python list, for N = num_rows rows of a batch of B = batch samples.

    When N == T * B every step holds all B samples (batch_sizes is non-increasing and starts at B),
    so the list follows from the shapes alone without reading the tensor: padded input then never
    reads tensor data on the host, which lets torch.compile trace it without a graph break.
    """
    steps = batch_sizes.shape[0]
    if num_rows == steps * batch:
        return [batch] * steps
    return batch_sizes.tolist()


def rows_to_time_batch(values: Tensor, batch_sizes: Tensor) -> Tensor:
    """Scatter per-row values [..., N] to [..., T, B] (zeros where a sequence has ended)."""
    sizes = batch_sizes.tolist()
    steps, batch = len(sizes), (sizes[0] if sizes else 0)
    if all(s == batch for s in sizes):
        return values.reshape(*values.shape[:-1], steps, batch)
    out = values.new_zeros(*values.shape[:-1], steps, batch)
    offset = 0
    for t, size in enumerate(sizes):
        out[..., t, :size] = values[..., offset:offset + size]
        offset += size
    return out
