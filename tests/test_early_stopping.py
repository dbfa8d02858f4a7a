"""ForecastEarlyStopping: the decision function in closed form, the Lightning callback, and replays of real runs.

Closed-form cases use a forecast with curve L(s) = 2 + 100 / (100 + s) and band +-0.05. Real cases replay the
Schaipp et al. 2025 124M runs (tests/data/schaipp, MIT) through the real ``forecast_run``: in the cosine LR sweep
the run with peak LR 2e-3 ends best, and the early-stopping rule must never stop it.
"""

from __future__ import annotations

import csv
import math
import os
import types
from collections import defaultdict

import lightning.pytorch as pl
import numpy as np
import pytest
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException

import lightning_scaling.forecast as forecast_mod
from lightning_scaling.callbacks.early_stopping import (
    ForecastEarlyStopping,
    ForecastStopRule,
    PairedReference,
    forecast_stop_reason,
    reference_final_loss,
)
from lightning_scaling.callbacks.forecast import ScalingForecast
from lightning_scaling.callbacks.loss_trajectory import LossTrajectory
from lightning_scaling.history import RunHistory

from helpers import TinyLM, token_loader, trainer_kwargs

DATA = os.path.join(os.path.dirname(__file__), "data", "schaipp")
W = 0.05  # band half-width of the synthetic forecasts


def curve(s):
    return 2.0 + 100.0 / (100.0 + np.asarray(s, dtype=np.float64))


def synthetic(horizon=100, tokens_per_step=None, observed_until=0):
    steps = np.arange(0, horizon + 1, dtype=np.float64)
    loss = curve(steps)
    return types.SimpleNamespace(steps=steps, loss=loss, lower=loss - W, upper=loss + W, final_loss=loss[-1],
                                 final_lower=loss[-1] - W, final_upper=loss[-1] + W, observed_until=observed_until,
                                 tokens_per_step=tokens_per_step)


# ------------------------------------------------------------------------------------ decision function (exact)
def test_target_budget_boundaries():
    f = synthetic(100, tokens_per_step=10.0)
    target = float(curve(60) - W)  # the lower bound reaches the target exactly at step 60
    assert forecast_stop_reason(f, current_step=20, target_loss=target, max_steps=60) is None
    assert forecast_stop_reason(f, current_step=20, target_loss=target, max_steps=59).startswith("target")
    assert forecast_stop_reason(f, current_step=20, target_loss=target, max_tokens=600.0) is None
    assert forecast_stop_reason(f, current_step=20, target_loss=target, max_tokens=590.0).startswith("target")
    # Default budget = the forecast's end; a target below the whole band is unreachable.
    assert forecast_stop_reason(f, current_step=20, target_loss=float(curve(100) - W - 1e-6)).startswith("target")
    # Undecidable: the budget lies past the forecast, or the target is already reached.
    assert forecast_stop_reason(f, current_step=20, target_loss=1.0, max_steps=1000) is None
    assert forecast_stop_reason(f, current_step=20, target_loss=2.9, current_loss=2.85) is None
    # A token budget without tokens per step cannot be judged: only the step budget (here the forecast end) counts.
    g = synthetic(100)
    assert forecast_stop_reason(g, current_step=20, target_loss=target, max_tokens=10.0) is None


def test_baseline_and_min_delta_boundaries():
    f = synthetic(100)
    final_lower = float(curve(100) - W)  # 2.45
    assert forecast_stop_reason(f, current_step=50, baseline_loss=final_lower - 0.01 + 1e-9, margin=0.01) is None
    reason = forecast_stop_reason(f, current_step=50, baseline_loss=final_lower - 0.01 - 1e-9, margin=0.01)
    assert reason.startswith("baseline")
    # Optimistic remaining gain at step 50 = L(50) - final_lower = 2.6667 - 2.45 = 0.2167.
    gain = float(curve(50) - final_lower)
    assert forecast_stop_reason(f, current_step=50, min_delta=gain - 1e-6) is None
    assert forecast_stop_reason(f, current_step=50, min_delta=gain + 1e-6).startswith("min_delta")


def test_rule_patience_and_min_fraction():
    f_bad, f_ok = synthetic(100), synthetic(100)
    rule = ForecastStopRule(horizon=100, patience=2, min_fraction=0.3, baseline_loss=2.0)
    assert rule.update(f_bad, current_step=20) is None and rule.wait_count == 0  # before 30% of the run
    assert rule.update(f_bad, current_step=30) is None and rule.wait_count == 1
    ok = ForecastStopRule(horizon=100, patience=2, min_fraction=0.3, baseline_loss=3.0)
    assert ok.update(f_ok, current_step=40) is None and ok.wait_count == 0
    rule.record(False)  # a negative check resets the count
    assert rule.wait_count == 0
    assert rule.update(f_bad, current_step=40) is None
    assert rule.update(f_bad, current_step=50).startswith("baseline")
    assert not ForecastStopRule(horizon=None, baseline_loss=2.0).ready(10**9)


def test_reference_final_loss_uses_tail_mean():
    h = RunHistory(step=np.arange(300), loss=np.r_[np.full(297, 3.0), [2.0, 2.5, 3.0]])
    assert reference_final_loss(h) == pytest.approx(2.5)  # last ceil(1% of 300) = 3 points
    with pytest.raises(ValueError, match="no finite loss"):
        reference_final_loss(RunHistory(step=[0, 1], loss=[math.nan, math.inf]))


@pytest.mark.parametrize(
    "kwargs, message",
    [(dict(), "needs a criterion"),
     (dict(baseline_loss=3.0, reference=RunHistory(step=[0], loss=[3.0])), "not both"),
     (dict(min_delta=0.0), "`min_delta` must be positive"),
     (dict(target_loss=3.0, max_steps=0), "`max_steps` must be a positive int"),
     (dict(max_steps=10, baseline_loss=3.0), "give `target_loss` too"),
     (dict(baseline_loss=3.0, margin=-0.1), "`margin` must be >= 0"),
     (dict(baseline_loss=3.0, confidence=1.5), r"`confidence` must be in \(0, 1\)"),
     (dict(baseline_loss=3.0, patience=0), "`patience` must be a positive int"),
     (dict(baseline_loss=3.0, min_fraction=1.0), r"`min_fraction` must be in \[0, 1\)"),
     (dict(target_loss=float("inf")), "`target_loss` must be a finite number")],
)
def test_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ForecastEarlyStopping(**kwargs)


def test_reference_from_path(tmp_path):
    h = RunHistory(name="ref", step=np.arange(100), loss=np.linspace(4.0, 3.0, 100))
    path = tmp_path / "history.json"
    h.to_json(path)
    stop = ForecastEarlyStopping(reference=str(path), margin=0.02)
    assert stop.baseline == pytest.approx(3.0)


# ------------------------------------------------------------------------------------------ Lightning callback
def stub_forecast_run(history, horizon=None, lr_schedule=None, *, law=None, target_loss=None, confidence=0.9,
                      method="auto", **kwargs):
    if len(history) < 3:
        raise ValueError("too little data")
    f = synthetic(int(horizon), tokens_per_step=history.tokens_per_step, observed_until=int(history.step[-1]))
    return f


@pytest.fixture
def stub(monkeypatch):
    monkeypatch.setattr(forecast_mod, "forecast_run", stub_forecast_run, raising=False)


def run(tmp_path, stop, *, with_forecast=True, max_steps=40, logger=False):
    cbs = [LossTrajectory(), stop]
    if with_forecast:
        cbs.insert(1, ScalingForecast(every_n_steps=5, background=False, figure=False, forecast_runs=False))
    tb = TensorBoardLogger(tmp_path, name="tb") if logger else False
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=max_steps, callbacks=cbs, logger=tb))
    trainer.fit(TinyLM(max_steps=max_steps), token_loader(n=64, batch_size=4))
    return trainer


@pytest.mark.parametrize("with_forecast", [True, False])
def test_stops_after_patience_on_baseline(tmp_path, stub, with_forecast):
    # Horizon 40: checks every 5 steps count from 25% (step 10); 3 positive checks (10, 15, 20) stop at step 20.
    stop = ForecastEarlyStopping(baseline_loss=float(curve(40)) - 0.2, patience=3, min_fraction=0.25,
                                 check_every_n_steps=5)
    trainer = run(tmp_path, stop, with_forecast=with_forecast, logger=True)
    assert stop.stopped_step == 20 and trainer.global_step == 20
    assert stop.stopped_reason.startswith("baseline")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(trainer.logger.log_dir)
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("forecast/early_stop")] == [(20, 1.0)]


def test_stops_on_min_delta_and_target(tmp_path, stub):
    # Remaining optimistic gain L(s) - (L(40) - 0.05) < 0.2  <=>  s > 15.7: checks 20, 25, 30 -> stop at 30.
    stop = ForecastEarlyStopping(min_delta=0.2, patience=3, min_fraction=0.25, check_every_n_steps=5)
    run(tmp_path, stop)
    assert stop.stopped_step == 30 and stop.stopped_reason.startswith("min_delta")
    # Target below the whole band within the 40-step budget: stops at the third check from step 10.
    stop = ForecastEarlyStopping(target_loss=float(curve(40)) - 0.1, patience=3, min_fraction=0.25,
                                 check_every_n_steps=5)
    run(tmp_path, stop)
    assert stop.stopped_step == 20 and stop.stopped_reason.startswith("target")


def test_does_not_stop_a_good_run(tmp_path, stub):
    stop = ForecastEarlyStopping(baseline_loss=float(curve(40)), target_loss=float(curve(40)), patience=1,
                                 min_fraction=0.0, check_every_n_steps=5)
    trainer = run(tmp_path, stop)
    assert trainer.global_step == 40 and stop.stopped_reason is None and stop.wait_count == 0
    state = stop.state_dict()
    fresh = ForecastEarlyStopping(baseline_loss=float(curve(40)), target_loss=float(curve(40)))
    fresh.load_state_dict(state)
    assert fresh.wait_count == 0 and fresh.stopped_reason is None


def test_requires_loss_trajectory(tmp_path):
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=2, callbacks=[ForecastEarlyStopping(min_delta=0.1)]))
    with pytest.raises(MisconfigurationException, match="LossTrajectory"):
        trainer.fit(TinyLM(), token_loader())


# --------------------------------------------------------------------------------------------------- real curves
def load_schaipp():
    runs = {int(r["run_idx"]): r for r in csv.DictReader(open(os.path.join(DATA, "runs.csv")))}
    rows = defaultdict(dict)
    for r in csv.DictReader(open(os.path.join(DATA, "val_curves.csv"))):
        rows[int(r["run_idx"])][int(r["iter"])] = (float(r["val_loss"]), float(r["lr"]) if r["lr"] else math.nan)
    out = {}
    for idx, meta in runs.items():
        it = np.array(sorted(rows[idx]))  # de-duplicated on iter
        val = np.array([rows[idx][i][0] for i in it])
        lr = np.array([rows[idx][i][1] for i in it])
        T = int(meta["iterations"])
        ok = np.isfinite(lr)
        planned = np.interp(np.arange(T), np.r_[0, it[ok]], np.r_[0.0, lr[ok]])  # warmup from 0
        bs = int(meta["batch_size"]) * int(meta["acc_steps"]) * int(meta["world_size"])
        out[idx] = RunHistory(name=f"schaipp_{idx}_lr{meta['lr']}_{meta['scheduler']}", step=it, loss=val,
                              batch_size=bs, tokens_per_sample=int(meta["sequence_length"]), planned_lr=planned,
                              n_params=float(meta["parameters"]))
    return out, runs


def replay(history, horizon, *, check_every=2500, paired=None, **rule_kwargs):
    """Run the stopping protocol over a finished run as the callback does while it trains (warm-started refits,
    optional paired reference): (stop step, reason) or (None, None)."""
    rule = ForecastStopRule(horizon=horizon, **rule_kwargs)
    prev = None
    for step in range(check_every, horizon, check_every):
        if not rule.ready(step):
            continue
        fc = forecast_mod.forecast_run(history.truncate(step), horizon, confidence=0.9, init=prev)
        prev = fc
        if paired is not None:
            rule.criteria["baseline_loss"] = paired.at(int(fc.observed_until))
        reason = rule.update(fc, current_step=step, current_loss=float(fc.observed_loss[-1]))
        if reason is not None:
            return step, reason
    return None, None


@pytest.fixture(scope="module")
def schaipp():
    return load_schaipp()


def test_real_sweep_paired_reference_never_stops_the_best_run(schaipp):
    histories, _ = schaipp
    horizon = 50000
    finals = {i: reference_final_loss(histories[i]) for i in (143, 164, 165, 166, 167, 168, 231)}
    assert min(finals, key=finals.get) == 167  # the 2e-3 cosine run ends best (2.9192)
    # Reference: the finished lr=1e-3 cosine run (a previous sweep point, 2.9264); margin 0.03 nats.
    paired = PairedReference(histories[166], horizon=horizon, confidence=0.9)
    assert paired.final == pytest.approx(finals[166])
    kw = dict(patience=3, min_fraction=0.2, baseline_loss=paired.final, margin=0.03)
    assert replay(histories[167], horizon, paired=paired, **kw) == (None, None)  # best: never stopped
    assert replay(histories[165], horizon, paired=paired, **kw) == (None, None)  # 0.022 worse: within margin
    for clearly_worse in (164, 143, 231):  # lr 1e-4 (3.097), diverged lr 5e-3 (7.55), constant LR (3.074)
        step, reason = replay(histories[clearly_worse], horizon, paired=paired, **kw)
        # the lr 1e-4 run is stopped at 85% of the run since the forecast's L(S) candidate joined the combination
        # for decayed schedules (issue 10): its band is wider while the candidates disagree (2.94-3.15 at 20%)
        assert step is not None and step <= 0.9 * horizon, (clearly_worse, step)
        assert reason.startswith("baseline")


def test_real_constant_lr_target_within_budget(schaipp):
    # Constant-LR sweep (power-law forecasts): target 3.1 within the 50k-step budget.
    histories, _ = schaipp
    horizon = 50000
    kw = dict(patience=3, min_fraction=0.2, target_loss=3.1, max_steps=horizon)
    for reaches in (231, 230):  # end at 3.074 (best) and 3.096
        assert replay(histories[reaches], horizon, **kw) == (None, None), reaches
    for misses in (232, 233):  # end at 3.103 and 3.158
        step, reason = replay(histories[misses], horizon, **kw)
        assert step is not None and reason.startswith("target"), misses
