"""ScalingForecast callback and TensorBoard panels.

Most tests swap ``forecast_run`` for a stub whose curve is known in closed form, so every logged number has an
exact expected value: L(s) = 2 + 100 / (100 + s), band +-0.05, steps to L* = 100 / (L* - 2) - 100.
"""

from __future__ import annotations

import glob
import json
import math
import os
import time
import warnings
from pathlib import Path
from dataclasses import dataclass, field

import lightning.pytorch as pl
import numpy as np
import pytest
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import lightning_scaling.forecast as forecast_mod
from lightning_scaling.callbacks.forecast import PBAR_ETA, PBAR_LOSS, ScalingForecast
from lightning_scaling.callbacks.loss_trajectory import LossTrajectory
from lightning_scaling.report.tensorboard import (
    FORECAST_TAG,
    LOSS_TAG,
    LOWER_TAG,
    OBSERVED_TAG,
    UPPER_TAG,
    custom_scalars_layout,
    forecast_run_dir,
    write_custom_scalars,
    write_forecast_run,
)
from lightning_scaling.report.figures import forecast_figure, render_figure
from lightning_scaling.history import RunHistory
from lightning_scaling.warnings import ForecastWarning

from helpers import TinyLM, token_loader, trainer_kwargs

HALF_WIDTH = 0.05


def curve(s):
    return 2.0 + 100.0 / (100.0 + np.asarray(s, dtype=np.float64))


@dataclass
class StubForecast:
    """Duck-typed Forecast with a closed-form curve."""

    steps: np.ndarray
    loss: np.ndarray
    lower: np.ndarray
    upper: np.ndarray
    observed_until: int
    n_observed: int
    tokens_per_step: float | None
    method: str = "stub"
    params: dict = field(default_factory=lambda: {"L0": 2.0, "A": 100.0})

    @property
    def final_loss(self):
        return float(self.loss[-1])

    @property
    def final_lower(self):
        return float(self.lower[-1])

    @property
    def final_upper(self):
        return float(self.upper[-1])

    def steps_to(self, loss, *, bound="mean"):
        y = {"mean": self.loss, "lower": self.lower, "upper": self.upper}[bound]
        hit = np.nonzero(y <= loss)[0]
        return float(self.steps[hit[0]]) if hit.size else math.inf

    def tokens_to(self, loss, *, bound="mean"):
        return self.steps_to(loss, bound=bound) * (self.tokens_per_step or math.nan)

    def to_dict(self):
        return {"final_loss": self.final_loss, "params": self.params, "steps": self.steps, "loss": self.loss}


def stub_forecast_run(history, horizon=None, lr_schedule=None, *, law=None, target_loss=None, confidence=0.9,
                      method="auto", **kwargs):
    if len(history) < 5:
        raise ValueError("too little data")
    steps = np.arange(0, int(horizon) + 1)
    loss = curve(steps)
    return StubForecast(steps=steps, loss=loss, lower=loss - HALF_WIDTH, upper=loss + HALF_WIDTH,
                        observed_until=int(history.step[-1]), n_observed=len(history),
                        tokens_per_step=history.tokens_per_step)


@pytest.fixture
def stub(monkeypatch):
    monkeypatch.setattr(forecast_mod, "forecast_run", stub_forecast_run, raising=False)
    return stub_forecast_run


def scalars(path, tag):
    acc = EventAccumulator(str(path), size_guidance={"scalars": 0, "tensors": 0, "images": 0})
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(tag)} if tag in acc.Tags()["scalars"] else {}


def fit(tmp_path, callbacks, *, max_steps=40, logger=True, model=None, ckpt_path=None, **kw):
    tb = TensorBoardLogger(tmp_path, name="tb") if logger else False
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=max_steps, callbacks=callbacks, logger=tb, **kw))
    trainer.fit(model or TinyLM(max_steps=max_steps), token_loader(n=64, batch_size=4), ckpt_path=ckpt_path)
    return trainer


# --------------------------------------------------------------------------------------------------- argument checks
@pytest.mark.parametrize(
    "kwargs",
    [dict(every_n_steps=0), dict(confidence=1.0), dict(confidence=0), dict(background="sometimes"),
     dict(max_overhead=0), dict(target_loss=float("nan")), dict(horizon=0)],
)
def test_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError, match="must be"):
        ScalingForecast(**kwargs)


def test_adds_a_loss_trajectory_when_none_is_attached(tmp_path, stub):
    sf = ScalingForecast(every_n_steps=5, background=False, figure=False, forecast_runs=False)
    trainer = fit(tmp_path, [sf], max_steps=10, logger=False)
    trajs = [c for c in trainer.callbacks if isinstance(c, LossTrajectory)]
    assert len(trajs) == 1 and trainer.callbacks[0] is trajs[0]
    assert len(trajs[0].history) == 10 and sf.n_refits == 2


# ------------------------------------------------------------------------------------------ logging (closed form)
def test_logs_exact_summary_panels_and_progress_bar(tmp_path, stub):
    # Train 40 steps of a planned 100 (explicit horizon); target 2.6 is reached by the curve at step 67.
    target, horizon, steps_done = 2.6, 100, 40
    # An unlimited budget for figures and files: every inline refit draws and writes them.
    sf = ScalingForecast(every_n_steps=10, target_loss=target, horizon=horizon, background=False, max_overhead=1e9)
    traj = LossTrajectory(tokens_per_sample=6, flush_every_n_steps=5)
    trainer = fit(tmp_path, [traj, sf], max_steps=steps_done)
    log_dir = trainer.logger.log_dir

    # Summaries at the current global step of each refit (10, 20, 30, 40).
    final = scalars(log_dir, "forecast/final_loss")
    assert sorted(final) == [10, 20, 30, 40]
    assert all(v == pytest.approx(curve(horizon), abs=1e-6) for v in final.values())
    lower, upper = scalars(log_dir, "forecast/final_loss_lower"), scalars(log_dir, "forecast/final_loss_upper")
    assert lower[40] == pytest.approx(curve(horizon) - HALF_WIDTH, abs=1e-6)
    assert upper[40] == pytest.approx(curve(horizon) + HALF_WIDTH, abs=1e-6)
    # 2 + 100/(100+s) <= 2.6 first at s = ceil(100/0.6 - 100) = 67; tokens = steps x 4 samples x 6 tokens.
    assert set(scalars(log_dir, "forecast/steps_to_target").values()) == {67.0}
    assert scalars(log_dir, "forecast/tokens_to_target")[40] == pytest.approx(67 * 4 * 6)
    # ETA = remaining steps (to the target / to the end) x measured seconds per optimizer step.
    dt = sf.step_seconds
    assert dt > 0
    assert scalars(log_dir, "forecast/eta_seconds")[40] == pytest.approx((67 - 40) * dt, rel=1e-4)
    assert scalars(log_dir, "forecast/remaining_seconds")[40] == pytest.approx((100 - 40) * dt, rel=1e-4)
    assert "forecast/critical_batch" not in sf.summary  # no GradientNoiseScale attached

    # Custom-scalars layout, written once.
    acc = EventAccumulator(log_dir, size_guidance={"tensors": 0})
    acc.Reload()
    assert "custom_scalars__config__" in acc.Tags()["tensors"]
    from tensorboard.plugins.custom_scalar import layout_pb2

    events = acc.Tensors("custom_scalars__config__")
    assert len(events) == 1
    layout = layout_pb2.Layout()
    layout.ParseFromString(events[0].tensor_proto.string_val[0])
    titles = {c.title: [ch.title for ch in c.chart] for c in layout.category}
    assert set(titles) == {"Forecast", "Gradient noise scale", "Tokens"}
    margin = next(ch for c in layout.category for ch in c.chart if ch.title.startswith("predicted final")).margin
    assert [s.value for s in margin.series] == ["forecast/final_loss"]
    assert margin.series[0].lower == "forecast/final_loss_lower"
    assert margin.series[0].upper == "forecast/final_loss_upper"

    # One forecast run holding the latest refit's curve on the step axis (one point per step, not one per refit).
    run = forecast_run_dir(log_dir)
    assert len([f for f in os.listdir(run) if f.startswith("events.out.tfevents")]) == 1
    curve_points = scalars(run, FORECAST_TAG)
    assert sorted(curve_points) == list(range(horizon + 1))
    assert curve_points[horizon] == pytest.approx(curve(horizon), abs=1e-6)
    assert scalars(run, LOWER_TAG)[horizon] == pytest.approx(curve(horizon) - HALF_WIDTH, abs=1e-6)
    assert scalars(run, UPPER_TAG)[horizon] == pytest.approx(curve(horizon) + HALF_WIDTH, abs=1e-6)
    assert max(scalars(run, OBSERVED_TAG)) == 39  # the observed loss the last refit saw (steps 0-39)
    assert not os.path.exists(os.path.join(log_dir, "by_tokens", "forecast"))  # no token-axis forecast runs
    latest = json.load(open(os.path.join(log_dir, "forecast", "latest.json")))
    assert latest["at_step"] == 40 and latest["final_loss"] == pytest.approx(curve(horizon))
    # The observed curve is in the main run under the same tag.
    assert len(scalars(log_dir, LOSS_TAG)) == steps_done

    # The figure is logged at each refit.
    acc = EventAccumulator(log_dir, size_guidance={"images": 0})
    acc.Reload()
    assert [e.step for e in acc.Images("forecast/curve")] == [10, 20, 30, 40]

    # Progress bar: predicted final loss and ETA in minutes, as plain numbers.
    pbar = trainer.progress_bar_metrics
    assert pbar[PBAR_LOSS] == pytest.approx(curve(horizon), abs=1e-6)
    assert pbar[PBAR_ETA] == pytest.approx(sf.summary["forecast/eta_seconds"] / 60, rel=1e-5)
    assert sf.n_refits == 4 and sf.n_failures == 0


def test_refits_after_validation_but_not_sanity_check(tmp_path, monkeypatch):
    calls = []

    def counting(history, *args, **kwargs):
        calls.append(int(history.step[-1]) if len(history) else -1)
        return stub_forecast_run(history, *args, **kwargs)

    monkeypatch.setattr(forecast_mod, "forecast_run", counting, raising=False)
    class WithVal(TinyLM):
        def validation_step(self, batch, batch_idx):
            return None

    model = WithVal(max_steps=30)
    sf = ScalingForecast(every_n_steps=1000, background=False, figure=False, forecast_runs=False,
                         refit_on_validation=True)
    tb = TensorBoardLogger(tmp_path, name="tb")
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=30, callbacks=[LossTrajectory(), sf], logger=tb,
                                          val_check_interval=10, num_sanity_val_steps=2))
    trainer.fit(model, token_loader(n=40, batch_size=4), token_loader(n=8, batch_size=4))  # 10 batches/epoch
    # One refit per validation run (at 10, 20, 30 steps done: last observed steps 9, 19, 29), none at sanity check.
    assert calls == [9, 19, 29]


def test_critical_batch_from_gradient_noise_scale(tmp_path, stub):
    class FakeGNS(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            traj = next(c for c in trainer.callbacks if isinstance(c, LossTrajectory))
            step = trainer.global_step
            traj.record_gns(step, b_simple=10.0 * step, grad_sq_norm=1.0, trace_sigma=10.0 * step)

    sf = ScalingForecast(every_n_steps=10, background=False, figure=False, forecast_runs=False)
    trainer = fit(tmp_path, [LossTrajectory(), FakeGNS(), sf], max_steps=20)
    crit = scalars(trainer.logger.log_dir, "forecast/critical_batch")
    # The latest B_simple reading when each refit ran (recorded before ScalingForecast's hook at the same step).
    assert crit == {10: pytest.approx(100.0), 20: pytest.approx(200.0)}


# ----------------------------------------------------------------------------------------- failures and threads
def test_failed_fit_warns_once_and_keeps_last_good_forecast(tmp_path, monkeypatch):
    state = {"n": 0}

    def flaky(history, *args, **kwargs):
        state["n"] += 1
        if state["n"] == 1:
            raise ValueError("too little data")  # expected early: silent
        if state["n"] == 2:
            return stub_forecast_run(history, *args, **kwargs)
        raise RuntimeError("singular matrix")

    monkeypatch.setattr(forecast_mod, "forecast_run", flaky, raising=False)
    sf = ScalingForecast(every_n_steps=5, background=False, figure=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(tmp_path, [LossTrajectory(), sf], max_steps=30)
    msgs = [str(w.message) for w in caught if "ScalingForecast" in str(w.message)]
    assert len(msgs) == 1 and "RuntimeError" in msgs[0] and "singular matrix" in msgs[0]
    assert sf.n_refits == 1 and sf.n_failures == 5
    assert sf.forecast is not None and sf.forecast.observed_until == 9  # the good one, made at step 10
    assert sf.summary["forecast/final_loss"] == pytest.approx(curve(30))


class StepWork(pl.Callback):
    """``seconds`` of GIL-free "device" work after every training step (sleep releases the GIL)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def on_train_batch_end(self, *args):
        time.sleep(self.seconds)


_COST, _STEP_TIME = 0.06, 0.01


def slow_stub(monkeypatch, seconds):
    """The stub forecast, taking ``seconds`` (sleep releases the GIL like the numpy/scipy parts of a fit)."""
    def slow(history, *args, **kwargs):
        time.sleep(seconds)
        return stub_forecast_run(history, *args, **kwargs)

    monkeypatch.setattr(forecast_mod, "forecast_run", slow, raising=False)  # in-process: threads see it


def _background_run(tmp_path, monkeypatch):
    """60 steps of 10 ms with a refit of 60 ms every 5 steps on the background thread: (callback, trainer, wall)."""
    slow_stub(monkeypatch, _COST)
    # max_overhead=1: at the end, wait for the last refits up to the 0.6 s of training (a 2% budget would drop them).
    sf = ScalingForecast(every_n_steps=5, background="thread", max_overhead=1.0, figure=False, forecast_runs=False)
    t0 = time.perf_counter()
    trainer = fit(tmp_path, [LossTrajectory(), StepWork(_STEP_TIME), sf], max_steps=60)
    return sf, trainer, time.perf_counter() - t0


def test_background_refits_land_on_their_cadence_steps(tmp_path, monkeypatch):
    sf, trainer, _ = _background_run(tmp_path, monkeypatch)
    assert sf.background_active
    assert sf.refit_seconds >= _COST
    assert sf.n_refits >= 3
    # Every refit belongs to a cadence step and is logged there, however late its result came back.
    steps = [s for s, _ in sf.refit_log]
    assert steps == sorted(steps) and all(s % 5 == 0 for s in steps) and steps[-1] == 60
    final = scalars(trainer.logger.log_dir, "forecast/final_loss")
    assert sorted(final) == steps
    assert all(v == pytest.approx(curve(60), abs=1e-6) for v in final.values())


@pytest.mark.timing
def test_background_refits_do_not_stall_training(tmp_path, monkeypatch):
    sf, _, wall = _background_run(tmp_path, monkeypatch)
    assert sf.max_stall_seconds < _COST / 5
    assert sf.stall_seconds < _COST / 5  # the training thread only snapshots the history and applies results
    # Training was not serialised behind the refits: 60 x 10 ms of steps + slack.
    assert wall < 60 * _STEP_TIME + 2 * _COST + 1.5


def test_figures_and_files_are_skipped_beyond_the_time_budget(tmp_path, stub):
    # A budget of ~0 s: no figure or forecast run, but latest.json (milliseconds) and every refit's numbers.
    sf = ScalingForecast(every_n_steps=5, background=False, max_overhead=1e-9, figure=True, forecast_runs=True)
    trainer = fit(tmp_path, [LossTrajectory(), sf], max_steps=20)
    acc = EventAccumulator(trainer.logger.log_dir, size_guidance={"images": 0})
    acc.Reload()
    assert "forecast/curve" not in acc.Tags()["images"]
    run = forecast_run_dir(trainer.logger.log_dir)
    assert not any(p.startswith("events.out") for p in os.listdir(run))
    assert json.load(open(os.path.join(run, "latest.json")))["at_step"] == 20
    assert sorted(scalars(trainer.logger.log_dir, "forecast/final_loss")) == [5, 10, 15, 20]
    assert sf.n_refits == 4 and [s for s, _ in sf.refit_log] == [5, 10, 15, 20]


def test_last_refits_are_dropped_when_they_would_delay_the_end(tmp_path, monkeypatch):
    slow_stub(monkeypatch, 0.3)
    sf = ScalingForecast(every_n_steps=10, background="thread", figure=False, forecast_runs=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(tmp_path, [LossTrajectory(), sf], max_steps=20, logger=False)
    # 2% of well under a second of training: the end does not wait 0.3 s for the refit of step 20.
    assert [s for s, _ in sf.refit_log] in ([], [10]) and sf._scheduler is None
    said = [str(w.message) for w in caught if issubclass(w.category, ForecastWarning)]
    if not sf.refit_log:  # a run that got no forecast at all is told so, with what to do
        assert any("no forecast was made during this run" in m and "background=False" in m for m in said), said


def test_refits_the_run_never_got_are_reported(tmp_path, monkeypatch):
    slow_stub(monkeypatch, 0.25)
    sf = ScalingForecast(every_n_steps=2, background="thread", figure=False, forecast_runs=False)
    with pytest.warns(ForecastWarning, match="refits were not made") as caught:
        fit(tmp_path, [LossTrajectory(), StepWork(0.01), sf], max_steps=40, logger=False)
    # refits every 20 ms of training, each 250 ms long: most were replaced while waiting, the last ones unfinished
    (msg,) = [str(w.message) for w in caught if "refits were not made" in str(w.message)]
    assert sf.n_refits < 20 and "of 20 refits were not made" in msg
    assert "skipped while the previous refit was still running" in msg and "every_n_steps=2" in msg
    if sf.n_refits:  # the last step's refit, unfinished, is not counted against the run
        assert f"the last forecast is from step {sf.forecast.observed_until + 1}" in msg
        assert "40" not in msg.split("unfinished")[-1]
    else:
        assert "no forecast was made during this run" in msg and "background=False" in msg


def test_a_resumed_run_that_gets_no_forecast_is_told_so(tmp_path, monkeypatch):
    from lightning.pytorch.callbacks import ModelCheckpoint

    monkeypatch.setattr(forecast_mod, "forecast_run", stub_forecast_run, raising=False)
    first = ScalingForecast(every_n_steps=10, background=False, figure=False, forecast_runs=False)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    fit(tmp_path, [LossTrajectory(), first, ckpt], max_steps=20, logger=False, enable_checkpointing=True)
    assert first.n_refits == 2

    slow_stub(monkeypatch, 0.5)
    second = ScalingForecast(every_n_steps=10, background="thread", figure=False, forecast_runs=False)
    with pytest.warns(ForecastWarning, match="no forecast was made during this run"):  # it raised IndexError
        fit(tmp_path, [LossTrajectory(), second, ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)],
            max_steps=40, logger=False, enable_checkpointing=True, ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert second.n_refits == 2  # the restored count; none of this fit's refits (30, 40) came back in time


def test_only_the_last_refit_unfinished_is_not_reported(tmp_path, monkeypatch):
    slow_stub(monkeypatch, 0.05)
    sf = ScalingForecast(every_n_steps=10, background="thread", figure=False, forecast_runs=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(tmp_path, [LossTrajectory(), StepWork(0.01), sf], max_steps=40, logger=False)
    steps = [s for s, _ in sf.refit_log]
    assert steps[:3] == [10, 20, 30]  # 100 ms of training between refits of 50 ms: none skipped
    # the refit of the last step may be dropped (the run is over and its end is known): no warning for that alone
    assert not [w for w in caught if "refits were not made" in str(w.message)]


def test_extras_budget_counts_what_figures_cost():
    from lightning_scaling.refit import FIRST_EXTRAS_SECONDS, FIRST_RUN_SECONDS, RefitResult, RefitScheduler

    sched = RefitScheduler("inline", max_overhead=0.1)
    first = FIRST_EXTRAS_SECONDS / 0.1  # training seconds that pay for the first figure
    assert not sched.wants_extras(0.99 * first, ("figure",)) and sched.wants_extras(first, ("figure",))
    # the forecast run is cheap: it is affordable long before a figure is
    assert sched.wants_extras(FIRST_RUN_SECONDS / 0.1, ("run",)) and not sched.wants_extras(first, ("run", "figure"))
    sched._finish_one(RefitResult(at_step=1, figure_seconds=0.5))  # the next figure: 0.5 s
    assert not sched.wants_extras(9.9, ("figure",)) and sched.wants_extras(10.0, ("figure",))
    sched._finish_one(RefitResult(at_step=2, run_seconds=0.05))  # spent 0.55 s in all
    assert sched.wants_extras(6.0, ("run",)) and not sched.wants_extras(10.4, ("run", "figure"))


def test_short_runs_get_the_forecast_run_before_any_figure(tmp_path, stub):
    # 5% of 2.4 s of training: the cheap forecast run (first expected at 0.1 s) is written once the run has
    # trained 2 s, the figure (first expected at 1 s) never within this short run; latest.json at every refit.
    sf = ScalingForecast(every_n_steps=5, background=False, figure=True, forecast_runs=True, max_overhead=0.05)
    trainer = fit(tmp_path, [LossTrajectory(), StepWork(0.04), sf], max_steps=60)
    acc = EventAccumulator(trainer.logger.log_dir, size_guidance={"images": 0})
    acc.Reload()
    assert "forecast/curve" not in acc.Tags()["images"]
    run = forecast_run_dir(trainer.logger.log_dir)
    assert any(p.startswith("events.out") for p in os.listdir(run))  # the forecast run was written
    assert json.load(open(os.path.join(run, "latest.json")))["at_step"] == 60


def test_an_unpredictable_forecast_writes_no_run_and_teaches_the_budget_nothing(tmp_path, monkeypatch):
    from lightning_scaling.refit import FIRST_RUN_SECONDS, RefitJob, RefitScheduler, compute_refit
    from lightning_scaling.report import figures

    monkeypatch.setattr(figures, "is_predictable", lambda *a: False)  # a band wider than the loss: not written
    job = RefitJob(_synthetic_history(300), at_step=300, fit_kwargs={"horizon": 1000, "method": "power"},
                   log_dir=str(tmp_path), draw=False, write_run=True)
    result = compute_refit(job)
    assert result.forecast is not None and result.run_seconds == 0.0
    assert not any(p.startswith("events.out") for p in os.listdir(forecast_run_dir(str(tmp_path))))
    sched = RefitScheduler("inline", max_overhead=0.02)
    sched._finish_one(result)
    assert not sched.wants_extras(0.99 * FIRST_RUN_SECONDS / 0.02, ("run",))


def test_a_refit_that_draws_nothing_leaves_the_figure_budget_alone(tmp_path):
    from lightning_scaling.refit import FIRST_EXTRAS_SECONDS, RefitJob, RefitScheduler, compute_refit

    # latest.json only (no figure, no forecast run): its cost must not stand in for a figure's in the budget
    job = RefitJob(_synthetic_history(300), at_step=300, fit_kwargs={"horizon": 1000, "method": "power"},
                   log_dir=str(tmp_path), draw=False, write_run=False)
    result = compute_refit(job)
    assert result.forecast is not None and result.extras_seconds == 0.0
    assert json.load(open(os.path.join(forecast_run_dir(str(tmp_path)), "latest.json")))["at_step"] == 300
    sched = RefitScheduler("inline", max_overhead=0.02)
    sched._finish_one(result)
    assert not sched.wants_extras(0.99 * FIRST_EXTRAS_SECONDS / 0.02)  # the first figure still waits for 50 s


def _synthetic_history(n=400):
    steps = np.arange(n)
    loss = 2.0 + 3.0 * (1.0 + steps) ** -0.4 + 0.01 * np.random.default_rng(0).standard_normal(n)
    return RunHistory(name="syn", batch_size=8, tokens_per_sample=16, step=steps, loss=loss)


def test_worker_process_refits_match_inline_and_keep_the_latest_waiting_job():
    from lightning_scaling.refit import RefitJob, RefitScheduler, compute_refit

    h = _synthetic_history()
    jobs = [RefitJob(h.truncate(k - 1), at_step=k, fit_kwargs={"horizon": 1000}) for k in (200, 300, 400)]
    sched = RefitScheduler("process")
    try:
        for job in jobs:  # the first is in flight; 300 waits and is replaced by 400
            sched.submit(job)
        results = sched.finish(timeout=120)
    finally:
        sched.close()
    assert sched.mode == "process" and sched.submitted_steps == [200, 300, 400]
    assert [r.at_step for r in results] == [200, 400]
    inline = compute_refit(jobs[2])
    assert results[1].error is None
    assert results[1].forecast.final_loss == pytest.approx(inline.forecast.final_loss, rel=1e-9)


def test_the_worker_process_writes_the_forecast_run_and_json_off_the_training_thread(tmp_path):
    from lightning_scaling.refit import FIRST_EXTRAS_SECONDS, RefitJob, RefitResult, RefitScheduler

    sched = RefitScheduler("process", max_overhead=0.02)
    assert sched.wants_extras(0.0, ("run",))  # free to the training thread: written at every refit ...
    sched._finish_one(RefitResult(at_step=1, figure_seconds=5.0))
    assert sched.wants_extras(1.0, ("run",))  # ... even after a figure overspent the budget
    sched.poll()  # (drops that made-up result)
    assert not sched.wants_extras(0.99 * FIRST_EXTRAS_SECONDS / 0.02, ("run", "figure"))  # the figure is not
    try:
        sched.submit(RefitJob(_synthetic_history(300), at_step=300, fit_kwargs={"horizon": 1000, "method": "power"},
                              log_dir=str(tmp_path), write_run=True))
        (result,) = sched.finish(timeout=60)
        pid = sched._worker._proc.pid
    finally:
        sched.close()
    assert result.error is None and result.extras_seconds == 0.0  # nothing charged to the budget
    run = forecast_run_dir(str(tmp_path))
    (event_file,) = [p for p in os.listdir(run) if p.startswith("events.out")]
    assert event_file.split(".")[-2] == str(pid)  # events.out.tfevents.<time>.<host>.<pid>.<n>: the worker's
    assert scalars(run, FORECAST_TAG)[1000] == pytest.approx(result.forecast.loss[-1], rel=1e-6)
    assert json.load(open(os.path.join(run, "latest.json")))["at_step"] == 300


def test_worker_survives_start_up_output_ctrl_c_and_closes_at_once_when_idle(tmp_path, monkeypatch):
    import signal

    from lightning_scaling.refit import RefitJob, RefitScheduler

    # Something on the path prints while the interpreter starts (a sitecustomize, a noisy .pth): with the protocol
    # on stdout this made the parent read text as a message length and block for ever.
    (tmp_path / "sitecustomize.py").write_text("print('hello from sitecustomize ' * 50)\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    h = _synthetic_history(300)
    sched = RefitScheduler("process")
    try:
        sched.submit(RefitJob(h, at_step=300, fit_kwargs={"horizon": 1000, "method": "power"}))
        assert [r.at_step for r in sched.finish(timeout=60)] == [300]
        sched._worker._proc.send_signal(signal.SIGINT)  # Ctrl-C reaches the whole process group: ignored
        sched.submit(RefitJob(h, at_step=301, fit_kwargs={"horizon": 1000, "method": "power"}))
        results = sched.finish(timeout=60)
        assert sched.mode == "process" and [r.at_step for r in results] == [301] and results[0].error is None
        proc = sched._worker._proc
    finally:
        sched.close()
    assert proc.wait(timeout=30) == 0  # an idle worker is told to quit (not killed, not left running)


def _idle_worker_scheduler():
    from lightning_scaling.refit import RefitJob, RefitScheduler

    sched = RefitScheduler("process")
    sched.submit(RefitJob(_synthetic_history(300), at_step=300, fit_kwargs={"horizon": 1000, "method": "power"}))
    assert [r.at_step for r in sched.finish(timeout=60)] == [300]
    return sched, sched._worker._proc


def test_the_worker_can_start_before_the_first_refit():
    from lightning_scaling.refit import RefitJob, RefitScheduler

    sched = RefitScheduler("process")
    try:
        sched.start()  # ScalingForecast does this at train start: the interpreter's start-up overlaps training
        worker = sched._worker
        assert worker is not None and worker._proc.poll() is None
        sched.submit(RefitJob(_synthetic_history(300), at_step=300, fit_kwargs={"horizon": 1000, "method": "power"}))
        assert sched._worker is worker and sched.pending_steps == [300]
        assert [r.at_step for r in sched.finish(timeout=60)] == [300] and sched.pending_steps == []
    finally:
        sched.close()


def test_closing_an_idle_worker_ends_and_reaps_it():
    sched, proc = _idle_worker_scheduler()
    sched.close()
    assert proc.wait(timeout=30) == 0  # told to quit, it exits by itself (a kill would be -9) and is reaped


@pytest.mark.timing
def test_closing_an_idle_worker_does_not_wait_for_its_exit():
    import time as _time

    sched, proc = _idle_worker_scheduler()
    t0 = _time.perf_counter()
    sched.close()
    closed = _time.perf_counter() - t0
    proc.wait(timeout=10)
    assert closed < 0.05  # the interpreter's ~0.1 s teardown is waited for off the training thread


def test_worker_that_cannot_start_falls_back_to_inline(monkeypatch):
    from lightning_scaling import refit
    from lightning_scaling.warnings import ForecastWarning

    def broken(self):
        raise OSError("no subprocesses here")

    monkeypatch.setattr(refit._Worker, "__init__", broken)
    monkeypatch.setattr(forecast_mod, "forecast_run", stub_forecast_run, raising=False)
    sched = refit.RefitScheduler("process")
    with pytest.warns(ForecastWarning, match="no subprocesses here"):
        sched.submit(refit.RefitJob(_synthetic_history(50), at_step=50, fit_kwargs={"horizon": 100}))
    (result,) = sched.poll()
    assert sched.mode == "inline" and result.forecast.final_loss == pytest.approx(curve(100))


def test_scheduler_rejects_bad_arguments():
    from lightning_scaling.refit import RefitScheduler

    with pytest.raises(ValueError, match="`mode` must be one of"):
        RefitScheduler("fork")
    with pytest.raises(ValueError, match="`max_overhead` must be a positive fraction"):
        RefitScheduler("inline", max_overhead=0)


def test_state_dict_round_trip(tmp_path, stub):
    sf = ScalingForecast(every_n_steps=10, target_loss=2.5, background=False, figure=False, forecast_runs=False)
    fit(tmp_path, [LossTrajectory(), sf], max_steps=20, logger=False)
    state = sf.state_dict()
    assert all(isinstance(v, (int, float, str, bool, type(None))) for v in state["summary"].values())
    fresh = ScalingForecast(every_n_steps=10, target_loss=2.5)
    fresh.load_state_dict(state)
    assert fresh.summary == sf.summary
    assert fresh.step_seconds == pytest.approx(sf.step_seconds)
    assert fresh.n_refits == 2
    assert fresh.state_key == sf.state_key != ScalingForecast(every_n_steps=10).state_key


# ------------------------------------------------------------------------------------------------------- panels
def test_layout_written_once_per_writer(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path))
    assert write_custom_scalars(writer) is True
    assert write_custom_scalars(writer) is False
    writer.close()
    layout = custom_scalars_layout()
    assert layout["Gradient noise scale"]["B_simple (samples)"][1] == [r"^(gns/b_simple|forecast/critical_batch)$"]
    assert layout["Tokens"]["tokens seen"] == ["Multiline", [r"^(scaling/tokens)$"]]


def test_forecast_run_subsamples_and_keeps_endpoints(tmp_path):
    steps = np.arange(0, 10001)
    loss = curve(steps)
    f = StubForecast(steps=steps, loss=loss, lower=loss - 0.1, upper=loss + 0.1, observed_until=5000,
                     n_observed=5001, tokens_per_step=None)
    run = write_forecast_run(tmp_path, f, max_points=101)
    pts = scalars(run, FORECAST_TAG)
    assert len(pts) == 101 and min(pts) == 0 and max(pts) == 10000
    assert pts[10000] == pytest.approx(curve(10000), abs=1e-6)
    assert OBSERVED_TAG not in pts  # no history given: no observed curve
    assert scalars(run, UPPER_TAG)[10000] == pytest.approx(curve(10000) + 0.1, abs=1e-6)
    # One event per step holds the curve and its band (an event each cost the training thread three times as much).
    from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader

    events = [e for f in glob.glob(os.path.join(run, "events.out.tfevents.*"))
              for e in LegacyEventFileLoader(f).Load() if e.HasField("summary")]
    assert len(events) == 101 and all(len(e.summary.value) == 3 for e in events)
    # Written elsewhere and renamed in: a leftover of a writer stopped half-way is cleared, one event file remains.
    (Path(run) / ".incoming-123").write_bytes(b"partial")
    write_forecast_run(tmp_path, f, max_points=11)
    assert [p.startswith("events.out.tfevents.") for p in os.listdir(run)] == [True]
    assert len(scalars(run, FORECAST_TAG)) == 11
    with pytest.raises(ValueError, match="max_points"):
        write_forecast_run(tmp_path, f, max_points=1)


def test_forecast_figure_draws_observed_forecast_band_and_target():
    steps = np.arange(0, 1000)
    rng = np.random.default_rng(0)
    h = RunHistory(name="demo", step=steps[:400], loss=curve(steps[:400]) + 0.02 * rng.standard_normal(400))
    loss = curve(steps)
    f = StubForecast(steps=steps, loss=loss, lower=loss - 0.05, upper=loss + 0.05, observed_until=399,
                     n_observed=400, tokens_per_step=None)
    fig = forecast_figure(h, f, target_loss=2.1)
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels[:2] == ["observed (raw)", "observed"] and "target 2.1" in labels
    assert any(lbl.startswith("forecast (stub)") for lbl in labels)
    forecast_line = next(line for line in ax.get_lines() if line.get_label().startswith("forecast"))
    np.testing.assert_allclose(forecast_line.get_ydata(), loss)
    assert len(ax.collections) == 1  # the band
    lo, hi = ax.get_ylim()
    assert lo < 2.1 and hi < curve(0)  # the early transient is clipped, the target is visible
    assert f"{curve(999):.4f}" in ax.get_title()
    img = render_figure(fig)
    assert img.dtype == np.uint8 and img.shape == (420, 700, 3)


def test_a_second_fit_from_step_zero_does_not_warm_start_from_the_first(tmp_path, stub):
    sf = ScalingForecast(every_n_steps=5, background=False, figure=False, forecast_runs=False)
    fit(tmp_path / "a", [LossTrajectory(), sf], max_steps=20)
    assert sf.forecast is not None and sf._last_observed is not None
    seen = []
    trainer = pl.Trainer(max_steps=1, logger=False, enable_progress_bar=False, enable_checkpointing=False)  # step 0
    sf.on_train_start(trainer, None)
    seen.append((sf.forecast, sf.summary, sf._last_observed))
    sf._shutdown()
    assert seen == [(None, {}, None)]
