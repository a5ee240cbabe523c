"""Files a GPU run of scripts/gpu_check.sh brought back, into the places they are committed.

    python scripts/collect_gpu_results.py DIR [DIR ...]    # the files_at folders of the run's calls

From the $OUT folders of one or more calls (e.g. call 1: smoke, probe, tests, sanitizers; call 2: the
bench; or a third with the gpu-targets grid) it writes, for the device kind and the commit the run
names (env.txt; the bench file's own):
  bench/results/<device>-<commit8>.json and <device>.json (the latest), with <device>.png, for each
      bench file (gpu-targets: <device>-gpu-targets-<commit8>.json, ...);
  bench/results/logs/<device>-gpu-check-<commit8>.txt: env, build, smoke (checks and timings), probe,
      step tracer (and its wide forwards with RNNKERN_WIDE_EXCHANGE=barrier), the tests' per-shard
      counts and every FAILED/ERROR line, the sanitizers' verdicts, the stress stage's counts (where
      run), the bench logs;
  bench/results/logs/<device>-tables-<commit8>.md: µs per step (plot.py --per-step), the floors
      (--floors, from the probe), and the tracer's phase tables (step_trace.md).
Prints what it wrote. Nothing is dropped silently: a file the run did not bring back is named as such.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import plot  # noqa: E402

RESULTS = ROOT / "bench" / "results"


def _find(dirs, name):
    """The last of `dirs` that has `name` (later calls replace earlier ones' files)."""
    found = [d / name for d in dirs if (d / name).exists()]
    return found[-1] if found else None


def _bench_files(dirs):
    """The bench files (the runs' only JSON files: <device>.json, <device>-gpu-targets.json), by name; a
    later call's replaces an earlier one's of the same name."""
    return list({p.name: p for d in dirs for p in sorted(d.glob("*.json"))}.values())


def _device_and_commit(dirs, benches):
    device = commit = None
    if benches:
        doc = json.loads(benches[0].read_text())
        # (a grid with its own file, e.g. gpu-targets, names it <device>-<grid>.json)
        device, commit = benches[0].stem.removesuffix(f"-{doc.get('grid')}"), doc.get("commit")
    env = _find(dirs, "env.txt")
    if env is not None:
        text = env.read_text()
        match = re.search(r"^commit (\S+)", text, re.M)
        commit = commit or (match.group(1) if match else None)
        if device is None:
            name = re.search(r"NVIDIA (H\d+|A\d+|L\d+|B\d+)", text)
            device = name.group(1).lower() if name else "gpu"
    return device or "gpu", (commit or "unknown")[:8]


def _section(title, path, tail=None):
    """`path`'s text (its last `tail` lines), under a title; or that the run did not bring it back."""
    if path is None:
        return f"===== {title} =====\n(not brought back by this run)\n"
    lines = path.read_text(errors="replace").rstrip().splitlines()
    if tail is not None and len(lines) > tail:
        title += f" (last {tail} of {len(lines)} lines)"
        lines = lines[-tail:]
    return f"===== {title} =====\n" + "\n".join(lines) + "\n"


def _bench_logs(dirs):
    """Each bench log of the calls (bench-<grid>.log; bench.log from before the grids had their own),
    its last 40 lines; or that none came back."""
    found = [p for d in dirs for p in sorted(d.glob("bench*.log"))]
    if not found:
        return [_section("bench log", None)]
    return [_section(f"{path.name} ({path.parent.name})", path, tail=40) for path in found]


def _test_summary(archive):
    """Per-shard pass/fail counts and every FAILED/ERROR line of the run's test-logs.tgz."""
    if archive is None:
        return "(no test-logs.tgz)"
    lines, failures = [], []
    with tarfile.open(archive) as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            if not member.isfile():
                continue
            text = tar.extractfile(member).read().decode(errors="replace")
            if member.name.startswith("tests-"):
                tail = text.strip().splitlines()[-1] if text.strip() else ""
                lines.append(f"{member.name}: {text.count(' PASSED')} passed, {text.count(' FAILED')} failed, "
                             f"{text.count(' ERROR')} errors :: {tail[:160]}")
            if member.name.endswith(".status"):
                lines.append(text.strip())
            failures += [f"{member.name}: {line[:240]}" for line in text.splitlines()
                         if line.startswith(("FAILED", "ERROR")) or "ERROR SUMMARY" in line
                         or "RACECHECK SUMMARY" in line]
    return "\n".join(lines + ["--- FAILED / ERROR / sanitizer summaries ---"] + (failures or ["(none)"]))


def collect(dirs, out_root=ROOT):
    dirs = [Path(d) for d in dirs]
    results, logs = out_root / "bench" / "results", out_root / "bench" / "results" / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    benches = _bench_files(dirs)
    device, commit = _device_and_commit(dirs, benches)
    written = []
    for bench in benches:
        for target in (results / f"{bench.stem}-{commit}.json", results / f"{bench.stem}.json"):
            shutil.copyfile(bench, target)
            written.append(target)
        written.append(plot.plot_speedups(plot.load(bench), results / f"{bench.stem}.png"))
    check = logs / f"{device}-gpu-check-{commit}.txt"
    check.write_text("\n".join([
        f"scripts/gpu_check.sh on {device}, commit {commit}: what the run brought back "
        "(scripts/collect_gpu_results.py).\n",
        _section("env.txt", _find(dirs, "env.txt")),
        _section("build.log", _find(dirs, "build.log"), tail=5),
        _section("smoke.txt", _find(dirs, "smoke.txt")),
        _section("probe.txt", _find(dirs, "probe.txt")),
        _section("step_trace.txt", _find(dirs, "step_trace.txt")),
        # (the wide forwards with RNNKERN_WIDE_EXCHANGE=barrier, where the run had them)
        *[_section("step_trace_barrier.txt", t) for t in [_find(dirs, "step_trace_barrier.txt")] if t],
        f"===== tests and sanitizers =====\n{_test_summary(_find(dirs, 'test-logs.tgz'))}\n",
        # (the optional stress stage's counts, where the run had one)
        *[_section("stress.txt", stress) for stress in [_find(dirs, "stress.txt")] if stress],
        *_bench_logs(dirs),
    ]))
    written.append(check)
    tables = io.StringIO()
    for bench in benches:
        doc = plot.load(bench)
        tables.write(f"## {bench.name}\n\n" + plot.per_step_table(doc) + "\n")
        probe = _find(dirs, "probe.txt")
        if probe is not None:
            tables.write(plot.floor_table(doc, plot.read_probe(probe)) + "\n")
    trace = _find(dirs, "step_trace.md")
    tables.write(trace.read_text() if trace is not None else "(no step_trace.md)\n")
    barrier = _find(dirs, "step_trace_barrier.md")
    if barrier is not None:
        tables.write("\n### The wide forwards with RNNKERN_WIDE_EXCHANGE=barrier\n\n" + barrier.read_text())
    table_path = logs / f"{device}-tables-{commit}.md"
    table_path.write_text(tables.getvalue())
    written.append(table_path)
    return written


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or not all(Path(a).is_dir() for a in args):
        print(__doc__)
        missing = [a for a in args if not Path(a).is_dir()]
        if missing:
            print(f"not a folder: {', '.join(missing)}")
        return 2
    for path in collect(args):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
