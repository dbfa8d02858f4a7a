"""What users see: forecast cadence, the progress bar, the TensorBoard forecast run and the forecast figure."""

from __future__ import annotations

import os

import lightning.pytorch as pl
import numpy as np
import pytest
from lightning.pytorch.loggers import TensorBoardLogger

import lightning_scaling.forecast as forecast_mod
from lightning_scaling.callbacks.forecast import PBAR_AVG, PBAR_ETA, PBAR_LOSS, ScalingForecast
from lightning_scaling.callbacks.loss_trajectory import LossTrajectory
from lightning_scaling.report.figures import forecast_figure
from lightning_scaling.report.tensorboard import FORECAST_TAG, write_forecast_run
from lightning_scaling.history import RunHistory

from helpers import TinyLM, token_loader, trainer_kwargs
from test_forecast_callbacks import StubForecast, curve, scalars, stub_forecast_run


def _counting(calls, widen=None):
    """A stub forecast_run that records the last observed step; ``widen(step)`` sets the band's half width."""

    def run(history, *args, **kwargs):
        calls.append(int(history.step[-1]))
        fc = stub_forecast_run(history, *args, **kwargs)
        if widen is not None:
            half = widen(calls[-1])
            fc.lower, fc.upper = fc.loss - half, fc.loss + half
        return fc

    return run


class WithVal(TinyLM):
    def validation_step(self, batch, batch_idx):
        return None


def test_refits_on_every_n_steps_whatever_the_validation_cadence(tmp_path, monkeypatch):
    calls: list[int] = []
    monkeypatch.setattr(forecast_mod, "forecast_run", _counting(calls), raising=False)
    sf = ScalingForecast(every_n_steps=15, background=False, figure=False, forecast_runs=False)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=30, callbacks=[LossTrajectory(), sf],
                                          val_check_interval=10))
    trainer.fit(WithVal(max_steps=30), token_loader(n=40, batch_size=4), token_loader(n=8, batch_size=4))
    # Validation ran at 10, 20, 30 steps; refits only at 15 and 30 optimizer steps (last observed 14, 29).
    assert calls == [14, 29]


def test_progress_bar_hides_unpredictable_loss_and_shows_average_and_final_eta(tmp_path, monkeypatch, caplog):
    calls: list[int] = []
    # Band half-width 40 nats at the first refit (not predictable), 0.05 afterwards.
    monkeypatch.setattr(forecast_mod, "forecast_run", _counting(calls, lambda s: 40.0 if s < 10 else 0.05),
                        raising=False)
    sf = ScalingForecast(every_n_steps=10, background=False, figure=False, horizon=20)
    tb = TensorBoardLogger(tmp_path, name="tb")
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=10, callbacks=[LossTrajectory(), sf], logger=tb))
    with caplog.at_level("INFO", logger="lightning.pytorch"):
        trainer.fit(TinyLM(max_steps=10), token_loader(n=64, batch_size=4))
    pbar = trainer.progress_bar_metrics
    assert PBAR_LOSS not in pbar and PBAR_ETA in pbar
    assert "not yet predictable" in caplog.text
    hist = sf._traj.history
    assert pbar[PBAR_AVG] == pytest.approx(float(np.mean(hist.loss[-5:])), rel=1e-5)
    log_dir = trainer.logger.log_dir
    assert scalars(log_dir, "forecast/predictable") == {10: 0.0}
    assert scalars(log_dir, "forecast/final_loss") == {}  # numbers of an unreadable band are not logged
    run = os.path.join(log_dir, "forecast")
    assert not any(p.startswith("events.out") for p in os.listdir(run))  # latest.json only: no unreadable curve

    # Resume to the horizon: the band narrows, pred_loss appears and eta_min ends at 0.
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=20, callbacks=[LossTrajectory(), sf], logger=tb))
    trainer.fit(TinyLM(max_steps=20), token_loader(n=80, batch_size=4))
    pbar = trainer.progress_bar_metrics
    assert pbar[PBAR_LOSS] == pytest.approx(curve(20), abs=1e-6)
    assert pbar[PBAR_ETA] == 0.0


def test_forecast_run_is_replaced_not_accumulated(tmp_path):
    steps = np.arange(0, 101)
    h = RunHistory(name="r", step=steps[:40], loss=curve(steps[:40]))
    for shift in (0.0, 0.5):
        loss = curve(steps) + shift
        f = StubForecast(steps=steps, loss=loss, lower=loss - 0.1, upper=loss + 0.1, observed_until=39,
                         n_observed=40, tokens_per_step=None)
        run = write_forecast_run(tmp_path, f, history=h)
    assert len([p for p in os.listdir(run) if p.startswith("events.out.tfevents")]) == 1
    pts = scalars(run, FORECAST_TAG)
    assert len(pts) == 101 and pts[100] == pytest.approx(curve(100) + 0.5, abs=1e-6)


def test_figure_says_not_yet_predictable_and_keeps_the_observed_scale():
    steps = np.arange(0, 200)
    h = RunHistory(name="run", step=steps[:50], loss=curve(steps[:50]))
    loss = curve(steps)
    f = StubForecast(steps=steps, loss=loss, lower=loss - 30, upper=loss + 30, observed_until=49, n_observed=50,
                     tokens_per_step=None)
    ax = forecast_figure(h, f).axes[0]
    assert "not yet predictable" in ax.get_title()
    assert ax.get_ylim()[1] < 4.0  # scaled to the curves, not to the 60-nat band
    assert "last observed step" in [t.get_text() for t in ax.get_legend().get_texts()]


# ------------------------------------------------------------------------------------------- LightningCLI configs
CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "callbacks")


def _cli(tmp_path, *configs, run=False):
    from lightning.pytorch.cli import LightningCLI
    from lightning.pytorch.demos.boring_classes import BoringModel

    args = [a for c in configs for a in ("--config", c if os.path.isabs(c) else os.path.join(CONFIGS, c))]
    args += ["--trainer.default_root_dir", str(tmp_path), "--trainer.max_steps", "4",
             "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
    cli = LightningCLI(BoringModel, args=(["fit"] if run else []) + args, run=run, save_config_callback=None)
    return [type(c).__name__ for c in cli.trainer.callbacks]


@pytest.mark.parametrize("order", ["user_first", "user_last"])
def test_configs_compose_in_any_order_with_a_callbacks_plus_user_config(tmp_path, order):
    user = tmp_path / "user.yaml"
    user.write_text("trainer:\n  callbacks+:\n    - class_path: lightning.pytorch.callbacks.LearningRateMonitor\n")
    ours = ["scaling.yaml", "gns.yaml", "forecast.yaml"]
    names = _cli(tmp_path, *([str(user), *ours] if order == "user_first" else [*ours, str(user)]))
    for cb in ("LearningRateMonitor", "LossTrajectory", "GradientNoiseScale", "ScalingForecast",
               "ForecastEarlyStopping"):
        assert names.count(cb) == 1, names


def test_all_yaml_holds_the_four_callbacks_and_forecast_yaml_trains_alone(tmp_path):
    names = _cli(tmp_path, "all.yaml")
    assert [n for n in names if n in ("LossTrajectory", "GradientNoiseScale", "ScalingForecast",
                                      "ForecastEarlyStopping")] == [
        "LossTrajectory", "GradientNoiseScale", "ScalingForecast", "ForecastEarlyStopping"]
    # forecast.yaml without scaling.yaml: ScalingForecast adds the LossTrajectory at setup, and training runs.
    assert "LossTrajectory" not in _cli(tmp_path, "forecast.yaml")
    assert _cli(tmp_path, "forecast.yaml", run=True).count("LossTrajectory") == 1


# ------------------------------------------------------------------------------------------------------- tokens
def test_declared_tokens_per_sample_is_checked_against_the_first_batch(tmp_path):
    from lightning_scaling.warnings import DataWarning

    # token_loader's samples are 6 tokens long; 48 declared is 8x too many.
    traj = LossTrajectory(tokens_per_sample=48)
    with pytest.warns(DataWarning, match=r"tokens_per_sample=48 .* 6 tokens per sample.* 8x off"):
        trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=2, callbacks=[traj]))
        trainer.fit(TinyLM(max_steps=2), token_loader(n=16, batch_size=4))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)  # the right value, or a tokens_fn, is not warned about
        for traj in (LossTrajectory(tokens_per_sample=6), LossTrajectory(tokens_per_sample=48, tokens_fn=len)):
            pl.Trainer(**trainer_kwargs(tmp_path, max_steps=2, callbacks=[traj])).fit(
                TinyLM(max_steps=2), token_loader(n=16, batch_size=4))


# ------------------------------------------------------------------------------------------------------ console
def test_no_progress_bars_when_stdout_is_not_a_terminal(monkeypatch):
    import io

    from lightning_scaling.callbacks.progress import StepRichProgressBar, interactive
    from lightning_scaling.cli import _progress, build_parser

    args = build_parser().parse_args(["demo", "--quick"])

    class Tty(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr("sys.stdout", io.StringIO())
    assert not interactive() and not _progress(args)
    monkeypatch.setattr("sys.stdout", Tty())
    assert _progress(args) and not _progress(build_parser().parse_args(["demo", "--no-progress"]))
    # The rich bar of a max_steps run (Lightning sets max_epochs=-1) reads "Epoch 3", not "Epoch 3/-2".
    import types

    bar = StepRichProgressBar.__new__(StepRichProgressBar)
    bar._trainer = types.SimpleNamespace(max_epochs=-1)
    assert bar._get_train_description(3).strip() == "Epoch 3"
    bar._trainer = types.SimpleNamespace(max_epochs=5)
    assert bar._get_train_description(3).strip() == "Epoch 3/4"


# ------------------------------------------------------------------------------------------------- demo figures
def test_demo_figures_label_every_line_and_title_the_comparison(tmp_path):
    from lightning_scaling.report.figures import _figure, plot_critical_batch, plot_loss_vs_n, write_figures
    from lightning_scaling.study.predict import fit_and_predict
    from lightning_scaling.laws import loss_n_s_b

    k = dict(n_c=1e10, alpha_n=0.08, s_c=200.0, alpha_s=0.7, b_star=2e4, alpha_b=0.3)
    s = np.arange(1, 3001, 10)
    runs = {f"n{n:g}_b{b}": RunHistory(name=f"n{n:g}_b{b}", n_params=n, batch_size=b, step=s,
                                       loss=loss_n_s_b(n, s, b, **k), gns_step=s[::10],
                                       gns_b_simple=np.full(len(s[::10]), 50.0))
            for n, b in [(1e6, 64), (1e7, 64), (3e7, 64), (1e6, 16), (1e6, 256), (1e6, 1024), (1e8, 64)]}
    fit = fit_and_predict([h for name, h in runs.items() if name != "n1e+08_b64"], predict_n=1e8, batch_size=64,
                          fit_kwargs={"n_bootstrap": 0})
    report = {"name": "study", "prediction": fit["prediction"],
              "runs": {name: {"role": "holdout" if name == "n1e+08_b64" else "ladder",
                              "final_loss": float(h.loss[-1])} for name, h in runs.items()},
              "comparison": {"final_loss": {"predicted": 2.4, "actual": 2.5, "rel_error": -0.04,
                                            "interval": [2.3, 2.5]}}}
    for draw in (lambda ax: plot_loss_vs_n(ax, report, runs, fit["_law"]),
                 lambda ax: plot_critical_batch(ax, report, runs, fit["_critical"], fit["_law"])):
        ax = _figure((6, 4)).add_subplot(1, 1, 1)
        draw(ax)
        in_containers = {id(a) for c in ax.containers for a in c.get_children()}  # an errorbar is labelled whole
        lines = [ln for ln in ax.get_lines() if len(ln.get_xdata()) and id(ln) not in in_containers]
        assert lines and all(not ln.get_label().startswith("_") for ln in lines)  # no unlabelled line
        ylo, yhi = ax.get_ylim()
        for handle, label in zip(*ax.get_legend_handles_labels()):  # every legend entry is drawn in view
            ys = handle.get_ydata() if hasattr(handle, "get_ydata") else getattr(handle, "get_offsets", lambda: [])()
            ys = np.asarray(ys, dtype=float).reshape(len(ys), -1)[:, -1] if len(ys) else np.empty(0)
            if not len(ys):
                continue  # an errorbar container: drawn from its children
            assert np.any((ys >= ylo) & (ys <= yhi)), label
    paths = write_figures(report, runs, fit["_law"], fit["_critical"], tmp_path)
    assert [os.path.basename(p) for p in paths] == ["loss_curves.png", "critical_batch.png", "loss_vs_n.png",
                                                    "report.png"]


# ------------------------------------------------------------------------------------------------ README section
def test_readme_section_is_written_between_markers_and_demo_checks_them_first(tmp_path, capsys):
    from lightning_scaling.cli import main
    from lightning_scaling.report.tables import README_END, README_START, update_readme

    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{README_START}\nold table\n{README_END}\noutro\n")
    update_readme(readme, f"{README_START}\nnew table\n{README_END}")
    assert readme.read_text() == f"intro\n{README_START}\nnew table\n{README_END}\noutro\n"
    plain = tmp_path / "plain.md"
    plain.write_text("no markers\n")
    with pytest.raises(ValueError, match="no demo section markers"):
        update_readme(plain, "x")
    # The demo refuses a README without markers before it trains anything.
    assert main(["demo", "--quick", "--out", str(tmp_path / "out"), "--readme", str(plain)]) == 1
    assert "lacks the demo-table markers" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
