"""Where the kernels on clusters wait for the loads they issue a step ahead, read from their SASS.

Each step of the cluster kernels loads the next step's global inputs into registers (the forward's x
projection, `load_x`; the backward's first pairs, `load_first`) so that their latency overlaps the rest
of the step. ptxas tracks a warp's global loads on a few scoreboards (one, in these kernels) and every
instruction that waits on a scoreboard waits for all of its loads in flight: one such wait soon after
the loads puts their whole round trip (DRAM, unless prefetched into L2) into the step. This script
decodes the control bits of each instruction (stall, scoreboards written and waited on) and lists,
for every matching kernel, the instructions between the loads and the end of the stretch they should
overlap that wait on the loads' scoreboards, with their source lines. No GPU needed: nvdisasm (the
CUDA toolkit's or triton's) on a cubin, an object or the built extension.

    python scripts/sass_waits.py build/temp.*/csrc/cuda/persistent_cluster_lstm.o            # both checks
    python scripts/sass_waits.py rnnkern/_C*.so --check forward-x --kernel 'E0Ef.*E1ELb0'    # LSTM f32 async
    python scripts/sass_waits.py OBJ --listing KERNEL_REGEX                                   # annotated SASS

A kernel is named by its mangled name (cluster_forward_kernel<Cell, T, Exchange, Mma>: E0 LSTM, E1 GRU,
E2 RNN-tanh, E3 RNN-ReLU; f, d, 6__half, 13__nv_bfloat16; Exchange E0 cluster, E1 cluster-async, E2
wide; Lb1 tensor cores). The waits listed include those on paths a step may not take (e.g. the sum
of a K split that only layers with few tiles of W_hh run, or the pairs past the prefetched ones):
read their lines.
"""
from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KERNELS = ROOT / "csrc" / "cuda" / "persistent_cluster_kernels.cuh"
INSTRUCTION = re.compile(r"\s*/\*([0-9a-f]+)\*/\s+(.*?);?\s*/\* (0x[0-9a-f]+) \*/")
LINE = re.compile(r'\s*//## File "(.*)", line (\d+)')


def find_tool(name: str):
    """nvdisasm / cuobjdump: the CUDA toolkit's, else the copy triton ships; None if neither."""
    toolkit = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / name
    found = shutil.which(name) or shutil.which(str(toolkit))
    if found:
        return found
    triton = Path(sys.prefix) / "lib" / "python3*" / "site-packages" / "triton" / "backends" / "nvidia"
    return next(iter(glob.glob(str(triton / "bin" / name))), None)


def tool(name: str) -> str:
    found = find_tool(name)
    if found is None:
        sys.exit(f"sass_waits: {name} not found (CUDA toolkit or triton)")
    return found


def disassemble(path: str) -> str:
    """nvdisasm's listing (line info, encodings) of every sm_90 cubin in `path`."""
    if path.endswith(".cubin"):
        cubins = [path]
    else:
        tmp = tempfile.mkdtemp()
        subprocess.run([tool("cuobjdump"), "-xelf", "all", os.path.abspath(path)], cwd=tmp, check=True,
                       capture_output=True)
        cubins = sorted(glob.glob(os.path.join(tmp, "*sm_90*.cubin")))
    return "\n".join(subprocess.run([tool("nvdisasm"), "-c", "-g", "-hex", c], check=True,
                                    capture_output=True, text=True).stdout for c in cubins)


def functions(listing: str) -> dict:
    """Kernel name -> its instructions as (offset, file, line, stall, write_sb, read_sb, wait_mask, text).
    Control bits (the high word, bits 41 up): stall 4, yield 1, write barrier 3, read barrier 3, wait
    mask 6 (barrier 7: none)."""
    out, name, rows, where = {}, None, [], ("?", 0)
    lines = listing.split("\n")
    for i, text in enumerate(lines):
        if re.match(r"^_Z\S*:$", text):
            name, rows = text[:-1], []
            out[name] = rows
            continue
        m = LINE.match(text)
        if m:
            where = (Path(m.group(1)).name, int(m.group(2)))
            continue
        m = INSTRUCTION.match(text)
        if m and name and i + 1 < len(lines):
            high = re.search(r"/\* (0x[0-9a-f]+) \*/", lines[i + 1])
            ctl = int(high.group(1), 16) >> 41
            rows.append((int(m.group(1), 16), where[0], where[1], ctl & 15, (ctl >> 5) & 7, (ctl >> 8) & 7,
                         (ctl >> 11) & 63, m.group(2).strip()))
    return out


def source_line(pattern: str, offset: int = 0) -> int:
    """The line of the kernels' header holding `pattern` (once), plus `offset`."""
    hits = [n for n, text in enumerate(KERNELS.read_text().split("\n"), 1) if pattern in text]
    if len(hits) != 1:
        sys.exit(f"sass_waits: {pattern!r} is on {len(hits)} lines of {KERNELS.name}, not one")
    return hits[0] + offset


# name: (kernel kind, the barrier the loads follow, the loads' source lines, where their overlap ends)
CHECKS = {
    "forward-x": lambda: ("forward", source_line("clock.mark(3);  // the other warps' products", -1),
                          [source_line("into[j][g] = x[g * H];")], source_line("rows_sent = (used")),
    "backward-first": lambda: ("backward", source_line("clock.mark(2);  // B: the cells", -1),
                               list(range(source_line("const auto load_first"),
                                          source_line("const auto load_first", 14))),
                               source_line("clock.mark(7);  // D: the sums")),
}


def check(rows, bar_line: int, load_lines, end_line: int):
    """(scoreboards of the step's loads, the instructions waiting on them before end_line)."""
    ours = KERNELS.name
    start = next((i for i, r in enumerate(rows) if r[1] == ours and r[2] == bar_line and "BAR" in r[7]), None)
    if start is None:
        return None, []
    loads = []
    for i in range(start + 1, len(rows)):
        r = rows[i]
        if r[1] == ours and r[2] > max(load_lines) + 40 and r[2] not in load_lines and loads:
            break
        if "LDG" in r[7] and (r[1] != ours or r[2] in load_lines):
            loads.append(i)
    boards = {rows[i][4] for i in loads} - {7}
    waits = []
    for r in rows[loads[-1] + 1:] if loads else []:
        if r[1] == ours and r[2] >= end_line:
            break
        if any(r[6] >> b & 1 for b in boards):
            waits.append(r)
    return boards, waits


def short(name: str) -> str:
    m = re.search(r"(forward|backward)_kernelILNS_4CellE(\d)E(\w+?)LNS0_8ExchangeE(\d)ELb(\d)", name)
    cells = ["lstm", "gru", "rnn_tanh", "rnn_relu"]
    dtypes = {"f": "float32", "d": "float64", "6__half": "float16", "13__nv_bfloat16": "bfloat16"}
    exchanges = ["cluster", "cluster-async", "wide"]
    return (f"{m.group(1)} {cells[int(m.group(2))]} {dtypes.get(m.group(3), m.group(3))} "
            f"{exchanges[int(m.group(4))]}{' mma' if m.group(5) == '1' else ''}") if m else name


def report(binary: str, check_name: str, kernel: str = "") -> dict:
    """{kernel's short name: [(file, line) of each instruction waiting on its step's loads]} for the
    kernels of `binary` that the check covers and `kernel` matches; None for a kernel whose barrier was
    not found."""
    kind, bar_line, load_lines, end_line = CHECKS[check_name]()
    out = {}
    for name, rows in functions(disassemble(binary)).items():
        if f"cluster_{kind}_kernel" in name and re.search(kernel, name):
            boards, waits = check(rows, bar_line, load_lines, end_line)
            out[short(name)] = None if boards is None else [(r[1], r[2]) for r in waits]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("binary", help="a cubin, an object or the extension")
    parser.add_argument("--check", choices=sorted(CHECKS), action="append", help="default: all")
    parser.add_argument("--kernel", default="", help="regular expression on the mangled kernel name")
    parser.add_argument("--listing", metavar="REGEX", help="print the annotated SASS of the kernels matching")
    args = parser.parse_args()
    kernels = functions(disassemble(args.binary))
    if args.listing:
        for name, rows in kernels.items():
            if re.search(args.listing, name):
                print(f"===== {short(name)}  ({name})")
                for off, f, line, stall, wb, rb, mask, text in rows:
                    w = "".join(str(b) for b in range(6) if mask >> b & 1)
                    print(f"{off:6x} {f[:26]:>26}:{line:<5} S{stall:<2} W{'-' if wb == 7 else wb} "
                          f"R{'-' if rb == 7 else rb} wait[{w:>6}] {text}")
        return 0
    for check_name in args.check or sorted(CHECKS):
        kind, bar_line, load_lines, end_line = CHECKS[check_name]()
        print(f"## {check_name}: waits on the step's loads (lines {load_lines[0]}..{load_lines[-1]}) "
              f"after the barrier at line {bar_line}, before line {end_line}")
        for name, rows in sorted(kernels.items(), key=lambda kv: short(kv[0])):
            if f"cluster_{kind}_kernel" not in name or not re.search(args.kernel, name):
                continue
            boards, waits = check(rows, bar_line, load_lines, end_line)
            if boards is None:
                print(f"{short(name)}: the barrier at line {bar_line} not found")
                continue
            where = sorted({f"{r[1]}:{r[2]}" for r in waits})
            at = f" at {', '.join(where)}" if where else ""
            print(f"{short(name)}: scoreboards {sorted(boards)}, {len(waits)} waits{at}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
