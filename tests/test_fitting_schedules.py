"""fit_scaling_law under any LR schedule, calibrated loss intervals, and B_crit(L) fitted at the low-loss end."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from lightning_scaling import RunHistory, fitting, laws
from lightning_scaling.fitting import (
    CriticalBatchFit,
    ScalingLaw,
    fit_critical_batch_size,
    fit_scaling_law,
    schedule_features,
)
from lightning_scaling.warnings import FitWarning

K = dict(n_c=1e10, alpha_n=0.08, s_c=300.0, alpha_s=0.7, b_star=5e4, alpha_b=0.3)
ANNEAL, LAM, STEPS, WARMUP = 0.08, 0.99, 3000, 60


def schedule(kind: str, steps: int = STEPS) -> np.ndarray:
    """Linear warmup, then constant, cosine to 10% or WSD (20% linear cooldown to 0)."""
    i = np.arange(steps, dtype=float)
    lr = np.ones(steps)
    if kind == "cosine":
        lr = 0.1 + 0.45 * (1 + np.cos(np.pi * np.clip((i - WARMUP) / (steps - WARMUP), 0, 1)))
    elif kind == "wsd":
        lr = np.clip((steps - i) / (0.2 * steps), 0.0, 1.0)
    lr[:WARMUP] = (i[:WARMUP] + 1) / WARMUP
    return 1e-3 * lr


def law_loss(n: float, lr: np.ndarray, s: np.ndarray, batch: float) -> np.ndarray:
    """``L = f L(N, S_eff, B)`` with ``f = exp(-c a)`` and B_crit at the annealed loss ``L`` itself."""
    s_eff, a = schedule_features(lr, s, lam=LAM)
    f = np.exp(-ANNEAL * a)
    return f * laws.loss_n_s_b(n, s_eff, batch * f ** (1 / K["alpha_b"]), **K)


def run(n: float, kind: str, *, seed: int = 0, batch: int = 64) -> RunHistory:
    """A run of the schedule-aware law: L(N, S_eff, B) exp(-c a), with 0.3% noise."""
    lr = schedule(kind)
    s = np.arange(1, STEPS + 1)
    clean = np.minimum(law_loss(n, lr, s, batch), 10.0)
    noise = np.exp(np.random.default_rng(seed).normal(0.0, 0.003, s.size))
    return RunHistory(name=f"n{n:g}_{kind}", n_params=n, batch_size=batch, tokens_per_sample=128, step=s,
                      loss=clean * noise, lr=lr[s - 1], planned_lr=lr)


def truth(n: float, kind: str) -> np.ndarray:
    return law_loss(n, schedule(kind), np.arange(1, STEPS + 1), 64)


SIZES = (1e6, 3e6, 1e7)


@pytest.fixture(scope="module")
def mixed_law() -> ScalingLaw:
    runs = [run(n, kind, seed=i) for i, (n, kind) in enumerate((n, k) for n in SIZES for k in ("constant", "cosine"))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fit_scaling_law(runs, critical_batch=(K["b_star"], K["alpha_b"]), n_bootstrap=20)


def test_schedule_features_constant_and_single_drop():
    s, a = schedule_features(np.full(50, 2e-3), [10, 50])
    np.testing.assert_allclose(s, [10.0, 50.0], rtol=1e-12)
    assert not a.any()
    lr = np.r_[np.ones(20), np.full(30, 0.5)]  # one drop of half the peak at step 20
    s, a = schedule_features(lr, [50, 80], lam=0.9)
    assert s[0] == pytest.approx(20 + 15) and s[1] == pytest.approx(35 + 15)  # past the end: the last LR
    assert a[0] == pytest.approx(0.5 * (1 - 0.9**30), rel=1e-9)
    decay = np.r_[np.ones(20), np.linspace(1.0, 0.2, 30)]  # past the end: closed form = padding with the last LR
    padded = schedule_features(np.r_[decay, np.full(40, 0.2)], [49, 60, 90], lam=0.9)
    np.testing.assert_allclose(schedule_features(decay, [49, 60, 90], lam=0.9), padded, rtol=1e-12)
    s, a = schedule_features(decay, [1e12], lam=0.9)  # no per-step arrays a trillion steps out
    assert a[0] == pytest.approx(0.8) and s[0] == pytest.approx(0.2 * 1e12, rel=1e-9)
    s, a = schedule_features(None, [3, 7])
    assert s.tolist() == [3.0, 7.0] and not a.any()


def test_schedule_features_and_predict_loss_reject_bad_input(mixed_law):
    with pytest.raises(ValueError, match=r"lam must be in \(0, 1\)"):
        schedule_features(np.ones(10), [5], lam=1.0)
    with pytest.raises(ValueError, match="lr_schedule must be a non-empty sequence"):
        mixed_law.predict_loss(1e7, [10], 64, lr_schedule=[-1.0, 1.0])
    with pytest.raises(ValueError, match="lr_schedule must be a sequence of learning rates"):
        mixed_law.predict_loss(1e7, [10], 64, lr_schedule=object())


def test_mixed_schedules_fit_recovers_the_annealing_term(mixed_law):
    p = mixed_law.params
    assert p["anneal_lambda"] == LAM
    assert p["anneal"] == pytest.approx(ANNEAL, rel=0.15)
    assert p["alpha_s"] == pytest.approx(K["alpha_s"], rel=0.1)
    assert mixed_law.schedule is None  # constant and cosine runs share no schedule: None means constant


@pytest.mark.parametrize("kind", ["cosine", "wsd"])
def test_predicts_a_larger_model_under_an_unseen_decay(mixed_law, kind):
    s = np.arange(1, STEPS + 1)
    pred = mixed_law.predict_loss(3e7, s, 64, lr_schedule=schedule(kind))
    true = truth(3e7, kind)
    late = s >= 0.1 * STEPS
    assert np.max(np.abs(pred[late] / true[late] - 1)) < 0.01
    # The constant-LR prediction misses the end of the decayed curve: the schedule is what carries it.
    const = mixed_law.predict_loss(3e7, s, 64)
    assert abs(const[-1] / true[-1] - 1) > 0.01


def test_a_decayed_run_never_ends_below_the_decayed_floor(mixed_law):
    from lightning_scaling.study.predict import predict_size

    n = 3e7
    floor = mixed_law.min_loss(n)
    decayed = mixed_law.min_loss(n, decayed=True)
    assert decayed == pytest.approx(floor * np.exp(-mixed_law.params["anneal"]))
    ends = [mixed_law.predict_loss(n, [k], 64, lr_schedule=schedule("wsd", k))[0] for k in (10**4, 10**5, 10**6)]
    assert ends[0] > ends[1] > ends[2] > decayed  # decays to 0 after ever longer runs approach the decayed floor
    assert decayed < floor
    out = predict_size(mixed_law, n, 64, STEPS, lr_schedule=schedule("cosine"))
    assert out["min_loss_decayed"] == pytest.approx(decayed) and min(out["loss"]) > out["min_loss_decayed"]
    lo, hi = out["min_loss_decayed_interval"]
    assert lo <= decayed <= hi


def test_runs_sharing_one_decay_are_predicted_under_it_by_default():
    runs = [run(n, "cosine", seed=i) for i, n in enumerate(SIZES)]
    law = fit_scaling_law(runs, critical_batch=(K["b_star"], K["alpha_b"]), n_bootstrap=0)
    assert law.schedule is not None and law.schedule.max() == pytest.approx(1.0)
    s = np.arange(300, STEPS + 1, 300)
    np.testing.assert_allclose(law.predict_loss(3e7, s, 64), law.predict_loss(3e7, s, 64, schedule("cosine")))
    assert law.predict_loss(3e7, [STEPS], 64)[0] / truth(3e7, "cosine")[-1] - 1 == pytest.approx(0, abs=0.01)
    back = ScalingLaw.from_dict(law.to_dict())
    np.testing.assert_array_equal(back.predict_loss(3e7, s, 64), law.predict_loss(3e7, s, 64))


def test_model_error_widens_loss_intervals_with_extrapolation_distance():
    row = [1e10, 0.08, 300.0, 0.7, 5e4, 0.3, 0.0]  # a 7-column row, as saved before the annealing columns
    law = ScalingLaw(dict(zip(ScalingLaw.PARAM_NAMES, row)), bootstrap=[row] * 5,
                     model_error={"sigma": 0.02, "distance": 1.0, "n_max": 1e7})
    assert law.bootstrap.shape == (5, len(ScalingLaw.PARAM_NAMES))
    centre = law.predict_loss(1e7, 1000, 64)
    lo, hi = law.interval("predict_loss", 1e7, 1000, 64, level=0.9)
    # No bootstrap spread: the model error alone, a relative error applied in log loss.
    half = 1.6449 * float(np.hypot(0.02, fitting.MODEL_ERROR_FLOOR))
    assert np.log(hi / centre) == pytest.approx(half, rel=1e-3) and np.log(centre / lo) == pytest.approx(half, rel=1e-3)
    far_lo, far_hi = law.interval("predict_loss", 1e7 * np.e**3, 1000, 64, level=0.9)
    far = law.predict_loss(1e7 * np.e**3, 1000, 64)
    assert np.log(far_hi / far) == pytest.approx(3 * half, rel=1e-3)


def test_loss_intervals_stay_positive_far_out():
    # A large model error extrapolated 20 e-folds in N: added to the loss itself it took the lower end below 0.
    law = ScalingLaw(K, bootstrap=[[K[k] for k in list(K)] + [0.0]] * 5,
                     model_error={"sigma": 0.3, "distance": 1.0, "n_max": 1e7})
    for method, args in (("min_loss", (1e7 * np.e**20,)), ("predict_loss", (1e7 * np.e**20, 1000, 64))):
        centre = float(getattr(law, method)(*args))
        lo, hi = law.interval(method, *args, level=0.9)
        assert 0 < float(lo) < centre < float(hi)
        assert np.log(centre / float(lo)) == pytest.approx(np.log(float(hi) / centre), rel=1e-6)


def test_fit_measures_its_own_held_out_size_error():
    runs = [run(n, "constant", seed=i) for i, n in enumerate((1e6, 2e6, 4e6, 8e6))]
    law = fit_scaling_law(runs, critical_batch=(K["b_star"], K["alpha_b"]), n_bootstrap=0)
    me = law.model_error
    assert law.params["anneal"] == 0.0 and law.schedule is None  # warmup then constant: no annealing term
    assert me["n_sizes"] == 1 and me["n_max"] == 8e6 and me["distance"] == pytest.approx(np.log(2))
    assert 0 <= me["sigma"] < 0.01  # the data follow the law: it predicts its own larger size well
    two = fit_scaling_law(runs[:2], critical_batch=(K["b_star"], K["alpha_b"]), n_bootstrap=0)
    assert two.model_error["sigma"] == 0.0 and two.model_error["n_sizes"] == 0


def bending_sweep() -> list[RunHistory]:
    """A sweep whose B_crit(L) is a power law at low loss and flattens at high loss (a bend above L = 4)."""
    s = np.arange(0, 20001, 5).astype(float)
    out = []
    for b in (8, 32, 128, 512, 2048, 8192):
        loss = np.empty_like(s)
        lev = np.linspace(8.0, 2.4, 4000)
        # S(L) at batch b from the hyperbola S = S_min(L) (1 + B_crit(L)/b), inverted on a grid of levels.
        s_min = 300.0 * (lev - 2.0) ** -1.4
        bcrit = 2e4 / lev ** (1 / 0.25) + 5.0 * np.exp(1.5 * (lev - 4.0))
        steps_at = s_min * (1 + bcrit / b)
        loss = np.interp(s, steps_at, lev, left=8.0, right=2.4)
        out.append(RunHistory(name=f"b{b}", n_params=1e7, batch_size=b, step=s, loss=loss))
    return out


def test_critical_batch_holds_at_the_low_loss_end_and_reports_residuals():
    fit = fit_critical_batch_size(bending_sweep(), warmup_steps=None, n_bootstrap=20)
    t = fit.table
    ok = np.isfinite(t["b_crit"])
    low = np.argsort(np.where(ok, t["loss"], np.inf))[:3]
    assert np.max(np.abs(fit(t["loss"][low]) / t["b_crit"][low] - 1)) < 0.10
    assert np.all(np.abs(t["residual"][low]) < 0.1) and t["fitted"][low].all() and not t["fitted"][ok].all()
    assert fit.min_loss == pytest.approx(t["loss"][ok].min())
    lo, hi = fit.alpha_b_interval
    assert lo <= fit.alpha_b <= hi
    back = CriticalBatchFit.from_dict(fit.to_dict())
    assert back.alpha_b_interval == fit.alpha_b_interval and back.min_loss == fit.min_loss


def test_fit_critical_batch_size_rejects_a_bad_bootstrap_count():
    with pytest.raises(ValueError, match="n_bootstrap must be an integer >= 0"):
        fit_critical_batch_size(bending_sweep(), n_bootstrap=-1)


def test_prediction_below_the_fitted_levels_warns_once():
    law = ScalingLaw(K, bcrit_min_loss=3.0)
    with pytest.warns(FitWarning, match=r"below the lowest level \(3\) at which B_crit\(L\) was measured"):
        law.predict_loss(1e9, [1e5], 64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        law.predict_loss(1e9, [1e5], 64)  # once per law
        ScalingLaw(K, bcrit_min_loss=1.0).predict_loss(1e9, [1e5], 64)  # within the levels: silent


def test_critical_batch_plateaus_below_the_lowest_fitted_level_by_default():
    fit = fit_critical_batch_size(bending_sweep(), warmup_steps=None, n_bootstrap=0)
    low = fit.min_loss
    assert fit.l_plateau == low and fit(0.8 * low) == pytest.approx(fit(low), rel=1e-12)
    assert fit(1.2 * low) == pytest.approx(fit.b_star / (1.2 * low) ** (1 / fit.alpha_b), rel=1e-12)
    assert CriticalBatchFit.from_dict(fit.to_dict()).l_plateau == low
    power = fit_critical_batch_size(bending_sweep(), warmup_steps=None, n_bootstrap=0, plateau=False)
    assert power.l_plateau == 0.0 and power(0.8 * low) > power(low)
    assert (power.b_star, power.alpha_b) == (fit.b_star, fit.alpha_b)  # the plateau only bounds the law below
    assert fit.plateau_auto and not power.plateau_auto  # the default lets fit_scaling_law check the choice
    assert not fit_critical_batch_size(bending_sweep(), warmup_steps=None, n_bootstrap=0, plateau=True).plateau_auto
    with pytest.raises(ValueError, match="plateau must be None, True or False"):
        fit_critical_batch_size(bending_sweep(), plateau="yes")


def test_annealed_prediction_holds_b_crit_at_the_current_loss_on_the_plateau():
    lp = 3.6
    law = ScalingLaw({**K, "anneal": ANNEAL, "anneal_lambda": LAM, "l_plateau": lp})
    lr, s = schedule("cosine"), np.arange(100, STEPS + 1, 100)
    pred = law.predict_loss(3e7, s, 64, lr_schedule=lr)
    assert pred.min() < lp < pred.max()
    # The root solves L = f [L_N + (S_c (1 + B_crit(L)/B) / S_eff)^alpha_S], B_crit at L itself, held below lp.
    s_eff, a = schedule_features(lr, s, lam=LAM)
    bc = laws.critical_batch(pred, b_star=K["b_star"], alpha_b=K["alpha_b"], l_plateau=lp)
    rhs = np.exp(-ANNEAL * a) * (laws.loss_n(3e7, n_c=K["n_c"], alpha_n=K["alpha_n"])
                                 + (K["s_c"] * (1 + bc / 64) / s_eff) ** K["alpha_s"])
    np.testing.assert_allclose(pred, rhs, rtol=1e-9)


def test_law_carries_the_plateau_and_laws_saved_before_it_load_unchanged():
    law = ScalingLaw({**K, "l_plateau": 2.5}, bootstrap=[[*K.values(), 0.0, 0.0, 0.999, 2.5]] * 3)
    assert law.critical_batch_size(2.0) == law.critical_batch_size(2.5) < ScalingLaw(K).critical_batch_size(2.0)
    steps = np.geomspace(100, 1e6, 9)
    np.testing.assert_allclose(law.predict_loss(1e9, steps, 64), laws.loss_n_s_b(1e9, steps, 64, **K, l_plateau=2.5))
    old = law.to_dict()
    del old["params"]["l_plateau"]
    old["bootstrap"] = [row[:9] for row in old["bootstrap"]]  # saved with 9 columns, before the plateau
    back = ScalingLaw.from_dict(old)
    assert back.params["l_plateau"] == 0.0 and back.bootstrap.shape == (3, len(ScalingLaw.PARAM_NAMES))
    np.testing.assert_allclose(back.predict_loss(1e9, steps, 64), laws.loss_n_s_b(1e9, steps, 64, **K))


def test_batch_sweep_ignores_runs_of_its_size_under_another_schedule():
    sweep = [run(4e6, "constant", seed=i, batch=b) for i, b in enumerate((16, 64, 256, 1024, 4096))]
    others = [run(4e6, kind, seed=9, batch=64) for kind in ("cosine", "wsd")]  # same size and batch, decayed LR
    alone = fit_critical_batch_size(sweep, n_bootstrap=0)
    mixed = fit_critical_batch_size(sweep + others, n_bootstrap=0)
    assert (mixed.b_star, mixed.alpha_b, mixed.min_loss) == (alone.b_star, alone.alpha_b, alone.min_loss)
    np.testing.assert_array_equal(mixed.table["b_crit"], alone.table["b_crit"])
    with pytest.raises(ValueError, match="one model size and LR schedule at >= 2 distinct batch sizes"):
        fit_critical_batch_size([sweep[1], *others])


def test_a_token_matched_sweep_is_one_sweep_whatever_each_run_s_length():
    from lightning_scaling.fitting import _sweeps

    def cosine(horizon: int, warmup: int = 100) -> np.ndarray:
        s = np.arange(horizon)
        decay = 0.1 + 0.45 * (1 + np.cos(np.pi * (s - warmup) / (horizon - warmup)))
        return np.where(s < warmup, (s + 1) / warmup, decay)

    batches = (32, 64, 128, 256)
    runs = [RunHistory(name=f"b{b}", n_params=1e6, batch_size=b, step=np.arange(3), loss=np.ones(3)) for b in batches]
    token_matched = [cosine(4000 * 32 // b) for b in batches]  # same shape, 4000 to 500 steps
    assert [g.tolist() for g in _sweeps(runs, token_matched)] == [[0, 1, 2, 3]]
    one_step_off = [cosine(4000), cosine(4000), np.r_[cosine(4000)[1:], 0.1], cosine(4000)]  # lr vs planned_lr
    assert [g.tolist() for g in _sweeps(runs, one_step_off)] == [[0, 1, 2, 3]]
    constant = np.r_[np.linspace(0.01, 1, 100), np.ones(3900)]
    mixed = [constant, constant, cosine(4000), cosine(4000)]  # two schedules: two sweeps of two batch sizes
    assert [g.tolist() for g in _sweeps(runs, mixed)] == [[0, 1], [2, 3]]
