"""Closed-form checks of lightning_scaling.laws (ground truth: algebra and Kaplan et al. 2020's published values)."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest
from scipy.optimize import brentq

from lightning_scaling import laws
from lightning_scaling.laws import KAPLAN_2020

K = KAPLAN_2020.n_s_b_kwargs()  # b_star in tokens, so batches below are in tokens


def test_single_variable_laws_closed_forms():
    assert laws.loss_n(KAPLAN_2020.conv_n_c, n_c=KAPLAN_2020.conv_n_c, alpha_n=0.076) == pytest.approx(1.0)
    assert laws.loss_n(1e9, n_c=1e10, alpha_n=0.5) == pytest.approx(10**0.5)
    assert laws.loss_d(1e12, d_c=1e13, alpha_d=0.1) == pytest.approx(10**0.1)
    np.testing.assert_allclose(laws.loss_steps([1.0, 100.0], l_inf=2.0, s_c=100.0, alpha_s=1.0), [102.0, 3.0])
    assert np.isinf(laws.loss_steps(0, l_inf=2.0, s_c=1.0, alpha_s=1.0))
    # L(N, S_min) is the sum of its parts (+ irreducible term).
    got = laws.loss_n_smin(1e8, 1e4, n_c=1e10, alpha_n=0.1, s_c=1e3, alpha_s=0.5, e=1.0)
    assert got == pytest.approx(1.0 + 100**0.1 + 0.1**0.5)


def test_chinchilla_and_kaplan_nd():
    # Besiroglu et al. 2024 corrected Chinchilla constants, evaluated by hand.
    got = laws.loss_n_d_chinchilla(70e9, 1.4e12, e=1.82, a=482.01, b=2085.43, alpha=0.3478, beta=0.3658)
    assert got == pytest.approx(1.82 + 482.01 / 70e9**0.3478 + 2085.43 / 1.4e12**0.3658)
    k = KAPLAN_2020
    kw = dict(n_c=k.nd_n_c, alpha_n=k.nd_alpha_n, d_c=k.nd_d_c, alpha_d=k.nd_alpha_d)
    # D -> inf gives L(N); N -> inf gives L(D) with D_c^alpha_D.
    assert laws.loss_n_d_kaplan(1e9, np.inf, **kw) == pytest.approx(laws.loss_n(1e9, n_c=k.nd_n_c, alpha_n=0.076))
    assert laws.loss_n_d_kaplan(np.inf, 1e10, **kw) == pytest.approx((k.nd_d_c / 1e10) ** k.nd_alpha_d)


def test_critical_batch_worked_values_from_science_reference():
    # science.md section 1 worked values with B* = 2e8 tokens, alpha_B = 0.21.
    got = laws.critical_batch([4.0, 3.0, 2.5, 2.0], b_star=2e8, alpha_b=0.21)
    np.testing.assert_allclose(got, [2.7e5, 1.07e6, 2.5e6, 7.4e6], rtol=0.03)
    # "B_crit doubles for every ~13% drop in L": 2^(-0.21) = 0.864.
    ratio = laws.critical_batch(3.0 * 2 ** (-0.21), b_star=2e8, alpha_b=0.21) / laws.critical_batch(3.0, b_star=2e8,
                                                                                                      alpha_b=0.21)
    assert ratio == pytest.approx(2.0)


def test_smin_emin_hyperbola_identities():
    b_crit = 1000.0
    batch = np.geomspace(10, 1e5, 9)
    steps = laws.steps_at_batch(500.0, batch, b_crit)
    samples = laws.samples_at_batch(5e5, batch, b_crit)
    # Same target at every batch: S = S_min + E_min / B with E_min = B_crit S_min.
    np.testing.assert_allclose(steps, 500.0 + 5e5 / batch)
    np.testing.assert_allclose(samples, steps * batch)
    # (S/S_min - 1)(E/E_min - 1) = 1 and the conversions invert.
    np.testing.assert_allclose((steps / 500.0 - 1) * (samples / 5e5 - 1), 1.0)
    np.testing.assert_allclose(laws.s_min(steps, batch, b_crit), 500.0)
    np.testing.assert_allclose(laws.e_min(samples, batch, b_crit), 5e5)
    # At B = B_crit: twice the minimal steps and data.
    assert laws.steps_at_batch(500.0, b_crit, b_crit) == pytest.approx(1000.0)
    assert laws.samples_at_batch(5e5, b_crit, b_crit) == pytest.approx(1e6)


def test_implicit_trajectory_root_is_unique_and_bracketed():
    n, batch = 1e8, 2.0**19
    l_n = laws.loss_n(n, n_c=K["n_c"], alpha_n=K["alpha_n"])
    for steps in (10.0, 1e3, 1e5):
        def f(loss, steps=steps):
            bc = laws.critical_batch(loss, b_star=K["b_star"], alpha_b=K["alpha_b"])
            return loss - l_n - (K["s_c"] * (1 + bc / batch) / steps) ** K["alpha_s"]

        grid = np.linspace(l_n + 1e-6, l_n + 50, 20001)
        assert np.all(np.diff(f(grid)) > 0)  # strictly increasing -> at most one root
        lo = l_n + (K["s_c"] / steps) ** K["alpha_s"]
        bc_max = laws.critical_batch(l_n, b_star=K["b_star"], alpha_b=K["alpha_b"])
        hi = l_n + (K["s_c"] * (1 + bc_max / batch) / steps) ** K["alpha_s"]
        assert f(lo) < 0 <= f(hi)
        root = laws.loss_n_s_b(n, steps, batch, **K)
        assert abs(f(root)) < 1e-10
        assert root == pytest.approx(brentq(f, lo, hi, xtol=1e-14), rel=1e-12)


def test_trajectory_inverse_broadcasting_and_limits():
    n = np.array([[1e7], [1e9]])
    steps = np.geomspace(10, 1e6, 7)
    batch = 2.0**16
    loss = laws.loss_n_s_b(n, steps, batch, **K, e=0.3)
    assert loss.shape == (2, 7)
    assert np.all(np.diff(loss, axis=1) < 0)  # more steps -> lower loss
    assert np.all(loss[1] < loss[0])  # bigger model -> lower loss
    back, samples = laws.steps_for_loss(loss, n, batch, **K, e=0.3)
    np.testing.assert_allclose(back, np.broadcast_to(steps, back.shape), rtol=1e-9)
    np.testing.assert_allclose(samples, back * batch)
    assert np.isinf(laws.loss_n_s_b(1e8, 0, batch, **K))
    # Below the converged loss no number of steps suffices.
    l_min = 0.3 + laws.loss_n(1e8, n_c=K["n_c"], alpha_n=K["alpha_n"])
    assert np.isinf(laws.min_steps_for_loss(l_min - 0.01, 1e8, n_c=K["n_c"], alpha_n=K["alpha_n"], s_c=K["s_c"],
                                            alpha_s=K["alpha_s"], e=0.3))
    # Infinite batch: S_min itself; E_min = B_crit S_min.
    s_inf, _ = laws.steps_for_loss(3.0, 1e8, 1e30, **K)
    smin = laws.min_steps_for_loss(3.0, 1e8, n_c=K["n_c"], alpha_n=K["alpha_n"], s_c=K["s_c"], alpha_s=K["alpha_s"])
    assert s_inf == pytest.approx(smin)
    assert laws.min_samples_for_loss(3.0, 1e8, **K) == pytest.approx(
        smin * laws.critical_batch(3.0, b_star=K["b_star"], alpha_b=K["alpha_b"]))


def test_critical_batch_plateau_holds_below_and_keeps_the_inverse():
    lp = 2.6
    bc = laws.critical_batch([2.0, 2.6, 3.5], **{k: K[k] for k in ("b_star", "alpha_b")}, l_plateau=lp)
    pure = laws.critical_batch([2.0, 2.6, 3.5], b_star=K["b_star"], alpha_b=K["alpha_b"])
    assert bc[0] == bc[1] == pure[1] and bc[2] == pure[2] and pure[0] > bc[0]
    n, steps, batch = 1e9, np.geomspace(100, 1e7, 25), 2.0**18
    loss = laws.loss_n_s_b(n, steps, batch, **K, l_plateau=lp)
    assert loss.min() < lp < loss.max()  # the trajectory crosses onto the plateau
    above, below = loss > lp, loss < lp
    np.testing.assert_allclose(loss[above], laws.loss_n_s_b(n, steps, batch, **K)[above], rtol=1e-12)
    # On the plateau the law is the constant-B_crit law at B_crit(l_plateau).
    const = {**K, "b_star": float(pure[1]), "alpha_b": np.inf}
    np.testing.assert_allclose(loss[below], laws.loss_n_s_b(n, steps, batch, **const)[below], rtol=1e-12)
    back, _ = laws.steps_for_loss(loss, n, batch, **K, l_plateau=lp)
    np.testing.assert_allclose(back, steps, rtol=1e-9)
    assert laws.min_samples_for_loss(2.0, n, **K, l_plateau=lp) == pytest.approx(
        float(pure[1]) * laws.min_steps_for_loss(2.0, n, **{k: K[k] for k in ("n_c", "alpha_n", "s_c", "alpha_s")}))


def test_compute_optimal_closed_form_matches_numeric_and_kaplan():
    c = np.geomspace(1e18, 1e24, 5)
    ref = laws.compute_optimal_kaplan_closed_form(c, **K)
    num = laws.compute_optimal_allocation(c, **K)
    for key in ("n", "s_min", "loss", "b_crit", "e_min"):
        np.testing.assert_allclose(num[key], ref[key], rtol=1e-8)
    # alpha_C^min = 1/(1/a_S + 1/a_B + 1/a_N) = 0.052 with the Table 3 exponents; N grows as C^(a_C/a_N).
    assert float(ref["alpha_c"]) == pytest.approx(0.052, abs=5e-4)
    slope = np.polyfit(np.log(c), np.log(ref["n"]), 1)[0]
    assert slope == pytest.approx(float(ref["alpha_c"]) / K["alpha_n"], rel=1e-9)
    # At the optimum the loss is (1 + a_N/a_S) times the converged loss, and C_min = 6 N E_min holds.
    l_n = laws.loss_n(ref["n"], n_c=K["n_c"], alpha_n=K["alpha_n"])
    np.testing.assert_allclose(ref["loss"], (1 + K["alpha_n"] / K["alpha_s"]) * l_n, rtol=1e-9)
    np.testing.assert_allclose(6 * ref["n"] * ref["e_min"], c, rtol=1e-9)


def test_compute_optimal_with_irreducible_loss_is_the_brute_force_optimum():
    kw = dict(n_c=1e10, alpha_n=0.1, s_c=300.0, alpha_s=0.7, b_star=5e4, alpha_b=0.3, e=1.2)
    c_min = 1e19
    out = laws.compute_optimal_allocation(c_min, tokens_per_sample=256, **kw)
    # Brute force: for each N, the loss whose C_min = 6 N B_crit(L) S_min(N, L) * T equals the budget.
    best = np.inf
    for n in np.geomspace(out["n"] / 30, out["n"] * 30, 241):
        def g(loss, n=n):
            smin = laws.min_steps_for_loss(loss, n, **{k: kw[k] for k in ("n_c", "alpha_n", "s_c", "alpha_s", "e")})
            bc = laws.critical_batch(loss, b_star=kw["b_star"], alpha_b=kw["alpha_b"])
            return np.log(6 * n * bc * smin * 256) - np.log(c_min)

        l_floor = kw["e"] + laws.loss_n(n, n_c=kw["n_c"], alpha_n=kw["alpha_n"])
        best = min(best, brentq(g, l_floor + 1e-9, 50.0, xtol=1e-13))
    assert float(out["loss"]) == pytest.approx(best, rel=1e-4)
    assert float(out["loss"]) <= best + 1e-9


def test_compute_flops_and_preset():
    assert laws.compute_flops(1e9, 512, 1000, tokens_per_sample=1024) == pytest.approx(6 * 1e9 * 512 * 1024 * 1000)
    d = KAPLAN_2020.to_dict()
    assert d["b_star"] == 2.1e8 and d["units"]["b_star"] == "tokens"
    assert (d["alpha_n"], d["alpha_s"], d["n_c"], d["s_c"], d["alpha_b"]) == (0.077, 0.76, 6.5e13, 2.1e3, 0.21)
    with pytest.raises(dataclasses.FrozenInstanceError, match="cannot assign to field 'alpha_n'"):
        KAPLAN_2020.alpha_n = 0.1  # frozen


@pytest.mark.timing
def test_prediction_of_1e5_points_under_one_second():
    rng = np.random.default_rng(0)
    n = rng.uniform(1e6, 1e9, 100_000)
    steps = rng.uniform(1, 1e5, 100_000)
    laws.loss_n_s_b(n[:10], steps[:10], 256.0, **K)
    best = np.inf
    for _ in range(3):
        t0 = time.perf_counter()
        out = laws.loss_n_s_b(n, steps, 2.0**18, **K)
        best = min(best, time.perf_counter() - t0)
    assert np.all(np.isfinite(out))
    assert best < 1.0


@pytest.mark.parametrize("alpha_s,alpha_b,batch,e", [(0.7, 0.3, 256.0, 0.0), (2.5, 0.05, 16.0, 0.0),
                                                     (0.05, 3.0, 1e-3, 0.0), (0.7, 0.3, 1.0, 1.0),
                                                     (0.7, np.inf, 64.0, 0.5)])
def test_trajectory_solver_converges_for_extreme_exponents(alpha_s, alpha_b, batch, e):
    kw = dict(n_c=1e10, alpha_n=0.08, s_c=300.0, alpha_s=alpha_s, b_star=5e4, alpha_b=alpha_b, e=e)
    rng = np.random.default_rng(1)
    n, steps = rng.uniform(1e6, 1e9, 20_000), rng.uniform(1, 1e5, 20_000)
    loss = laws.loss_n_s_b(n, steps, batch, **kw)
    l_floor = e + laws.loss_n(n, n_c=1e10, alpha_n=0.08)
    bc = laws.critical_batch(loss, b_star=5e4, alpha_b=alpha_b)
    resid = loss - l_floor - (300.0 * (1 + bc / batch) / steps) ** alpha_s
    assert np.max(np.abs(resid / loss)) < 1e-12
    for i in range(0, 20_000, 4000):  # and it is the root brentq finds
        def f(x, i=i):
            return x - l_floor[i] - (300.0 * (1 + laws.critical_batch(x, b_star=5e4, alpha_b=alpha_b) / batch)
                                     / steps[i]) ** alpha_s
        assert loss[i] == pytest.approx(brentq(f, l_floor[i] * (1 + 1e-14), 1e4, xtol=1e-14), rel=1e-10)
