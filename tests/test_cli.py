"""The ``lightning-scaling`` command line: help, exit codes and one-line errors, fit/forecast on known curves."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lightning_scaling import RunHistory
from lightning_scaling.cli import build_parser, main
from lightning_scaling.laws import loss_n_s_b

# Known constants (Kaplan-like, in samples): synthetic runs are generated from them and fitted back.
TRUTH = dict(n_c=1e10, alpha_n=0.08, s_c=200.0, alpha_s=0.7, b_star=2e4, alpha_b=0.3)
STEPS = np.arange(0, 3001, 10)


def _run(n: float, b: float, name: str) -> RunHistory:
    loss = np.minimum(loss_n_s_b(n, np.maximum(STEPS, 1), b, **TRUTH), 10.0)
    return RunHistory(name=name, n_params=n, batch_size=b, tokens_per_sample=128, step=STEPS, loss=loss)


@pytest.fixture(scope="module")
def ladder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ladder")
    runs = [_run(n, 64, f"n{n:g}_b64") for n in (1e6, 3e6, 1e7)]
    runs += [_run(1e6, b, f"n1e6_b{b}") for b in (16, 256, 1024)]
    for r in runs:
        r.to_json(root / r.name / "scaling" / "history.json")
    return root


def _err(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize("command", [[], ["demo"], ["recipe"], ["fit"], ["forecast"], ["backtest"]])
def test_help_for_every_command(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit, match="^0$") as exc:
        main([*command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: lightning-scaling") and "--help" in out
    subcommands = build_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    assert set(subcommands) == {"demo", "recipe", "fit", "forecast", "backtest"}


def test_version_and_no_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit, match="^0$") as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.startswith("lightning-scaling ")
    assert main([]) == 0 and "COMMAND" in capsys.readouterr().out


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["fit"], ["forecast", "x"], ["fit", "x", "--predict-n", "-5"], ["recipe"]):
        with pytest.raises(SystemExit, match="^2$") as exc:
            main(argv)
        assert exc.value.code == 2
        assert "usage:" in capsys.readouterr().err


def test_fit_bad_inputs_one_line_nonzero(tmp_path: Path, ladder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # A folder with no runs.
    (tmp_path / "empty").mkdir()
    assert main(["fit", str(tmp_path / "empty")]) == 1
    assert "no runs found" in _err(capsys)
    # A path that does not exist.
    assert main(["fit", str(tmp_path / "nope")]) == 1
    assert "does not exist" in _err(capsys)
    # Runs of one size only when a size fit is asked.
    assert main(["fit", str(ladder / "n1e+06_b64"), str(ladder / "n1e6_b16")]) == 1
    assert "same size" in _err(capsys)
    # A run too short to fit.
    short = _run(1e6, 64, "short").truncate(50)
    short.to_json(tmp_path / "short" / "history.json")
    assert main(["fit", str(tmp_path / "short"), str(ladder)]) == 1
    assert "too short" in _err(capsys)
    # TensorBoard logs without the requested tag.
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(tmp_path / "tb" / "plain")) as w:
        for s in range(20):
            w.add_scalar("train_loss", 3.0 - 0.01 * s, s)
    assert main(["fit", str(tmp_path / "tb")]) == 1
    assert "scaling/loss" in _err(capsys)
    # The right tag, but no sizes recorded.
    assert main(["fit", str(tmp_path / "tb"), "--loss-tag", "train_loss"]) == 1
    assert "--n-params" in _err(capsys)


def test_fit_recovers_known_law(ladder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    n_new, target = 1e8, 3.2
    rc = main(["fit", str(ladder), "--predict-n", f"{n_new:g}", "--batch-size", "64", "--steps", "3000",
               "--target-loss", str(target), "--bootstrap", "4", "--json", "--out", str(tmp_path / "fit")])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["runs"]) == 6
    pred = out["prediction"]
    truth_final = float(loss_n_s_b(n_new, 3000, 64, **TRUTH))
    assert pred["loss"][-1] == pytest.approx(truth_final, rel=0.02)
    assert pred["min_loss"] == pytest.approx((TRUTH["n_c"] / n_new) ** TRUTH["alpha_n"], rel=0.02)
    truth_steps = float(np.interp(-target, -loss_n_s_b(n_new, np.arange(1, 20001), 64, **TRUTH), np.arange(1, 20001)))
    assert pred["steps_to_target"] == pytest.approx(truth_steps, rel=0.05)
    assert out["critical_batch"]["alpha_b"] == pytest.approx(TRUTH["alpha_b"], rel=0.1)
    for name in ("fit.json", "loss_curves.png", "critical_batch.png", "loss_vs_n.png"):
        assert (tmp_path / "fit" / name).exists()
    # The readable table names the prediction.
    assert main(["fit", str(ladder), "--predict-n", "1e8", "--bootstrap", "0"]) == 0
    assert "Prediction for N = 100M" in capsys.readouterr().out
    # Critical batch only, on the sweep of one size.
    assert main(["fit", *[str(ladder / f"n1e6_b{b}") for b in (16, 256, 1024)], str(ladder / "n1e+06_b64"),
                 "--critical-only", "--json"]) == 0
    cb = json.loads(capsys.readouterr().out)["critical_batch"]
    assert cb["b_star"] == pytest.approx(TRUTH["b_star"], rel=0.1)


def test_forecast_on_plain_tensorboard_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # A plain Lightning-style TensorBoard log (tag train_loss), L(S) = 2 + (S/50)^-0.5: forecast to step 10000.
    from torch.utils.tensorboard import SummaryWriter

    steps = np.arange(1, 3001, 5)
    with SummaryWriter(str(tmp_path / "run")) as w:
        for s in steps:
            w.add_scalar("train_loss", 2.0 + (s / 50.0) ** -0.5, int(s))
    rc = main(["forecast", str(tmp_path / "run"), "--horizon", "10000", "--loss-tag", "train_loss", "--json",
               "--out", str(tmp_path / "fc")])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["final_loss"] == pytest.approx(2.0 + 200.0**-0.5, abs=0.01)
    assert (tmp_path / "fc" / "forecast.png").exists()
    # A target the run's smoothed loss already reached is said to be so; one ahead is not.
    common = ["forecast", str(tmp_path / "run"), "--horizon", "10000", "--loss-tag", "train_loss"]
    assert main([*common, "--target-loss", "2.2"]) == 0  # reached at S = 1250
    assert "(already reached: an observed step)" in capsys.readouterr().out
    assert main([*common, "--target-loss", "2.09", "--json"]) == 0
    ahead = json.loads(capsys.readouterr().out)
    assert ahead["target_already_reached"] is False and 3000 < ahead["steps_to_target"] < 10000
    # Bad inputs: horizon inside the run, a folder without runs, the default tag missing.
    assert main(["forecast", str(tmp_path / "run"), "--horizon", "100", "--loss-tag", "train_loss"]) == 1
    assert "beyond the run's last step" in _err(capsys)
    (tmp_path / "empty").mkdir()
    assert main(["forecast", str(tmp_path / "empty"), "--horizon", "100"]) == 1
    assert "no runs found" in _err(capsys)
    assert main(["forecast", str(tmp_path / "run"), "--horizon", "10000"]) == 1
    assert "scaling/loss" in _err(capsys)


def test_recipe_bad_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["recipe", "--config", str(tmp_path / "missing.yaml")]) == 1
    assert "not found" in _err(capsys)
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {class_path: no.such.Module}\ndata: {class_path: x.Y}\nsizes: [{a: 1}, {a: 2}, {a: 3}]\n")
    assert main(["recipe", "--config", str(bad), "--out", str(tmp_path / "o"), "--no-plots"]) == 1
    assert "cannot import 'no.such.Module'" in _err(capsys)
    bad.write_text("model: [1, 2]\n")
    assert main(["recipe", "--config", str(bad)]) == 1
    assert "misses required keys" in _err(capsys)
    from lightning_scaling.study import EXAMPLE_CONFIG

    example = EXAMPLE_CONFIG
    assert main(["recipe", "--config", str(example), "--dry-run"]) == 0
    assert "holdout" in capsys.readouterr().out


def test_fit_on_plain_lightning_logs_per_run_n_and_critical_batch(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    # Plain Lightning TensorBoard logs (tag train_loss) of three sizes at one batch size: N of two runs from the
    # hparams.yaml Lightning writes (any nesting, an n_params-like key), the third from --n-params RUN=N.
    from torch.utils.tensorboard import SummaryWriter

    for n in (1e6, 3e6, 1e7):
        run = tmp_path / "lightning_logs" / f"n{n:g}" / "version_0"
        with SummaryWriter(str(run)) as w:
            for s, v in zip(STEPS, np.minimum(loss_n_s_b(n, np.maximum(STEPS, 1), 64, **TRUTH), 10.0)):
                w.add_scalar("train_loss", float(v), int(s))
        if n < 1e7:
            (run / "hparams.yaml").write_text(f"lr: 0.001\nmodel:\n  num_params: {int(n)}\n")
    base = ["fit", str(tmp_path / "lightning_logs"), "--loss-tag", "train_loss", "--run-batch-size", "64",
            "--bootstrap", "0"]
    assert main([*base]) == 1
    assert "n1e+07/version_0" in _err(capsys)  # named by folder path, not just version_0
    assert main([*base, "--n-params", "nope=5"]) == 1
    assert "no run named 'nope'" in _err(capsys)
    assert main([*base, "--n-params", "n1e+07/version_0=1e7"]) == 1
    assert "--critical-batch none" in _err(capsys)  # one batch size, no sweep: the flag the error names exists
    assert main([*base, "--n-params", "n1e+07/version_0=1e7", "--critical-batch", "none", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {r["name"]: r["n_params"] for r in out["runs"]} == {
        "n1e+06/version_0": 1e6, "n3e+06/version_0": 3e6, "n1e+07/version_0": 1e7}
    assert out["critical_batch"]["b_star"] == 0.0 and out["critical_batch"]["source"] == "none"
    # The run folder alone names a TensorBoard run (n1e+07 for n1e+07/version_0); a target loss needs no B_crit.
    assert main([*base, "--n-params", "n1e+07=1e7", "--critical-batch", "none", "--predict-n", "3e7",
                 "--target-loss", "3.0"]) == 0
    printed = capsys.readouterr().out
    assert "steps to loss 3.000" in printed and "critical batch at loss" not in printed
    assert "critical batch: not fitted" in printed
    # A global N fills in only the runs whose logs record none.
    assert main([*base, "--n-params", "1e7", "--critical-batch", "none", "--json"]) == 0
    assert sorted(r["n_params"] for r in json.loads(capsys.readouterr().out)["runs"]) == [1e6, 3e6, 1e7]
    with pytest.raises(SystemExit, match="^2$"):
        main([*base, "--critical-batch", "big"])
    assert "expected 'none' or a positive number" in capsys.readouterr().err


def test_fit_predicts_under_the_schedule_of_a_named_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Three sizes at a constant LR and under cosine, generated from a law with an annealing term: without
    # --schedule-of the mixed runs share no schedule, so the prediction is at a constant LR (and says so); with it,
    # under that run's cosine.
    from lightning_scaling.fitting import ScalingLaw

    truth = ScalingLaw({**TRUTH, "anneal": 0.3, "anneal_lambda": 0.99})
    steps = np.arange(1, 3001)
    cosine = 0.1 + 0.45 * (1 + np.cos(np.pi * np.arange(3000) / 3000))
    for n in (1e6, 3e6, 1e7):
        for name, lr in (("const", np.ones(3000)), ("cos", cosine)):
            loss = truth.predict_loss(n, steps, 64, lr)
            run = RunHistory(name=f"n{n:g}_{name}", n_params=n, batch_size=64, tokens_per_sample=128, step=steps,
                             loss=loss, lr=lr, planned_lr=lr)
            run.to_json(tmp_path / run.name / "scaling" / "history.json")
    base = ["fit", str(tmp_path), "--critical-batch", "none", "--bootstrap", "0", "--predict-n", "3e7", "--json"]
    assert main(base) == 0
    captured = capsys.readouterr()
    assert "the runs use several LR schedules; the prediction is at a constant LR" in captured.err
    const = json.loads(captured.out)["prediction"]["loss"][-1]
    assert main([*base, "--schedule-of", "n1e+07_cos"]) == 0
    cos = json.loads(capsys.readouterr().out)["prediction"]["loss"][-1]
    assert const == pytest.approx(float(truth.predict_loss(3e7, 3000, 64, np.ones(3000))), rel=0.01)
    assert cos == pytest.approx(float(truth.predict_loss(3e7, 3000, 64, cosine)), rel=0.02)  # 3x past the sizes
    assert cos < const - 0.05  # the annealing gain
    assert main([*base, "--schedule-of", "nope"]) == 1
    assert "--schedule-of 'nope': no such run" in _err(capsys)


def test_fit_fails_fast_before_importing_heavy_modules(tmp_path: Path) -> None:
    import subprocess
    import sys

    code = ("import sys; from lightning_scaling.cli import main; rc = main(['fit', sys.argv[1]]); "
            "print(rc, sorted(m for m in ('lightning', 'scipy', 'matplotlib', 'torch') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "nope")], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1], timeout=120)
    assert done.stdout.split() == ["1", "[]"], done.stdout + done.stderr
    assert "does not exist" in done.stderr
