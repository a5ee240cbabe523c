"""A model of the cluster kernels' st.async exchange (csrc/cuda/persistent_cluster_kernels.cuh, Async = true),
checked under random schedules on the CPU.

The GPU runs the kernels rarely (issue 9: a lent device, minutes per session), and a protocol error
there is a hang or a silent race. This model replays each block's program with the kernel's
synchronisation — its mbarriers (arrival count 1, a transaction count that may run ahead of the
announcement, phases by parity), the bytes each block announces per phase (the kernel's formulas),
the st.async stores each block issues (enumerated as the kernel's loops issue them) delivered in any
order at any later time, and its buffers (stages by step parity; the backward's partials and inbox by
parity, or single where the plan has room for one copy only) — and checks that every read finds the data of the step it needs, that every store
completes on the phase it was meant for, and that no schedule deadlocks. Blocks without hidden units
(the cluster is a power of two of blocks) and tiles whose rows grow or shrink are included.
"""

import random

import pytest

CHUNK = 16  # bytes per st.async of a state chunk


class Barrier:
    """An mbarrier with one expected arrival per phase (the receiver's own arrive.expect_tx)."""

    def __init__(self):
        self.phase = 0  # phases completed
        self.pending = 1
        self.tx = 0

    def _maybe_complete(self):
        if self.pending == 0 and self.tx == 0:
            self.phase += 1
            self.pending = 1

    def expect(self, nbytes):
        self.tx += nbytes
        self.pending -= 1
        assert self.pending == 0, "a second arrival in one phase"
        self._maybe_complete()

    def complete_tx(self, nbytes, phase):
        assert self.phase == phase, f"a store meant for phase {phase} completed on phase {self.phase}"
        self.tx -= nbytes
        assert abs(self.tx) < 2 ** 20, "transaction count out of range"
        self._maybe_complete()

    def done(self, phase):  # try_wait.parity: the phase with this index has completed
        return self.phase > phase


class Cluster:
    """Blocks, their buffers and barriers, and the stores in flight."""

    def __init__(self, blocks, rng):
        self.blocks = blocks
        self.rng = rng
        self.buffers = [dict() for _ in range(blocks)]  # per block: key -> tag (the step written)
        self.bars = [dict() for _ in range(blocks)]      # per block: name -> Barrier
        self.flight = []                                 # (dest, key, tag, bytes, barrier name, phase)

    def bar(self, block, name):
        return self.bars[block].setdefault(name, Barrier())

    def send(self, dest, key, tag, nbytes, bar, phase):
        self.flight.append((dest, key, tag, nbytes, bar, phase))

    def deliver(self, i):
        dest, key, tag, nbytes, bar, phase = self.flight.pop(i)
        self.buffers[dest][key] = tag
        self.bar(dest, bar).complete_tx(nbytes, phase)

    def read(self, block, key, tag, what):
        got = self.buffers[block].get(key)
        assert got == tag, f"block {block} read {what} {key}: step {got}, wanted {tag}"


def run(cluster, programs):
    """Interleave the block programs (generators yielding (barrier, phase) to wait for, or None) and
    the deliveries at random until all are done; fail on a deadlock."""
    waiting = {r: None for r in range(len(programs))}
    live = dict(enumerate(programs))
    rng = cluster.rng
    while live or cluster.flight:
        ready = [r for r in live if waiting[r] is None or cluster.bar(r, waiting[r][0]).done(waiting[r][1])]
        choices = [("block", r) for r in ready] + [("store", i) for i in range(len(cluster.flight))]
        assert choices, f"deadlock: blocks {sorted(live)} wait for {[waiting[r] for r in live]}"
        kind, which = rng.choice(choices)
        if kind == "store":
            cluster.deliver(which)
            continue
        try:
            waiting[which] = next(live[which])
        except StopIteration:
            del live[which]


def units_of(r, units, hidden):
    return max(0, min(units, hidden - r * units))


def forward_block(c, r, *, hidden, units, rows, vec):
    """cluster_forward_kernel<Async = true>: the blocks [0, used) that own units (the others skip the
    loop), stages by step parity, full[k] per stage, phases only for steps that send rows."""
    steps = len(rows)
    nu = units_of(r, units, hidden)
    used = -(-hidden // units)
    others_chunks = sum(-(-units_of(q, units, hidden) // vec) for q in range(used) if q != r)  # the kernel's
    rows_sent = 0
    phases = {0: 0, 1: 0}  # phases used per stage: the index of the next one
    for s in range(steps if nu > 0 else 0):
        if rows_sent > 0:
            yield (f"full{s & 1}", phases[s & 1])  # stage s % 2: the others' step s - 1
            phases[s & 1] += 1
        if used > 1 and s + 1 < steps and rows[s] > 0:
            c.bar(r, f"full{(s + 1) & 1}").expect(rows[s] * others_chunks * CHUNK)
        rows_prev = min(rows[s], rows[s - 1]) if s > 0 else 0
        for q in range(used):  # the product reads every block's columns of the continuing rows
            if q != r:
                for b in range(rows_prev):
                    for j in range(-(-units_of(q, units, hidden) // vec)):
                        c.read(r, ("stage", s & 1, b, q, j), s - 1, "h_{t-1}")
        if s + 1 < steps and used > 1:  # broadcast_columns<Async = true> (nu > 0 here)
            for chunk in range(rows[s] * -(-nu // vec)):
                b, j = divmod(chunk, -(-nu // vec))
                for q in range(used):
                    if q != r:
                        # the receiver's phase for this stage: as many as it has waited for before
                        c.send(q, ("stage", (s + 1) & 1, b, r, j), s, CHUNK, f"full{(s + 1) & 1}",
                               phase_of(rows, s, (s + 1) & 1))
        rows_sent = rows[s] if (used > 1 and s + 1 < steps) else 0
        yield None


def phase_of(rows, s, stage):
    """The index of the phase of `stage` that the rows sent at step s complete: the earlier steps that
    sent rows into the same stage (all blocks agree on it: it depends on the tile's rows only)."""
    return sum(1 for q in range(s) if rows[q] > 0 and (q + 1) & 1 == stage)


def backward_block(c, r, *, hidden, units, rows, mma, acc_bytes, norm_c, norm_g, clipping, copies=2,
                   norms_first=None):
    """cluster_backward_kernel<Async = true>: the Σ g² partials by step parity (full_g[k]); the inbox
    in `copies` copies (Plan::copies; full_in[k]). With clipping or one copy (norms_first), each
    block's Σ g² goes to every block (full_g) before the cell; otherwise the recorded norms' partials
    (Σ g², and the LSTM's Σ dc² always) go to global memory, summed after the loop (not part of the
    exchange: norm_c and norm_g then change nothing here), and the step has one wait.
    norms_first=False with copies=1: what the kernel never does (the negative test)."""
    n = c.blocks
    nu = units_of(r, units, hidden)
    used = -(-hidden // units)
    if norms_first is None:
        norms_first = clipping or copies == 1
    inbox_row_bytes = 0
    if nu > 0:  # the kernel's formula
        inbox_row_bytes = (used - 1) * ((nu + 3) // 4) * 4 * acc_bytes
    # The reduce-scatter's stores, as the kernel's loops issue them (send_partials): 4-unit chunks for
    # every k < H in steps of 4 (MMA: two lanes' accumulator pairs traded by a shuffle; float32 on
    # the tensor cores).
    assert not mma or acc_bytes == 4
    pieces = [(k, 4 * acc_bytes) for k in range(0, hidden, 4)]
    for s in range(len(rows)):
        p, pin = s & 1, s % copies  # the Σ g² partials' copy; the inbox's
        g_phase = sum(1 for q in range(s) if rows[q] > 0 and q & 1 == p)  # steps with rows, this copy
        phase = sum(1 for q in range(s) if rows[q] > 0 and q % copies == pin)
        if norms_first and n > 1 and rows[s] > 0:
            c.bar(r, f"g{p}").expect((n - 1) * rows[s] * 8)
        if inbox_row_bytes > 0 and rows[s] > 0:
            c.bar(r, f"in{pin}").expect(rows[s] * inbox_row_bytes)
        if norms_first:  # A: Σ g² of own units to every block (blocks without units send zeros)
            for q in range(n):
                for b in range(rows[s]):
                    if q == r:
                        c.buffers[r][("part_g", p, r, b)] = s
                    else:
                        c.send(q, ("part_g", p, r, b), s, 8, f"g{p}", g_phase)
            if n > 1 and rows[s] > 0:
                yield (f"g{p}", g_phase)
            for q in range(n):
                for b in range(rows[s]):
                    c.read(r, ("part_g", p, q, b), s, "Σ g²")
        # C: the dh partials of every unit to its owner
        if nu > 0:
            for b in range(rows[s]):
                for k, nbytes in pieces:
                    if k // units == r:
                        c.buffers[r][("inbox", pin, r, b, k)] = s
                    else:
                        c.send(k // units, ("inbox", pin, r, b, k), s, nbytes, f"in{pin}", phase)
        if inbox_row_bytes > 0 and rows[s] > 0:
            yield (f"in{pin}", phase)
        # D: own units' sums over the blocks with units
        if nu > 0:
            for q in range(used):
                for b in range(rows[s]):
                    for k, _ in pieces:
                        if k // units == r:
                            c.read(r, ("inbox", pin, q, b, k), s, "dh partial")
        yield None


def random_layer(rng):
    """A layer as make_cluster_plan splits it: units a multiple of the grain, blocks the smallest
    power of two covering them; the tile's rows per step, growing (reverse) or shrinking (forward)."""
    grain = rng.choice([4, 8])
    hidden = rng.randint(1, 70)
    size = rng.choice([1, 2, 4, 8, 16])
    units = -(-(-(-hidden // size)) // grain) * grain
    blocks = 1
    while blocks < -(-hidden // units):
        blocks *= 2
    steps = rng.randint(1, 6)
    rows = sorted((rng.randint(0, 5) for _ in range(steps)), reverse=rng.random() < 0.5)
    return grain, hidden, units, blocks, rows


@pytest.mark.parametrize("seed", range(60))
def test_forward_exchange_under_random_schedules(seed):
    rng = random.Random(seed)
    for _ in range(10):
        grain, hidden, units, blocks, rows = random_layer(rng)
        vec = 8 if grain == 8 else 4  # elements per 16-byte chunk: 16-bit (grain 8) or float32
        c = Cluster(blocks, rng)
        run(c, [forward_block(c, r, hidden=hidden, units=units, rows=rows, vec=vec) for r in range(blocks)])


@pytest.mark.parametrize("seed", range(60))
def test_backward_exchange_under_random_schedules(seed):
    rng = random.Random(1000 + seed)
    for _ in range(10):
        grain, hidden, units, blocks, rows = random_layer(rng)
        mma = grain == 8 or rng.random() < 0.3  # 16-bit, or TF32 float32 (grain 4)
        acc_bytes = 4 if mma else rng.choice([4, 8])
        norm_c, norm_g, clipping = (rng.random() < 0.5 for _ in range(3))
        copies = rng.choice([1, 2])
        c = Cluster(blocks, rng)
        run(c, [backward_block(c, r, hidden=hidden, units=units, rows=rows, mma=mma, acc_bytes=acc_bytes,
                               norm_c=norm_c, norm_g=norm_g, clipping=clipping, copies=copies)
                for r in range(blocks)])


def test_the_model_catches_a_single_buffered_inbox_without_clipping():
    """With one exchange per step (no clipping) the buffers need two copies: single ones (which the
    kernel pairs with the norms' exchange first, keeping every block within a step of the others) fail
    under some schedule."""
    failures = 0
    for seed in range(200):
        rng = random.Random(seed)
        c = Cluster(4, rng)
        try:
            run(c, [backward_block(c, r, hidden=16, units=4, rows=[2, 2, 2, 2], mma=False, acc_bytes=4,
                                   norm_c=False, norm_g=False, clipping=False, copies=1, norms_first=False)
                    for r in range(4)])
        except AssertionError:
            failures += 1
    assert failures > 0


def test_the_model_catches_a_single_buffered_partial_sum():
    """The model is not vacuous: with the backward's partials single-buffered (one barrier, as the
    kernel had them before a block without units could run a step ahead), some schedule fails."""
    failures = 0
    for seed in range(200):
        rng = random.Random(seed)
        hidden, units, blocks, rows = 12, 4, 4, [3, 3, 3, 3]  # block 3 owns no units
        c = Cluster(blocks, rng)

        def single(r):
            nu = units_of(r, units, hidden)
            for s in range(len(rows)):
                c.bar(r, "g").expect((blocks - 1) * rows[s] * 8)
                for q in range(blocks):
                    for b in range(rows[s]):
                        if q == r:
                            c.buffers[r][("part_g", r, b)] = s
                        else:
                            c.send(q, ("part_g", r, b), s, 8, "g", s)
                yield ("g", s)
                for q in range(blocks):
                    for b in range(rows[s]):
                        c.read(r, ("part_g", q, b), s, "Σ g²")
                if nu == 0:
                    continue  # nothing more to wait for: runs ahead
                yield None
        try:
            run(c, [single(r) for r in range(blocks)])
        except AssertionError:
            failures += 1
    assert failures > 0
