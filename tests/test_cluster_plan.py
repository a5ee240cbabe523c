"""The cluster kernels' planner (make_cluster_plan, csrc/cuda/persistent_cluster.cu) without a GPU: its
own code, built with a model of a Hopper device standing in for the CUDA runtime's attribute and
occupancy calls (scripts/plan_model.cu: 132 SMs in 8 modelled GPCs, 227 KiB of shared memory per
block, one block per SM, clusters confined to a GPC). Checks the plans' invariants over many layers
and the plans the docs and bench/NOTES.md describe. Needs nvcc (CUDA_HOME) and a host compiler, as the
build of the extension's CUDA code does."""

import itertools
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CUDA_HOME = os.environ.get("CUDA_HOME", "/usr/local/cuda")
HAVE_NVCC = os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")) and shutil.which(os.environ.get("CXX", "g++"))

pytestmark = pytest.mark.skipif(not HAVE_NVCC, reason=f"needs nvcc ({CUDA_HOME}/bin/nvcc) and a host compiler")

OPTIN = 232448  # the model's shared memory per block (sharedMemPerBlockOptin)
SM_SHARED = 233472  # and per SM (sharedMemPerMultiprocessor)
SMS = 132
GPC_SMS = (18, 18, 18, 18, 16, 16, 14, 14)  # scripts/plan_model.cu
GATES = {"lstm": 4, "gru": 3, "tanh": 1, "relu": 1}
SHARED_MEMORY, OCCUPANCY = 4, 5  # persistent::Decline


def resident(cluster):
    return sum(sms // cluster for sms in GPC_SMS)


@pytest.fixture(scope="module")
def plan(tmp_path_factory):
    binary = tmp_path_factory.mktemp("plan") / "plan_model"
    subprocess.run(["bash", "scripts/build_plan_model.sh", str(binary)], cwd=ROOT, check=True,
                   capture_output=True, text=True, timeout=300)

    def run(*cases):
        out = subprocess.run([str(binary), *cases], capture_output=True, text=True, timeout=60, check=True)
        plans = {}
        for line in out.stdout.splitlines():
            case, *fields = line.split()
            plans[case] = {k: int(v) for k, v in (f.split("=") for f in fields)}
        assert list(plans) == list(cases)
        return plans

    return run


def _check_invariants(case, p):
    cell, dtype, kernel, batch, hidden = case.split(":")
    kernel, _, rows_cap = kernel.partition("@")
    kernel, _, cap = kernel.partition("/")
    batch, hidden, cap, rows_cap = int(batch), int(hidden), int(cap or 0), int(rows_cap or 0)
    grain = 8 if dtype in ("f16", "bf16") else 4
    assert p["optin"] == OPTIN
    if not p["ok"]:
        assert p["reason"] in (SHARED_MEMORY, OCCUPANCY), case
        return
    assert p["tf32"] == (dtype == "tf32"), case
    assert p["smem_forward"] <= OPTIN and p["smem_backward"] <= OPTIN, case
    assert p["units"] > 0 and p["units"] % grain == 0, case
    assert p["blocks"] % p["cluster"] == 0, case
    tiles = p["blocks"] // p["cluster"]
    assert 1 <= p["tile_rows"] <= 64 and tiles * p["tile_rows"] >= batch > (tiles - 1) * p["tile_rows"], case
    if rows_cap and -(-batch // rows_cap) <= (6 if kernel != "wide" else 1):  # (resident(16): 6)
        assert p["tile_rows"] <= rows_cap, case  # few tiles: the cap's always run at once
    if tiles <= p["resident"]:  # all run at once: every block on an SM of its own (on_own_sms)
        assert min(p["smem_forward"], p["smem_backward"]) >= SM_SHARED // 2, case
    owners = -(-hidden // p["units"])  # blocks that own units
    if kernel == "wide":
        assert p["copies"] == 2 and p["resident"] == tiles and p["blocks"] <= SMS, case
        assert owners == p["cluster"], case  # every block of a tile owns units
    else:
        assert p["cluster"] in (1, 2, 4, 8, 16) and (cap == 0 or p["cluster"] <= cap), case
        # the smallest power of two of blocks that covers the units
        assert owners <= p["cluster"] and (p["cluster"] == 1 or owners > p["cluster"] // 2), case
        assert p["copies"] in (1, 2) and p["resident"] == resident(p["cluster"]), case


def test_plan_invariants(plan):
    """Every plan over cells x dtypes x exchanges x batches x hidden sizes x cluster caps: shared memory
    within the device's, units whole chunks, tiles covering the batch, clusters covering the units."""
    cases = [f"{cell}:{dtype}:{kernel}" + (f"/{cap}" if cap else "") + f":{batch}:{hidden}"
             for cell, dtype, kernel, batch, hidden, cap in itertools.product(
                 GATES, ("f16", "bf16", "f32", "tf32", "f64"), ("cluster", "async", "wide"),
                 (1, 5, 16, 33, 64, 256), (8, 37, 256, 512, 768, 1024), (0, 1, 4))
             if not (kernel == "wide" and cap)]
    plans = plan(*cases)
    for case, p in plans.items():
        _check_invariants(case, p)
    # the cluster kernels accept what issue 9 needs on one cluster, and decline beyond it
    assert all(plans[f"{c}:{d}:cluster:16:256"]["ok"] for c in GATES for d in ("f16", "bf16", "f32", "tf32"))
    assert not plans["lstm:f16:cluster:16:768"]["ok"] and plans["lstm:f16:wide:16:768"]["ok"]


def test_tile_caps_keep_the_invariants(plan):
    """RNNKERN_TILE_ROWS (@R) from 1 to 64 rows over cells x dtypes x exchanges x batches x sizes."""
    cases = [f"{cell}:{dtype}:{kernel}@{rows}:{batch}:{hidden}"
             for cell, dtype, kernel, batch, hidden, rows in itertools.product(
                 GATES, ("f16", "f32", "tf32", "f64"), ("cluster", "async", "wide"), (1, 5, 16, 33, 100),
                 (37, 256, 768), (1, 4, 8, 16, 64))]
    for case, p in plan(*cases).items():
        _check_invariants(case, p)


# The batch rows per tile a plan tries first, per dtype (first_tile_rows): the FMA products' work per
# block scales with the tile's rows; the tensor cores pad a tile to 16 rows, but the cell math and the
# exchange per block still shrink (16-bit: 8, measured; TF32: not measured below 16).
FIRST_ROWS = {"f32": 4, "f64": 4, "f16": 8, "bf16": 8, "tf32": 16}


def _spread_rows(batch, cap):
    """The rows of the tiles a plan from `cap` rows takes on clusters of 16 (the model runs
    resident(16) of them): the first of cap, 2 cap, ... below 16 whose tiles all run at once; None:
    none does, the plan from 16 rows."""
    while cap < 16:
        tiles = -(-batch // cap)
        if tiles <= resident(16):
            return -(-batch // tiles)
        cap *= 2
    return None


@pytest.mark.parametrize("cell", GATES)
def test_small_tiles_where_all_run_at_once(plan, cell):
    """Each dtype starts from its own tile size (FIRST_ROWS) on the largest cluster, taken where all of
    a batch's tiles run at once (the model runs 6 clusters of 16), else from twice the rows, and so on;
    where none below 16 rows does, the plan from 16 rows. RNNKERN_TILE_ROWS (@R) sets the first size."""
    H = 256
    caps = ("", "@4", "@8", "@16")
    batches = (3, 5, 16, 24, 33, 48, 64)
    cases = [f"{cell}:{dtype}:{kernel}{cap}:{batch}:{H}" for dtype in FIRST_ROWS
             for kernel in ("cluster", "async") for cap in caps for batch in batches]
    p = plan(*cases)
    for dtype, first in FIRST_ROWS.items():
        for kernel in ("cluster", "async"):
            for batch in batches:
                default, at4, at8, at16 = (p[f"{cell}:{dtype}:{kernel}{cap}:{batch}:{H}"] for cap in caps)
                assert all(q["ok"] for q in (default, at4, at8, at16)), (cell, dtype, batch)
                assert default == {4: at4, 8: at8, 16: at16}[first], (dtype, kernel, batch)
                for cap, got in ((4, at4), (8, at8)):
                    rows = _spread_rows(batch, cap)
                    if rows is None:
                        assert got == at16, (dtype, batch, cap)
                    else:
                        assert (got["tile_rows"], got["cluster"]) == (rows, 16), (dtype, batch, cap, got)
                        assert got["blocks"] == 16 * -(-batch // rows), (dtype, batch, cap, got)
    f32 = p[f"{cell}:f32:async:16:{H}"]
    assert (f32["blocks"], f32["cluster"], f32["tile_rows"]) == (64, 16, 4), f32  # four clusters of 4 rows
    # each of their blocks asks for over half an SM's shared memory: no two share an SM (the point of
    # the smaller tiles is more SMs); so do the 16-row and one-tile plans' (on_own_sms)
    assert min(f32["smem_forward"], f32["smem_backward"]) >= SM_SHARED // 2, f32
    assert p[f"{cell}:f32:async@16:16:{H}"]["smem_forward"] >= SM_SHARED // 2
    assert p[f"{cell}:f32:async:3:{H}"]["blocks"] == 16  # one tile
    assert p[f"{cell}:f32:async:3:{H}"]["smem_forward"] >= SM_SHARED // 2
    assert p[f"{cell}:f32:async:33:{H}"]["tile_rows"] == 7  # 9 tiles of 4 would not all run: 5 of 7
    assert p[f"{cell}:f32:async:48:{H}"]["tile_rows"] == 8  # 6 clusters of 16: all resident
    assert p[f"{cell}:f32:async:64:{H}"] == p[f"{cell}:f32:async@16:64:{H}"]  # 8 would not be
    f16 = p[f"{cell}:f16:async:16:{H}"]
    assert (f16["blocks"], f16["tile_rows"]) == (32, 8) and p[f"{cell}:tf32:async:16:{H}"]["tile_rows"] == 16


def test_documented_plans(plan):
    """The plans docs/internals.md and bench/NOTES.md describe (under the model's GPCs where the
    cluster count matters)."""
    p = plan("lstm:f16:cluster:16:256", "lstm:f32:cluster:16:256", "lstm:f16:cluster@16:16:512",
             "tanh:f16:cluster/1@16:16:256", "lstm:f16:cluster/4@16:16:256", "lstm:f16:wide@16:16:768",
             "lstm:f16:wide:16:768", "lstm:f16:wide:64:1024")
    # B16 H256: clusters of 16 blocks of 16 units, two copies of the backward's exchanged buffers
    assert (p["lstm:f16:cluster:16:256"]["cluster"], p["lstm:f16:cluster:16:256"]["units"]) == (16, 16)
    assert p["lstm:f16:cluster:16:256"]["copies"] == 2 and p["lstm:f32:cluster:16:256"]["cluster"] == 16
    # 16-bit LSTM H512 with a 16-row tile still fits with two copies (~216 of 227 KiB)
    h512 = p["lstm:f16:cluster@16:16:512"]
    assert h512["ok"] and h512["copies"] == 2 and 214 * 1024 <= h512["smem_backward"] <= OPTIN
    # RNN-tanh float16 H256 (one 16-row tile) in one block: forward ~182 KiB, backward ~221 KiB with one copy
    one = p["tanh:f16:cluster/1@16:16:256"]
    assert (one["cluster"], one["units"], one["copies"]) == (1, 256, 1)
    assert 180 * 1024 < one["smem_forward"] < 185 * 1024 and 219 * 1024 < one["smem_backward"] < 222 * 1024
    # LSTM float16 H256 (one 16-row tile) on 4 blocks: ~170 / ~190 KiB
    four = p["lstm:f16:cluster/4@16:16:256"]
    assert (four["cluster"], four["units"]) == (4, 64)
    assert 168 * 1024 < four["smem_forward"] < 172 * 1024 and 188 * 1024 < four["smem_backward"] < 192 * 1024
    # wide: LSTM B16 H768 on 48 blocks of 16 units a tile (two tiles of 8 rows, or one of 16); B64
    # H1024 as 2 tiles of 32 rows x 64 blocks
    assert (p["lstm:f16:wide@16:16:768"]["blocks"], p["lstm:f16:wide@16:16:768"]["units"]) == (48, 16)
    eight = p["lstm:f16:wide:16:768"]
    assert (eight["blocks"], eight["cluster"], eight["tile_rows"], eight["units"]) == (96, 48, 8, 16)
    wide = p["lstm:f16:wide:64:1024"]
    assert (wide["blocks"], wide["cluster"], wide["tile_rows"]) == (128, 64, 32)


@pytest.mark.parametrize("batch", [64, 128, 256])
def test_large_batches_take_smaller_clusters_before_larger_tiles(plan, batch):
    """Without a cap: 16-row tiles on the largest cluster with every tile's cluster resident (each block
    holding more of W_hh), larger tiles only where none is. With RNNKERN_CLUSTER_BLOCKS (the cap), the
    cluster size stays and the tiles grow until every cluster is resident."""
    free, capped = f"lstm:f16:cluster:{batch}:256", f"lstm:f16:cluster/16:{batch}:256"
    p = plan(free, capped)
    tiles = batch // 16
    sizes = [c for c in (16, 8, 4, 2, 1) if resident(c) >= tiles]
    assert p[free]["ok"] and p[free]["tile_rows"] == 16 and p[free]["cluster"] == sizes[0]
    assert p[free]["resident"] >= tiles
    assert p[capped]["ok"] and p[capped]["cluster"] == 16
    capped_tiles = p[capped]["blocks"] // 16
    assert capped_tiles <= resident(16) and p[capped]["tile_rows"] == min(64, -(-batch // capped_tiles))
    assert (p[capped]["tile_rows"] > 16) == (tiles > resident(16))


def test_auto_takes_the_measured_fastest_cluster_plan(plan):
    """What backend "auto" runs on the kernels on clusters (auto_cluster_plan): cluster-async (exchange 1)
    where W_hh fits in one cluster, else wide (2); each dtype's first tile size; with TF32 allowed
    ("tf32"), exact float32 where its tiles are below 16 rows, else TF32; nothing (ok=0) for float64, or
    where tiles of more than 16 rows would be needed."""
    p = plan("lstm:f32:auto:16:256", "lstm:tf32:auto:16:256", "lstm:tf32:auto@16:16:256",
             "gru:tf32:auto:64:256", "lstm:f16:auto:16:256", "tanh:bf16:auto:16:256", "lstm:f16:auto:16:768",
             "lstm:tf32:auto:16:768", "lstm:f16:auto:256:256", "lstm:f64:auto:16:256", "lstm:f16:auto:64:1024")
    f32 = p["lstm:f32:auto:16:256"]
    assert (f32["ok"], f32["exchange"], f32["tf32"], f32["tile_rows"], f32["blocks"]) == (1, 1, 0, 4, 64), f32
    assert p["lstm:tf32:auto:16:256"] == f32  # exact on 4-row tiles over TF32 on one 16-row tile
    tf32 = p["lstm:tf32:auto@16:16:256"]  # 16-row tiles: TF32
    assert (tf32["ok"], tf32["tf32"], tf32["tile_rows"]) == (1, 1, 16), tf32
    # B64: 16 tiles of 4 or 8 of 8 would not all run at once (the model runs 6 clusters of 16): 16-row
    # tiles, so TF32
    b64 = p["gru:tf32:auto:64:256"]
    assert (b64["ok"], b64["tf32"], b64["tile_rows"]) == (1, 1, 16), b64
    for case in ("lstm:f16:auto:16:256", "tanh:bf16:auto:16:256"):
        assert (p[case]["ok"], p[case]["exchange"], p[case]["tile_rows"]) == (1, 1, 8), (case, p[case])
    wide = p["lstm:f16:auto:16:768"]
    assert (wide["ok"], wide["exchange"], wide["tile_rows"], wide["blocks"]) == (1, 2, 8, 96), wide
    wide32 = p["lstm:tf32:auto:16:768"]  # exact float32 on two 8-row tiles (4-row ones do not fit)
    assert (wide32["ok"], wide32["exchange"], wide32["tf32"], wide32["tile_rows"]) == (1, 2, 0, 8), wide32
    large = p["lstm:f16:auto:256:256"]  # 16 tiles of 16 rows on smaller clusters, all resident
    assert (large["ok"], large["exchange"], large["tile_rows"]) == (1, 1, 16) and large["cluster"] < 16, large
    assert p["lstm:f64:auto:16:256"]["ok"] == 0  # float64: the grid-wide kernel's rule (layer_cuda.cpp)
    assert p["lstm:f16:auto:64:1024"]["ok"] == 0  # wide would need 32-row tiles: the per-step path
