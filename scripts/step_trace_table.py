"""The step tracer's output (scripts/step_trace.cu, step_trace.txt of scripts/gpu_check.sh) as Markdown
tables for bench/NOTES.md: one table per pass, a row per case, µs per step.

    python3 scripts/step_trace_table.py step_trace.txt
"""

from __future__ import annotations

import re
import sys
from typing import Dict, List

# One line per case and pass, as step_trace.cu's report() prints it.
_LINE = re.compile(r"^(?P<case>\S+)\s+(?P<pass>forward|backward)\s+(?P<blocks>\d+) blk\s+(?P<sms>\d+) sm\s+"
                   r"(?P<cluster>\d+)/cl "
                   r"tile\s+(?P<tile>\d+) copies (?P<copies>\d+)\s+(?P<us>[\d.]+) us/step \(loop\s+(?P<loop>[\d.]+), "
                   r"prologue\s+(?P<prologue>[\d.]+) us, (?P<ghz>[\d.]+) GHz\) \|(?P<phases>.*)$")
_PHASE = re.compile(r"(\S+) ([\d.]+) \[([\d.]+)\]")
_OTHER = re.compile(r"^(?P<case>\S+)\s+(?P<what>declined \(reason \d+\)|skipped \(--skip\))$")


def parse(text: str) -> List[Dict[str, object]]:
    """The cases of a step_trace output, in order: dicts with case, pass, blocks, sms (the SMs they ran
    on), cluster, tile, copies, us (the launch's µs per step), loop, prologue, ghz and phases
    ([(name, mean, max)]), or case and `note` for a declined or skipped one. Other lines (the header,
    errors) are left out."""
    rows: List[Dict[str, object]] = []
    for line in text.splitlines():
        line = line.rstrip()
        m = _LINE.match(line)
        if m:
            row: Dict[str, object] = {"case": m["case"], "pass": m["pass"]}
            row.update({k: int(m[k]) for k in ("blocks", "sms", "cluster", "tile", "copies")})
            row.update({k: float(m[k]) for k in ("us", "loop", "prologue", "ghz")})
            row["phases"] = [(name, float(mean), float(top)) for name, mean, top in _PHASE.findall(m["phases"])]
            rows.append(row)
            continue
        m = _OTHER.match(line)
        if m:
            rows.append({"case": m["case"], "note": m["what"]})
    return rows


def markdown(rows: List[Dict[str, object]]) -> str:
    """A table per pass (forward, backward): the case, its blocks, µs per step of the launch and of the
    loop, then each phase's mean over the blocks (the slowest block's in brackets); declined and
    skipped cases listed after."""
    out = []
    for pass_ in ("forward", "backward"):
        timed = [r for r in rows if r.get("pass") == pass_]
        if not timed:
            continue
        names = [name for name, _, _ in timed[0]["phases"]]
        header = ["case", "blocks/SMs (per cluster, tile rows)", "µs/step", "loop"] + names + ["GHz"]
        out += [f"**{pass_}** (µs per step; phases: mean over blocks [slowest block])", "",
                "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for r in timed:
            phases = [f"{mean:.3f} [{top:.3f}]" for _, mean, top in r["phases"]]
            shape = f"{r['blocks']}/{r['sms']} ({r['cluster']}, {r['tile']})"
            out.append("| " + " | ".join([str(r["case"]), shape,
                                          f"{r['us']:.3f}", f"{r['loop']:.3f}", *phases, f"{r['ghz']:.2f}"]) + " |")
        out.append("")
    others = [r for r in rows if "note" in r]
    if others:
        out.append("Not timed: " + "; ".join(f"{r['case']} {r['note']}" for r in others) + ".")
        out.append("")
    return "\n".join(out)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(__doc__)
        return 2
    with open(argv[0]) as f:
        print(markdown(parse(f.read())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
