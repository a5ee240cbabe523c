"""`rnnkern gradflow`: the task generators follow their published definitions, the summary numbers are
right on constructed norms, and the tool runs end to end on tiny settings."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import pytest  # noqa: E402
import torch  # noqa: E402

from rnnkern.__main__ import main  # noqa: E402
from rnnkern.gradflow import report, tasks, train  # noqa: E402
from rnnkern.gradflow.plots import log10_norms, moving_average  # noqa: E402
from rnnkern.gradnorms import GradNorms  # noqa: E402


# --------------------------------------------------------------------------------------------------
# Task generators

def test_adding_problem_hochreiter1997_definition():
    T, B = 23, 3000
    task = tasks.AddingProblem(T)
    x, target = task.sample(B, torch.Generator().manual_seed(3))
    assert x.shape == (T, B, 2) and target.shape == (B, 1)
    values, marker = x[..., 0], x[..., 1]
    marked = marker == 1.0
    assert bool((marked.sum(0) == 2).all()), "exactly two marked steps per sequence"
    assert bool(marked[T // 2:].sum() == 0), "both marks in the first half"
    first_mark = marked.float().argmax(0)
    assert int(first_mark.max()) < 10 + 1, "one mark among the first ten steps"
    # The earlier of the two marks lies in the first ten steps (the paper's X1 position).
    assert bool((first_mark < 10).all())
    assert bool(((values >= -1) & (values <= 1)).all())
    # -1 at the first and last step unless marked, 0 elsewhere.
    assert bool((marker[T - 1] == -1).all())
    assert bool(((marker[0] == -1) | (marker[0] == 1)).all())
    assert bool(((marker[1:T - 1] == 0) | (marker[1:T - 1] == 1)).all())
    # A marked first step carries the value 0 (the paper's rare case), and it happens in this batch.
    assert int(marked[0].sum()) > 50
    assert bool((values[0][marked[0]] == 0).all())
    # Target: 0.5 + (X1 + X2) / 4.
    expected = 0.5 + (values * marked).sum(0) / 4.0
    torch.testing.assert_close(target[:, 0], expected, rtol=0, atol=1e-6)
    assert bool(((target >= 0) & (target <= 1)).all())
    # Both positions are drawn over their whole ranges.
    second_mark = T - 1 - marked.flip(0).float().argmax(0)
    assert set(first_mark.tolist()) == set(range(10))
    assert set(second_mark.tolist()) == set(range(1, T // 2))


def test_adding_problem_known_example():
    # A hand-written sequence of the 1997 form: marks at t=2 and t=5, target 0.5 + (0.4 - 0.2) / 4 = 0.55.
    task = tasks.AddingProblem(8)
    values = torch.tensor([0.1, -0.3, 0.4, 0.9, -0.7, -0.2, 0.5, 0.6])
    marker = torch.tensor([-1.0, 0, 1, 0, 0, 1, 0, -1])
    target = torch.tensor([[0.55]])
    perfect, off = torch.tensor([[0.55]]), torch.tensor([[0.60]])
    assert float(task.loss(perfect, target)) == 0.0
    assert math.isclose(float(task.loss(off, target)), 0.05 ** 2, rel_tol=1e-5)
    assert task.metric(torch.tensor([[0.58]]), target) == 1.0
    assert task.metric(off, target) == 0.0
    assert math.isclose(0.5 + float((values * (marker == 1)).sum()) / 4, 0.55, rel_tol=1e-6)


def test_adding_problem_halves_definition():
    T, B = 30, 500
    task = tasks.AddingProblem(T, "halves")
    x, target = task.sample(B, torch.Generator().manual_seed(1))
    values, marker = x[..., 0], x[..., 1]
    assert bool(((marker == 0) | (marker == 1)).all())
    assert bool((marker[: T // 2].sum(0) == 1).all()) and bool((marker[T // 2:].sum(0) == 1).all())
    assert bool(((values >= 0) & (values <= 1)).all())
    torch.testing.assert_close(target[:, 0], (values * marker).sum(0), rtol=0, atol=1e-6)


def test_copy_task_definition():
    T, B, K, S = 31, 200, 10, 8
    task = tasks.CopyTask(T, copy_len=K, n_symbols=S)
    x, target = task.sample(B, torch.Generator().manual_seed(2))
    assert x.shape == (T, B, S + 2) and target.shape == (T, B) and target.dtype == torch.long
    assert bool((x.sum(-1) == 1).all()), "one-hot inputs"
    symbols = x.argmax(-1)
    D = T - 2 * K
    assert bool(((symbols[:K] >= 1) & (symbols[:K] <= S)).all())
    assert bool((symbols[K:K + D - 1] == 0).all())
    assert bool((symbols[K + D - 1] == S + 1).all()), "delimiter after the delay"
    assert bool((symbols[K + D:] == 0).all())
    assert bool((target[:K + D] == 0).all())
    # After the delay the target is the input sequence, in order.
    assert torch.equal(target[K + D:], symbols[:K])
    assert set(symbols[:K].unique().tolist()) == set(range(1, S + 1))
    # Perfect logits: recall accuracy 1; the memoryless baseline is K log S / T.
    logits = torch.nn.functional.one_hot(target, S + 1).float() * 50
    assert task.metric(logits, target) == 1.0
    assert float(task.loss(logits, target)) < 1e-6
    assert math.isclose(task.baseline_loss(), K * math.log(S) / T)


def test_task_argument_errors():
    with pytest.raises(ValueError, match="seq_len"):
        tasks.CopyTask(20, copy_len=10)
    with pytest.raises(ValueError, match="seq_len"):
        tasks.AddingProblem(3)
    with pytest.raises(ValueError, match="unknown task"):
        tasks.make_task("parity", 10)


# --------------------------------------------------------------------------------------------------
# Summary numbers on constructed norms

def _geometric_norms(T, B, rate, scale=2.0):
    """h_per_sample[0, 0, t, b] = scale * (b + 1) * rate**(T - 1 - t): decays by `rate` per step away from the end."""
    t = torch.arange(T, dtype=torch.float64)
    per_sample = scale * rate ** (T - 1 - t)[:, None] * torch.arange(1, B + 1, dtype=torch.float64)[None, :]
    return GradNorms(per_sample.float()[None, None])


def test_cell_row_on_constructed_norms():
    T, B = 13, 3
    run = train.CellRun("rnn_tanh")
    run.snapshots[0] = _geometric_norms(T, B, 0.5)
    run.snapshots[4] = _geometric_norms(T, B, 0.9)
    run.losses = [1.0] * 10 + [0.5] * 10
    run.metrics = [0.0] * 18 + [1.0, 0.5]
    run.step_seconds = [9.0] + [0.002, 0.004, 0.003]
    run.global_clip_fired = 5
    run.hidden_clip_fired, run.hidden_clip_total = 3, 12
    row = report.cell_row(run, 0, 4, clip_grad_norm=1.0, hidden_grad_clip=0.5)
    assert math.isclose(row["decay_first"], 0.5, rel_tol=1e-5)
    assert math.isclose(row["decay_last"], 0.9, rel_tol=1e-5)
    assert math.isclose(row["first_last_ratio"], 0.9 ** (T - 1), rel_tol=1e-5)
    assert row["clip_fraction"] == 5 / 20
    assert row["hidden_clip_fraction"] == 3 / 12
    assert row["final_loss"] == 0.5  # mean over the last 10% = 2 steps
    assert row["final_metric"] == 0.75
    assert math.isclose(row["ms_per_step"], 3.0)  # median without the warm-up step
    off = report.cell_row(run, 0, 4, clip_grad_norm=None, hidden_grad_clip=None)
    assert off["clip_fraction"] is None and off["hidden_clip_fraction"] is None
    table = report.format_table([row, off], "accuracy")
    assert "0.500 → 0.900" in table and "25.0%" in table and "off" in table and "RNN-tanh" in table


def test_helpers():
    assert moving_average([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    assert report.final_mean([1.0, 2.0, 3.0], fraction=0.5) == 2.5
    logs = log10_norms(torch.tensor([[100.0, 0.0, float("inf")]]))
    assert logs[0, 0] == 2.0 and math.isnan(logs[0, 1]) and math.isnan(logs[0, 2])


def test_chrono_and_forget_bias_initialisation():
    torch.manual_seed(0)
    plain = train.build_rnn("lstm", 3, 5, 1, "auto", None, "cpu", 0.0)
    torch.manual_seed(0)
    shifted = train.build_rnn("lstm", 3, 5, 1, "auto", None, "cpu", 1.0)
    delta = shifted.bias_ih_l0.detach() - plain.bias_ih_l0.detach()
    torch.testing.assert_close(delta[5:10], torch.ones(5))
    torch.testing.assert_close(delta[:5], torch.zeros(5))
    torch.testing.assert_close(delta[10:], torch.zeros(10))
    chrono = train.build_rnn("gru", 3, 7, 2, "auto", None, "cpu", "chrono", seq_len=50)
    for layer in range(2):
        z = getattr(chrono, f"bias_ih_l{layer}").detach()[7:14]
        assert bool(((z >= 0) & (z <= math.log(49) + 1e-6)).all())
        assert bool((getattr(chrono, f"bias_hh_l{layer}").detach()[7:14] == 0).all())


# --------------------------------------------------------------------------------------------------
# Training loop and end to end

def test_clip_fractions_match_recorded_norms():
    task = tasks.AddingProblem(9)
    steps = 4
    run = train.train_cell("rnn_tanh", task, steps=steps, batch=5, hidden=6, hidden_grad_clip=0.01,
                           clip_grad_norm=1e-9, snapshot_steps=tuple(range(steps)))
    per_sample = torch.stack([run.snapshots[s].h_per_sample[-1, 0] for s in range(steps)])
    expected = int((per_sample > 0.01).sum())
    assert 0 < expected < per_sample.numel(), "the threshold should split the recorded norms for this test to mean anything"
    assert (run.hidden_clip_fired, run.hidden_clip_total) == (expected, per_sample.numel())
    assert run.global_clip_fired == steps  # any gradient exceeds 1e-9
    torch.testing.assert_close(torch.stack(run.norm_history), torch.linalg.vector_norm(per_sample, dim=-1))
    never = train.train_cell("rnn_tanh", task, steps=2, batch=5, hidden=6, clip_grad_norm=1e9)
    assert never.global_clip_fired == 0


def test_hook_norms_are_the_module_norms():
    task = tasks.CopyTask(23, copy_len=4, n_symbols=3)
    seen = {}

    def on_step(step, run):
        seen[step] = run.norm_history[-1]

    run = train.train_cell("lstm", task, steps=2, batch=3, hidden=5, snapshot_steps=(0, 1), on_step=on_step)
    assert run.steps == 2 and len(run.metrics) == 2 and all(math.isfinite(v) for v in run.losses)
    for step in (0, 1):
        assert run.snapshots[step].h.shape == (1, 1, 23)
        assert run.snapshots[step].c is not None
        torch.testing.assert_close(seen[step], run.snapshots[step].h[-1, 0])
        assert bool((run.snapshots[step].h > 0).all()), "the copy loss reaches every step"


def test_gradflow_end_to_end(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["gradflow", "--steps", "3", "--seq-len", "12", "--hidden", "8", "--batch", "4",
                 "--out", str(out), "--no-progress", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    for label in ("RNN-tanh", "RNN-ReLU", "GRU", "LSTM", "decay/step", "ms/step"):
        assert label in printed
    for name in ("heatmap_rnn_tanh.png", "heatmap_rnn_relu.png", "heatmap_gru.png", "heatmap_lstm.png",
                 "heatmaps.png", "norms_vs_timestep.png", "training.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000, name
    summary = json.loads((out / "summary.json").read_text())
    assert [r["cell"] for r in summary["rows"]] == ["rnn_tanh", "rnn_relu", "gru", "lstm"]
    import numpy as np

    history = np.load(out / summary["norm_history_file"])
    assert sorted(history.files) == ["gru", "lstm", "rnn_relu", "rnn_tanh"] and history["gru"].shape == (3, 12)
    assert (history["lstm"] > 0).all()
    for row in summary["rows"]:
        assert 0 < row["decay_first"] < 10 and row["ms_per_step"] > 0
    assert (out / "summary.txt").read_text().startswith("cell")


def test_gradflow_copy_with_clipping(tmp_path, capsys):
    out = tmp_path / "copy"
    result_code = main(["gradflow", "--task", "copy", "--cells", "gru,rnn-tanh", "--steps", "2", "--seq-len", "25",
                        "--hidden", "6", "--batch", "3", "--clip-grad-norm", "0.5", "--hidden-grad-clip", "0.001",
                        "--curve-steps", "1", "--forget-bias", "chrono", "--out", str(out), "--no-progress"])
    assert result_code == 0
    summary = json.loads((out / "summary.json").read_text())
    rows = {r["cell"]: r for r in summary["rows"]}
    assert set(rows) == {"gru", "rnn_tanh"}
    for row in rows.values():
        assert 0.0 <= row["clip_fraction"] <= 1.0 and 0.0 <= row["hidden_clip_fraction"] <= 1.0
    assert "recall accuracy" in capsys.readouterr().out


def test_gradflow_bad_arguments(capsys):
    with pytest.raises(SystemExit):
        main(["gradflow", "--cells", "lstm,transformer"])
    with pytest.raises(SystemExit):
        main(["gradflow", "--steps", "0"])
    with pytest.raises(SystemExit):
        main(["gradflow", "--forget-bias", "large"])
    with pytest.raises(SystemExit, match="unknown rnnkern backend"):
        main(["gradflow", "--backend", "fortran", "--device", "cpu", "--no-progress", "--out", "/nonexistent-never-written"])
    with pytest.raises(SystemExit, match="seq_len"):
        main(["gradflow", "--task", "copy", "--seq-len", "12", "--device", "cpu", "--no-progress",
              "--out", "/nonexistent-never-written"])
    with pytest.raises(SystemExit, match="curve-steps"):
        main(["gradflow", "--steps", "2", "--seq-len", "8", "--hidden", "4", "--batch", "2", "--curve-steps", "5",
              "--no-progress", "--out", "/nonexistent-never-written"])


def test_gradflow_more_bad_arguments(tmp_path, capsys):
    """Every bad argument is a one-line `rnnkern gradflow: ...` error, never a traceback."""
    for value in ("nan", "inf", "-inf"):
        with pytest.raises(SystemExit):
            main(["gradflow", f"--forget-bias={value}"])
        assert "finite number" in capsys.readouterr().err
    small = ["--steps", "2", "--seq-len", "8", "--hidden", "4", "--batch", "2", "--no-progress", "--device", "cpu"]
    with pytest.raises(SystemExit, match="--curve-steps takes comma-separated step numbers, got 'a'"):
        main(["gradflow", *small, "--curve-steps", "a", "--out", str(tmp_path / "never")])
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    with pytest.raises(SystemExit, match="cannot be the output directory"):
        main(["gradflow", *small, "--out", str(a_file)])
    with pytest.raises(SystemExit, match="--curve-steps takes at least one step number"):
        main(["gradflow", *small, "--curve-steps", ",", "--out", str(tmp_path / "never")])
    for flag, value, says in [("--lr", "inf", "positive finite number"),
                              ("--lr", "1e400", "positive finite number"),
                              ("--device", "foo", "must be cpu, cuda or cuda:N"),
                              ("--device", "meta", "must be cpu, cuda or cuda:N"),
                              ("--seed", str(2**64), "integer from 0 to 2**63 - 1"),
                              ("--seed", "-1", "integer from 0 to 2**63 - 1")]:
        with pytest.raises(SystemExit):
            main(["gradflow", flag, value])
        assert says in capsys.readouterr().err
    if _tensorboard_available():
        with pytest.raises(SystemExit, match="--tensorboard .* cannot be the log directory"):
            main(["gradflow", *small, "--out", str(tmp_path / "o"), "--tensorboard", str(a_file / "x")])


def test_gradflow_runs_as_a_module():
    """python -m rnnkern.gradflow is python -m rnnkern gradflow."""
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-m", "rnnkern.gradflow", "--help"], capture_output=True, text=True,
                         timeout=120, cwd=str(Path(__file__).resolve().parents[1]))
    assert run.returncode == 0 and "usage: rnnkern gradflow" in run.stdout, run.stderr


def test_gradflow_tensorboard_missing_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import now raises ImportError
    with pytest.raises(SystemExit, match="tensorboard"):
        main(["gradflow", "--steps", "1", "--seq-len", "8", "--hidden", "4", "--batch", "2", "--no-progress",
              "--out", str(tmp_path / "o"), "--tensorboard", str(tmp_path / "tb")])


def _tensorboard_available() -> bool:
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _tensorboard_available(), reason="the tensorboard package is not installed")
def test_gradflow_tensorboard_logs(tmp_path):
    tb = tmp_path / "tb"
    main(["gradflow", "--cells", "lstm", "--steps", "2", "--seq-len", "8", "--hidden", "4", "--batch", "2",
          "--no-progress", "--out", str(tmp_path / "o"), "--tensorboard", str(tb)])
    assert any(p.name.startswith("events.out.tfevents") for p in tb.iterdir())


def test_ratio_of_an_underflowed_norm_is_shown_as_a_bound():
    assert report.format_ratio(0.0, 1e-3) == "<1e-42 (0)"
    assert report.format_ratio(2.5e-3, 1e-3) == "2.50e-03"


def test_gradflow_tensorboard_logging_calls(tmp_path, monkeypatch):
    """What the tool logs, checked through a recording stand-in for torch.utils.tensorboard (the real
    package is exercised by test_gradflow_tensorboard_logs where it is installed)."""
    import types

    calls = []

    class RecordingWriter:
        def __init__(self, log_dir):
            calls.append(("init", log_dir))

        def add_scalar(self, tag, value, step):
            assert isinstance(value, float) and math.isfinite(value)
            calls.append(("scalar", tag, step))

        def add_histogram(self, tag, values, step):
            calls.append(("histogram", tag, step))

        def add_text(self, tag, text):
            calls.append(("text", tag, text))

        def close(self):
            calls.append(("close",))

    module = types.ModuleType("torch.utils.tensorboard")
    module.SummaryWriter = RecordingWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", module)
    main(["gradflow", "--cells", "gru,rnn_relu", "--steps", "3", "--seq-len", "9", "--hidden", "4", "--batch", "2",
          "--no-progress", "--out", str(tmp_path / "o"), "--tensorboard", str(tmp_path / "tb")])
    assert calls[0] == ("init", str(tmp_path / "tb")) and calls[-1] == ("close",)
    scalars = {(c[1], c[2]) for c in calls if c[0] == "scalar"}
    for cell in ("gru", "rnn_relu"):
        for step in range(3):
            assert (f"{cell}/loss", step) in scalars and (f"{cell}/accuracy", step) in scalars
            for t in (0, 2, 4, 6, 8):
                assert (f"{cell}/grad_norm/t={t:05d}", step) in scalars
        assert (f"{cell}/summary/decay_last", 3) in scalars
    assert any(c[0] == "text" and "GRU" in c[2] for c in calls)
