"""Loss-trajectory forecasts for one training run: schedule-aware laws, robust fits and calibrated bands.

Lightning-free (numpy/scipy only). Three curve forms are available:

* ``"mpl"``: the Multi-Power Law of Luo et al. 2025 (arXiv 2503.12811),
  ``L(s) = L0 + A·S1^(-alpha) - B·Σ_k (η_{k-1} - η_k)·G(η_k^(-gamma)·S_k(s))``, ``G(x) = 1 - (C·x + 1)^(-beta)``;
* ``"momentum"``: the momentum law of Tissue et al. 2024 (arXiv 2408.11029), ``L = L0 + A·S1^(-alpha) - C·S2``;
* ``"power"``: the schedule-blind L(S) form ``L_inf + (S_c/S)^alpha_S`` of Kaplan et al. 2020 / Su et al. 2024,
  imported from :func:`lightning_scaling.laws.loss_steps` (optionally through ``S_min`` when a critical batch
  size is known).

Step convention (the one of :class:`~lightning_scaling.RunHistory`): ``lr[i]`` is the learning rate used by
optimizer step ``i`` and the loss "at step ``s``" is measured after ``s`` updates, so it depends on ``lr[:s]``.
``S1(s) = Σ_{i<s} lr[i]``. (The MPL paper's logs record the loss after update ``t`` under step ``t``; that is
our step ``t + 1``.)

Example::

    >>> import numpy as np
    >>> lr = np.full(1000, 1e-3)
    >>> lr[800:] = 1e-4                       # a step decay at step 800
    >>> loss = multi_power_law(lr, [500, 1000], L0=2.0, A=0.5, alpha=0.5, B=300.0, C=2.0, beta=0.6, gamma=0.6)
    >>> bool(loss[1] < loss[0])
    True
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
from numpy.typing import ArrayLike
from scipy import optimize, signal, stats

from lightning_scaling import laws

__all__ = [
    "Forecast",
    "ScheduleLawFit",
    "fit_schedule_law",
    "forecast_run",
    "momentum_law",
    "momentum_sums",
    "multi_power_law",
    "warmup_steps",
]

FORMS = ("mpl", "momentum", "power")
_EPS_LR = 1e-300
# Backtest cuts (fractions of the observed fit window) for the band's model-error calibration in forecast_run.
_BACKTEST_CUTS = (0.35, 0.5, 0.65, 0.8)
# Candidate strengths of the annealing-parameter prior for fit_schedule_law(prior="auto") (log-loss noise scales).
_PRIOR_LADDER = (None, 0.003, 0.01, 0.03)


# ----------------------------------------------------------------------------------------------------------------
# Schedules
# ----------------------------------------------------------------------------------------------------------------
def _as_lr(lr: ArrayLike) -> np.ndarray:
    arr = np.asarray(lr, dtype=np.float64).ravel()
    if arr.size == 0:
        raise ValueError("the learning-rate schedule is empty")
    if not np.all(np.isfinite(arr)) or np.any(arr < 0):
        raise ValueError("the learning-rate schedule must be finite and non-negative")
    return arr


def _as_steps(steps: ArrayLike, n_lr: int) -> np.ndarray:
    s = np.asarray(steps, dtype=np.float64).ravel()
    if s.size and (np.any(s != np.round(s)) or s.min() < 1):
        raise ValueError("steps must be integers >= 1 (the loss at step s follows s optimizer updates)")
    if s.size and s.max() > n_lr:
        raise ValueError(f"step {int(s.max())} needs lr[:{int(s.max())}] but the schedule has {n_lr} entries")
    return s.astype(np.int64)


def warmup_steps(lr: ArrayLike, *, rtol: float = 1e-3) -> int:
    """Length of the initial warmup: the first index where the schedule reaches its peak (within ``rtol``).

    Example::

        >>> warmup_steps(np.r_[np.linspace(0, 1, 10, endpoint=False), np.ones(5)])
        10
    """
    arr = _as_lr(lr)
    peak = arr.max()
    if peak <= 0:
        return 0
    return int(np.argmax(arr >= peak * (1 - rtol)))


# ----------------------------------------------------------------------------------------------------------------
# Multi-Power Law (Luo et al. 2025)
# ----------------------------------------------------------------------------------------------------------------
def _mpl_blocks(lr: np.ndarray, steps: np.ndarray, *, exact_recent: int = 48, ratio: float = 1.06) -> dict:
    """Pre-aggregate the MPL loss-drop sum into per-point blocks (graded in distance to the point).

    ``LD(s) = Σ_{j=1}^{s-1} g_j·G(η_j^(-γ)·(P_s - P_j))`` with ``g_j = lr[j-1] - lr[j]`` and ``P`` the prefix sums.
    The ``exact_recent`` terms nearest to ``s`` are kept one by one; further away the terms are merged into
    blocks whose width grows geometrically with the distance (``ratio``), each represented by its gap-weighted
    mean of ``P_j`` and ``log η_j`` (separately for LR decreases and increases, so the weights keep one sign).
    G varies slowly far from ``s``, so the error is second order in the relative block width (< 2e-5 relative
    on the published fixtures) while the cost per point drops from O(s) to O(log s). Everything that depends
    on the parameters is left out, so a fit reuses these arrays.
    """
    n = lr.size
    cs = np.concatenate([[0.0], np.cumsum(lr)])  # cs[k] = Σ_{i<k} lr[i]
    gap = np.zeros(n)
    gap[1:] = lr[:-1] - lr[1:]
    loglr = np.log(np.maximum(lr, _EPS_LR))
    # distance boundaries d_0 = 1 < d_1 < ...: block k holds j in (s - d_{k+1}, s - d_k]
    smax = int(steps.max()) if steps.size else 1
    d = list(range(1, exact_recent + 2))
    while d[-1] < smax:
        d.append(max(d[-1] + 1, int(math.ceil(d[-1] * ratio))))
    dist = np.asarray(d, dtype=np.int64)
    s = steps[:, None]
    hi = s - dist[None, :-1]                       # inclusive upper j
    lo = np.maximum(s - dist[None, 1:] + 1, 1)     # inclusive lower j
    valid = hi >= lo
    hi_c = np.clip(hi, 0, n - 1)
    lo_c = np.clip(lo, 0, n - 1)
    out: dict[str, Any] = {"S1": cs[steps], "n": steps.size}
    chans = []
    for sign in (1.0, -1.0):
        g = np.where(sign * gap > 0, gap, 0.0)
        if not np.any(g):
            continue
        cg = np.concatenate([[0.0], np.cumsum(g)])
        cgp = np.concatenate([[0.0], np.cumsum(g * cs[:-1])])
        cgl = np.concatenate([[0.0], np.cumsum(g * loglr)])
        D = np.where(valid, cg[hi_c + 1] - cg[lo_c], 0.0)
        with np.errstate(invalid="ignore", divide="ignore"):
            pm = np.where(D != 0, (cgp[hi_c + 1] - cgp[lo_c]) / D, 0.0)
            lm = np.where(D != 0, (cgl[hi_c + 1] - cgl[lo_c]) / D, 0.0)
        keep = np.any(D != 0, axis=0)
        D, pm, lm = D[:, keep], pm[:, keep], lm[:, keep]
        dP = np.where(D != 0, cs[steps][:, None] - pm, 0.0)
        chans.append((D, np.maximum(dP, 0.0), lm))
    if chans:
        out["D"] = np.concatenate([c[0] for c in chans], axis=1)
        out["dP"] = np.concatenate([c[1] for c in chans], axis=1)
        out["lm"] = np.concatenate([c[2] for c in chans], axis=1)
    else:
        out["D"] = out["dP"] = out["lm"] = np.zeros((steps.size, 0))
    return out


def _mpl_exact_ld(lr: np.ndarray, steps: np.ndarray, C: float, beta: float, gamma: float) -> np.ndarray:
    cs = np.concatenate([[0.0], np.cumsum(lr)])
    res = np.zeros(steps.size)
    for i, s in enumerate(steps):
        j = np.arange(1, s)
        g = lr[j - 1] - lr[j]
        x = np.maximum(lr[j], _EPS_LR) ** (-gamma) * (cs[s] - cs[j])
        res[i] = np.sum(g * (1.0 - (C * x + 1.0) ** (-beta)))
    return res


def multi_power_law(lr: ArrayLike, steps: ArrayLike, *, L0: float, A: float, alpha: float, B: float, C: float,
                    beta: float, gamma: float, exact: bool = False) -> np.ndarray:
    """Multi-Power Law loss (Luo et al. 2025) after ``steps`` updates under the per-step schedule ``lr``.

    ``L(s) = L0 + A·S1(s)^(-alpha) - B·Σ_{j=1}^{s-1} (lr[j-1] - lr[j])·(1 - (C·lr[j]^(-gamma)·S_j(s) + 1)^(-beta))``
    with ``S1(s) = Σ_{i<s} lr[i]`` (warmup included) and ``S_j(s) = Σ_{j<=i<s} lr[i]``. LR increases (warmup)
    enter the sum with their sign, as in the authors' code.

    Args:
        lr: Per-step learning rate, ``lr[i]`` used by optimizer step ``i``; must cover ``max(steps)`` steps.
        steps: Steps (number of updates applied, >= 1) at which to evaluate the loss.
        L0, A, alpha, B, C, beta, gamma: The law's seven parameters.
        exact: Evaluate the O(s) sum term by term instead of the graded-block approximation (slow; for tests).

    Returns:
        float64 array of predicted losses, one per step.

    Example::

        >>> lr = np.r_[np.linspace(0, 3e-4, 100, endpoint=False), np.full(900, 3e-4)]
        >>> p = dict(L0=3.0, A=0.5, alpha=0.5, B=400.0, C=2.0, beta=0.6, gamma=0.6)
        >>> # the graded-block evaluation agrees with the O(s) term-by-term sum
        >>> fast, exact = multi_power_law(lr, [1000], **p), multi_power_law(lr, [1000], exact=True, **p)
        >>> bool(np.allclose(fast, exact, rtol=1e-4))
        True
    """
    lr_a = _as_lr(lr)
    st = _as_steps(steps, lr_a.size)
    if exact:
        cs = np.concatenate([[0.0], np.cumsum(lr_a)])
        return L0 + A * cs[st] ** (-alpha) - B * _mpl_exact_ld(lr_a, st, C, beta, gamma)
    des = _mpl_blocks(lr_a, st)
    z = _MPL.to_z(dict(L0=L0, A=A, alpha=alpha, B=B, C=C, beta=beta, gamma=gamma))
    return _MPL.predict(z, des)[0]


# ----------------------------------------------------------------------------------------------------------------
# Momentum law (Tissue et al. 2024)
# ----------------------------------------------------------------------------------------------------------------
def momentum_sums(lr: ArrayLike, steps: ArrayLike, *, lam: float = 0.999,
                  warmup: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The momentum law's ``S1`` (forward area) and ``S2`` (annealing momentum) after ``steps`` updates.

    ``m_i = lam·m_{i-1} + (η_{i-1} - η_i)``, ``m_0 = 0``, ``S2(s) = Σ_{i<s} m_i`` and ``S1(s) = Σ_{i<s} η_i``,
    where the warmup steps (``warmup``, default :func:`warmup_steps`) count as if run at the peak LR.

    Example::

        >>> lr = np.r_[np.full(10, 1.0), np.full(10, 0.5)]     # one drop of 0.5 at step 10
        >>> s1, s2 = momentum_sums(lr, [20], lam=0.9)
        >>> bool(np.isclose(s2[0], 0.5 * (1 - 0.9**10) / (1 - 0.9)))
        True
    """
    eta = _as_lr(lr).copy()
    st = _as_steps(steps, eta.size)
    w = warmup_steps(eta) if warmup is None else int(warmup)
    if w > 0:
        eta[:w] = eta.max() if w >= eta.size else max(eta[w], eta[:w].max())
    gap = np.zeros_like(eta)
    gap[1:] = eta[:-1] - eta[1:]
    m = signal.lfilter([1.0], [1.0, -lam], gap)
    c1 = np.concatenate([[0.0], np.cumsum(eta)])
    c2 = np.concatenate([[0.0], np.cumsum(m)])
    return c1[st], c2[st]


def momentum_law(lr: ArrayLike, steps: ArrayLike, *, L0: float, A: float, alpha: float, C: float,
                 lam: float = 0.999, warmup: int | None = None) -> np.ndarray:
    """Momentum-law loss (Tissue et al. 2024) ``L = L0 + A·S1^(-alpha) - C·S2``; see :func:`momentum_sums`.

    Example::

        >>> lr = np.full(1000, 1e-3)
        >>> round(float(momentum_law(lr, [1000], L0=2.0, A=1.0, alpha=1.0, C=0.3)[0]), 9)
        3.0
    """
    s1, s2 = momentum_sums(lr, steps, lam=lam, warmup=warmup)
    return L0 + A * s1 ** (-alpha) - C * s2


# ----------------------------------------------------------------------------------------------------------------
# Forms: parameter transforms, designs, predictions with Jacobians (in the transformed space z)
# ----------------------------------------------------------------------------------------------------------------
class _Form:
    name: str
    names: tuple[str, ...]
    log_params: tuple[str, ...] = ()
    bounds_z: dict[str, tuple[float, float]] = {}

    @classmethod
    def to_z(cls, p: Mapping[str, float]) -> np.ndarray:
        return np.array([math.log(max(p[k], 1e-300)) if k in cls.log_params else float(p[k]) for k in cls.names])

    @classmethod
    def from_z(cls, z: np.ndarray) -> dict[str, float]:
        return {k: float(math.exp(v)) if k in cls.log_params else float(v) for k, v in zip(cls.names, z)}

    @classmethod
    def zbounds(cls) -> list[tuple[float | None, float | None]]:
        return [cls.bounds_z.get(k, (None, None)) for k in cls.names]


class _MPL(_Form):
    name = "mpl"
    names = ("L0", "A", "alpha", "B", "C", "beta", "gamma")
    log_params = ("A", "B", "C")
    bounds_z = {"L0": (0.0, None), "A": (-12.0, 8.0), "alpha": (0.01, 2.0), "B": (-10.0, 14.0),
                "C": (-12.0, 10.0), "beta": (0.01, 3.0), "gamma": (0.0, 1.5)}

    @staticmethod
    def design(lr: np.ndarray, steps: np.ndarray) -> dict:
        return _mpl_blocks(lr, steps)

    @staticmethod
    def predict(z: np.ndarray, des: dict, jac: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        L0, lA, alpha, lB, lC, beta, gamma = z
        A, B, C = math.exp(lA), math.exp(lB), math.exp(lC)
        S1 = des["S1"]
        lS1 = np.log(S1)
        t1 = A * np.exp(-alpha * lS1)
        D, dP, lm = des["D"], des["dP"], des["lm"]
        e = np.exp(-gamma * lm)
        cw = C * e * dP
        u = 1.0 + cw
        lu = np.log1p(cw)
        um = np.exp(-beta * lu)
        G = 1.0 - um
        LD = np.sum(D * G, axis=1)
        pred = L0 + t1 - B * LD
        if not jac:
            return pred, None
        J = np.empty((pred.size, 7))
        J[:, 0] = 1.0
        J[:, 1] = t1
        J[:, 2] = -t1 * lS1
        J[:, 3] = -B * LD
        dGc = beta * um / u * cw            # dG/dlogC
        J[:, 4] = -B * np.sum(D * dGc, axis=1)
        J[:, 5] = -B * np.sum(D * um * lu, axis=1)
        J[:, 6] = -B * np.sum(D * dGc * (-lm), axis=1)
        return pred, J

    @staticmethod
    def linear_basis(des: dict, alpha: float, C: float, beta: float, gamma: float) -> np.ndarray:
        # for fixed (alpha, C, beta, gamma) the law is linear in (L0, A, B)
        G = 1.0 - (1.0 + C * np.exp(-gamma * des["lm"]) * des["dP"]) ** (-beta)
        return np.stack([np.ones(des["n"]), des["S1"] ** (-alpha), -np.sum(des["D"] * G, axis=1)], axis=1)


class _Momentum(_Form):
    name = "momentum"
    names = ("L0", "A", "alpha", "C")
    log_params = ("A",)
    bounds_z = {"L0": (0.0, None), "A": (-12.0, 8.0), "alpha": (0.01, 2.0), "C": (0.0, None)}

    @staticmethod
    def design(lr: np.ndarray, steps: np.ndarray, lam: float = 0.999) -> dict:
        s1, s2 = momentum_sums(lr, steps, lam=lam)
        return {"S1": s1, "S2": s2, "n": steps.size}

    @staticmethod
    def predict(z: np.ndarray, des: dict, jac: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        L0, lA, alpha, C = z
        lS1 = np.log(des["S1"])
        t1 = math.exp(lA) * np.exp(-alpha * lS1)
        pred = L0 + t1 - C * des["S2"]
        if not jac:
            return pred, None
        J = np.stack([np.ones_like(pred), t1, -t1 * lS1, -des["S2"]], axis=1)
        return pred, J

    @staticmethod
    def linear_basis(des: dict, alpha: float) -> np.ndarray:
        return np.stack([np.ones(des["n"]), des["S1"] ** (-alpha), -des["S2"]], axis=1)


class _Power(_Form):
    """``L_inf + (S_c/S)^alpha_S`` on (effective) steps; values through :func:`laws.loss_steps`."""

    name = "power"
    names = ("l_inf", "s_c", "alpha_s")
    log_params = ("s_c",)
    bounds_z = {"l_inf": (0.0, None), "s_c": (-30.0, 60.0), "alpha_s": (0.01, 3.0)}

    @staticmethod
    def design(s_eff: np.ndarray) -> dict:
        return {"S": np.asarray(s_eff, dtype=np.float64), "n": len(s_eff)}

    @staticmethod
    def predict(z: np.ndarray, des: dict, jac: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        l_inf, lsc, a = z
        pred = laws.loss_steps(des["S"], l_inf=l_inf, s_c=math.exp(lsc), alpha_s=a)
        if not jac:
            return pred, None
        t = pred - l_inf
        J = np.stack([np.ones_like(pred), a * t, t * (lsc - np.log(des["S"]))], axis=1)
        return pred, J


_FORM_CLS: dict[str, type[_Form]] = {"mpl": _MPL, "momentum": _Momentum, "power": _Power}


# ----------------------------------------------------------------------------------------------------------------
# Robust objective and optimiser
# ----------------------------------------------------------------------------------------------------------------
def _huber(r: np.ndarray, delta: float) -> tuple[np.ndarray, np.ndarray]:
    a = np.abs(r)
    quad = a <= delta
    rho = np.where(quad, 0.5 * r * r, delta * (a - 0.5 * delta))
    psi = np.where(quad, r, delta * np.sign(r))
    return rho, psi


@dataclass(frozen=True)
class ScheduleLawFit:
    """A schedule-aware law fitted by :func:`fit_schedule_law`.

    Attributes:
        form: ``"mpl"``, ``"momentum"`` or ``"power"``.
        params: The fitted parameters (names as in :func:`multi_power_law` / :func:`momentum_law` /
            :func:`lightning_scaling.laws.loss_steps`).
        objective: Final value of the summed Huber objective.
        n_points: Number of fitted points over all curves.
        lam: Momentum decay used by the momentum law.
        prior_scale: Strength of the annealing-parameter prior used (``None``: no prior).

    Example::

        >>> lr = np.full(2000, 1e-3); lr[1500:] = 3e-4
        >>> steps = np.arange(100, 2001, 50)
        >>> truth = dict(L0=2.0, A=0.4, alpha=0.5, C=0.3)
        >>> fit = fit_schedule_law([(steps, momentum_law(lr, steps, **truth), lr)], form="momentum")
        >>> bool(abs(fit.params["L0"] - 2.0) < 1e-2)
        True
    """

    form: str
    params: dict[str, float]
    objective: float
    n_points: int
    lam: float = 0.999
    prior_scale: float | None = None

    def predict(self, lr: ArrayLike, steps: ArrayLike) -> np.ndarray:
        """The fitted law's loss after ``steps`` updates under schedule ``lr``."""
        if self.form == "mpl":
            return multi_power_law(lr, steps, **self.params)
        if self.form == "momentum":
            return momentum_law(lr, steps, lam=self.lam, **self.params)
        return laws.loss_steps(np.asarray(steps, dtype=np.float64), **self.params)


def _design_for(form: str, lr: np.ndarray | None, steps: np.ndarray, lam: float) -> dict:
    if form == "mpl":
        return _MPL.design(lr, steps)
    if form == "momentum":
        return _Momentum.design(lr, steps, lam)
    return _Power.design(steps.astype(np.float64))


def _grid_inits(form: str, designs: Sequence[dict], ys: Sequence[np.ndarray], ws: Sequence[np.ndarray],
                fixed: Mapping[str, float], n_best: int = 3) -> list[np.ndarray]:
    """Starting points: for a grid of the nonlinear parameters solve the linear ones by weighted least squares."""
    cls = _FORM_CLS[form]
    y = np.concatenate(ys)
    w = np.sqrt(np.concatenate(ws))
    cands = []

    def solve(basis: np.ndarray) -> tuple[float, np.ndarray] | None:
        try:
            coef, *_ = np.linalg.lstsq(basis * w[:, None], y * w, rcond=None)
        except np.linalg.LinAlgError:
            return None
        resid = float(np.sum((w * (basis @ coef - y)) ** 2))
        return resid, coef

    if form == "mpl":
        for alpha in ([fixed["alpha"]] if "alpha" in fixed else (0.3, 0.5, 0.8)):
            for C in ([fixed["C"]] if "C" in fixed else (0.5, 2.0, 8.0)):
                for beta in ([fixed["beta"]] if "beta" in fixed else (0.4, 0.6, 0.9)):
                    for gamma in ([fixed["gamma"]] if "gamma" in fixed else (0.4, 0.6)):
                        basis = np.concatenate([_MPL.linear_basis(d, alpha, C, beta, gamma) for d in designs])
                        sol = solve(basis)
                        if sol is None:
                            continue
                        L0, A, B = sol[1]
                        A, B = max(A, 1e-6), max(B, 1e-3)
                        cands.append((sol[0], dict(L0=max(L0, 1e-3), A=A, alpha=alpha, B=B, C=C, beta=beta,
                                                   gamma=gamma)))
    elif form == "momentum":
        for alpha in ([fixed["alpha"]] if "alpha" in fixed else (0.2, 0.35, 0.5, 0.7, 1.0)):
            basis = np.concatenate([_Momentum.linear_basis(d, alpha) for d in designs])
            sol = solve(basis)
            if sol is None:
                continue
            L0, A, C = sol[1]
            cands.append((sol[0], dict(L0=max(L0, 1e-3), A=max(A, 1e-6), alpha=alpha, C=max(C, 0.0))))
    else:
        for a in ([fixed["alpha_s"]] if "alpha_s" in fixed else (0.1, 0.2, 0.35, 0.5, 0.75, 1.0, 1.5)):
            basis = np.concatenate([np.stack([np.ones(d["n"]), d["S"] ** (-a)], axis=1) for d in designs])
            sol = solve(basis)
            if sol is None:
                continue
            l_inf, k = sol[1]
            k = max(k, 1e-12)
            cands.append((sol[0], dict(l_inf=max(l_inf, 1e-3), s_c=k ** (1.0 / a), alpha_s=a)))
    cands.sort(key=lambda c: c[0])
    out = []
    for _, p in cands[:n_best]:
        p = {**p, **{k: v for k, v in fixed.items() if k in p}}
        out.append(cls.to_z(p))
    return out


def _fit_z(form: str, designs: Sequence[dict], ys: Sequence[np.ndarray], ws: Sequence[np.ndarray], *,
           delta: float, inits: Sequence[np.ndarray], fixed: Mapping[str, float], prior: tuple | None = None,
           max_nfev: int = 300) -> tuple[np.ndarray, float]:
    """Robust nonlinear least squares (scipy ``least_squares``, trust-region reflective, analytic Jacobian).

    Minimises ``Σ Huber_delta(sqrt(w)·(log L̂ - log L))`` plus the Gaussian prior ``½ Σ prec·(z - mu)²`` (prior rows
    are exempt from the Huber loss) from each start and returns the best ``(z, objective)``.
    """
    cls = _FORM_CLS[form]
    free = np.array([k not in fixed for k in cls.names])
    zb = cls.zbounds()
    lb = np.array([-np.inf if b[0] is None else b[0] for b in zb])
    ub = np.array([np.inf if b[1] is None else b[1] for b in zb])
    ly = np.concatenate([np.log(y) for y in ys])
    sw = np.sqrt(np.concatenate(ws))
    n_data = ly.size
    if prior is not None:
        pmask = free & (prior[1] > 0)
        p_mu, p_sq = prior[0][pmask], np.sqrt(prior[1][pmask])
    cache: dict[str, Any] = {}

    def evaluate(zf: np.ndarray, z_full: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        key = zf.tobytes()
        if cache.get("key") != key:
            z = z_full.copy()
            z[free] = zf
            preds, jacs = zip(*(cls.predict(z, d, jac=True) for d in designs))
            p = np.concatenate(preds)
            J = np.concatenate(jacs)
            ok = np.isfinite(p) & (p > 0)
            pc = np.where(ok, p, 1e-12)
            r = sw * (np.log(pc) - ly)
            r = np.where(ok, r, 1e3)
            Jr = np.where(ok[:, None], (sw / pc)[:, None] * J, 0.0)[:, free]
            if prior is not None and p_mu.size:
                zp = z[pmask]
                r = np.concatenate([r, p_sq * (zp - p_mu)])
                Jp = np.zeros((p_mu.size, int(free.sum())))
                cols = np.nonzero(pmask[free])[0]
                Jp[np.arange(p_mu.size), cols] = p_sq
                Jr = np.concatenate([Jr, Jp])
            cache.update(key=key, r=r, J=Jr)
        return cache["r"], cache["J"]

    def loss_fn(zz: np.ndarray) -> np.ndarray:  # Huber on data rows, quadratic on prior rows
        rho = np.empty((3, zz.size))
        d = zz[:n_data]
        big = d > 1.0
        sq = np.sqrt(np.where(big, d, 1.0))
        rho[0, :n_data] = np.where(big, 2.0 * sq - 1.0, d)
        rho[1, :n_data] = np.where(big, 1.0 / sq, 1.0)
        rho[2, :n_data] = np.where(big, -0.5 / (sq * np.where(big, d, 1.0)), 0.0)
        rho[0, n_data:], rho[1, n_data:], rho[2, n_data:] = zz[n_data:], 1.0, 0.0
        return rho

    best: tuple[np.ndarray | None, float] = (None, np.inf)
    for z0 in inits:
        z0 = np.asarray(z0, dtype=np.float64).copy()
        for i, k in enumerate(cls.names):
            if k in fixed:
                z0[i] = cls.to_z({**cls.from_z(z0), k: fixed[k]})[i]
        pad = 1e-9 * (1.0 + np.abs(np.where(np.isfinite(lb), lb, 0.0)) + np.abs(np.where(np.isfinite(ub), ub, 0.0)))
        z0 = np.clip(z0, lb + pad, ub - pad)
        if not np.any(free):
            r, _ = evaluate(z0[free], z0)
            val = float(np.sum(loss_fn((r / delta) ** 2)[0])) * 0.5 * delta ** 2
            z = z0
        else:
            try:
                res = optimize.least_squares(
                    lambda zf: evaluate(zf, z0)[0], z0[free], jac=lambda zf: evaluate(zf, z0)[1],
                    bounds=(lb[free], ub[free]), loss=loss_fn, f_scale=delta, method="trf", x_scale="jac",
                    max_nfev=max_nfev, xtol=1e-10, ftol=1e-10, gtol=1e-10)
            except np.linalg.LinAlgError:
                continue
            z = z0.copy()
            z[free] = res.x
            val = float(res.cost)
        if val < best[1]:
            best = (z, val)
    if best[0] is None:
        raise ValueError("the fit failed from every starting point")
    return best


def fit_schedule_law(curves: Iterable[tuple[ArrayLike, ArrayLike, ArrayLike]], form: str = "mpl", *,
                     delta: float = 1e-3, init: Mapping[str, float] | ScheduleLawFit | None = None,
                     fixed: Mapping[str, float] | None = None, lam: float = 0.999,
                     weights: Sequence[ArrayLike] | None = None,
                     prior: str | float | None = "auto") -> ScheduleLawFit:
    """Fit one schedule-aware law jointly to several loss curves (Luo et al. 2025 protocol).

    Minimises ``Σ_curves Σ_points Huber_delta(log L̂ - log L)`` (plus an optional weak prior, see ``prior``) by
    robust trust-region least squares with analytic Jacobians from the best points of a grid over the nonlinear
    parameters, the linear ones (``L0, A, B`` or ``L0, A, C``) being solved by least squares at each grid point.

    Args:
        curves: ``(steps, loss, lr)`` per run; ``steps`` follow the :mod:`forecast <lightning_scaling.forecast>`
            step convention (loss after ``steps`` updates, ``lr[:steps]`` used), ``lr`` is the per-step schedule.
            Non-finite or non-positive losses are excluded.
        form: ``"mpl"``, ``"momentum"`` or ``"power"`` (the last ignores ``lr``).
        delta: Huber threshold on the log-loss residual (1e-3 as in both papers).
        init: Extra starting parameters (e.g. a previous fit) tried besides the grid.
        fixed: Parameters held at the given values.
        lam: Momentum decay of the momentum law.
        weights: Optional per-point weights per curve.
        prior: Strength of the weak Gaussian prior on the annealing parameters (the generic centres of
            ``forecast_run``: MPL ``C = 1``, ``beta = gamma = 0.5``, ``B·eta_max ≈ 0.1``; momentum-law drop
            ``≈ 0.1`` nats), as the log-loss noise scale that converts its widths into Huber units (larger =
            stronger); ``None`` fits without it. ``"auto"`` (default) picks it among ``None, 0.003, 0.01, 0.03``
            by leave-one-curve-out validation when three or more curves are given (each curve predicted from a
            fit on the others; smallest mean relative error wins), else uses no prior. Only the training curves
            are used for the choice.

    Returns:
        The :class:`ScheduleLawFit` (``prior_scale`` records the strength used).

    Raises:
        ValueError: unknown form, no curves, or fewer finite points than free parameters.

    Example::

        >>> lr = np.full(3000, 3e-4); lr[2000:] = 3e-5
        >>> steps = np.arange(200, 3001, 40)
        >>> truth = dict(L0=3.0, A=0.5, alpha=0.5, B=400.0, C=2.0, beta=0.6, gamma=0.6)
        >>> fit = fit_schedule_law([(steps, multi_power_law(lr, steps, **truth), lr)], form="mpl")
        >>> err = np.abs(fit.predict(lr, steps) / multi_power_law(lr, steps, **truth) - 1).max()
        >>> bool(err < 1e-4)
        True
    """
    if form not in FORMS:
        raise ValueError(f"unknown form {form!r}; choose one of {FORMS}")
    fixed = dict(fixed or {})
    designs, ys, ws, curves_l = [], [], [], []
    for i, cur in enumerate(curves):
        steps, loss, lr = cur
        s = np.asarray(steps, dtype=np.float64).ravel()
        y = np.asarray(loss, dtype=np.float64).ravel()
        if s.size != y.size:
            raise ValueError(f"curve {i}: {s.size} steps but {y.size} losses")
        w = np.ones(s.size) if weights is None else np.asarray(weights[i], dtype=np.float64).ravel()
        ok = np.isfinite(y) & (y > 0) & np.isfinite(s) & (s >= 1)
        if not np.any(ok):
            continue
        st = s[ok].astype(np.int64)
        lr_a = _as_lr(lr) if form != "power" else None
        if lr_a is not None:
            _as_steps(st, lr_a.size)
        designs.append(_design_for(form, lr_a, st, lam))
        curves_l.append(cur)
        ys.append(y[ok])
        ws.append(w[ok])
    n = int(sum(y.size for y in ys))
    cls = _FORM_CLS[form]
    if n < len(cls.names) - len(fixed) + 1:
        raise ValueError(f"too few finite points ({n}) to fit the {len(cls.names)}-parameter {form} law")
    extra = []
    if init is not None:
        p = init.params if isinstance(init, ScheduleLawFit) else init
        if all(k in p for k in cls.names):
            extra.append(cls.to_z(p))
    eta_max = max((float(np.max(_as_lr(c[2]))) for c in curves_l), default=1.0) if form != "power" else 1.0

    def run(idx: Sequence[int], scale: float | None) -> tuple[np.ndarray, float]:
        d, y, w = [designs[i] for i in idx], [ys[i] for i in idx], [ws[i] for i in idx]
        pr = None if scale is None else _prior_for(form, eta_max, lam, scale)
        return _fit_z(form, d, y, w, delta=delta, inits=_grid_inits(form, d, y, w, fixed) + extra, fixed=fixed,
                      prior=pr)

    if isinstance(prior, str):
        if prior != "auto":
            raise ValueError(f"prior must be 'auto', None or a positive float, got {prior!r}")
        scale: float | None = None
        if form != "power" and len(designs) >= 3:
            # empirical choice of the regularisation strength: leave one training curve out, predict it
            best_cv = math.inf
            for sc in _PRIOR_LADDER:
                errs = []
                for i in range(len(designs)):
                    try:
                        zi, _ = run([j for j in range(len(designs)) if j != i], sc)
                    except ValueError:
                        errs.append(math.inf)
                        continue
                    errs.append(float(np.mean(np.abs(cls.predict(zi, designs[i])[0] / ys[i] - 1))))
                cv = float(np.mean(errs))
                if cv < best_cv:
                    best_cv, scale = cv, sc
    elif prior is None or (isinstance(prior, (int, float)) and prior > 0):
        scale = None if prior is None else float(prior)
    else:
        raise ValueError(f"prior must be 'auto', None or a positive float, got {prior!r}")
    z, val = run(range(len(designs)), scale)
    return ScheduleLawFit(form=form, params=cls.from_z(z), objective=val, n_points=n, lam=lam, prior_scale=scale)


# ----------------------------------------------------------------------------------------------------------------
# Forecast of one run
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Forecast:
    """Where one run's loss is heading: a fitted curve on a grid of future steps with a calibrated band.

    ``steps`` is the *future* grid: from ``observed_until + 1`` to ``horizon`` (both included), at most
    ``grid_points`` steps (all steps when fewer, else a union of linearly and geometrically spaced steps; the
    last is always ``horizon``). When the run is already at or past ``horizon`` it holds ``[horizon]`` only.
    The band is for the *expected* (noise-free) loss at ``confidence``: Laplace parameter uncertainty combined
    with a model-error term ``q·log(t/t_obs)`` whose slope ``q`` is calibrated by backtests on earlier
    sub-prefixes of the observed curve (see ``docs/forecast.md``).

    Attributes:
        steps: int64 future steps. loss, lower, upper: float64 forecast and band at ``steps``.
        final_loss, final_lower, final_upper: the same at ``horizon``.
        horizon: last step forecast. method: the fitted form (``"mpl"``, ``"momentum"``, ``"power"``).
        params: fitted parameters of that form. confidence: band level.
        n_observed: finite points used (before binning). n_nonfinite: NaN/inf losses excluded.
        observed_until: last recorded step. tokens_per_step: tokens per step (NaN if unknown).
        validation_error: mean |relative error| of the held-out tail prediction (NaN if not validated).
        observed_steps, observed_loss: the binned (smoothed) observed curve the fit used.
        candidates: tail-validation error of every form tried.

    Example::

        >>> f = Forecast(steps=np.array([10, 20]), loss=np.array([3.0, 2.5]), lower=np.array([2.9, 2.3]),
        ...              upper=np.array([3.1, 2.7]), final_loss=2.5, final_lower=2.3, final_upper=2.7,
        ...              horizon=20, method="power", params={}, n_observed=9, observed_until=9,
        ...              tokens_per_step=1000.0)
        >>> f.steps_to(2.75), f.tokens_to(2.75)
        (15.0, 15000.0)
    """

    steps: np.ndarray
    loss: np.ndarray
    lower: np.ndarray
    upper: np.ndarray
    final_loss: float
    final_lower: float
    final_upper: float
    horizon: int
    method: str
    params: dict[str, float]
    n_observed: int
    observed_until: int
    tokens_per_step: float = float("nan")
    n_nonfinite: int = 0
    confidence: float = 0.9
    validation_error: float = float("nan")
    observed_steps: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    observed_loss: np.ndarray = field(default_factory=lambda: np.zeros(0))
    candidates: dict[str, float] = field(default_factory=dict)
    state: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def _curve(self, bound: str) -> np.ndarray:
        if bound not in ("mean", "lower", "upper"):
            raise ValueError(f"bound must be 'mean', 'lower' or 'upper', got {bound!r}")
        return {"mean": self.loss, "lower": self.lower, "upper": self.upper}[bound]

    def steps_to(self, loss: float, *, bound: str = "mean") -> float:
        """First step at which the forecast (or its ``lower``/``upper`` bound) reaches ``loss``.

        Returns the first observed (binned) step at or below ``loss`` when it was already reached, the
        linearly interpolated future step otherwise, and ``inf`` when not reached by ``horizon``.
        """
        curve = self._curve(bound)
        if not math.isfinite(loss):
            raise ValueError(f"loss must be finite, got {loss}")
        hit = np.nonzero(self.observed_loss <= loss)[0]
        if hit.size:
            return float(self.observed_steps[hit[0]])
        below = np.nonzero(curve <= loss)[0]
        if below.size == 0:
            return float("inf")
        i = int(below[0])
        if i == 0:
            return float(self.steps[0])
        s0, s1, l0, l1 = self.steps[i - 1], self.steps[i], curve[i - 1], curve[i]
        frac = (l0 - loss) / (l0 - l1) if l0 != l1 else 1.0
        return float(s0 + frac * (s1 - s0))

    def tokens_to(self, loss: float, *, bound: str = "mean") -> float:
        """Tokens consumed when the forecast reaches ``loss`` (``steps_to × tokens_per_step``; NaN if unknown)."""
        s = self.steps_to(loss, bound=bound)
        return s * self.tokens_per_step if math.isfinite(s) else s

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (arrays as lists, non-finite floats as ``None``)."""
        def enc(v: Any) -> Any:
            if isinstance(v, np.ndarray):
                return [enc(x) for x in v.tolist()]
            if isinstance(v, (float, np.floating)):
                return float(v) if math.isfinite(v) else None
            if isinstance(v, (np.integer,)):
                return int(v)
            if isinstance(v, dict):
                return {k: enc(x) for k, x in v.items()}
            if isinstance(v, (list, tuple)):
                return [enc(x) for x in v]
            return v
        return {f.name: enc(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name != "state"}


def _law_params(law: Any) -> dict[str, float]:
    if law is None:
        return {}
    p = getattr(law, "params", law)
    if not isinstance(p, Mapping):
        raise ValueError("`law` must have a `.params` mapping (e.g. from fit_scaling_law) or be a mapping")
    return {k: float(v) for k, v in p.items() if isinstance(v, (int, float, np.floating)) and math.isfinite(v)}


def _bin_curve(steps: np.ndarray, loss: np.ndarray, max_bins: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Average log-loss in ``max_bins`` equal-width step windows (points with outlier residuals clipped)."""
    lo, hi = steps[0], steps[-1]
    nb = int(min(max_bins, steps.size))
    edges = np.linspace(lo, hi + 1, nb + 1)
    idx = np.clip(np.searchsorted(edges, steps, side="right") - 1, 0, nb - 1)
    ly = np.log(loss)
    cnt = np.bincount(idx, minlength=nb).astype(np.float64)
    ok = cnt > 0
    # robust: clip each point to its bin median ± 4 MAD-sigmas before averaging (loss spikes)
    if steps.size > 2 * nb:
        ci = cnt.astype(np.int64)
        start = np.concatenate([[0], np.cumsum(ci)[:-1]])
        lo_i, hi_i = start + np.maximum(ci - 1, 0) // 2, start + ci // 2

        def group_median(v: np.ndarray) -> np.ndarray:  # per-bin median, vectorised (sort within bins)
            sv = v[np.lexsort((v, idx))]
            return np.where(ok, 0.5 * (sv[np.minimum(lo_i, v.size - 1)] + sv[np.minimum(hi_i, v.size - 1)]), 0.0)

        medf = group_median(ly)
        madf = group_median(np.abs(ly - medf[idx])) * 1.4826
        lim = 4 * madf[idx] + 1e-12
        ly = np.clip(ly, medf[idx] - lim, medf[idx] + lim)
    sy = np.bincount(idx, weights=ly, minlength=nb)
    ss = np.bincount(idx, weights=steps.astype(np.float64), minlength=nb)
    bs = np.round(ss[ok] / cnt[ok]).astype(np.int64)
    return bs, np.exp(sy[ok] / cnt[ok]), cnt[ok]


def _future_grid(start: int, horizon: int, n: int) -> np.ndarray:
    if start > horizon:
        return np.array([horizon], dtype=np.int64)
    if horizon - start + 1 <= n:
        return np.arange(start, horizon + 1, dtype=np.int64)
    g = np.concatenate([np.linspace(start, horizon, n // 2), np.geomspace(start, horizon, n - n // 2)])
    return np.unique(np.round(g).astype(np.int64))


class _Problem:
    """One form fitted to binned points of one run (design for fit points and for the forecast grid)."""

    def __init__(self, form: str, lr: np.ndarray | None, lam: float, s_eff: Callable[[np.ndarray], np.ndarray]):
        self.form, self.lr, self.lam, self.s_eff = form, lr, lam, s_eff
        self.cls = _FORM_CLS[form]

    def design(self, steps: np.ndarray) -> dict:
        if self.form == "power":
            return _Power.design(self.s_eff(steps))
        return _design_for(self.form, self.lr, steps, self.lam)


def _prior_for(form: str, eta_max: float, lam: float, sigma: float) -> tuple[np.ndarray, np.ndarray] | None:
    """Weak Gaussian prior on the annealing parameters, which a prefix without LR decay cannot identify.

    Centres: C = 1, beta = gamma = 0.5 and a full-anneal drop B·eta_max ≈ 0.1 nats (MPL); a momentum-law drop
    C·eta_max/(1-lam) ≈ 0.1 nats. Widths are wide (a factor e in C and B, ±0.2 in the exponents) so any
    observed decay overrides them; ``sigma`` converts them into units of the Huber objective.
    """
    cls = _FORM_CLS[form]
    mu, prec = np.zeros(len(cls.names)), np.zeros(len(cls.names))
    if form == "mpl":
        spec = {"B": (math.log(0.1 / eta_max), 1.0), "C": (0.0, 1.0), "beta": (0.5, 0.2), "gamma": (0.5, 0.2)}
    elif form == "momentum":
        spec = {"C": (0.1 * (1 - lam) / eta_max, 0.1 * (1 - lam) / eta_max)}
    else:
        return None
    for i, k in enumerate(cls.names):
        if k in spec:
            mu[i], prec[i] = spec[k][0], (sigma / spec[k][1]) ** 2
    return mu, prec


def _laplace_sd(prob: _Problem, z: np.ndarray, des_fit: dict, y: np.ndarray, w: np.ndarray,
                fixed: Mapping[str, float], prior: tuple | None, des_out: dict) -> tuple[np.ndarray, float]:
    """Log-space sd of the forecast from the Gauss-Newton covariance; also returns the residual scale."""
    pred, J = prob.cls.predict(z, des_fit, jac=True)
    r = np.log(y) - np.log(pred)
    sigma = max(1.4826 * float(np.median(np.abs(r - np.median(r)))), 1e-5)
    if r.size > 3:  # residuals of neighbouring bins are correlated: inflate by (1+rho)/(1-rho)
        rho = float(np.clip(np.corrcoef(r[:-1], r[1:])[0, 1], 0.0, 0.9)) if np.std(r) > 0 else 0.0
    else:
        rho = 0.0
    free = np.array([k not in fixed for k in prob.cls.names])
    Jl = (J / pred[:, None])[:, free]
    H = (Jl * w[:, None]).T @ Jl / sigma ** 2
    if prior is not None:
        # prior precisions are in Huber units (noise scale folded in); rescale to this sigma
        H += np.diag(prior[1][free] / max(prior[2], 1e-12) ** 2) if len(prior) > 2 else 0.0
    H *= (1 - rho) / (1 + rho)
    cov = np.linalg.pinv(H + 1e-12 * np.eye(H.shape[0]) * max(np.trace(H), 1.0))
    p_out, J_out = prob.cls.predict(z, des_out, jac=True)
    Jo = (J_out / p_out[:, None])[:, free]
    var = np.einsum("ij,jk,ik->i", Jo, cov, Jo)
    return np.sqrt(np.maximum(var, 0.0)), sigma


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"`{name}` must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"`{name}` must be finite, got {value!r}")
    return value


def _check_forecast_args(*, confidence: Any, horizon: Any, target_loss: Any, min_points: Any, min_fraction: Any,
                         critical_batch: Any, max_bins: Any, grid_points: Any, holdout: Any, delta: Any,
                         lam: Any) -> None:
    """Validate every numeric argument of :func:`forecast_run` before any fitting (NaN reaches LAPACK else)."""
    if not 0.0 < _number("confidence", confidence) < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if horizon is not None and (_number("horizon", horizon) < 1 or float(horizon) != int(horizon)):
        raise ValueError(f"horizon must be an integer >= 1, got {horizon}")
    if target_loss is not None and _number("target_loss", target_loss) <= 0:
        raise ValueError(f"`target_loss` must be positive, got {target_loss!r}")
    if critical_batch is not None and _number("critical_batch", critical_batch) <= 0:
        raise ValueError(f"`critical_batch` must be a positive number of samples, got {critical_batch!r}")
    for name, value, low in (("min_points", min_points, 1), ("max_bins", max_bins, 8),
                             ("grid_points", grid_points, 1)):
        if _number(name, value) < low or float(value) != int(value):
            raise ValueError(f"`{name}` must be an integer >= {low}, got {value!r}")
    if not 0.0 <= _number("min_fraction", min_fraction) <= 1.0:
        raise ValueError(f"`min_fraction` must be in [0, 1], got {min_fraction!r}")
    if not 0.05 <= _number("holdout", holdout) <= 0.5:
        raise ValueError(f"holdout must be in [0.05, 0.5], got {holdout}")
    if _number("delta", delta) <= 0:
        raise ValueError(f"`delta` must be positive, got {delta!r}")
    if not 0.0 < _number("lam", lam) < 1.0:
        raise ValueError(f"`lam` must be in (0, 1), got {lam!r}")


def _checked_forecast(**fields: Any) -> Forecast:
    """Build the Forecast, refusing one that is not a loss: non-positive, non-finite or outside its own band."""
    loss, lower, upper = fields["loss"], fields["lower"], fields["upper"]
    with np.errstate(invalid="ignore"):
        ok = np.isfinite(loss) & (loss > 0) & np.isfinite(lower) & (lower > 0) & (lower <= loss) & (loss <= upper)
    if not np.all(ok):
        i = int(np.argmin(ok))
        raise ValueError(
            f"the {fields['method']} fit gave an unusable forecast at step {int(fields['steps'][i])}: loss "
            f"{float(loss[i]):.4g}, band ({float(lower[i]):.4g}, {float(upper[i]):.4g}); the observed curve does "
            "not determine where it is heading (too short, too noisy, or not a falling power law)"
        )
    return Forecast(**fields)


def forecast_run(history: Any, horizon: int | None = None, lr_schedule: ArrayLike | None = None, *,
                 law: Any = None, target_loss: float | None = None, confidence: float = 0.9,
                 method: str = "auto", min_points: int = 16, min_fraction: float = 0.0,
                 critical_batch: float | None = None, init: Forecast | None = None, max_bins: int = 96,
                 grid_points: int = 256, validate: bool = True, holdout: float = 0.25, delta: float = 1e-3,
                 lam: float = 0.999, revalidate_every: int = 10, exclude_transient: bool = True) -> Forecast:
    """Forecast the rest of one run's loss curve from its observed prefix.

    Form choice (``method="auto"``): with a planned schedule that is not constant after warmup, the Multi-Power
    Law and the momentum law are both fitted to the first ``1 - holdout`` of the observed (post-warmup) span
    and the one with the smaller error on the held-out tail wins; with no schedule or a constant one the
    schedule-blind L(S) form (:func:`lightning_scaling.laws.loss_steps`) is used, in steps or, when a critical
    batch size is known, in ``S_min = S / (1 + B_crit/B)``. For that form the early transient is excluded by
    choosing the start of the fit window ``s0`` (0, 10, 25 or 40% into the observed span) by the same tail
    validation. Points before the end of warmup are never fitted; non-finite losses are excluded and counted
    (``n_nonfinite``); the remaining points are averaged in ``max_bins`` windows of log-loss (spikes clipped)
    and fitted with a Huber loss on log loss.

    Args:
        history: A :class:`~lightning_scaling.RunHistory` (uses ``step``, ``loss``, ``planned_lr``, ``lr``,
            ``batch_size``, ``tokens``).
        horizon: Final step to forecast to; defaults to ``len(lr_schedule)`` / ``len(history.planned_lr)``.
        lr_schedule: Per-step LR, ``lr[i]`` for optimizer step ``i`` over ``0..horizon-1`` (defaults to
            ``history.planned_lr``).
        law: Optional prior law from smaller runs of the same setup: an object with a ``.params`` mapping (or a
            mapping). Its shared exponents are held fixed: ``alpha_s`` fixes the S exponent of every form
            (``alpha`` of the schedule-aware laws, which equals ``alpha_S`` at constant LR); ``alpha``, ``beta``,
            ``gamma``, ``C`` of a fitted MPL/momentum law are held too. ``b_star``/``alpha_b`` give B_crit(L).
        target_loss: Optional loss of interest; recorded in ``state`` for callers (use ``steps_to``).
        confidence: Band level in (0, 1).
        method: ``"auto"``, ``"mpl"``, ``"momentum"`` or ``"power"``.
        min_points: Minimum finite post-warmup points needed.
        min_fraction: Minimum fraction of ``horizon`` that must have been observed.
        critical_batch: Critical batch size (same unit as ``history.batch_size``) for the ``S_min`` conversion.
        init: A previous :class:`Forecast` of the same run: its method, window, band calibration and parameters
            warm-start the fits (grid search, form validation and backtests are skipped: ~10 ms on 10k points),
            except on periodic revalidations (see ``revalidate_every``).
        max_bins: Number of averaging windows.
        grid_points: Maximum size of the future grid.
        validate: Choose the form / window by held-out tail validation (else first candidate, full window).
        holdout: Fraction of the observed post-warmup span held out for validation.
        delta: Huber threshold on log-loss residuals.
        lam: Momentum-law decay.
        revalidate_every: With ``init``, every ``revalidate_every``-th consecutive warm call (and any call where
            the observed post-warmup span grew by more than 25% since the last cold fit) redoes the full form
            choice, window choice and band calibration; the others reuse them and only refit the parameters.
        exclude_transient: Choose the start of the L(S) fit window by tail validation (``False``: fit from the
            end of warmup; for ablations).

    Returns:
        The :class:`Forecast`.

    Raises:
        ValueError: bad arguments, no schedule and no horizon, or too little of the curve observed.

    Example::

        >>> from lightning_scaling import RunHistory
        >>> s = np.arange(0, 3001, 10)
        >>> h = RunHistory(step=s, loss=2.0 + (np.maximum(s, 1) / 50.0) ** -0.5)
        >>> f = forecast_run(h, horizon=10000)
        >>> f.method, bool(abs(f.final_loss - (2.0 + 200.0 ** -0.5)) < 0.01)
        ('power', True)
    """
    _check_forecast_args(confidence=confidence, horizon=horizon, target_loss=target_loss, min_points=min_points,
                         min_fraction=min_fraction, critical_batch=critical_batch, max_bins=max_bins,
                         grid_points=grid_points, holdout=holdout, delta=delta, lam=lam)
    if method not in ("auto",) + FORMS:
        raise ValueError(f"method must be 'auto' or one of {FORMS}, got {method!r}")
    if not isinstance(revalidate_every, int) or revalidate_every < 1:
        raise ValueError(f"revalidate_every must be a positive int, got {revalidate_every!r}")
    steps_all = np.asarray(history.step, dtype=np.int64)
    loss_all = np.asarray(history.loss, dtype=np.float64)
    if steps_all.size == 0:
        raise ValueError("the history is empty: nothing to forecast")
    finite = np.isfinite(loss_all)
    n_nonfinite = int(np.sum(~finite))
    if np.any(loss_all[finite] <= 0):
        raise ValueError("losses must be positive (the fit is on log loss)")
    lr = lr_schedule if lr_schedule is not None else getattr(history, "planned_lr", None)
    lr = None if lr is None else _as_lr(lr)
    if horizon is None:
        if lr is None:
            raise ValueError("`horizon` is required when no LR schedule is given or recorded")
        horizon = int(lr.size)
    horizon = int(horizon)
    if horizon < 1:
        raise ValueError(f"horizon must be >= 1, got {horizon}")
    if lr is not None and lr.size < horizon:
        raise ValueError(f"the LR schedule covers {lr.size} steps but horizon is {horizon}")
    observed_until = int(steps_all[-1])
    lawp = _law_params(law)
    if method == "power" or lr is None:
        forms = ["power"]
    elif method == "auto":
        post = lr[warmup_steps(lr):horizon]
        forms = ["power"] if post.size == 0 or post.max() <= 1.02 * post.min() else ["mpl", "momentum"]
    else:
        forms = [method]

    # warmup end: from the schedule, else from the recorded LR
    if lr is not None:
        w_end = warmup_steps(lr)
    else:
        rec = np.asarray(getattr(history, "lr", np.full(steps_all.size, np.nan)), dtype=np.float64)
        okr = np.isfinite(rec)
        w_end = int(steps_all[okr][warmup_steps(rec[okr])]) if okr.sum() > 2 and rec[okr].max() > 0 else 0
    use = finite & (steps_all >= max(w_end, 1))
    n_obs = int(use.sum())
    if n_obs < min_points:
        raise ValueError(f"too little of the curve seen: {n_obs} finite points after warmup (step {w_end}), "
                         f"need at least {min_points}")
    if observed_until < min_fraction * horizon:
        raise ValueError(f"too little of the curve seen: step {observed_until} < {min_fraction:.0%} of {horizon}")
    bs, by, bc = _bin_curve(steps_all[use], loss_all[use], max_bins)
    bw = bc / bc.mean()
    if bs.size < 8:
        raise ValueError(f"too little of the curve seen: {bs.size} distinct windows after warmup, need 8")

    # S_min conversion for the schedule-blind form
    batch = getattr(history, "batch_size", None)
    bcrit_fn: Callable[[np.ndarray], np.ndarray] | None = None
    if batch is not None and critical_batch is not None:
        bcrit_fn = lambda L: np.full(np.shape(L), float(critical_batch))  # noqa: E731
    elif batch is not None and "b_star" in lawp and "alpha_b" in lawp:
        bcrit_fn = lambda L: laws.critical_batch(L, b_star=lawp["b_star"], alpha_b=lawp["alpha_b"])  # noqa: E731
    eta_max = float(lr.max()) if lr is not None else 1.0
    tail_scale = 1e-3 * 3  # noise scale that converts prior widths into Huber units

    def make_problem(form: str, ref_loss: np.ndarray | None = None) -> _Problem:
        if form == "power" and bcrit_fn is not None:
            # observed points: B_crit at the (smoothed) observed loss; future: at the current loss level
            lvl = float(by[-1])

            def s_eff(st: np.ndarray) -> np.ndarray:
                L = np.interp(st, bs, by, right=lvl)
                return laws.s_min(st, batch, bcrit_fn(L))
        else:
            def s_eff(st: np.ndarray) -> np.ndarray:
                return st.astype(np.float64)
        return _Problem(form, lr, lam, s_eff)

    def fixed_for(form: str) -> dict[str, float]:
        fx: dict[str, float] = {}
        if "alpha_s" in lawp:
            fx["alpha" if form != "power" else "alpha_s"] = lawp["alpha_s"]
        shared = {"mpl": ("alpha", "beta", "gamma", "C"), "momentum": ("alpha",), "power": ()}[form]
        for k in shared:
            if k in lawp:
                fx[k] = lawp[k]
        return fx

    def fit(prob: _Problem, sel: np.ndarray, inits: list[np.ndarray] | None) -> tuple[np.ndarray, dict, tuple]:
        des = prob.design(bs[sel])
        fx = fixed_for(prob.form)
        pr = _prior_for(prob.form, eta_max, lam, tail_scale)
        if inits is None:
            inits = _grid_inits(prob.form, [des], [by[sel]], [bw[sel]], fx, n_best=2)
        z, _ = _fit_z(prob.form, [des], [by[sel]], [bw[sel]], delta=delta, inits=inits, fixed=fx, prior=pr,
                      max_nfev=200)
        return z, des, (pr[0], pr[1], tail_scale) if pr is not None else None

    t_first = int(bs[0])
    t_obs = int(bs[-1])
    t_val = int(round(t_first + (1 - holdout) * (t_obs - t_first)))
    tail = bs > t_val
    candidates: dict[str, float] = {}
    best: tuple[float, str, float] | None = None
    st0 = init.state if init is not None else {}
    e_val = float(st0.get("validation_error", float("nan")))
    q_model = float(st0.get("q_model", float("nan")))
    n_warm = int(st0.get("n_warm", 0)) + 1
    cold_until = int(st0.get("cold_until", observed_until))
    # a warm refit reuses the last form, window and band calibration; the full (cold) validation is redone
    # every `revalidate_every`-th call and whenever the observed span grew by more than 25% since the last one
    warm = (init is not None and init.method in forms and n_warm < revalidate_every
            and (observed_until - w_end) <= 1.25 * max(cold_until - w_end, 1) and math.isfinite(q_model))
    if warm:
        best = (e_val, init.method, float(st0.get("s0_frac", 0.0)))
    else:
        n_warm, cold_until = 0, observed_until
        if validate and tail.sum() >= 2 and (~tail).sum() >= 8:
            for form in forms:
                fracs = (0.0, 0.1, 0.25, 0.4) if (form == "power" and exclude_transient) else (0.0,)
                for frac in fracs:
                    s0 = t_first + frac * (t_val - t_first)
                    sel = (bs >= s0) & ~tail
                    if sel.sum() < 8:
                        continue
                    prob = make_problem(form)
                    try:
                        z, des, pr = fit(prob, sel, None)
                    except (ValueError, FloatingPointError, np.linalg.LinAlgError):
                        continue
                    pt = prob.cls.predict(z, prob.design(bs[tail]))[0]
                    err = float(np.average(np.abs(np.log(pt) - np.log(by[tail])), weights=bw[tail]))
                    key = form if form != "power" else f"power@{frac:g}"
                    candidates[key] = err
                    if best is None or err < best[0]:
                        best = (err, form, frac)
            if best is not None:
                e_val = best[0]
    if best is None:
        best = (float("nan"), forms[0], 0.0)
    form, frac = best[1], best[2]
    prob = make_problem(form)
    s0 = t_first + frac * (t_obs - t_first) * (1 - holdout)
    sel = bs >= s0
    if not warm:
        # backtest calibration of the model-error term (split-conformal on the observed prefix): refit the chosen
        # form on earlier sub-prefixes ending at `cut`, score each later observed point by its log error per unit
        # of log extrapolation distance log(t / cut), and take the `confidence` quantile of those scores
        scores = []
        for f_cut in _BACKTEST_CUTS:
            cut = s0 + f_cut * (t_obs - s0)
            sub = sel & (bs <= cut)
            later = bs > cut
            if sub.sum() < 8 or later.sum() < 2:
                continue
            try:
                zb, _, _ = fit(prob, sub, None)
            except (ValueError, FloatingPointError, np.linalg.LinAlgError):
                continue
            pb = prob.cls.predict(zb, prob.design(bs[later]))[0]
            dist_b = np.log(bs[later] / float(bs[sub][-1]))
            far = dist_b >= 0.5 * dist_b.max()  # near the cut the score is noise / tiny distance
            scores.append(np.abs(np.log(pb[far]) - np.log(by[later][far])) / dist_b[far])
        if scores:
            sc = np.concatenate(scores)
            sc = sc[np.isfinite(sc)]
            level = min(1.0, math.ceil((sc.size + 1) * confidence) / sc.size) if sc.size else 1.0
            q_model = float(np.quantile(sc, level)) if sc.size else float("nan")
    inits = None
    if init is not None and init.method == form and all(k in init.params for k in prob.cls.names):
        inits = [prob.cls.to_z(init.params)]
    z, des, pr = fit(prob, sel, inits)

    grid = _future_grid(observed_until + 1, horizon, grid_points)
    if lr is not None and form != "power" and grid.max() > lr.size:
        raise ValueError(f"the LR schedule covers {lr.size} steps but the forecast needs {grid.max()}")
    des_out = prob.design(grid)
    pred = prob.cls.predict(z, des_out)[0]
    sd, sigma = _laplace_sd(prob, z, des, by[sel], bw[sel], fixed_for(form), pr, des_out)
    zq = stats.norm.ppf(0.5 + confidence / 2)
    dist = np.log(np.maximum(grid, t_obs) / t_obs)
    if math.isfinite(q_model):
        e_model = q_model * dist
    else:  # no backtest possible: fall back on the held-out tail error per unit log distance
        e_v = 0.0 if not math.isfinite(e_val) else e_val
        e_model = e_v * dist / max(math.log(t_obs / max(t_val, 1)), 1e-6)
    half = np.sqrt((zq * sd) ** 2 + e_model ** 2)
    lower, upper = pred * np.exp(-half), pred * np.exp(half)
    tps = getattr(history, "tokens_per_step", None)
    if tps is None or not (isinstance(tps, (int, float)) and math.isfinite(tps)):
        tok = np.asarray(getattr(history, "tokens", np.full(steps_all.size, np.nan)), dtype=np.float64)
        okt = np.isfinite(tok) & (steps_all > 0)
        tps = float(tok[okt][-1] / steps_all[okt][-1]) if okt.any() else float("nan")
    state = {"kappa": 1.0, "validation_error": e_val, "s0_frac": frac, "sigma": sigma, "warmup": w_end,
             "target_loss": target_loss, "q_model": q_model, "n_warm": n_warm, "cold_until": cold_until,
             "warm": warm}
    return _checked_forecast(steps=grid, loss=pred, lower=lower, upper=upper, final_loss=float(pred[-1]),
                    final_lower=float(lower[-1]), final_upper=float(upper[-1]), horizon=horizon, method=form,
                    params=prob.cls.from_z(z), n_observed=n_obs, observed_until=observed_until,
                    tokens_per_step=float(tps), n_nonfinite=n_nonfinite, confidence=confidence,
                    validation_error=e_val, observed_steps=bs, observed_loss=by, candidates=candidates,
                    state=state)
