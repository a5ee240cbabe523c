"""Figures and tables from a benchmark results file.

    python bench/plot.py bench/results/cpu-x86-2core.json              # writes cpu-x86-2core.png beside it
    python bench/plot.py bench/results/h100.json --out speedup.png
    python bench/plot.py bench/results/h100.json --markdown            # prints the Markdown table
    python bench/plot.py bench/results/h100.json --readme README.md    # regenerates its table there
    python bench/plot.py bench/results/h100.json --per-step            # µs per step, as bench/NOTES.md
    python bench/plot.py bench/results/h100.json --floors probe.txt    # each layer's floor per step (issue 9)

The figure: per shape (cell, T, B, H, dtype), the speed-up over torch.nn (torch_nn_ms / ms) of every
backend, with and without norm recording, forward and forward+backward; 1 = as fast as torch.nn.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Dict, List

CELL_NAMES = {"lstm": "LSTM", "gru": "GRU", "rnn_tanh": "RNN-tanh", "rnn_relu": "RNN-ReLU"}


def load(path) -> Dict[str, object]:
    with open(path) as f:
        return json.load(f)


def _shape_key(case) -> tuple:
    return (case["cell"], case["T"], case["B"], case["H"], case["dtype"])


def _shape_label(key) -> str:
    cell, T, B, H, dtype = key
    return f"{CELL_NAMES.get(cell, cell)} T={T} B={B} H={H} {dtype}"


def _variants(cases) -> List[tuple]:
    """(backend, norms) pairs other than torch.nn, in order of first appearance."""
    seen = OrderedDict()
    for c in cases:
        if c["backend"] != "torch.nn":
            seen[(c["backend"], c["norms"])] = None
    return list(seen)


def markdown_table(doc: Dict[str, object]) -> str:
    """One row per shape and pass: torch.nn's time, then each backend's time and speed-up (×, torch.nn
    time / backend time; > 1 is faster), without and with norm recording, and the best fraction of floor."""
    cases = doc["cases"]
    variants = _variants(cases)
    rows = OrderedDict()
    for c in cases:
        rows.setdefault((_shape_key(c), c["pass"]), {})[(c["backend"], c["norms"])] = c
    header = ["shape", "pass", "torch.nn ms"]
    header += [f"{b}{' +norms' if n else ''} ms (speed-up)" for b, n in variants]
    header += ["best % of floor"]
    lines = [f"Device: {doc['device']}; torch {doc['torch']}" + (f", CUDA {doc['cuda']}" if doc.get("cuda") else "")
             + f"; commit {doc['commit']}; {doc['date']}.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for (key, pass_), by_variant in rows.items():
        any_case = next(iter(by_variant.values()))
        cells = [_shape_label(key), pass_, f"{any_case['torch_nn_ms']:.3g}"]
        for v in variants:
            c = by_variant.get(v)
            cell = "–" if c is None else f"{c['ms']:.3g} ({c['torch_nn_ms'] / c['ms']:.2f}×)"
            if c is not None and c.get("norm_cost") is not None:
                cell += f"; norms {100 * c['norm_cost']:+.1f} %"  # paired measurement (bench_rnn.py)
            cells.append(cell)
        best = max(c["fraction_of_floor"] for c in by_variant.values())
        cells.append(f"{100 * best:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _layer_label(layer) -> str:
    cell, T, B, H = layer
    return f"{CELL_NAMES.get(cell, cell)} T{T} B{B} H{H}"


def _timed_layers(cases):
    """{(layer, dtype, backend, pass): case} of torch.nn and the variants with norms recorded (as issue
    9's targets count them), with the layers (cell, T, B, H) and dtypes in order of appearance."""
    by = {}
    for c in cases:
        if c["backend"] == "torch.nn" or c["norms"]:
            by[((c["cell"], c["T"], c["B"], c["H"]), c["dtype"], c["backend"], c["pass"])] = c
    layers = list(OrderedDict.fromkeys((c["cell"], c["T"], c["B"], c["H"]) for c in cases))
    dtypes = list(OrderedDict.fromkeys(c["dtype"] for c in cases))
    return by, layers, dtypes


def _us(timed, layer, dtype, backend, pass_):
    """µs per step (ms / T) of one case of _timed_layers' table, or None where it was not timed."""
    c = timed.get((layer, dtype, backend, pass_))
    return None if c is None else 1000.0 * c["ms"] / c["T"]


def _us_cell(fwdbwd, fwd) -> str:
    """A table cell: forward+backward µs per step, the forward's in brackets; "–" for what is missing."""
    if fwdbwd is None and fwd is None:
        return "–"
    return (f"{fwdbwd:.2f}" if fwdbwd is not None else "–") + (f" ({fwd:.2f})" if fwd is not None else "")


def per_step_table(doc: Dict[str, object]) -> str:
    """Microseconds per step (ms / T), forward+backward with the forward in brackets, one row per layer
    shape: torch.nn and every backend variant (with norms recorded, as issue 9's targets count them) in
    each dtype; then, per dtype, the fastest variant's forward+backward speed-up over torch.nn float16
    (torch.nn's fastest: the 16-bit target) and over torch.nn in the same dtype (the float32 target)."""
    cases = doc["cases"]
    by, layers, dtypes = _timed_layers(cases)
    backends = ["torch.nn"] + list(OrderedDict.fromkeys(b for b, _ in _variants(cases)))
    columns = [(b, d) for d in dtypes for b in backends if any(k[1] == d and k[2] == b for k in by)]

    def us(layer, dtype, backend, pass_):
        return _us(by, layer, dtype, backend, pass_)

    header = ["layer"] + [f"{b} {d}" for b, d in columns] + ["fastest: × torch.nn float16, × torch.nn same dtype"]
    lines = [f"µs per step, forward+backward (forward); norms recorded by rnnkern. Device: {doc['device']}; "
             f"commit {doc['commit']}.", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for layer in layers:
        cells = [_layer_label(layer)]
        for b, d in columns:
            fb, f = us(layer, d, b, "fwdbwd"), us(layer, d, b, "fwd")
            cells.append(_us_cell(fb, f))
        best = []
        half = us(layer, "float16", "torch.nn", "fwdbwd")
        for d in dtypes:
            timed = [(us(layer, d, b, "fwdbwd"), b) for b, dd in columns if dd == d and b != "torch.nn"]
            timed = [(t, b) for t, b in timed if t is not None]
            if not timed:
                continue
            t, b = min(timed)
            own = us(layer, d, "torch.nn", "fwdbwd")
            ratios = [f"{half / t:.2f}×" if half is not None else "–", f"{own / t:.2f}×" if own is not None else "–"]
            best.append(f"{d}: {b} {', '.join(ratios)}")
        cells.append("; ".join(best) or "–")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def read_probe(path) -> Dict[str, float]:
    """µs per step of each probe in scripts/persistent_probe.cu's table ("name blocks us/step" lines)."""
    probe = {}
    for line in Path(path).read_text().splitlines():
        fields = line.split()
        if len(fields) == 3 and fields[1].isdigit():
            try:
                probe[fields[0]] = float(fields[2])
            except ValueError:
                pass
    return probe


# The exchange a layer's step needs at least, cheapest first: where its W_hh fits in one cluster (the
# bench has a cuda:cluster time for it), the st.async exchange of a 16-block cluster (each block's slice
# of h_t into every other block, completing on their mbarriers: barrier and round trip in one), or the
# chunked DSMEM stores + cluster barrier; otherwise a grid barrier + an L2 round trip of h_t.
CLUSTER_EXCHANGES = ("cluster-stasync/16", "cluster-chunks/16", "cluster-exchange/16")
GRID_EXCHANGE = "grid-exchange"


def floor_table(doc: Dict[str, object], probe: Dict[str, float]) -> str:
    """Issue 9's floor per step of each layer and dtype against the fastest rnnkern variant (norms
    recorded): one exchange (barrier + round trip, measured by the probe on the same kind of device) per
    step and pass — the forward step and the backward step each wait for the step before — plus the
    case's matrix-product FLOPs per step at the device's measured GEMM rate (float16's for 16-bit)."""
    rates = doc["ceilings"]["gemm_flops_per_s"]
    timed, layers, dtypes = _timed_layers(doc["cases"])
    cluster_sync = next((probe[n] for n in CLUSTER_EXCHANGES if n in probe), None)
    lines = [f"Floor per step = one exchange per pass + matrix products at the GEMM rate; µs per step, "
             f"forward+backward (forward). Device: {doc['device']}; commit {doc['commit']}. Exchanges "
             f"(probe): cluster {cluster_sync if cluster_sync is not None else '–'} µs, grid "
             f"{probe.get(GRID_EXCHANGE, '–')} µs.", "",
             "| layer | dtype | exchange | floor | fastest rnnkern | × floor | torch.nn same dtype | torch.nn float16 |",
             "|---|---|---|---|---|---|---|---|"]
    for layer in layers:
        for dtype in dtypes:
            ours = {}
            for pass_ in ("fwd", "fwdbwd"):
                found = [(c["ms"], b) for (l, d, b, p), c in timed.items()
                         if l == layer and d == dtype and p == pass_ and b != "torch.nn"]
                if found:
                    ours[pass_] = min(found)
            if "fwdbwd" not in ours:
                continue
            T = layer[1]
            in_cluster = any(l == layer and d == dtype and b.startswith("cuda:cluster")
                             for (l, d, b, _p) in timed)
            kind, sync = ("cluster", cluster_sync) if in_cluster and cluster_sync is not None else \
                ("grid", probe.get(GRID_EXCHANGE))
            if sync is None:
                continue
            rate = rates["float32" if dtype == "float32" else "float16"]

            def floor_us(pass_, passes):
                case = timed.get((layer, dtype, "torch.nn", pass_))
                flops = case["flops"] if case is not None else None
                return None if flops is None else passes * sync + 1e6 * flops / T / rate

            floor_fb, floor_f = floor_us("fwdbwd", 2), floor_us("fwd", 1)
            if floor_fb is None:
                continue

            ms_fb, backend = ours["fwdbwd"]
            us_fb = 1000.0 * ms_fb / T
            us_f = 1000.0 * ours["fwd"][0] / T if "fwd" in ours else None
            nn = [_us_cell(_us(timed, layer, d, "torch.nn", "fwdbwd"), _us(timed, layer, d, "torch.nn", "fwd"))
                  for d in (dtype, "float16")]
            lines.append("| " + " | ".join([
                _layer_label(layer), dtype, kind, _us_cell(floor_fb, floor_f), f"{_us_cell(us_fb, us_f)} {backend}",
                f"{us_fb / floor_fb:.1f}", *nn]) + " |")
    return "\n".join(lines) + "\n"


def plot_speedups(doc: Dict[str, object], out_path) -> Path:
    """Grouped bars: speed-up over torch.nn per shape; one panel per pass. Returns the PNG's path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    cases = [c for c in doc["cases"] if c["backend"] != "torch.nn"]
    passes = [p for p in ("fwd", "fwdbwd") if any(c["pass"] == p for c in cases)] or ["fwd"]
    shapes = list(OrderedDict.fromkeys(_shape_key(c) for c in doc["cases"]))
    variants = _variants(cases)
    fig, axes = plt.subplots(len(passes), 1, figsize=(max(6.0, 0.9 * len(shapes) + 2), 3.6 * len(passes)),
                             squeeze=False)
    width = 0.8 / max(1, len(variants))
    for ax, pass_ in zip(axes[:, 0], passes):
        by = {(_shape_key(c), c["backend"], c["norms"]): c for c in cases if c["pass"] == pass_}
        all_ys = []
        for i, (backend, norms) in enumerate(variants):
            xs, ys = [], []
            for j, key in enumerate(shapes):
                c = by.get((key, backend, norms))
                if c is not None:
                    xs.append(j - 0.4 + width * (i + 0.5))
                    ys.append(c["torch_nn_ms"] / c["ms"])
            # Bars grow from 1 (as fast as torch.nn): up is faster, down is slower.
            ax.bar(xs, [y - 1.0 for y in ys], width, bottom=1.0, label=backend + (" + norms" if norms else ""),
                   hatch="//" if norms else None)
            all_ys.extend(ys)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_yscale("log")
        lo, hi = min(all_ys + [1.0]) / 1.15, max(all_ys + [1.0]) * 1.15
        ax.set_ylim(lo, hi)
        ticks = [t for t in (0.1, 0.2, 0.3, 0.5, 0.7, 0.8, 0.9, 1, 1.25, 1.5, 2, 3, 5, 7, 10, 20, 30, 50, 100)
                 if lo <= t <= hi]
        ax.yaxis.set_major_locator(ticker.FixedLocator(ticks))
        ax.yaxis.set_major_formatter(ticker.FormatStrFormatter("%g×"))
        ax.yaxis.set_minor_locator(ticker.NullLocator())
        ax.set_ylabel("speed-up over torch.nn")
        ax.set_title(f"{pass_}: {doc['device']}", fontsize=9)
        ax.set_xticks(range(len(shapes)))
        ax.set_xticklabels([_shape_label(k) for k in shapes], rotation=30, ha="right", fontsize=7)
        if variants:
            ax.legend(fontsize=7)
    fig.tight_layout()
    out_path = Path(out_path)
    fig.savefig(out_path, dpi=120)
    plt.close(fig)
    return out_path


def update_readme(readme: Path, name: str, table: str) -> None:
    """Put `table` between the markers <!-- bench:name --> and <!-- /bench:name --> of `readme`, so that
    the README's performance section is always regenerated from a results file, never typed in."""
    text = readme.read_text()
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    if start not in text or end not in text:
        raise SystemExit(f"{readme} has no {start} ... {end} markers")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    readme.write_text(f"{head}{start}\n{table.rstrip()}\n{end}{tail}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", help="a bench/results/<device>.json file")
    parser.add_argument("--out", help="PNG path (default: the results path with .png)")
    parser.add_argument("--markdown", action="store_true", help="print the Markdown table instead of plotting")
    parser.add_argument("--per-step", action="store_true",
                        help="print microseconds per step per layer, dtype and variant (bench/NOTES.md's tables)")
    parser.add_argument("--floors", metavar="PROBE_TXT",
                        help="print each layer's floor per step (issue 9: one exchange per pass, measured by "
                             "scripts/persistent_probe.cu, whose output this is, + the products at the GEMM rate)")
    parser.add_argument("--readme", help="replace the table between <!-- bench:NAME --> and <!-- /bench:NAME --> "
                                         "in this file (NAME: the results file's stem)")
    args = parser.parse_args(argv)
    doc = load(args.results)
    if args.readme:
        update_readme(Path(args.readme), Path(args.results).stem, markdown_table(doc))
        print(f"updated the {Path(args.results).stem} table in {args.readme}")
        return 0
    if args.markdown:
        sys.stdout.write(markdown_table(doc))
        return 0
    if args.per_step:
        sys.stdout.write(per_step_table(doc))
        return 0
    if args.floors:
        sys.stdout.write(floor_table(doc, read_probe(args.floors)))
        return 0
    out = plot_speedups(doc, args.out or Path(args.results).with_suffix(".png"))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
