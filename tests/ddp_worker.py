"""Runs a few DistributedDataParallel SGD steps of a model holding an rnnkern LSTM, on 2 CPU processes
(gloo), and saves each rank's parameters and per-step grad norms. Used by tests/test_ecosystem.py.

    python tests/ddp_worker.py OUT_DIR PORT
"""

import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import rnnkern

WORLD_SIZE = 2
STEPS = 3
LR = 0.5


class Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = rnnkern.LSTM(3, 6, num_layers=2, bidirectional=True, batch_first=True,
                                record_grad_norms=True)
        self.head = torch.nn.Linear(12, 1)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.head(out).squeeze(-1)


def make_model():
    torch.manual_seed(0)
    return Model().double()


def make_data():
    """The full batch [B=6, T=5, 3] and its targets; rank r trains on samples [3r, 3r + 3)."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(6, 5, 3, generator=generator, dtype=torch.float64)
    y = torch.randn(6, 5, generator=generator, dtype=torch.float64)
    return x, y


def shard(tensor, rank):
    per_rank = tensor.shape[0] // WORLD_SIZE
    return tensor[rank * per_rank:(rank + 1) * per_rank]


def loss_fn(model, x, y):
    return (model(x) - y).pow(2).mean()


def _rank_main(rank, out_dir, port):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD_SIZE)
    try:
        model = make_model()
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        optimizer = torch.optim.SGD(ddp.parameters(), lr=LR)
        x, y = make_data()
        x, y = shard(x, rank), shard(y, rank)
        norms, hook_calls = [], []
        model.rnn.register_grad_norm_hook(lambda module, gn: hook_calls.append(1))
        for _ in range(STEPS):
            optimizer.zero_grad()
            loss_fn(ddp, x, y).backward()
            norms.append(model.rnn.grad_norms.to_dict())
            optimizer.step()
        torch.save({"state_dict": model.state_dict(), "norms": norms, "hook_calls": len(hook_calls)},
                   os.path.join(out_dir, f"rank{rank}.pt"))
        # No rank tears its gloo connections down while the other still uses them (a rank that did
        # was seen to abort once in a full local run).
        dist.barrier()
    finally:
        dist.destroy_process_group()


def main(out_dir, port):
    mp.spawn(_rank_main, args=(out_dir, port), nprocs=WORLD_SIZE, join=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
