"""Long-range synthetic tasks for studying gradient flow through time.

Every task draws batches from an explicit ``torch.Generator`` (reproducible, independent of the model's
random state) and defines its loss and metric. Shapes are time-major like torch.nn's default:
inputs ``[T, B, input_size]``.

- :class:`AddingProblem` — Hochreiter & Schmidhuber (1997), "Long Short-Term Memory", Neural Computation
  9(8), section 5.4, Experiment 4 (the "adding problem"); used again by Pascanu, Mikolov & Bengio (2013),
  "On the difficulty of training recurrent neural networks", ICML, section 4.1.
- :class:`AddingProblem` with ``variant="halves"`` — the form used from Le, Jaitly & Hinton (2015) and
  Arjovsky, Shah & Bengio (2016) on: one marker in each half, values in [0, 1], target the plain sum.
- :class:`CopyTask` — the copy (memorisation) task of Arjovsky, Shah & Bengio (2016), "Unitary evolution
  recurrent neural networks", ICML, section 4.1, a form of the long-lag memorisation problems of
  Hochreiter & Schmidhuber (1997) (section 5.2, "noise-free sequences with long time lags") and of
  Pascanu et al. (2013) (section 4.1, "noiseless memorization").
"""

from __future__ import annotations

from typing import Dict, Tuple

import torch
from torch import Tensor
from torch.nn import functional as F


class AddingProblem:
    """The adding problem. Each step's input is a pair (value, marker); exactly two steps are marked 1.0.

    ``variant="hochreiter1997"`` (default), Hochreiter & Schmidhuber (1997), Experiment 4:
      - values uniform in [-1, 1];
      - the first marked step is one of the first ten steps (of the first ``T//2`` when ``T < 20``); its
        value is X1. The second is one of the first ``T//2 - 1`` still unmarked steps of the first half
        (positions ``[0, T//2)`` without the first mark); its value is X2;
      - the marker is 1.0 at the two marked steps, -1.0 at the first and the last step when they are
        not marked, 0.0 elsewhere;
      - a marked step at t = 0 has its value set to 0 (the paper's "X1 is set to zero in the rare case
        where the first pair of the sequence got marked");
      - target, at the end of the sequence only: ``0.5 + (X1 + X2) / 4``, in [0, 1];
      - a sequence counts as processed correctly when the absolute error at the end is below 0.04.
      One change from the paper: the length is fixed at ``seq_len`` (the paper drew it from
      [T, T + T/10]) so that a batch is one rectangular tensor.

    ``variant="halves"`` (Le, Jaitly & Hinton 2015; Arjovsky, Shah & Bengio 2016): values uniform in
    [0, 1]; one marked step uniform in the first half ``[0, T//2)``, the other uniform in the second
    half ``[T//2, T)``; marker 1.0 at those two steps, 0.0 elsewhere; target ``X1 + X2``. Accuracy uses
    the same 0.04 threshold on the absolute error, scaled by 4 (the target's range is 4 times wider).

    The model reads out one number from the last step; the loss is the mean squared error.
    """

    input_size = 2
    output_size = 1
    loss_at_every_step = False
    metric_name = "accuracy"

    def __init__(self, seq_len: int, variant: str = "hochreiter1997"):
        if variant not in ("hochreiter1997", "halves"):
            raise ValueError(f"unknown adding-problem variant {variant!r}; use 'hochreiter1997' or 'halves'")
        if seq_len < 4:
            raise ValueError(f"the adding problem needs seq_len >= 4, got {seq_len}")
        self.seq_len = seq_len
        self.variant = variant
        self.name = "adding" if variant == "hochreiter1997" else "adding-halves"
        self.tolerance = 0.04 if variant == "hochreiter1997" else 0.16

    def sample(self, batch: int, generator: torch.Generator) -> Tuple[Tensor, Tensor]:
        """A batch: inputs ``[T, B, 2]`` float32 (value, marker) and targets ``[B, 1]`` float32 (CPU)."""
        T, half = self.seq_len, self.seq_len // 2
        rows = torch.arange(batch)
        marker = torch.zeros(T, batch)
        if self.variant == "hochreiter1997":
            values = torch.rand(T, batch, generator=generator) * 2 - 1
            first = torch.randint(0, min(10, half), (batch,), generator=generator)
            # One of the half - 1 unmarked positions of [0, half): draw in [0, half - 1), skip `first`.
            second = torch.randint(0, half - 1, (batch,), generator=generator)
            second = second + (second >= first).long()
            marker[0] = -1.0
            marker[T - 1] = -1.0
            marker[first, rows] = 1.0
            marker[second, rows] = 1.0
            values[0] = torch.where(marker[0] == 1.0, torch.zeros_like(values[0]), values[0])
            total = values[first, rows] + values[second, rows]
            target = 0.5 + total / 4.0
        else:
            values = torch.rand(T, batch, generator=generator)
            first = torch.randint(0, half, (batch,), generator=generator)
            second = torch.randint(half, T, (batch,), generator=generator)
            marker[first, rows] = 1.0
            marker[second, rows] = 1.0
            target = values[first, rows] + values[second, rows]
        return torch.stack([values, marker], dim=-1), target.unsqueeze(-1)

    def loss(self, prediction: Tensor, target: Tensor) -> Tensor:
        """Mean squared error; ``prediction [B, 1]`` (the readout of the last step)."""
        return F.mse_loss(prediction, target)

    def metric(self, prediction: Tensor, target: Tensor) -> float:
        """Fraction of sequences whose absolute error is below the tolerance (0.04 in the paper)."""
        return float(((prediction - target).abs() < self.tolerance).float().mean())

    def baseline_loss(self) -> float:
        """MSE of the best constant prediction (the target's variance): 1/24 or 1/6."""
        return 1.0 / 24.0 if self.variant == "hochreiter1997" else 1.0 / 6.0


class CopyTask:
    """The copy task (Arjovsky, Shah & Bengio 2016, section 4.1).

    Alphabet ``{0, ..., n_symbols + 1}``: 0 is the blank, 1..n_symbols are data symbols and
    ``n_symbols + 1`` is the delimiter. With ``K = copy_len`` and delay ``D = seq_len - 2K``
    (the paper's T; the sequence has ``D + 2K`` steps in all):
      - input: K data symbols drawn uniformly from 1..n_symbols, then D - 1 blanks, the delimiter at
        step ``K + D - 1``, then K blanks; one-hot encoded, ``[seq_len, B, n_symbols + 2]``;
      - target: blanks at the first ``K + D`` steps, then the K data symbols in their original order;
        class indices ``[seq_len, B]`` in 0..n_symbols.
    The loss is the cross-entropy averaged over every step (as in the paper, so the memoryless baseline
    that outputs blanks and then guesses is ``K log(n_symbols) / seq_len``); the metric is the accuracy
    on the K recalled symbols. The paper's setting is K = 10, n_symbols = 8.
    """

    loss_at_every_step = True
    metric_name = "recall accuracy"
    name = "copy"

    def __init__(self, seq_len: int, copy_len: int = 10, n_symbols: int = 8):
        if copy_len < 1 or n_symbols < 2:
            raise ValueError("the copy task needs copy_len >= 1 and n_symbols >= 2")
        if seq_len < 2 * copy_len + 1:
            raise ValueError(f"the copy task needs seq_len >= 2 * copy_len + 1 = {2 * copy_len + 1}, got {seq_len}")
        self.seq_len, self.copy_len, self.n_symbols = seq_len, copy_len, n_symbols
        self.delay = seq_len - 2 * copy_len
        self.input_size = n_symbols + 2
        self.output_size = n_symbols + 1

    def sample(self, batch: int, generator: torch.Generator) -> Tuple[Tensor, Tensor]:
        """A batch: one-hot inputs ``[T, B, n_symbols + 2]`` float32 and targets ``[T, B]`` int64 (CPU)."""
        K, D, T = self.copy_len, self.delay, self.seq_len
        data = torch.randint(1, self.n_symbols + 1, (K, batch), generator=generator)
        symbols = torch.zeros(T, batch, dtype=torch.long)
        symbols[:K] = data
        symbols[K + D - 1] = self.n_symbols + 1
        target = torch.zeros(T, batch, dtype=torch.long)
        target[K + D:] = data
        return F.one_hot(symbols, self.input_size).float(), target

    def loss(self, logits: Tensor, target: Tensor) -> Tensor:
        """Cross-entropy over every step; ``logits [T, B, n_symbols + 1]``."""
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))

    def metric(self, logits: Tensor, target: Tensor) -> float:
        """Accuracy on the K recalled symbols (the last K steps)."""
        K = self.copy_len
        return float((logits[-K:].argmax(-1) == target[-K:]).float().mean())

    def baseline_loss(self) -> float:
        import math

        return self.copy_len * math.log(self.n_symbols) / self.seq_len


TASKS: Dict[str, str] = {
    "adding": "adding problem, Hochreiter & Schmidhuber (1997) Experiment 4",
    "adding-halves": "adding problem, one marker per half (Le et al. 2015; Arjovsky et al. 2016)",
    "copy": "copy task (Arjovsky, Shah & Bengio 2016)",
}


def make_task(name: str, seq_len: int):
    """The task called `name` (a key of TASKS) at sequence length seq_len."""
    if name == "adding":
        return AddingProblem(seq_len, "hochreiter1997")
    if name == "adding-halves":
        return AddingProblem(seq_len, "halves")
    if name == "copy":
        return CopyTask(seq_len)
    raise ValueError(f"unknown task {name!r}; choose one of {sorted(TASKS)}")
