"""forecast_run with reference runs, candidate combination, the typed warm-start state, lodo_choose."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from lightning_scaling import RunHistory
from lightning_scaling.forecast import Forecast, ForecastState, forecast_run, warmup_steps

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_forecast import load  # noqa: E402  (the MPL fixture loader)


def _mpl(size: int, name: str = "cosine_24000") -> RunHistory:
    s, y, lr = load(size, name)
    return RunHistory(name=f"mpl{size}", step=s, loss=y, planned_lr=lr)


def _final(h: RunHistory) -> float:
    return float(np.mean(h.loss[-3:]))


def test_reference_run_beats_the_run_alone_and_keeps_the_gap_rule():
    # 100M cosine from 30% of the run; the finished 25M cosine run of the same setup as reference
    run, ref = _mpl(100), _mpl(25)
    cut = int(0.3 * run.step[-1])
    prefix = run.truncate(cut)
    actual = _final(run)
    f = forecast_run(prefix, reference=[ref])
    alone = forecast_run(prefix)
    # "keep the gap" baseline at the same fraction of the run
    now = run.loss[run.step <= cut][-3:].mean()
    ref_now = ref.loss[ref.step <= cut][-3:].mean()
    gap = _final(ref) + now - ref_now
    err = abs(f.final_loss / actual - 1)
    assert f.method == "reference" and set(f.warm_state.weights) == {"ref0"}
    # the run alone is within 1% here too (0.07%: its L(S) candidate with the expected anneal); the reference
    # forecast must beat the keep-the-gap rule and stay well inside the alone forecast's band
    assert err < 0.01 and err < abs(gap / actual - 1) and alone.final_lower <= f.final_loss <= alone.final_upper
    assert f.final_lower <= actual <= f.final_upper
    assert 0.5 < f.params["b"] < 1.5


def test_reference_accepts_one_run_any_length_and_refuses_junk():
    run, ref = _mpl(100), _mpl(25, "cosine_72000")  # a reference three times longer: aligned by fraction
    prefix = run.truncate(int(0.5 * run.step[-1]))
    f = forecast_run(prefix, reference=ref)
    assert abs(f.final_loss / _final(run) - 1) < 0.03
    with pytest.raises(ValueError, match=r"reference\[0\] must be a RunHistory"):
        forecast_run(prefix, reference=[{"loss": [1.0]}])
    with pytest.raises(ValueError, match=r"reference\[0\] has 2 finite positive losses"):
        forecast_run(prefix, reference=[RunHistory(step=[1, 2], loss=[3.0, 2.9])])


def test_warm_refit_with_references_reuses_the_calibration():
    run, ref = _mpl(100), _mpl(25)
    h = run.truncate(int(0.4 * run.step[-1]))
    f0 = forecast_run(h, reference=[ref])
    f1 = forecast_run(run.truncate(int(0.41 * run.step[-1])), reference=[ref], init=f0)
    assert f1.warm_state.warm and not f0.warm_state.warm
    assert f1.warm_state.q_model == f0.warm_state.q_model
    # a warm state of a law forecast is not reused for a reference forecast (and vice versa)
    f2 = forecast_run(run.truncate(int(0.41 * run.step[-1])), init=f0)
    assert not f2.warm_state.warm and f2.method in ("mpl", "momentum", "power")


def test_candidates_are_combined_by_validated_error_and_their_disagreement_widens_the_band():
    s, y, lr = load(100, "wsd_20000_24000")
    h = RunHistory(step=s[: s.size // 2], loss=y[: s.size // 2], planned_lr=lr)
    f = forecast_run(h)
    w = f.warm_state.weights
    laws = {"mpl", "momentum", "power@0", "power@0.1", "power@0.25", "power@0.4"}  # L(S) is a candidate too
    assert set(w) <= laws and abs(sum(w.values()) - 1) < 1e-12
    assert set(f.candidates) == laws
    if len(w) == 2:  # the better tail error gets the larger weight
        best = min(f.candidates, key=f.candidates.get)
        assert w[best] == max(w.values())
    single = forecast_run(h, method=f.method)
    assert (f.final_upper - f.final_lower) >= 0.999 * (single.final_upper - single.final_lower)
    assert f.final_lower <= y[-1] <= f.final_upper


def test_sparse_constant_curve_with_fifteen_points_is_forecast():
    # a Gemstones-like record: 15 logged points of a constant-LR run at 30% of its horizon
    s = np.linspace(480, 7150, 15).round().astype(int)
    loss = 2.1 + (s / 100.0) ** -0.4
    f = forecast_run(RunHistory(step=s, loss=loss), horizon=23850, lr_schedule=np.ones(23850))
    truth = 2.1 + (23850 / 100.0) ** -0.4
    assert f.method == "power" and abs(f.final_loss / truth - 1) < 0.01
    with pytest.raises(ValueError, match="need at least 8"):
        forecast_run(RunHistory(step=s[:7], loss=loss[:7]), horizon=23850)


def test_forecast_state_is_typed_and_the_old_dict_stays_readable():
    s, y, lr = load(25, "cosine_24000")
    f = forecast_run(RunHistory(step=s[:90], loss=y[:90], planned_lr=lr))
    st = f.warm_state
    assert isinstance(st, ForecastState) and st.method == f.method and st.warmup == warmup_steps(lr)
    assert f.state["q_model"] == st.q_model and f.state["warm"] is False and f.state["cold_until"] == s[89]
    assert set(st.params) == set(st.weights)
    bare = Forecast(steps=np.array([2]), loss=np.array([1.0]), lower=np.array([0.9]), upper=np.array([1.1]),
                    final_loss=1.0, final_lower=0.9, final_upper=1.1, horizon=2, method="power", params={},
                    n_observed=9, observed_until=1)
    assert bare.state == {} and "warm_state" not in bare.to_dict()


def test_lodo_choose_never_uses_the_scored_dataset():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from validate import lodo_choose

    scores = {0.1: {"A": 0.0, "B": 5.0, "C": 5.0}, 0.3: {"A": 9.0, "B": 1.0, "C": 1.0}}
    # A is best with 0.1 on itself, but B and C prefer 0.3: A gets 0.3
    assert lodo_choose(scores) == {"A": 0.3, "B": 0.1, "C": 0.1}
    assert lodo_choose({1: {"A": float("nan"), "B": 1.0}, 2: {"A": 0.5, "B": 2.0}}) == {"A": 1, "B": 2}
    with pytest.raises(ValueError, match="needs candidate values and >= 2 datasets"):
        lodo_choose({0.1: {"A": 1.0}})


def test_scaling_forecast_takes_reference_histories_or_a_folder(tmp_path):
    from lightning_scaling.callbacks.forecast import ScalingForecast

    ref = _mpl(25)
    ref.to_json(tmp_path / "mpl25" / "history.json")
    cb = ScalingForecast(reference=tmp_path)
    assert len(cb.reference) == 1 and np.array_equal(cb.reference[0].loss, ref.loss)
    assert ScalingForecast(reference=ref).reference[0] is ref
    assert ScalingForecast().reference is None
    with pytest.raises(ValueError, match="must be RunHistory runs or a folder"):
        ScalingForecast(reference=[1.0])
    with pytest.raises(FileNotFoundError, match="missing does not exist"):
        ScalingForecast(reference=tmp_path / "missing")


@pytest.mark.parametrize("size,name", [(25, "cosine_24000"), (100, "wsd_20000_24000"), (400, "constant_24000")])
def test_stop_rule_replayed_on_real_curves_never_stops_a_reachable_target(size, name):
    from lightning_scaling.callbacks.early_stopping import ForecastStopRule

    run = _mpl(size, name)
    horizon, actual = int(run.planned_lr.size), _final(run)
    reach = ForecastStopRule(horizon=horizon, patience=3, min_fraction=0.2, target_loss=1.005 * actual)
    out = ForecastStopRule(horizon=horizon, patience=3, min_fraction=0.2, target_loss=0.95 * actual)
    stopped_reach, stopped_out, f = None, None, None
    for frac in np.arange(0.2, 0.96, 0.05):
        step = int(frac * horizon)
        f = forecast_run(run.truncate(step), init=f)
        now = float(np.mean(run.loss[run.step <= step][-3:]))
        stopped_reach = stopped_reach or reach.update(f, current_step=step, current_loss=now)
        if stopped_out is None and out.update(f, current_step=step, current_loss=now):
            stopped_out = frac
    assert stopped_reach is None
    # a target 5% below the actual final loss is out of reach: stopped, and early (the prefix is reported)
    assert stopped_out is not None and stopped_out <= 0.5, stopped_out


def test_remaining_annealing_gain_is_capped_by_what_the_schedule_can_support():
    from lightning_scaling import forecast as fc

    horizon = 10000
    lr = np.r_[np.linspace(1e-5, 1e-3, 100), np.linspace(1e-3, 0.0, horizon - 100)]
    steps = np.arange(100, 3001, 20)
    loss = fc.momentum_law(lr, steps, L0=1.0, A=2.0, alpha=0.5, C=0.1)
    curve = fc._prepare(RunHistory(step=steps, loss=loss), horizon, lr, method="momentum", law=None, min_points=8,
                        min_fraction=0.0, max_bins=96, critical_batch=None)
    opts = fc._Opts(delta=1e-3, lam=0.999, holdout=0.25, validate=True, exclude_transient=True, confidence=0.9)
    fit = fc._fitter("momentum", "momentum", 0.0, curve, opts, [])(curve.t_obs)
    fit.z = fc._Momentum.to_z(dict(L0=1.0, A=2.0, alpha=0.5, C=2.0))  # an annealing amplitude 20x the truth
    grid = np.array([5000, horizon])
    raw = fc._Momentum.predict(fit.z, fit.prob.design(grid))[0]
    capped = fit.predict(grid)
    # the forecast gain beyond the window may not exceed half the current loss times the LR share still to decay
    no_anneal = fc._Momentum.predict(fc._Momentum.to_z(dict(L0=1.0, A=2.0, alpha=0.5, C=0.0)),
                                     fit.prob.design(np.r_[curve.t_obs, grid]))[0]
    at_end = fc._Momentum.predict(fit.z, fit.prob.design(np.array([curve.t_obs])))[0][0]
    gain = (no_anneal[1:] - capped) - (no_anneal[0] - at_end)
    share = (lr[curve.t_obs - 1] - lr[grid - 1]) / lr.max()
    assert np.all(capped > raw) and fit.capped(grid)
    assert np.allclose(gain, fc._MAX_GAIN_FRAC * curve.by[-1] * share, rtol=1e-6)
