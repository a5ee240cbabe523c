"""The cluster kernels' steps do not wait for the loads they issue a step ahead (scripts/sass_waits.py
on their SASS; bench/NOTES.md, fourteenth session): ptxas tracks a warp's global loads on one
scoreboard, so one wait on it soon after the loads puts their whole round trip into every step.
Needs nvcc (the CUDA toolkit: CUDA_HOME or /usr/local/cuda) and nvdisasm (the toolkit's or triton's);
no GPU. Compiles nine kernels' pairs for sm_90 (~30 s). The same pairs keep every thread's registers
to itself: no stack frame (ptxas's spills go to local memory, whose L1 lines each step's barrier or
acquire invalidates)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import sass_waits  # noqa: E402

NVCC = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "nvcc"
SOURCE = """#include "persistent_cluster_kernels.cuh"
namespace rnnkern { namespace persistent {
const void* kernels[] = {
  kernel_of<Cell::LSTM, float, Exchange::ClusterAsync, false>(true),
  kernel_of<Cell::GRU, float, Exchange::ClusterAsync, false>(true),
  kernel_of<Cell::RNN_TANH, float, Exchange::ClusterAsync, false>(true),
  kernel_of<Cell::LSTM, __half, Exchange::ClusterAsync, true>(true),
  kernel_of<Cell::GRU, __half, Exchange::ClusterAsync, true>(true),
  kernel_of<Cell::RNN_TANH, __half, Exchange::ClusterAsync, true>(true),
  kernel_of<Cell::LSTM, __half, Exchange::Grid, true>(true),
  kernel_of<Cell::GRU, __half, Exchange::Grid, true>(true),
  kernel_of<Cell::RNN_TANH, __half, Exchange::Grid, true>(true),
};
}}
"""


@pytest.fixture(scope="module")
def cubin(tmp_path_factory):
    if not NVCC.exists():
        pytest.skip(f"no nvcc at {NVCC}: the CUDA toolkit is needed to compile the kernels")
    if sass_waits.find_tool("nvdisasm") is None:
        pytest.skip("no nvdisasm (the CUDA toolkit's or triton's) to read the SASS")
    tmp = tmp_path_factory.mktemp("sass")
    (tmp / "kernels.cu").write_text(SOURCE)
    flags = ["-std=c++17", "-O3", "-DNDEBUG", "-lineinfo", "--expt-relaxed-constexpr", "--diag-suppress=3357",
             "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
             "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
             "-gencode=arch=compute_90,code=sm_90"]  # setup.py's device flags
    includes = [f"-I{ROOT / 'csrc' / 'include'}", f"-I{ROOT / 'csrc' / 'cuda'}"]
    out = tmp / "kernels.cubin"
    command = [str(NVCC), *flags, *includes, "-cubin", "-o", str(out), str(tmp / "kernels.cu")]
    subprocess.run(command, check=True, capture_output=True)
    return str(out)


CELLS = ("lstm", "gru", "rnn_tanh")


def test_the_forward_cells_do_not_wait_for_the_next_steps_x(cubin):
    waits = sass_waits.report(cubin, "forward-x")
    assert len(waits) == 9
    # (float16: the products' K parts are summed before the x loads are issued; summed in the cells,
    # their loads waited for the x loads: the wide GRU's and RNN's in every step)
    for cell in CELLS:
        assert waits[f"forward {cell} float32 cluster-async"] == [], cell
        assert waits[f"forward {cell} float16 cluster-async mma"] == [], cell
        assert waits[f"forward {cell} float16 wide mma"] == [], cell


def test_the_async_backward_does_not_wait_for_the_next_steps_pairs_before_phase_d_ends(cubin):
    waits = sass_waits.report(cubin, "backward-first", "ExchangeE1")  # the cluster-async ones
    assert len(waits) == 6
    for cell in CELLS:
        assert waits[f"backward {cell} float16 cluster-async mma"] == [], cell
    for cell in ("lstm", "rnn_tanh"):
        assert waits[f"backward {cell} float32 cluster-async"] == [], cell
    # float32 GRU: in phase D's sums of the partials, after the exchange's wait, not in phase C
    d_begin = sass_waits.source_line("// D: own units' dh_prev, summed over the blocks")
    assert all(line > d_begin for _, line in waits["backward gru float32 cluster-async"])


def test_the_listing_decodes_control_bits(cubin, capsys):
    sys.argv = ["sass_waits.py", cubin, "--listing", "forward_kernelILNS_4CellE0Ef"]
    assert sass_waits.main() == 0
    out = capsys.readouterr().out
    assert "===== forward lstm float32 cluster-async" in out
    # every instruction line: offset, source, stall, write and read barriers, wait mask, instruction
    body = [line for line in out.splitlines() if " wait[" in line]
    assert body and all(" S" in line and " W" in line and " R" in line for line in body)
    assert any("LDG" in line and re.search(r" W[0-5] ", line) for line in body)  # a load sets a scoreboard


def test_the_kernels_spill_nothing(cubin):
    cuobjdump = sass_waits.find_tool("cuobjdump")
    if cuobjdump is None:
        pytest.skip("no cuobjdump (the CUDA toolkit's or triton's) to read the kernels' resources")
    listing = subprocess.run([cuobjdump, "-res-usage", cubin], check=True, capture_output=True, text=True).stdout
    usage = dict(re.findall(r"Function (\w+):\s*\n\s*(REG:\d+ STACK:\d+ SHARED:\d+ LOCAL:\d+)", listing))
    kernels = {sass_waits.short(name): resources for name, resources in usage.items() if "cluster_" in name}
    assert len(kernels) == 18, sorted(kernels)
    for name, resources in kernels.items():
        assert " STACK:0 " in resources and resources.endswith("LOCAL:0"), (name, resources)
