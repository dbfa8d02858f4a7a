"""Tests of lightning_scaling.forecast against closed forms, synthetic curves and the MPL paper's data.

Fixtures: tests/data/mpl (Luo et al. 2025 curves, MIT; see its SOURCE.md).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from lightning_scaling import RunHistory
from lightning_scaling.forecast import (
    Forecast,
    fit_schedule_law,
    forecast_run,
    momentum_law,
    momentum_sums,
    multi_power_law,
    warmup_steps,
)

DATA = Path(__file__).parent / "data" / "mpl"
TRAIN = ("cosine_24000", "constant_24000", "wsdcon_9")
TEST = ("constant_72000", "cosine_72000", "wsd_20000_24000", "wsdld_20000_24000", "wsdcon_3", "wsdcon_18")
NAMES = ("L0", "A", "alpha", "B", "C", "beta", "gamma")
PUBLISHED = {
    25: (3.04045406, 0.52468604, 0.50786857, 363.78751622, 2.06560812, 0.58279013, 0.64142257),
    100: (2.6514477, 0.60115152, 0.45295811, 437.9464276, 2.13245612, 0.59785199, 0.65523644),
    400: (2.37474466, 0.65421216, 0.42878731, 523.42464371, 2.02462735, 0.59350493, 0.63472457),
}


def schedule(name: str, n: int) -> np.ndarray:
    """The paper's per-step LR: warmup 0 -> 3e-4 over 2160 steps, then the named schedule (data README)."""
    peak, floor, w = 3e-4, 3e-5, 2160
    i = np.arange(n, dtype=np.float64)
    lr = np.full(n, peak)
    lr[:w] = peak * i[:w] / w
    kind, _, rest = name.partition("_")
    if kind == "cosine":
        T = int(rest)
        lr[w:] = floor + 0.5 * (peak - floor) * (1 + np.cos(np.pi * (i[w:] - w) / (T - w)))
    elif kind == "wsdcon":
        lr[8000:16000] = int(rest) * 1e-5
    elif kind == "wsdld":
        lr[20000:24000] = peak + (floor - peak) * (i[20000:24000] - 20000) / 4000
    elif kind == "wsd":
        lr[20000:24000] = peak * (floor / peak) ** ((i[20000:24000] - 20000) / 4000)
    return lr


def load(size: int, name: str):
    a = np.loadtxt(DATA / f"csv_{size}" / f"{name}.csv", delimiter=",", skiprows=1)
    if a[-1, 0] == 24000:
        a = a[a[:, 0] < 24000]
    steps = a[:, 0].astype(np.int64) + 1  # loss logged after update t = after t + 1 updates
    lr = schedule(name, int(steps[-1]))
    # the rebuilt schedule reproduces the logged LR column exactly
    assert np.allclose(lr[steps - 1], a[:, 1], rtol=1e-9, atol=0)
    return steps, a[:, 2], lr


# ------------------------------------------------------------------------------------------------ closed forms
def test_momentum_sums_closed_forms():
    lam = 0.99
    s1, s2 = momentum_sums(np.full(50, 2.0), [10, 50], lam=lam)
    assert np.allclose(s2, 0.0) and np.allclose(s1, [20.0, 100.0])
    lr = np.r_[np.full(30, 1.0), np.full(40, 0.25)]          # one drop of 0.75 at step 30
    s = np.arange(31, 71)
    _, s2 = momentum_sums(lr, s, lam=lam)
    k = s - 30                                                   # updates since the drop
    assert np.allclose(s2, 0.75 * (1 - lam ** k) / (1 - lam))
    # warmup counts at the peak LR
    lr_w = np.r_[np.linspace(0.1, 1.0, 10, endpoint=False), np.ones(10)]
    s1w, s2w = momentum_sums(lr_w, [20], lam=lam)
    assert s1w[0] == pytest.approx(20.0) and s2w[0] == pytest.approx(0.0)
    assert warmup_steps(lr_w) == 10
    assert momentum_law(np.ones(100), [100], L0=1.0, A=10.0, alpha=0.5, C=1.0)[0] == pytest.approx(2.0)


def test_mpl_closed_forms_and_block_sum_matches_exact():
    p = dict(zip(NAMES, PUBLISHED[25]))
    lr = np.full(5000, 3e-4)
    s = np.array([10, 100, 5000])
    # constant LR: no loss-drop term, L = L0 + A (eta s)^-alpha
    assert np.allclose(multi_power_law(lr, s, **p), p["L0"] + p["A"] * (3e-4 * s) ** -p["alpha"])
    # one drop at step k: LD = B * delta * G(eta_k^-gamma * S_k(s)) exactly
    lr[3000:] = 1e-4
    s = np.array([3500])
    g = 1 - (p["C"] * 1e-4 ** -p["gamma"] * 1e-4 * 500 + 1) ** -p["beta"]
    expect = p["L0"] + p["A"] * (3e-4 * 3000 + 1e-4 * 500) ** -p["alpha"] - p["B"] * 2e-4 * g
    assert multi_power_law(lr, s, **p)[0] == pytest.approx(expect, rel=1e-12)
    # graded-block evaluation vs the O(s) sum on real schedules with smooth and abrupt changes
    for name in ("cosine_24000", "wsdcon_3", "wsd_20000_24000"):
        steps, _, lr = load(25, name)
        fast = multi_power_law(lr, steps, **p)
        exact = multi_power_law(lr, steps, exact=True, **p)
        assert np.max(np.abs(fast / exact - 1)) < 2e-5


@pytest.mark.parametrize("size,prede,worste", [(25, 0.00110, 0.00409), (100, 0.00142, 0.00583),
                                               (400, 0.00168, 0.00995)])
def test_mpl_forward_reproduces_published_errors(size, prede, worste):
    p = dict(zip(NAMES, PUBLISHED[size]))
    pe, we = [], []
    for name in TEST:
        s, y, lr = load(size, name)
        r = np.abs(multi_power_law(lr, s, **p) / y - 1)
        pe.append(r.mean())
        we.append(r.max())
    assert np.mean(pe) == pytest.approx(prede, abs=1e-5)
    assert np.mean(we) == pytest.approx(worste, abs=1e-4)


# ------------------------------------------------------------------------------------------------ fitting
def test_fit_schedule_law_recovers_synthetic_curves():
    truth = dict(L0=2.5, A=0.6, alpha=0.45, B=450.0, C=2.0, beta=0.6, gamma=0.6)
    curves = []
    for name in TRAIN:
        s = np.arange(2200, 24000, 200)
        lr = schedule(name, 24000)
        curves.append((s, multi_power_law(lr, s, **truth), lr))
    fit = fit_schedule_law(curves, form="mpl")
    s = np.arange(2200, 72000, 500)
    lr = schedule("cosine_72000", 72000)
    assert np.max(np.abs(fit.predict(lr, s) / multi_power_law(lr, s, **truth) - 1)) < 5e-4
    m_truth = dict(L0=2.5, A=0.6, alpha=0.45, C=0.4)
    mcurves = [(c[0], momentum_law(c[2], c[0], **m_truth), c[2]) for c in curves]
    mfit = fit_schedule_law(mcurves, form="momentum")
    assert mfit.params["alpha"] == pytest.approx(0.45, abs=1e-3) and mfit.params["C"] == pytest.approx(0.4, rel=1e-2)


@pytest.mark.parametrize("size,limit", [(25, 0.0020), (100, 0.0020), (400, 0.00205)])
def test_fit_on_train_schedules_predicts_test_schedules(size, limit):
    # Luo et al. protocol. Published MPL: 0.0012 / 0.0013 / 0.0019; ours (prior strength chosen by
    # leave-one-training-curve-out) 0.00115 / 0.00164 / 0.00200 (400M: 0.0020027, at the target, see docs).
    fit = fit_schedule_law([load(size, n) for n in TRAIN], form="mpl")
    pe = np.mean([np.mean(np.abs(fit.predict(lr, s) / y - 1)) for s, y, lr in (load(size, n) for n in TEST)])
    assert pe <= limit


def test_fit_schedule_law_prior_options():
    curves = [load(25, n) for n in TRAIN]
    free = fit_schedule_law(curves, form="mpl", prior=None)
    strong = fit_schedule_law(curves, form="mpl", prior=0.03)
    assert free.prior_scale is None and strong.prior_scale == 0.03
    # the prior pulls the poorly identified annealing exponent towards its generic centre 0.5 ...
    assert abs(strong.params["beta"] - 0.5) < abs(free.params["beta"] - 0.5)
    # ... at a small cost in training fit, since the unregularised fit is the objective's minimum
    assert free.objective < strong.objective
    # with fewer than three curves "auto" cannot cross-validate and fits without the prior
    assert fit_schedule_law(curves[:2], form="mpl").prior_scale is None
    with pytest.raises(ValueError, match="prior"):
        fit_schedule_law(curves, form="mpl", prior="strong")
    with pytest.raises(ValueError, match="prior"):
        fit_schedule_law(curves, form="mpl", prior=-1.0)


def test_fit_schedule_law_rejects_bad_input():
    with pytest.raises(ValueError, match="unknown form"):
        fit_schedule_law([], form="cubic")
    with pytest.raises(ValueError, match="too few"):
        fit_schedule_law([([10, 20], [3.0, np.nan], np.full(30, 1e-3))], form="mpl")


# ------------------------------------------------------------------------------------------------ forecast_run
def _power_history(noise=0.0, n=3000, seed=0, nan_every=0):
    rng = np.random.default_rng(seed)
    s = np.arange(0, n + 1, 5)
    loss = 2.0 + (np.maximum(s, 1) / 50.0) ** -0.5
    loss = loss * np.exp(noise * rng.standard_normal(s.size))
    if nan_every:
        loss[::nan_every] = np.nan
    return RunHistory(step=s, loss=loss, batch_size=32, tokens_per_sample=128)


def test_forecast_power_law_noisy_with_nans():
    h = _power_history(noise=0.02, nan_every=37)
    f = forecast_run(h, horizon=20000)
    truth = 2.0 + (20000 / 50.0) ** -0.5
    assert f.method == "power"
    assert f.n_nonfinite == int(np.sum(~np.isfinite(h.loss))) > 0
    assert abs(f.final_loss / truth - 1) < 0.01
    assert f.final_lower <= truth <= f.final_upper
    assert f.steps[0] == h.step[-1] + 1 and f.steps[-1] == 20000 and f.steps.dtype == np.int64
    assert np.all(f.lower <= f.loss) and np.all(f.loss <= f.upper)
    assert f.tokens_per_step == 32 * 128


def test_forecast_schedule_aware_prefix_on_real_curve():
    # WSD run seen up to ~step 13000 of 24000: the cooldown (20000-24000) lies entirely in the future
    s, y, lr = load(100, "wsd_20000_24000")
    k = s.size // 2
    f = forecast_run(RunHistory(step=s[:k], loss=y[:k], planned_lr=lr))
    # the schedule-aware laws take part in the combination (beside L(S) credited with the prior's expected anneal)
    assert {"mpl", "momentum"} & set(f.warm_state.weights) and f.horizon == lr.size
    assert abs(f.final_loss / y[-1] - 1) < 0.015 and f.final_lower <= y[-1] <= f.final_upper
    blind = forecast_run(RunHistory(step=s[:k], loss=y[:k], planned_lr=lr), method="power")
    assert abs(blind.final_loss / y[-1] - 1) > abs(f.final_loss / y[-1] - 1)


def test_a_pure_power_law_is_not_a_fit_on_its_bound():
    from lightning_scaling.forecast import _MPL, _LawFit, _Power

    def at_bounds(cls, **p):
        return _LawFit.at_bounds(SimpleNamespace(prob=SimpleNamespace(cls=cls), fixed={}, z=cls.to_z(p)))

    assert not at_bounds(_Power, l_inf=0.0, s_c=50.0, alpha_s=0.3)  # L_inf = 0: a curve far from its floor
    assert at_bounds(_Power, l_inf=1.0, s_c=50.0, alpha_s=3.0)  # alpha_S on its upper bound: not evidence
    assert at_bounds(_MPL, L0=0.0, A=0.5, alpha=0.5, B=300.0, C=2.0, beta=0.6, gamma=0.6)  # an MPL with L0 = 0


def test_windows_that_find_a_pure_power_law_are_kept():
    # A noisy pure power law (L_inf = 0) seen for 30% of its run: the windows whose fit reaches L_inf = 0 are
    # combined with the others (they were left out as "on a bound", and with them the forecast's best windows).
    rng = np.random.default_rng(4)
    s = np.arange(1, 2001)
    true = 4.0 * (s / 10.0) ** -0.12
    y = true * np.exp(0.02 * rng.standard_normal(s.size))
    f = forecast_run(RunHistory(step=s[:600], loss=y[:600]), horizon=2000)
    assert set(f.warm_state.weights) == {"power@0", "power@0.1", "power@0.25", "power@0.4"}
    assert abs(f.final_loss / true[-1] - 1) < 0.01 and f.final_lower <= true[-1] <= f.final_upper


def test_candidates_on_a_bound_are_left_out_unless_all_are():
    from lightning_scaling.forecast import _drop_at_bounds

    fit = lambda bound: SimpleNamespace(at_bounds=lambda: bound)  # noqa: E731
    fits = {"mpl": fit(True), "momentum": fit(False), "power@0": fit(False)}
    assert set(_drop_at_bounds(fits)) == {"momentum", "power@0"}  # L0 = 0 is where the optimiser stopped
    every = {"mpl": fit(True), "power@0": fit(True)}
    assert _drop_at_bounds(every) is every  # none left: keep them (the band is widened instead)


def test_decayed_schedules_combine_the_schedule_blind_law_with_the_schedule_aware_ones():
    s, y, lr = load(100, "cosine_24000")
    k = s.size * 3 // 10
    f = forecast_run(RunHistory(step=s[:k], loss=y[:k], planned_lr=lr))
    kinds = {key.split("@")[0] for key in f.warm_state.weights}
    assert "power" in kinds and kinds & {"mpl", "momentum"}  # L(S) is a candidate beside MPL / momentum
    assert abs(f.final_loss / y[-1] - 1) < 0.02


def test_forecast_law_prior_fixes_exponent():
    h = _power_history(noise=0.01)
    law = SimpleNamespace(params={"alpha_s": 0.5, "s_c": 1.0})
    f = forecast_run(h, horizon=20000, law=law)
    assert f.params["alpha_s"] == 0.5
    assert abs(f.final_loss / (2.0 + 400.0 ** -0.5) - 1) < 0.005


def test_forecast_refuses_short_curves_and_bad_args():
    h = _power_history()
    with pytest.raises(ValueError, match="too little"):
        forecast_run(h.truncate(30), horizon=1000)  # 6 points after step 0
    with pytest.raises(ValueError, match="horizon"):
        forecast_run(h)
    with pytest.raises(ValueError, match="confidence"):
        forecast_run(h, horizon=100, confidence=1.5)
    with pytest.raises(ValueError, match="method"):
        forecast_run(h, horizon=100, method="spline")
    with pytest.raises(ValueError, match="covers"):
        forecast_run(h, horizon=100, lr_schedule=np.ones(50))


def test_warm_refit_is_fast_and_consistent():
    rng = np.random.default_rng(1)
    horizon, w = 20000, 500
    lr = np.r_[3e-4 * (np.arange(w) + 1) / w,
               3e-5 + 0.5 * 2.7e-4 * (1 + np.cos(np.pi * np.arange(horizon - w) / (horizon - w)))]
    steps = np.arange(1, 10001)
    clean = multi_power_law(lr, steps, **dict(zip(NAMES, PUBLISHED[25])))
    h = RunHistory(step=steps, loss=clean * np.exp(0.01 * rng.standard_normal(steps.size)), planned_lr=lr)
    f0 = forecast_run(h)
    f1 = forecast_run(h, init=f0)
    truth = multi_power_law(lr, [horizon], **dict(zip(NAMES, PUBLISHED[25])))[0]
    # every candidate predicts the held-out tail at the noise level, so the momentum law and L(S) (credited with
    # the annealing prior's expected gain) keep part of the weight and pull the combination off this pure-MPL
    # truth; the band holds the truth either way
    assert abs(f0.final_loss / truth - 1) < 0.012 and abs(f1.final_loss / f0.final_loss - 1) < 1e-3
    assert f0.final_lower <= truth <= f0.final_upper and f1.final_lower <= truth <= f1.final_upper
    assert not f0.state["warm"] and f1.state["warm"] and f1.state["q_model"] == f0.state["q_model"]


@pytest.mark.timing
def test_refit_cost_does_not_regress(request):
    """CPU time of one forecast_run on a 10k-point cosine history, cold and warm (``init=``).

    Measured 405 ms cold / 36 ms warm CPU (benchmarks/forecast_cost.py --cpu); the guard is twice that. Issue 13's
    targets (200 ms / 20 ms) are not met yet: six candidates, each a scipy trust-region fit (see docs/forecast.md).
    """
    if "timing" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("wall-clock check: run with -m timing")
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from forecast_cost import measure

    measure("cosine", 2_000, warm_calls=2)  # imports and first-call costs out of the measured calls
    row = measure("cosine", 10_000, clock=time.process_time)
    assert row["cold_ms"] <= 950 and row["warm_ms"] <= 75, row


def test_warm_refits_revalidate_periodically_and_on_growth():
    h = _power_history(noise=0.01, n=4000)
    f = forecast_run(h.truncate(2000), horizon=20000)
    assert not f.state["warm"] and f.state["cold_until"] == 2000
    flags = []
    for k in range(1, 6):   # small growth: warm, except every 3rd consecutive warm call
        f = forecast_run(h.truncate(2000 + 10 * k), horizon=20000, init=f, revalidate_every=3)
        flags.append(f.state["warm"])
    assert flags == [True, True, False, True, True]
    # the observed span grew by more than 25% since the last cold fit: full revalidation
    f = forecast_run(h.truncate(2100), horizon=20000, init=f, revalidate_every=100)
    assert f.state["warm"]
    f = forecast_run(h.truncate(3000), horizon=20000, init=f, revalidate_every=100)
    assert not f.state["warm"] and f.state["cold_until"] == 3000
    with pytest.raises(ValueError, match="revalidate_every"):
        forecast_run(h, horizon=20000, revalidate_every=0)


def test_transient_exclusion_helps_power_law_with_early_transient():
    # a steep early transient (fast exponential) on top of a power law: fitting it biases the asymptote
    s = np.arange(0, 3001, 5)
    sf = np.maximum(s, 1).astype(float)
    clean = 2.0 + (sf / 50.0) ** -0.5 + 1.5 * np.exp(-sf / 150.0)
    h = RunHistory(step=s, loss=clean)
    truth = 2.0 + (20000 / 50.0) ** -0.5
    with_ex = forecast_run(h, horizon=20000)
    without = forecast_run(h, horizon=20000, exclude_transient=False)
    assert abs(with_ex.final_loss / truth - 1) < abs(without.final_loss / truth - 1)
    assert abs(with_ex.final_loss / truth - 1) < 0.01


def test_one_noisy_bin_below_the_target_is_not_reaching_it():
    obs = np.full(40, 3.4)
    obs[12] = 3.0  # one bin of a noisy curve dips below the target
    f = Forecast(steps=np.array([41, 60, 80]), loss=np.array([3.3, 3.1, 2.9]), lower=np.array([3.2, 2.9, 2.7]),
                 upper=np.array([3.4, 3.3, 3.1]), final_loss=2.9, final_lower=2.7, final_upper=3.1, horizon=80,
                 method="power", params={}, n_observed=40, observed_until=40,
                 observed_steps=np.arange(1, 41), observed_loss=obs)
    assert f.steps_to(3.1) == pytest.approx(60.0)  # from the forecast, not the dip at step 13
    obs[12:15] = 3.0  # three bins in a row: the trailing mean of the last 5% (3 bins here) reaches it
    assert f.steps_to(3.1) == 15.0


def test_forecast_steps_to_tokens_to_and_json():
    f = Forecast(steps=np.array([11, 20, 30]), loss=np.array([3.0, 2.6, 2.4]), lower=np.array([2.9, 2.4, 2.2]),
                 upper=np.array([3.1, 2.8, 2.6]), final_loss=2.4, final_lower=2.2, final_upper=2.6, horizon=30,
                 method="power", params={"l_inf": 2.0}, n_observed=10, observed_until=10, tokens_per_step=100.0,
                 observed_steps=np.array([2, 4, 6, 8, 10]), observed_loss=np.array([3.6, 3.5, 3.4, 3.3, 3.1]))
    assert f.steps_to(3.3) == 10.0                    # already reached: the mean of the last 3 bins is 3.27
    assert f.steps_to(2.8) == pytest.approx(15.5)     # interpolated between 11 and 20
    assert f.steps_to(2.8, bound="lower") < f.steps_to(2.8) < f.steps_to(2.8, bound="upper")
    assert math.isinf(f.steps_to(2.0)) and f.tokens_to(2.8) == pytest.approx(1550.0)
    with pytest.raises(ValueError, match="bound"):
        f.steps_to(2.5, bound="median")
    d = json.loads(json.dumps(f.to_dict()))
    assert d["method"] == "power" and d["steps"] == [11, 20, 30]
