"""An independent oracle for the per-timestep gradient norms and the per-timestep clipping.

It unrolls the stack one sample at a time with torch.nn's *cell* modules (LSTMCell, GRUCell,
RNNCell) carrying the weights of the stack, keeps every h_t (and c_t), and reads ∂L/∂h_t through
tensor hooks — which see the total gradient of h_t, summed over all its uses. Clipping is a hook
that rescales that gradient. Nothing here shares code with rnnkern.
"""

import torch


def _cell_module(module, layer, direction):
    suffix = f"_l{layer}" + ("_reverse" if direction else "")
    kind = module.mode
    in_size = module.input_size if layer == 0 else module.hidden_size_out * (2 if module.bidirectional else 1)
    if kind == "LSTM" and module.proj_size > 0:
        cell = _ProjectedLSTMCell(in_size, module.hidden_size, module.proj_size, module.bias)
    elif kind == "LSTM":
        cell = torch.nn.LSTMCell(in_size, module.hidden_size, bias=module.bias)
    elif kind == "GRU":
        cell = torch.nn.GRUCell(in_size, module.hidden_size, bias=module.bias)
    else:
        cell = torch.nn.RNNCell(in_size, module.hidden_size, bias=module.bias,
                                nonlinearity="tanh" if kind == "RNN_TANH" else "relu")
    cell = cell.to(next(module.parameters()))
    with torch.no_grad():
        cell.weight_ih.copy_(getattr(module, "weight_ih" + suffix))
        cell.weight_hh.copy_(getattr(module, "weight_hh" + suffix))
        if module.bias:
            cell.bias_ih.copy_(getattr(module, "bias_ih" + suffix))
            cell.bias_hh.copy_(getattr(module, "bias_hh" + suffix))
    w_hr = getattr(module, "weight_hr" + suffix) if module.proj_size > 0 else None
    return cell, (None if w_hr is None else w_hr.detach().clone().requires_grad_(True))


def unrolled_norms(module, sequences, h0, c0, weights_out, weights_h, weights_c, clip=None):
    """Run `module`'s stack per sample and backpropagate L = Σ out·weights_out + Σ h_n·weights_h (+c).

    sequences: list of [len_b, I] tensors (caller's batch order); h0/c0: [L*D, B, *] or None;
    weights_out: list of [len_b, D*P]; weights_h/weights_c: [L*D, B, *].
    Returns (h_norms [L, D, T, B], c_norms or None, grads of the sequences, cells) where
    cells[(layer, direction)] = (cell module, w_hr) hold the weight gradients.
    """
    module.hidden_size_out = module.proj_size if module.proj_size > 0 else module.hidden_size
    layers, dirs = module.num_layers, 2 if module.bidirectional else 1
    steps, batch = max(len(s) for s in sequences), len(sequences)
    cells = {(l, d): _cell_module(module, l, d) for l in range(layers) for d in range(dirs)}
    is_lstm = module.mode == "LSTM"
    h_norms = torch.zeros(layers, dirs, steps, batch, dtype=torch.float64)
    c_norms = torch.zeros_like(h_norms) if is_lstm else None
    inputs = [s.detach().clone().requires_grad_(True) for s in sequences]
    loss = 0
    for b, seq in enumerate(inputs):
        layer_input = list(seq.unbind(0))
        for l in range(layers):
            outs = [[None] * len(seq) for _ in range(dirs)]
            for d in range(dirs):
                cell, w_hr = cells[(l, d)]
                idx = l * dirs + d
                h = h0[idx, b:b + 1] if h0 is not None else torch.zeros(
                    1, module.hidden_size_out, dtype=seq.dtype)
                c = (c0[idx, b:b + 1] if c0 is not None else torch.zeros(1, module.hidden_size, dtype=seq.dtype)) if is_lstm else None
                order = range(len(seq) - 1, -1, -1) if d else range(len(seq))
                for t in order:
                    x_t = layer_input[t].unsqueeze(0)
                    if is_lstm:
                        h_raw, c = cell(x_t, (h, c))
                        c.register_hook(_recorder(c_norms, l, d, t, b, None))
                        h = h_raw @ w_hr.t() if w_hr is not None else h_raw
                    else:
                        h = cell(x_t, h)
                    h.register_hook(_recorder(h_norms, l, d, t, b, clip))
                    outs[d][t] = h
                loss = loss + (h * weights_h[idx, b:b + 1]).sum()
                if is_lstm:
                    loss = loss + (c * weights_c[idx, b:b + 1]).sum()
            layer_input = [torch.cat([outs[d][t] for d in range(dirs)], dim=1).squeeze(0)
                           for t in range(len(seq))]
        top = torch.stack(layer_input, 0)
        loss = loss + (top * weights_out[b]).sum()
    loss.backward()
    return h_norms, c_norms, [x.grad for x in inputs], cells


class _ProjectedLSTMCell(torch.nn.Module):
    """LSTMCell whose recurrent input is the projected state (torch.nn.LSTMCell has no proj_size).
    Returns the unprojected h and c; the caller applies W_hr."""

    def __init__(self, in_size, hidden, proj, bias):
        super().__init__()
        self.weight_ih = torch.nn.Parameter(torch.empty(4 * hidden, in_size))
        self.weight_hh = torch.nn.Parameter(torch.empty(4 * hidden, proj))
        self.bias_ih = torch.nn.Parameter(torch.empty(4 * hidden)) if bias else None
        self.bias_hh = torch.nn.Parameter(torch.empty(4 * hidden)) if bias else None

    def forward(self, x, state):
        h, c = state
        gates = x @ self.weight_ih.t() + h @ self.weight_hh.t()
        if self.bias_ih is not None:
            gates = gates + self.bias_ih + self.bias_hh
        i, f, g, o = gates.chunk(4, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c


def _recorder(store, l, d, t, b, clip):
    def hook(grad):
        norm = grad.norm()
        store[l, d, t, b] = norm.item()
        if clip is not None and norm > clip:
            return grad * (clip / norm)
        return None
    return hook
