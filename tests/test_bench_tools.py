"""The benchmark suite's tools: floor formulas, the results writer and its schema, plots and tables.
(The timings themselves are never asserted: speed is measured in bench/, not tested.)"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import pytest  # noqa: E402
import torch  # noqa: E402

from bench import benchlib, plot  # noqa: E402

CEILINGS = {"gemm_flops_per_s": {"float32": 1e12, "float16": 4e12}, "copy_bytes_per_s": 1e10, "method": "test"}


def test_flops_known_cases():
    # LSTM T=10 B=2 H=3 (I=H): forward 2*T*B*G*H*(I+H) = 2*10*2*4*3*6.
    assert benchlib.case_flops("lstm", 10, 2, 3, "fwd") == 2880.0
    assert benchlib.case_flops("lstm", 10, 2, 3, "fwdbwd") == 3 * 2880.0
    assert benchlib.case_flops("gru", 5, 7, 11, "fwd", input_size=13) == 2.0 * 5 * 7 * 3 * 11 * (13 + 11)
    assert benchlib.case_flops("rnn_tanh", 64, 16, 256, "fwd") == 2.0 * 64 * 16 * 256 * 512
    with pytest.raises(ValueError):
        benchlib.case_flops("lstm", 1, 1, 1, "bwd")


def test_min_bytes_known_case():
    # LSTM T=2, B=1, H=I=1, float32. Weights: W_ih 4 + W_hh 4 + biases 8 = 16 numbers.
    # Forward: x 2 + h0,c0 2 + weights 16 + out 2 + h_n,c_n 2 = 24 numbers = 96 bytes.
    assert benchlib.case_min_bytes("lstm", 2, 1, 1, "fwd", 4, norms=False) == 96.0
    assert benchlib.case_min_bytes("lstm", 2, 1, 1, "fwd", 4, norms=True) == 96.0  # forward records nothing
    # Backward adds dout 2 + dx 2 + dh0,dc0 2 + weight grads 16 = 22 numbers; norms add 2 * T*B float32.
    assert benchlib.case_min_bytes("lstm", 2, 1, 1, "fwdbwd", 4, norms=False) == 46 * 4.0
    assert benchlib.case_min_bytes("lstm", 2, 1, 1, "fwdbwd", 4, norms=True) == 46 * 4.0 + 16.0
    # RNN, float16, T=3 B=2 H=4: weights 16+16+8 = 40; fwd 24+8+40+24+8 = 104; bwd 24+24+8+40 = 96.
    assert benchlib.case_min_bytes("rnn_tanh", 3, 2, 4, "fwd", 2, norms=False) == 208.0
    assert benchlib.case_min_bytes("rnn_tanh", 3, 2, 4, "fwdbwd", 2, norms=True) == 400.0 + 4 * 6


def test_fraction_of_floor():
    # Compute floor 1e9 / 1e12 = 1 ms beats the memory floor 1e6 / 1e10 = 0.1 ms; measured 10 ms.
    assert math.isclose(benchlib.fraction_of_floor(1e9, 1e6, 10.0, 1e12, 1e10), 0.1)
    # Memory bound: 1e9 bytes / 1e10 = 100 ms floor, measured 200 ms.
    assert math.isclose(benchlib.fraction_of_floor(1e3, 1e9, 200.0, 1e12, 1e10), 0.5)


def test_make_case_and_writer_schema(tmp_path, monkeypatch):
    monkeypatch.setenv("RNNKERN_BENCH_OUT", str(tmp_path))
    shape = benchlib.Shape("gru", 100, 64, 256)
    writer = benchlib.ResultsWriter(torch.device("cpu"), CEILINGS, extra={"grid": "cpu"})
    case = benchlib.make_case(shape, "cpu", "float32", "fwdbwd", True, 12.0, 16.0, None, CEILINGS)
    writer.add(case)
    writer.add(benchlib.make_case(shape, "torch.nn", "float32", "fwdbwd", False, 16.0, 16.0, None, CEILINGS))
    assert writer.path.parent == tmp_path and re.fullmatch(r"cpu-[a-z0-9_]+-\d+core\.json", writer.path.name)
    doc = json.loads(writer.path.read_text())
    benchlib.validate_results(doc)
    assert list(doc)[:7] == list(benchlib.TOP_KEYS) and doc["grid"] == "cpu" and doc["cuda"] is None
    assert doc["torch"] == torch.__version__ and doc["commit"] and doc["date"].endswith("+00:00")
    first = doc["cases"][0]
    assert list(first) == list(benchlib.CASE_KEYS)
    assert first["ratio"] == 12.0 / 16.0
    assert first["flops"] == benchlib.case_flops("gru", 100, 64, 256, "fwdbwd")
    assert first["min_bytes"] == benchlib.case_min_bytes("gru", 100, 64, 256, "fwdbwd", 4, True)
    floor_s = max(first["flops"] / 1e12, first["min_bytes"] / 1e10)
    assert math.isclose(first["fraction_of_floor"], floor_s / 12e-3)
    with pytest.raises(ValueError, match="lacks"):
        writer.add({"cell": "lstm"})


def test_validate_rejects_bad_results():
    case = benchlib.make_case(benchlib.Shape("lstm", 4, 2, 8), "cpu", "float32", "fwd", False, 1.0, 2.0, None,
                              CEILINGS)
    good = {"device": "d", "torch": "t", "cuda": None, "commit": "c", "date": "x", "ceilings": CEILINGS,
            "cases": [case]}
    benchlib.validate_results(good)
    for key, value in [("ms", "fast"), ("T", 4.0), ("norms", 1), ("cell", "mlp"), ("pass", "bwd"),
                       ("peak_mem_mb", 3)]:
        bad = dict(good, cases=[dict(case, **{key: value})])
        with pytest.raises(ValueError):
            benchlib.validate_results(bad)
    with pytest.raises(ValueError, match="ceilings"):
        benchlib.validate_results({k: v for k, v in good.items() if k != "ceilings"})


def test_device_slugs():
    assert benchlib.gpu_slug("NVIDIA H100 80GB HBM3") == "h100"
    assert benchlib.gpu_slug("NVIDIA H200") == "h200"
    assert benchlib.gpu_slug("NVIDIA A100-SXM4-80GB") == "a100"
    assert re.fullmatch(r"cpu-[a-z0-9_]+-\d+core", benchlib.device_slug(torch.device("cpu")))


def test_grids_hold_the_target_shapes():
    cpu = benchlib.GRIDS["cpu"]
    assert cpu["dtypes"] == ["float32"]
    assert set(cpu["shapes"]) == {benchlib.Shape(c, 100, 64, 256) for c in ("lstm", "gru", "rnn_tanh")} | {
        benchlib.Shape("lstm", 200, 16, 512), benchlib.Shape("lstm", 50, 32, 128)}
    quick = benchlib.GRIDS["gpu-quick"]
    # issue 9's shapes (B = 256 among them), two at the persistent/per-step crossover, one where the
    # per-step GEMMs dominate
    assert set(quick["shapes"]) == {benchlib.Shape(c, 256, 16, 256) for c in ("lstm", "gru", "rnn_tanh")} | {
        benchlib.Shape("lstm", 256, 256, 256), benchlib.Shape("lstm", 1024, 16, 768), benchlib.Shape("lstm", 256, 64, 256), benchlib.Shape("gru", 256, 16, 512),
        benchlib.Shape("lstm", 512, 64, 1024)}
    assert set(quick["dtypes"]) == {"float32", "float16"}
    full = benchlib.GRIDS["gpu-full"]
    assert len(full["shapes"]) == 3 * 3 * 4 * 4 and set(full["dtypes"]) == {"float32", "bfloat16", "float16"}
    # issue 9's targets as stated: fwd+bwd, B <= 64, H 256..1024, T 512 (and 2048 at B16 H256), every
    # cell and dtype, auto only
    targets = benchlib.GRIDS["gpu-targets"]
    cells = ("lstm", "gru", "rnn_tanh")
    assert set(targets["shapes"]) == ({benchlib.Shape(c, 512, b, h) for c in cells for b in (16, 64)
                                       for h in (256, 512, 768, 1024)}
                                      | {benchlib.Shape(c, 2048, 16, 256) for c in cells})
    assert set(targets["dtypes"]) == {"float32", "bfloat16", "float16"}
    assert (targets["backends"], targets["passes"], targets["own_file"]) == (["cuda"], ["fwdbwd"], True)


def test_a_grid_that_names_its_backends_times_those_alone(monkeypatch):
    """A grid's "backends" (gpu-targets: auto alone) leaves out the other backends and the forced
    variants, and its "passes" the forward-only pass; its results go to the grid's own file."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_conftest", Path(__file__).resolve().parents[1] / "bench"
                                                  / "conftest.py")
    conftest = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conftest)
    grid = {"device": "cpu", "shapes": [benchlib.Shape("lstm", 4, 2, 8)], "dtypes": ["float32"],
            "backends": ["cpu"], "passes": ["fwdbwd"]}
    monkeypatch.setitem(benchlib.GRIDS, "test-only", grid)
    monkeypatch.setenv("RNNKERN_BENCH_GRID", "test-only")

    class Config:
        def getoption(self, name):
            return None

    plan, excluded = conftest._backend_plan(Config())
    assert plan == {"float32": ["cpu"]} and excluded == {}

    class Metafunc:
        fixturenames = ["bench_case"]
        config = Config()

        def parametrize(self, name, params, ids):
            self.ids = ids

    metafunc = Metafunc()
    conftest.pytest_generate_tests(metafunc)
    assert metafunc.ids == ["lstm-T4-B2-H8-float32-fwdbwd-torch.nn", "lstm-T4-B2-H8-float32-fwdbwd-cpu",
                            "lstm-T4-B2-H8-float32-fwdbwd-cpu-norms"]
    # the no_grad pass (grid cpu-small): no norm variant, nothing is recorded there
    grid["passes"] = ["infer"]
    conftest.pytest_generate_tests(metafunc)
    assert metafunc.ids == ["lstm-T4-B2-H8-float32-infer-torch.nn", "lstm-T4-B2-H8-float32-infer-cpu"]
    # a grid that names no passes: the forward and forward+backward ones, as before the infer pass
    del grid["passes"]
    conftest.pytest_generate_tests(metafunc)
    assert [i.split("-")[5] for i in metafunc.ids] == ["fwd"] * 3 + ["fwdbwd"] * 3
    assert "infer" not in str([g.get("passes") for name, g in benchlib.GRIDS.items() if name != "cpu-small"])
    writer = benchlib.ResultsWriter(torch.device("cpu"), CEILINGS, out_dir=Path("/nonexistent"), suffix="-x")
    assert writer.path.name == benchlib.device_slug(torch.device("cpu")) + "-x.json"


def _synthetic_results():
    cases = []
    for shape in (benchlib.Shape("lstm", 100, 64, 256), benchlib.Shape("rnn_tanh", 50, 16, 128)):
        for pass_ in ("fwd", "fwdbwd"):
            base = 10.0 if pass_ == "fwd" else 30.0
            cases.append(benchlib.make_case(shape, "torch.nn", "float32", pass_, False, base, base, None, CEILINGS))
            cases.append(benchlib.make_case(shape, "cpu", "float32", pass_, False, base / 2, base, None, CEILINGS))
            cases.append(benchlib.make_case(shape, "cpu", "float32", pass_, True, base / 1.6, base, None, CEILINGS))
    return {"device": "Test CPU", "torch": "2.x", "cuda": None, "commit": "abc", "date": "2026-01-01",
            "ceilings": CEILINGS, "cases": cases}


def test_markdown_table():
    text = plot.markdown_table(_synthetic_results())
    lines = [line for line in text.splitlines() if line.startswith("|")]
    assert lines[0] == "| shape | pass | torch.nn ms | cpu ms (speed-up) | cpu +norms ms (speed-up) | best % of floor |"
    assert len(lines) == 2 + 4
    assert "| LSTM T=100 B=64 H=256 float32 | fwd | 10 | 5 (2.00×) | 6.25 (1.60×) |" in text
    assert "RNN-tanh T=50 B=16 H=128 float32 | fwdbwd | 30 | 15 (2.00×)" in text


def test_per_step_table():
    """µs per step (ms / T), the variants with norms recorded, and the fastest one's speed-ups (no
    torch.nn float16 in this file: '–')."""
    text = plot.per_step_table(_synthetic_results())
    lines = [line for line in text.splitlines() if line.startswith("|")]
    assert lines[0] == ("| layer | torch.nn float32 | cpu float32 | "
                        "fastest: × torch.nn float16, × torch.nn same dtype |")
    assert len(lines) == 2 + 2
    assert "| LSTM T100 B64 H256 | 300.00 (100.00) | 187.50 (62.50) | float32: cpu –, 1.60× |" in text
    assert "| RNN-tanh T50 B16 H128 | 600.00 (200.00) | 375.00 (125.00) |" in text


PROBE_TEXT = """device: Test GPU, 132 SMs, L2 60 MB, steps per launch 2048, B=16 H=256 float32
probe                         blocks      us/step
grid-sync                        128        0.970
grid-exchange                    128        1.350
cluster-sync/16                   16        0.194
cluster-stasync/16                16        0.500
"""


def _synthetic_gpu_results():
    """LSTM T100 B16 H256 on the cluster kernels (float32 and float16), GRU T50 B16 H512 per-step only."""
    cases = []
    for shape, backend in ((benchlib.Shape("lstm", 100, 16, 256), "cuda:cluster"),
                           (benchlib.Shape("gru", 50, 16, 512), "cuda")):
        for dtype in ("float32", "float16"):
            for pass_ in ("fwd", "fwdbwd"):
                base = 10.0 if pass_ == "fwd" else 30.0
                cases.append(benchlib.make_case(shape, "torch.nn", dtype, pass_, False, base, base, None, CEILINGS))
                cases.append(benchlib.make_case(shape, backend, dtype, pass_, True, base / 4, base, None, CEILINGS))
                cases.append(benchlib.make_case(shape, "triton", dtype, pass_, True, base / 2, base, None, CEILINGS))
    return {"device": "Test GPU", "torch": "2.x", "cuda": "13.0", "commit": "abc", "date": "2026-01-01",
            "ceilings": CEILINGS, "cases": cases}


def test_floor_table(tmp_path, capsys):
    """Issue 9's floor: one exchange per pass (the probe's st.async cluster exchange where the layer ran
    on the cluster kernels, else its grid exchange) + the products' FLOPs per step at the GEMM rate of
    the dtype (float16's for 16-bit); against the fastest variant with norms."""
    probe = tmp_path / "probe.txt"
    probe.write_text(PROBE_TEXT)
    assert plot.read_probe(probe) == {"grid-sync": 0.97, "grid-exchange": 1.35, "cluster-sync/16": 0.194,
                                      "cluster-stasync/16": 0.5}
    text = plot.floor_table(_synthetic_gpu_results(), plot.read_probe(probe))
    rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(rows) == 4

    def floor(cell_gates, T, B, H, passes, exchange, rate):
        forward = 2 * T * B * cell_gates * H * (H + H)  # input projection and recurrence, I = H
        return passes * exchange + 1e6 * forward * (3 if passes == 2 else 1) / T / rate

    lstm32 = floor(4, 100, 16, 256, 2, 0.5, 1e12), floor(4, 100, 16, 256, 1, 0.5, 1e12)
    gru16 = floor(3, 50, 16, 512, 2, 1.35, 4e12), floor(3, 50, 16, 512, 1, 1.35, 4e12)
    assert rows[0] == (f"| LSTM T100 B16 H256 | float32 | cluster | {lstm32[0]:.2f} ({lstm32[1]:.2f}) | "
                       f"75.00 (25.00) cuda:cluster | {75.0 / lstm32[0]:.1f} | 300.00 (100.00) | 300.00 (100.00) |")
    assert rows[3] == (f"| GRU T50 B16 H512 | float16 | grid | {gru16[0]:.2f} ({gru16[1]:.2f}) | "
                       f"150.00 (50.00) cuda | {150.0 / gru16[0]:.1f} | 600.00 (200.00) | 600.00 (200.00) |")
    results = tmp_path / "gpu.json"
    results.write_text(json.dumps(_synthetic_gpu_results()))
    assert plot.main([str(results), "--floors", str(probe)]) == 0
    assert capsys.readouterr().out == text


def test_plot_png_and_cli(tmp_path, capsys):
    results = tmp_path / "test-device.json"
    results.write_text(json.dumps(_synthetic_results()))
    assert plot.main([str(results)]) == 0
    png = tmp_path / "test-device.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    capsys.readouterr()
    assert plot.main([str(results), "--markdown"]) == 0
    assert "| shape | pass |" in capsys.readouterr().out
    assert plot.main([str(results), "--per-step"]) == 0
    assert "| layer | torch.nn float32 |" in capsys.readouterr().out
    out = subprocess.run([sys.executable, str(Path(plot.__file__)), str(results), "--markdown"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "speed-up" in out.stdout, out.stderr


def test_bench_suite_runs_on_the_tiny_grid(tmp_path):
    """The pytest-benchmark suite itself, end to end on a seconds-long grid: every case is timed against
    torch.nn in the same run and lands in a valid results file."""
    root = Path(benchlib.__file__).resolve().parent.parent
    env = dict(os.environ, RNNKERN_BENCH_OUT=str(tmp_path), RNNKERN_BENCH_GRID="tiny")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "bench", "--benchmark-only",
                           "--benchmark-disable-gc", "-p", "no:cacheprovider", "--bench-reference"],
                          cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = list(tmp_path.glob("*.json"))
    assert len(files) == 1
    doc = json.loads(files[0].read_text())
    benchlib.validate_results(doc)
    import importlib

    import rnnkern

    registry = importlib.import_module("rnnkern.backends")
    backends = [b for b in rnnkern.backends()
                if registry.get(b).unsupported_reason(torch.device("cpu"), torch.float32) is None]
    expected = 3 * 2 * (1 + 2 * len(backends))  # cells x passes x (torch.nn + backends x norms on/off)
    assert len(doc["cases"]) == expected
    assert {c["backend"] for c in doc["cases"]} == {"torch.nn", *backends}
    for c in doc["cases"]:
        assert c["ms"] > 0 and math.isclose(c["ratio"], c["ms"] / c["torch_nn_ms"])
    assert set(doc["ceilings"]["gemm_flops_per_s"]) == {"float32"} and doc["ceilings"]["copy_bytes_per_s"] > 0


def test_readme_table_is_regenerated_between_markers(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- bench:dev -->\nstale table\n<!-- /bench:dev -->\nafter\n")
    plot.update_readme(readme, "dev", "| a |\n|---|\n| 1 |\n")
    assert readme.read_text() == "intro\n<!-- bench:dev -->\n| a |\n|---|\n| 1 |\n<!-- /bench:dev -->\nafter\n"
    with pytest.raises(SystemExit, match="markers"):
        plot.update_readme(readme, "other", "x")


def test_backend_variants_run_their_backend_with_the_kernel_choice():
    assert benchlib.backend_variant("cuda") == ("cuda", {})
    name, variables = benchlib.backend_variant("cuda:persistent")
    assert name == "cuda" and variables == {"RNNKERN_CUDA_KERNEL": "persistent"}


def test_paired_norm_cost_is_the_median_paired_ratio(monkeypatch):
    """The norm cost of a +norms case: each pair times both modules back to back (order alternating);
    the result is the median of the pairs' ratios minus 1, so one disturbed pair does not move it."""
    from bench import bench_rnn

    calls = []
    times = iter([10.0, 11.0, 11.0, 10.0, 10.0, 30.0, 11.0, 10.0, 10.0, 11.0])  # pair 3 disturbed

    def fake_call_ms(step, args, device):
        calls.append(step)
        return next(times)

    monkeypatch.setattr(bench_rnn, "_one_call_ms", fake_call_ms)
    plain, norms = object(), object()
    cost = bench_rnn.paired_norm_cost(plain, norms, [()], torch.device("cpu"), case_ms=1e6)
    assert calls == [plain, norms, norms, plain] * 2 + [plain, norms]  # 5 pairs, order alternating
    assert cost == pytest.approx(0.1)


def _step_trace_formats():
    """The printf formats of scripts/step_trace.cu's report lines, read from its source (so that the
    table script is checked against what the tracer prints, not against a copy)."""
    src = (Path(__file__).resolve().parent.parent / "scripts" / "step_trace.cu").read_text()
    line = re.search(r'std::printf\("(%-28s %-8s [^"]*)"', src).group(1)
    phase = re.search(r'std::printf\("( %s %\.3f \[%\.3f\])"', src).group(1)
    names = re.findall(r'"([^"]+)"', re.search(r"kForwardPhases\[kTracePhases\] = \{([^}]*)\}", src).group(1))
    declined = re.search(r'std::printf\("(%-28s declined[^"\\]*)\\n"', src).group(1)
    skipped = re.search(r'std::printf\("(%-28s skipped[^"\\]*)\\n"', src).group(1)
    return line, phase, names, declined, skipped


def test_step_trace_table_reads_the_tracer_output():
    """scripts/step_trace_table.py parses every kind of line the tracer prints (formatted here with the
    tracer's own printf formats) and makes a table per pass."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    try:
        import step_trace_table
    finally:
        sys.path.pop(0)
    line, phase, names, declined, skipped = _step_trace_formats()
    header = (Path(__file__).resolve().parent.parent / "csrc" / "cuda" / "step_trace.cuh").read_text()
    assert len(names) == int(re.search(r"constexpr int kTracePhases = (\d+);", header).group(1))
    timed = line % ("lstm:f16:async:16:256:512", "forward", 16, 16, 16, 16, 2, 1.23456, 1.2, 12.25, 1.98)
    timed += "".join(phase % (name, 0.125 * (i + 1), 0.25 * (i + 1)) for i, name in enumerate(names))
    slow = line % ("tanh:f16:async/1:16:256:512:0.5", "backward", 1, 1, 1, 16, 1, 123.5, 120.0, 3.0, 1.755)
    slow += "".join(phase % (name, 10.0, 20.0) for name in names)
    text = "\n".join(["step_trace on NVIDIA H100 80GB HBM3 (132 SMs); us per step; phases: ...", timed, slow,
                      declined % ("lstm:f32:wide:16:768:512", 4), skipped % ("gru:f16:wide:16:256:512",),
                      "scripts/step_trace.cu:12 cudaMalloc(&p, bytes): out of memory", ""])
    rows = step_trace_table.parse(text)
    assert [r["case"] for r in rows] == ["lstm:f16:async:16:256:512", "tanh:f16:async/1:16:256:512:0.5",
                                         "lstm:f32:wide:16:768:512", "gru:f16:wide:16:256:512"]
    first = rows[0]
    assert (first["pass"], first["blocks"], first["sms"], first["cluster"], first["tile"], first["copies"]) == (
        "forward", 16, 16, 16, 16, 2)
    assert first["us"] == 1.235 and first["loop"] == 1.2 and first["prologue"] == 12.2 and first["ghz"] == 1.98
    assert first["phases"] == [(name, 0.125 * (i + 1), 0.25 * (i + 1)) for i, name in enumerate(names)]
    assert rows[1]["pass"] == "backward" and rows[1]["us"] == 123.5 and rows[1]["copies"] == 1
    assert rows[2]["note"] == "declined (reason 4)" and rows[3]["note"] == "skipped (--skip)"
    table = step_trace_table.markdown(rows)
    assert "**forward**" in table and "**backward**" in table
    assert "| lstm:f16:async:16:256:512 | 16/16 (16, 16) | 1.235 | 1.200 | 0.125 [0.250] |" in table
    assert "Not timed: lstm:f32:wide:16:768:512 declined (reason 4); gru:f16:wide:16:256:512 skipped (--skip)." in table


def test_collect_gpu_results(tmp_path):
    """scripts/collect_gpu_results.py files two calls' $OUT folders under bench/results: the bench file
    (named by device and commit, and as the latest), the figure, one log of the checks (every FAILED line
    and sanitizer verdict kept) and the tables (µs per step, floors from the probe, the tracer's)."""
    import io
    import tarfile

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import collect_gpu_results

    call1, call2, root = tmp_path / "call1", tmp_path / "call2", tmp_path / "repo"
    call1.mkdir(), call2.mkdir()
    (call1 / "env.txt").write_text("Thu Nov 26\ncommit 0123456789ab\nname\nNVIDIA H100 80GB HBM3, 580\n")
    (call1 / "smoke.txt").write_text("smoke cluster: rc=0\ncluster lstm float16 ok\n")
    (call1 / "probe.txt").write_text(PROBE_TEXT)
    (call1 / "step_trace.md").write_text("| phase | us |\n")
    (call1 / "step_trace_barrier.txt").write_text("lstm:f16:wide:16:768:512 forward 48 blk\n")
    (call1 / "step_trace_barrier.md").write_text("| barrier phase | us |\n")
    (call1 / "build.log").write_text("\n".join(f"line {i}" for i in range(100)))
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w:gz") as tar:
        for name, text in (("tests-gpu-0.log", "t::a PASSED\nt::b PASSED\nt::c FAILED\nFAILED t::c - boom\n= 1 failed =\n"),
                           ("racecheck.status", "sanitizer racecheck: rc=0 :: RACECHECK SUMMARY: 0 hazards")):
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (call1 / "test-logs.tgz").write_bytes(archive.getvalue())
    doc = _synthetic_gpu_results()
    doc["commit"] = "0123456789ab"
    (call2 / "h100.json").write_text(json.dumps(doc))
    (call2 / "bench-gpu-quick.log").write_text("quick grid: 200 passed\n")
    call3 = tmp_path / "call3"  # a third call: the gpu-targets grid, in its own file
    call3.mkdir()
    (call3 / "h100-gpu-targets.json").write_text(json.dumps(dict(doc, grid="gpu-targets")))
    (call3 / "bench-gpu-targets.log").write_text("targets grid: 216 passed\n")
    (call3 / "stress.txt").write_text("56 passed, 1088 deselected\nFAILED t::wavefront - boom\n")
    written = collect_gpu_results.collect([call1, call2, call3], out_root=root)
    names = sorted(p.relative_to(root).as_posix() for p in written)
    assert names == ["bench/results/h100-01234567.json", "bench/results/h100-gpu-targets-01234567.json",
                     "bench/results/h100-gpu-targets.json", "bench/results/h100-gpu-targets.png",
                     "bench/results/h100.json", "bench/results/h100.png",
                     "bench/results/logs/h100-gpu-check-01234567.txt", "bench/results/logs/h100-tables-01234567.md"]
    assert json.loads((root / "bench/results/h100-gpu-targets.json").read_text())["grid"] == "gpu-targets"
    log = (root / "bench/results/logs/h100-gpu-check-01234567.txt").read_text()
    assert "===== bench-gpu-quick.log (call2)" in log and "===== bench-gpu-targets.log (call3)" in log
    assert "216 passed" in log and "200 passed" in log
    assert "===== stress.txt =====" in log and "FAILED t::wavefront - boom" in log
    assert "tests-gpu-0.log: 2 passed, 1 failed" in log and "FAILED t::c - boom" in log
    assert "RACECHECK SUMMARY: 0 hazards" in log and "line 99" in log and "line 94" not in log
    tables = (root / "bench/results/logs/h100-tables-01234567.md").read_text()
    assert "| layer |" in tables and "Floor per step" in tables and "| phase | us |" in tables
    assert "RNNKERN_WIDE_EXCHANGE=barrier" in tables and "| barrier phase | us |" in tables
    assert "===== step_trace_barrier.txt =====" in log and "lstm:f16:wide:16:768:512 forward" in log
    assert "## h100.json" in tables and "## h100-gpu-targets.json" in tables
    # a targets-only run is still the device's (its file's grid suffix is not part of the name)
    collect_gpu_results.collect([call3], out_root=tmp_path / "repo3")
    assert (tmp_path / "repo3/bench/results/logs/h100-gpu-check-01234567.txt").exists()
    # a run without a bench call says so
    collect_gpu_results.collect([call1], out_root=tmp_path / "repo2")
    log = (tmp_path / "repo2/bench/results/logs/h100-gpu-check-01234567.txt").read_text()
    assert "===== bench log =====\n(not brought back by this run)" in log
    assert "stress.txt" not in log  # (an optional stage: no section where it did not run)


def test_the_device_probe_compiles(tmp_path):
    """scripts/persistent_probe.cu (gpu_check.sh's probe stage) builds with the toolkit's nvcc for sm_90:
    the probes added without a GPU are at least compiled before a device session runs them."""
    nvcc = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "nvcc"
    if not nvcc.exists():
        pytest.skip(f"no nvcc at {nvcc}")
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "probe"
    proc = subprocess.run([str(nvcc), "-O3", "-std=c++17", "-gencode=arch=compute_90,code=sm_90",
                           f"-I{root / 'scripts'}", str(root / "scripts" / "persistent_probe.cu"), "-o", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert out.exists()
