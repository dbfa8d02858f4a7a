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
from lightning_scaling.history import FINAL_FRACTION
from lightning_scaling.numerics import to_jsonable, warmup_steps

__all__ = [
    "Forecast",
    "ForecastState",
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


# ----------------------------------------------------------------------------------------------------------------
# Multi-Power Law (Luo et al. 2025)
# ----------------------------------------------------------------------------------------------------------------
def _mpl_sums(lr: np.ndarray) -> dict:
    """What the MPL design needs from the schedule alone: LR prefix sums and, per sign of the LR change, the prefix
    sums of the gaps, gap-weighted LR areas and gap-weighted log LRs (computed once per schedule and cached)."""
    n = lr.size
    cs = np.concatenate([[0.0], np.cumsum(lr)])  # cs[k] = Σ_{i<k} lr[i]
    gap = np.zeros(n)
    gap[1:] = lr[:-1] - lr[1:]
    loglr = np.log(np.maximum(lr, _EPS_LR))
    chans = []
    for sign in (1.0, -1.0):
        g = np.where(sign * gap > 0, gap, 0.0)
        if np.any(g):
            chans.append(tuple(np.concatenate([[0.0], np.cumsum(v)]) for v in (g, g * cs[:-1], g * loglr)))
    return {"cs": cs, "chans": chans, "n": n}


_SCHEDULE_CACHE: dict[tuple, Any] = {}


def _schedule_cached(kind: str, lr: np.ndarray, build: Callable[[], Any], *extra: Any) -> Any:
    """``build()`` for this schedule, cached across calls (a refit of the same run sees the same schedule)."""
    key = (kind, lr.size, hash(lr.tobytes()), *extra)
    if key not in _SCHEDULE_CACHE:
        if len(_SCHEDULE_CACHE) >= 8:
            _SCHEDULE_CACHE.pop(next(iter(_SCHEDULE_CACHE)))
        _SCHEDULE_CACHE[key] = build()
    return _SCHEDULE_CACHE[key]


def _mpl_blocks(lr: np.ndarray, steps: np.ndarray, *, exact_recent: int = 48, ratio: float = 1.06,
                sums: dict | None = None) -> dict:
    """Pre-aggregate the MPL loss-drop sum into per-point blocks (graded in distance to the point).

    ``LD(s) = Σ_{j=1}^{s-1} g_j·G(η_j^(-γ)·(P_s - P_j))`` with ``g_j = lr[j-1] - lr[j]`` and ``P`` the prefix sums.
    The ``exact_recent`` terms nearest to ``s`` are kept one by one; further away the terms are merged into
    blocks whose width grows geometrically with the distance (``ratio``), each represented by its gap-weighted
    mean of ``P_j`` and ``log η_j`` (separately for LR decreases and increases, so the weights keep one sign).
    G varies slowly far from ``s``, so the error is second order in the relative block width (< 2e-5 relative
    on the published fixtures) while the cost per point drops from O(s) to O(log s). Everything that depends
    on the parameters is left out, so a fit reuses these arrays. ``sums``: :func:`_mpl_sums` of ``lr`` if known.
    """
    sums = _mpl_sums(lr) if sums is None else sums
    n, cs = sums["n"], sums["cs"]
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
    for cg, cgp, cgl in sums["chans"]:
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
    eta = _as_lr(lr)
    st = _as_steps(steps, eta.size)
    c1, c2 = _momentum_cums(eta, lam, warmup)
    return c1[st], c2[st]


def _momentum_cums(lr: np.ndarray, lam: float, warmup: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Prefix sums of the (warmup-flattened) LR and of the annealing momentum: S1 and S2 at every step count."""
    eta = lr.copy()
    w = warmup_steps(eta) if warmup is None else int(warmup)
    if w > 0:
        eta[:w] = eta.max() if w >= eta.size else max(eta[w], eta[:w].max())
    gap = np.zeros_like(eta)
    gap[1:] = eta[:-1] - eta[1:]
    m = signal.lfilter([1.0], [1.0, -lam], gap)
    return np.concatenate([[0.0], np.cumsum(eta)]), np.concatenate([[0.0], np.cumsum(m)])


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
    # lower bounds that are values a curve can have, not where an optimiser stopped (see _LawFit.at_bounds)
    attainable_lower: tuple[str, ...] = ()

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
    # L_inf = 0 is a pure power law: a run still far from its floor over the horizon (the CPU study's curves are
    # straight lines in log-log), which the data chose. Counting it as a bound dropped the windows that saw that.
    attainable_lower = ("l_inf",)

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
           max_nfev: int = 300, tol: float = 1e-10) -> tuple[np.ndarray, float]:
    """Robust nonlinear least squares (scipy ``least_squares``, trust-region reflective, analytic Jacobian).

    Minimises ``Σ Huber_delta(sqrt(w)·(log L̂ - log L))`` plus the Gaussian prior ``½ Σ prec·(z - mu)²`` (prior rows
    are exempt from the Huber loss) from each start and returns the best ``(z, objective)``. ``tol`` is scipy's
    ``xtol``/``ftol``/``gtol``.
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
                    max_nfev=max_nfev, xtol=tol, ftol=tol, gtol=tol)
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
        candidates: tail-validation error (mean |log error| on the held-out tail) of every candidate tried.
        warm_state: the typed :class:`ForecastState` a refit of the same run reuses (``init=``); ``state`` is
            the same as a dict.

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
    warm_state: ForecastState | None = field(default=None, repr=False, compare=False)

    @property
    def state(self) -> dict[str, Any]:
        """The warm-start state as a plain dict (the pre-0.2 interface; prefer :attr:`warm_state`)."""
        return self.warm_state.as_dict() if self.warm_state is not None else {}

    def _curve(self, bound: str) -> np.ndarray:
        if bound not in ("mean", "lower", "upper"):
            raise ValueError(f"bound must be 'mean', 'lower' or 'upper', got {bound!r}")
        return {"mean": self.loss, "lower": self.lower, "upper": self.upper}[bound]

    def steps_to(self, loss: float, *, bound: str = "mean") -> float:
        """First step at which the forecast (or its ``lower``/``upper`` bound) reaches ``loss``.

        Returns the first observed step at which the observed loss, averaged over it and the bins before it (5% of
        the observed bins, at least 3: the span of a final loss), was at or below ``loss`` when it was already
        reached; the linearly interpolated future step otherwise; ``inf`` when not reached by ``horizon``. One noisy
        bin below ``loss`` does not count as reaching it.
        """
        curve = self._curve(bound)
        if not math.isfinite(loss):
            raise ValueError(f"loss must be finite, got {loss}")
        hit = np.nonzero(_trailing_mean(self.observed_loss, FINAL_FRACTION) <= loss)[0]
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
        """A JSON-serialisable dict: arrays as lists, non-finite floats as ``"NaN"``/``"Infinity"`` (the package's one
        convention, :func:`lightning_scaling.numerics.to_jsonable`)."""
        return to_jsonable({f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "warm_state"})


def _trailing_mean(y: np.ndarray, share: float, least: int = 3) -> np.ndarray:
    """Mean of each point with the points before it, over ``share`` of the (equal-width) bins, at least ``least``;
    NaN where fewer points came before."""
    y = np.asarray(y, dtype=np.float64)
    k = min(max(least, math.ceil(share * y.size)), y.size)
    out = np.full(y.size, np.nan)
    if k:
        c = np.concatenate([[0.0], np.cumsum(y)])
        out[k - 1:] = (c[k:] - c[:-k]) / k
    return out


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
        self._cache: dict[bytes, dict] = {}

    def design(self, steps: np.ndarray) -> dict:
        # the forecast grid's design is needed by the prediction and by the band: build it once
        key = np.asarray(steps).tobytes()
        if key not in self._cache:
            if len(self._cache) > 32:  # the fit windows of every candidate of this form, the grid, the tails
                self._cache.clear()
            self._cache[key] = self._build(np.asarray(steps, dtype=np.int64))
        return self._cache[key]

    def _build(self, steps: np.ndarray) -> dict:
        if self.form == "power":
            return _Power.design(self.s_eff(steps))
        _as_steps(steps, self.lr.size)
        if self.form == "mpl":  # the schedule's prefix sums are shared by every refit of the run
            return _mpl_blocks(self.lr, steps, sums=_schedule_cached("mpl", self.lr, lambda: _mpl_sums(self.lr)))
        c1, c2 = _schedule_cached("momentum", self.lr, lambda: _momentum_cums(self.lr, self.lam, None), self.lam)
        return {"S1": c1[steps], "S2": c2[steps], "n": steps.size}


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


# ----------------------------------------------------------------------------------------------------------------
# forecast_run in named stages: prepare -> fit candidates -> combine -> calibrate -> package
# ----------------------------------------------------------------------------------------------------------------
# Combination weights are ∝ 1/(held-out tail error + _WEIGHT_FLOOR)² (tail errors in mean |log loss|): the floor
# keeps a candidate that happens to hit a short tail exactly from taking all the weight.
_WEIGHT_FLOOR = 1e-4  # chosen leave-one-dataset-out (benchmarks/forecast_accuracy.py --sections lodo)
_MIN_WEIGHT = 0.02          # candidates below this share are dropped (and not refitted warm)
_BOUNDS_WIDEN = 2.0         # model-error term of a fit with a parameter on a bound (not evidence: widen instead)
# Reference collapse: log L(f) = a + b·log L_ref(f) at the same fraction f of each run's horizon, b ~ N(1, sd²)
# (b = 1 keeps the log gap), fitted on the latest _REF_WINDOW of the observed post-warmup span (the slope sd was
# chosen leave-one-dataset-out; the window a priori).
_REF_SLOPE_SD = 0.1
_REF_WINDOW = 0.5
# Annealing prior: a full anneal is expected to buy about this fraction of the run's current loss (a priori), and
# is never forecast to buy more than _MAX_GAIN_FRAC of it (chosen leave-one-dataset-out among 0.05-0.5 and none).
# The same share credits the L(S) candidate of a decayed schedule with the anneal still to come, and is the band's
# uncertainty of that gain (3% +- 3%). The credit was checked leave-one-dataset-out among 3/5/8% on the forecast
# replays and the Gemstones cooldowns: 3% for three datasets of four.
_ANNEAL_FRAC = 0.03
_MAX_GAIN_FRAC = 0.2
# Optimiser tolerance and evaluation budget of fits from grid starts and from a previous fit of the same run
# (a priori, checked on the suite: the forecasts move far less than their bands; a noisy prefix whose MPL is not
# identified otherwise wanders over a flat valley for hundreds of evaluations)
_COLD_TOL, _COLD_NFEV = 1e-8, 100
# A warm refit re-optimises only the candidates with at least this weight (a priori; the others move the
# combination by their small weight times how far new points would move them, and revalidations refit all)
_WARM_REFIT_MIN = 0.15
_WARM_TOL, _WARM_NFEV = 1e-6, 30


@dataclass(frozen=True)
class ForecastState:
    """What a refit of the same run reuses (``forecast_run(init=previous)``).

    Attributes:
        method: the candidate form with the largest weight (``"mpl"``, ``"momentum"``, ``"power"``, ``"reference"``).
        weights: combination weight of each kept candidate (keys such as ``"mpl"``, ``"power@0.25"``, ``"ref0"``).
        params: fitted parameters of each kept candidate (the warm starts).
        validation_error: weighted held-out tail error (mean |log error|) of the kept candidates.
        q_model: backtest-calibrated model-error slope per unit of log extrapolation distance (NaN: none).
        sigma: residual scale (log loss) of the top candidate's fit.
        warmup: end of warmup (step).
        n_warm: consecutive warm refits since the last cold one; cold_until: observed step of the last cold one.
        warm: whether this forecast was a warm refit.
        target_loss: the caller's loss of interest.

    Example::

        >>> ForecastState(method="power", weights={"power@0": 1.0}).as_dict()["s0_frac"]
        0.0
    """

    method: str
    weights: dict[str, float] = field(default_factory=dict)
    params: dict[str, dict[str, float]] = field(default_factory=dict)
    validation_error: float = float("nan")
    q_model: float = float("nan")
    sigma: float = float("nan")
    warmup: int = 0
    n_warm: int = 0
    cold_until: int = 0
    warm: bool = False
    target_loss: float | None = None

    def as_dict(self) -> dict[str, Any]:
        """The pre-0.2 ``Forecast.state`` dict (``s0_frac``: window of the top candidate; ``kappa`` is 1)."""
        top = max(self.weights, key=self.weights.get) if self.weights else ""
        frac = float(top.split("@")[1]) if "@" in top else 0.0
        return {"kappa": 1.0, "validation_error": self.validation_error, "s0_frac": frac, "sigma": self.sigma,
                "warmup": self.warmup, "target_loss": self.target_loss, "q_model": self.q_model,
                "n_warm": self.n_warm, "cold_until": self.cold_until, "warm": self.warm,
                "weights": dict(self.weights)}


@dataclass
class _Curve:
    """Stage 1 output: the observed curve binned after warmup, the schedule and what the fits need."""

    bs: np.ndarray
    by: np.ndarray
    bw: np.ndarray
    lr: np.ndarray | None
    horizon: int
    w_end: int
    n_obs: int
    n_nonfinite: int
    observed_until: int
    forms: list[str]
    lawp: dict[str, float]
    bcrit_fn: Callable[[np.ndarray], np.ndarray] | None
    batch: float | None
    tokens_per_step: float

    @property
    def t_first(self) -> int:
        return int(self.bs[0])

    @property
    def t_obs(self) -> int:
        return int(self.bs[-1])


@dataclass(frozen=True)
class _Opts:
    delta: float
    lam: float
    holdout: float
    validate: bool
    exclude_transient: bool
    confidence: float
    tail_scale: float = 3e-3  # noise scale that converts prior widths into Huber units


class _LawFit:
    """One schedule-aware (or L(S)) law fitted to a window of the binned curve."""

    def __init__(self, prob: _Problem, curve: _Curve, sel: np.ndarray, opts: _Opts, init: np.ndarray | None,
                 n_starts: int = 2, optimise: bool = True):
        self.prob, self.curve, self.sel = prob, curve, sel
        self.fixed = _fixed_for(prob.form, curve.lawp)
        self.des = prob.design(curve.bs[sel])
        scale = _anneal_scale(curve)
        self.prior = _prior_for(prob.form, scale, opts.lam, opts.tail_scale)
        y, w = curve.by[sel], curve.bw[sel]
        inits = [init] if init is not None else _grid_inits(prob.form, [self.des], [y], [w], self.fixed,
                                                            n_best=n_starts)
        # a start from a previous fit of the same run is already near the optimum: a looser tolerance and budget
        # stop the optimiser once the forecast no longer moves instead of polishing digits far below the band
        warm = init is not None
        if warm and not optimise:  # a minor candidate of a warm refit keeps its parameters (see _fit_candidates)
            self.z = np.asarray(init, dtype=np.float64)
        else:
            self.z, _ = _fit_z(prob.form, [self.des], [y], [w], delta=opts.delta, inits=inits, fixed=self.fixed,
                               prior=self.prior, max_nfev=_WARM_NFEV if warm else _COLD_NFEV,
                               tol=_WARM_TOL if warm else _COLD_TOL)
        self.prior3 = None if self.prior is None else (self.prior[0], self.prior[1], opts.tail_scale)
        self._raw: dict[bytes, np.ndarray] = {}
        self._gain_cache: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}

    def raw(self, steps: np.ndarray) -> np.ndarray:
        """The uncapped prediction at ``steps`` (cached: predict, wild and capped all need it on the same grid)."""
        key = np.asarray(steps).tobytes()
        if key not in self._raw:
            if len(self._raw) > 8:
                self._raw.clear()
            pred = self.prob.cls.predict(self.z, self.prob.design(steps))[0]
            self._raw[key] = pred * self._expected_anneal(steps) if self.prob.form == "power" else pred
        return self._raw[key]

    def _expected_anneal(self, steps: np.ndarray) -> np.ndarray:
        """Factor the L(S) form's forecast gets for LR decay still to come after its window: the prior's gain.

        The schedule-blind law cannot see a planned decay; as a candidate for a decayed schedule it is credited
        with the annealing prior's expected gain (a full anneal buys ``_ANNEAL_FRAC`` of the loss, in proportion to
        the share of the peak LR decayed after the window), so it stays a fair fallback and not a biased one. At
        constant LR the factor is 1.
        """
        lr = self.prob.lr
        if lr is None:
            return np.ones(np.shape(steps))
        end = int(self.curve.bs[self.sel][-1])
        eta = lr[np.clip(np.asarray(steps, dtype=np.int64) - 1, 0, lr.size - 1)]
        share = np.maximum(lr[min(end, lr.size) - 1] - eta, 0.0) / lr.max()
        return np.exp(-_ANNEAL_FRAC * np.where(np.asarray(steps) > end, share, 0.0))

    @property
    def params(self) -> dict[str, float]:
        return self.prob.cls.from_z(self.z)

    def predict(self, steps: np.ndarray) -> np.ndarray:
        pred = self.raw(steps)
        return pred + self.excess_gain(steps)

    def excess_gain(self, steps: np.ndarray) -> np.ndarray:
        """How far the predicted annealing gain beyond the fit window exceeds what the schedule can support.

        The gain is the annealing term's contribution (MPL ``B·LD``, momentum ``C·S2``) added since the window's
        last point; it may not exceed ``_MAX_GAIN_FRAC`` of the loss there times the share of the peak LR still
        to be decayed (a full anneal buys a few per cent of the loss on every dataset of the suite; a fit that
        promises 60% has extrapolated its annealing amplitude, not measured it).
        """
        g, g_max = self._gains(steps)
        return np.maximum(g - g_max, 0.0)

    def wild(self, steps: np.ndarray) -> bool:
        """The uncapped forecast is no loss (not positive) or wants over twice the supportable annealing gain."""
        pred = self.raw(steps)
        if not np.all(np.isfinite(pred) & (pred > 0)):
            return True
        g, g_max = self._gains(steps, whole_drop=True)
        return bool(np.any(g > 2.0 * g_max + 1e-12))

    def _gains(self, steps: np.ndarray, whole_drop: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(annealing gain forecast beyond the fit window, the most the schedule supports) at ``steps``."""
        lr, form = self.prob.lr, self.prob.form
        if form == "power" or lr is None or not math.isfinite(_MAX_GAIN_FRAC):
            return np.zeros(np.shape(steps)), np.full(np.shape(steps), np.inf)
        key = (np.asarray(steps).tobytes(), whole_drop, _MAX_GAIN_FRAC)
        if key not in self._gain_cache:  # predict, wild and capped ask for the same grid
            self._gain_cache[key] = self._gains_uncached(steps, whole_drop)
        return self._gain_cache[key]

    def _gains_uncached(self, steps: np.ndarray, whole_drop: bool) -> tuple[np.ndarray, np.ndarray]:
        lr, form, pred = self.prob.lr, self.prob.form, self.raw(steps)
        z0 = self.z.copy()
        z0[3] = -50.0 if form == "mpl" else 0.0     # no annealing term (log B -> -inf, C = 0)
        end = int(self.curve.bs[self.sel][-1])
        d_end = self.prob.design(np.array([end]))
        g_end = self.prob.cls.predict(z0, d_end)[0][0] - self.prob.cls.predict(self.z, d_end)[0][0]
        g = self.prob.cls.predict(z0, self.prob.design(steps))[0] - pred - g_end
        eta = lr[np.clip(np.asarray(steps, dtype=np.int64) - 1, 0, lr.size - 1)]
        # the cap counts the drop still to come; refusing a fit as wild counts the whole drop from the peak: after
        # a step drop (two-stage or WSD schedules) the loss keeps falling toward its new level for a while, a gain
        # the past drop supports (without this every two-stage MPL curve was refused after its drop)
        top = lr.max() if whole_drop else lr[end - 1]
        g_max = _MAX_GAIN_FRAC * float(self.curve.by[self.sel][-1]) * np.maximum(top - eta, 0.0) / lr.max()
        return np.where(np.asarray(steps) > end, g, 0.0), g_max

    def log_sd(self, steps: np.ndarray) -> tuple[np.ndarray, float]:
        c = self.curve
        return _laplace_sd(self.prob, self.z, self.des, c.by[self.sel], c.bw[self.sel], self.fixed, self.prior3,
                           self.prob.design(steps))

    def capped(self, steps: np.ndarray) -> bool:
        """Whether the annealing-gain cap changed the forecast at ``steps``."""
        return bool(np.any(self.excess_gain(steps) > 0))

    def at_bounds(self) -> bool:
        """A free parameter on (within 1e-6 of) a finite bound: the data did not determine it. Lower bounds in the
        form's ``attainable_lower`` (L(S)'s ``l_inf = 0``, a pure power law) do not count. Decides both whether
        the candidate is combined (:func:`_drop_at_bounds`) and whether the band's model error is doubled."""
        free = np.array([k not in self.fixed for k in self.prob.cls.names])
        zb = np.array([[np.nan if b is None else b for b in bb] for bb in self.prob.cls.zbounds()], dtype=float)
        attainable = np.array([k in self.prob.cls.attainable_lower for k in self.prob.cls.names])
        with np.errstate(invalid="ignore"):
            near = ((np.abs(self.z - zb[:, 0]) < 1e-6) & ~attainable) | (np.abs(self.z - zb[:, 1]) < 1e-6)
        return bool(np.any(near & free))


class _RefFit:
    """Curve collapse on one finished reference run: ``log L(f) = a + b·log L_ref(f)``, ``b ~ N(1, sd²)``."""

    def __init__(self, ref_f: np.ndarray, ref_ly: np.ndarray, curve: _Curve, sel: np.ndarray, slope_sd: float):
        self.ref_f, self.ref_ly, self.horizon = ref_f, ref_ly, curve.horizon
        x, y = self.x(curve.bs[sel]), np.log(curve.by[sel])
        xm, ym = float(x.mean()), float(y.mean())
        sxx, sxy = float(np.sum((x - xm) ** 2)), float(np.sum((x - xm) * (y - ym)))
        s2 = max(float(np.var(y - ym - (x - xm))), 1e-10)  # residual variance of the keep-log-gap fit (b = 1)
        lam = s2 / slope_sd ** 2
        self.b = (sxy + lam) / (sxx + lam)
        self.a = ym - self.b * xm
        self.xm, self.n, self.sxx, self.lam, self.x_end = xm, x.size, sxx, lam, float(x[-1])
        self.sigma = max(math.sqrt(max(float(np.mean((y - self.a - self.b * x) ** 2)), 1e-12)), 1e-5)

    def x(self, steps: np.ndarray) -> np.ndarray:
        return np.interp(np.asarray(steps, dtype=np.float64) / self.horizon, self.ref_f, self.ref_ly)

    @property
    def params(self) -> dict[str, float]:
        return {"a": self.a, "b": self.b}

    def predict(self, steps: np.ndarray) -> np.ndarray:
        return np.exp(self.a + self.b * self.x(steps))

    def log_sd(self, steps: np.ndarray) -> tuple[np.ndarray, float]:
        # posterior sd of a + b·x (intercept at the window mean, slope shrunk by the prior), and how far the fitted
        # slope moved the forecast away from keeping the log gap (b = 1): a slope from a short window is a guess
        x = self.x(steps)
        post = self.sigma ** 2 * (1.0 / self.n + (x - self.xm) ** 2 / (self.sxx + self.lam))
        moved = ((self.b - 1.0) * (x - self.x_end)) ** 2
        return np.sqrt(post + moved), self.sigma

    def at_bounds(self) -> bool:
        return False

    def capped(self, steps: np.ndarray) -> bool:
        return False

    def wild(self, steps: np.ndarray) -> bool:
        return False


def _fixed_for(form: str, lawp: Mapping[str, float]) -> dict[str, float]:
    """Parameters a prior law from smaller runs holds fixed (see ``forecast_run(law=...)``)."""
    fx: dict[str, float] = {}
    if "alpha_s" in lawp:
        fx["alpha" if form != "power" else "alpha_s"] = lawp["alpha_s"]
    for k in {"mpl": ("alpha", "beta", "gamma", "C"), "momentum": ("alpha",), "power": ()}[form]:
        if k in lawp:
            fx[k] = lawp[k]
    return fx


def _anneal_scale(curve: _Curve) -> float:
    """Peak LR divided by the expected full-anneal gain, so the prior is relative to the run's own loss scale."""
    eta_max = float(curve.lr.max()) if curve.lr is not None else 1.0
    return eta_max * 0.1 / (_ANNEAL_FRAC * float(curve.by[-1]))


# ---------------------------------------------------------------------------------------------- stage 1: prepare
def _prepare(history: Any, horizon: int | None, lr_schedule: ArrayLike | None, *, method: str, law: Any,
             min_points: int, min_fraction: float, max_bins: int, critical_batch: float | None) -> _Curve:
    """Validate the history, find the warmup, bin the post-warmup curve and choose the candidate forms."""
    steps_all = np.asarray(history.step, dtype=np.int64)
    loss_all = np.asarray(history.loss, dtype=np.float64)
    if steps_all.size == 0:
        raise ValueError("the history is empty: nothing to forecast")
    finite = np.isfinite(loss_all)
    if np.any(loss_all[finite] <= 0):
        raise ValueError("losses must be positive (the fit is on log loss)")
    lr = lr_schedule if lr_schedule is not None else getattr(history, "planned_lr", None)
    lr = None if lr is None else _as_lr(lr)
    if horizon is None:
        if lr is None:
            raise ValueError("`horizon` is required when no LR schedule is given or recorded")
        horizon = int(lr.size)
    horizon = int(horizon)
    if lr is not None and lr.size < horizon:
        raise ValueError(f"the LR schedule covers {lr.size} steps but horizon is {horizon}")
    w_end = _warmup_end(history, lr, steps_all)
    use = finite & (steps_all >= max(w_end, 1))
    n_obs = int(use.sum())
    if n_obs < min_points:
        raise ValueError(f"too little of the curve seen: {n_obs} finite points after warmup (step {w_end}), "
                         f"need at least {min_points}")
    observed_until = int(steps_all[-1])
    if observed_until < min_fraction * horizon:
        raise ValueError(f"too little of the curve seen: step {observed_until} < {min_fraction:.0%} of {horizon}")
    bs, by, bc = _bin_curve(steps_all[use], loss_all[use], max_bins)
    if bs.size < 8:
        raise ValueError(f"too little of the curve seen: {bs.size} distinct windows after warmup, need 8")
    lawp = _law_params(law)
    batch = getattr(history, "batch_size", None)
    return _Curve(bs=bs, by=by, bw=bc / bc.mean(), lr=lr, horizon=horizon, w_end=w_end, n_obs=n_obs,
                  n_nonfinite=int(np.sum(~finite)), observed_until=observed_until,
                  forms=_forms_for(method, lr, horizon), lawp=lawp,
                  bcrit_fn=_bcrit_fn(batch, critical_batch, lawp), batch=batch,
                  tokens_per_step=_tokens_per_step(history, steps_all))


def _warmup_end(history: Any, lr: np.ndarray | None, steps: np.ndarray) -> int:
    """End of warmup: from the schedule, else from the recorded LR, else 0."""
    if lr is not None:
        return warmup_steps(lr)
    rec = np.asarray(getattr(history, "lr", None) if getattr(history, "lr", None) is not None
                     else np.full(steps.size, np.nan), dtype=np.float64)
    okr = np.isfinite(rec)
    return int(steps[okr][warmup_steps(rec[okr])]) if okr.sum() > 2 and rec[okr].max() > 0 else 0


def _forms_for(method: str, lr: np.ndarray | None, horizon: int) -> list[str]:
    """Candidate forms: the schedule-aware pair for a schedule that varies after warmup, else L(S)."""
    if method == "power" or lr is None:
        return ["power"]
    if method != "auto":
        return [method]
    post = lr[warmup_steps(lr):horizon]
    # the schedule-blind L(S) form stays a candidate for decayed schedules: when both schedule-aware fits go wrong
    # (parameters on bounds, an annealing amplitude the prefix cannot pin down) the combination falls back on it
    return ["power"] if post.size == 0 or post.max() <= 1.02 * post.min() else ["mpl", "momentum", "power"]


def _bcrit_fn(batch: Any, critical_batch: float | None, lawp: Mapping[str, float]):
    """B_crit(L) for the S_min conversion of the L(S) form, when a batch size and B_crit are known."""
    if batch is None:
        return None
    if critical_batch is not None:
        return lambda L: np.full(np.shape(L), float(critical_batch))
    if "b_star" in lawp and "alpha_b" in lawp:
        return lambda L: laws.critical_batch(L, b_star=lawp["b_star"], alpha_b=lawp["alpha_b"])
    return None


def _tokens_per_step(history: Any, steps: np.ndarray) -> float:
    tps = getattr(history, "tokens_per_step", None)
    if isinstance(tps, (int, float)) and math.isfinite(tps):
        return float(tps)
    tok = getattr(history, "tokens", None)
    tok = np.asarray(tok if tok is not None else np.full(steps.size, np.nan), dtype=np.float64)
    okt = np.isfinite(tok) & (steps > 0)
    return float(tok[okt][-1] / steps[okt][-1]) if okt.any() else float("nan")


def _problem(form: str, curve: _Curve, lam: float) -> _Problem:
    """A form's design on this run (for L(S) with a known B_crit: in S_min at the smoothed observed loss)."""
    if form == "power" and curve.bcrit_fn is not None:
        lvl, bs, by, fn = float(curve.by[-1]), curve.bs, curve.by, curve.bcrit_fn

        def s_eff(st: np.ndarray) -> np.ndarray:
            return laws.s_min(st, curve.batch, fn(np.interp(st, bs, by, right=lvl)))
    else:
        def s_eff(st: np.ndarray) -> np.ndarray:
            return st.astype(np.float64)
    # L(S) sees the schedule only as a candidate beside the schedule-aware laws (its expected-anneal credit, see
    # _LawFit._expected_anneal); asked for alone (method="power") it stays schedule-blind
    lr = curve.lr if form != "power" or len(curve.forms) > 1 else None
    return _Problem(form, lr, lam, s_eff)


def _reference_curves(reference: Any) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each finished reference run as (fraction of its horizon, smoothed log loss), its horizon its last step."""
    if reference is None:
        return []
    refs = [reference] if hasattr(reference, "loss") else list(reference)
    out = []
    for i, r in enumerate(refs):
        if not (hasattr(r, "step") and hasattr(r, "loss")):
            raise ValueError(f"reference[{i}] must be a RunHistory (with step and loss), got {type(r).__name__}")
        s, y = np.asarray(r.step, dtype=np.int64), np.asarray(r.loss, dtype=np.float64)
        ok = np.isfinite(y) & (y > 0)
        if ok.sum() < 8 or s[-1] <= 0:
            raise ValueError(f"reference[{i}] has {int(ok.sum())} finite positive losses, need at least 8")
        rs, ry, _ = _bin_curve(s[ok], y[ok], 256)
        out.append((rs / float(s[-1]), np.log(ry)))
    return out


# ------------------------------------------------------------------------------------- stage 2: fit candidates
def _law_windows(curve: _Curve, opts: _Opts) -> list[tuple[str, str, float]]:
    """(key, form, window start fraction) of every law candidate."""
    out = []
    for form in curve.forms:
        fracs = (0.0, 0.1, 0.25, 0.4) if (form == "power" and opts.exclude_transient) else (0.0,)
        out += [(form if form != "power" else f"power@{f:g}", form, f) for f in fracs]
    return out


def _tail_split(curve: _Curve, holdout: float) -> tuple[int, np.ndarray]:
    t_val = int(round(curve.t_first + (1 - holdout) * (curve.t_obs - curve.t_first)))
    return t_val, curve.bs > t_val


def _fitter(key: str, form: str, frac: float, curve: _Curve, opts: _Opts, refs: list,
            prob: _Problem | None = None):
    """A function (end step, init) -> fit on the candidate's window of the binned points up to that step.

    ``prob``: the form's problem, shared by all of its windows (its design cache holds the forecast grid's design).
    """
    if form == "reference":
        ref = refs[int(key[3:])]

        def fit_ref(end: float, init: Any = None, **_: Any) -> _RefFit:  # closed form: no starts, no optimiser
            lo = curve.t_first + (1 - _REF_WINDOW) * (end - curve.t_first)
            sel = (curve.bs >= lo) & (curve.bs <= end)
            if sel.sum() < 4:
                raise ValueError("too few points in the reference window")
            return _RefFit(ref[0], ref[1], curve, sel, _REF_SLOPE_SD)
        return fit_ref
    prob = prob if prob is not None else _problem(form, curve, opts.lam)

    def fit_law(end: float, init: Any = None, n_starts: int = 2, optimise: bool = True) -> _LawFit:
        sel = (curve.bs >= curve.t_first + frac * (end - curve.t_first)) & (curve.bs <= end)
        if sel.sum() < 8:
            raise ValueError("too few points in the window")
        z0 = prob.cls.to_z(init) if init is not None and all(k in init for k in prob.cls.names) else None
        return _LawFit(prob, curve, sel, opts, z0, n_starts=n_starts, optimise=optimise)
    return fit_law


_FIT_ERRORS = (ValueError, FloatingPointError, np.linalg.LinAlgError)


def _fit_candidates(curve: _Curve, opts: _Opts, refs: list, st0: ForecastState | None,
                    warm: bool) -> tuple[dict[str, Any], dict[str, float], dict[str, Callable]]:
    """Fit every candidate (cold: held-out tail error first, then the whole window; warm: the kept ones only).

    Returns the fits, the held-out tail errors (NaN when not validated) and the fitters (for the backtests).
    """
    if refs:
        specs = [(f"ref{i}", "reference", 0.0) for i in range(len(refs))]
    else:
        specs = _law_windows(curve, opts)
    if warm:
        specs = [s for s in specs if s[0] in st0.weights]
    probs = {form: _problem(form, curve, opts.lam) for _, form, _ in specs if form != "reference"}
    fitters = {k: _fitter(k, form, frac, curve, opts, refs, probs.get(form)) for k, form, frac in specs}
    t_val, tail = _tail_split(curve, opts.holdout)
    errs: dict[str, float] = {}
    fits: dict[str, Any] = {}
    can_validate = opts.validate and tail.sum() >= 2 and (~tail).sum() >= 8 and not warm
    for key, fitter in fitters.items():
        init = st0.params.get(key) if st0 is not None else None
        try:
            if can_validate:
                pre = fitter(t_val, None)
                e = np.abs(np.log(pre.predict(curve.bs[tail])) - np.log(curve.by[tail]))
                errs[key] = float(np.average(e, weights=curve.bw[tail]))
                init = pre.params if init is None else init
            # warm: candidates below _WARM_REFIT_MIN of the weight keep their parameters until the next cold fit
            major = not warm or st0.weights.get(key, 0.0) >= _WARM_REFIT_MIN
            fits[key] = fitter(curve.t_obs, init, optimise=major)
        except _FIT_ERRORS:
            continue
    if not fits:
        raise ValueError("every candidate fit failed: the observed curve does not determine where it is heading")
    return fits, errs, fitters


# -------------------------------------------------------------------------------------------- stage 3: combine
def _drop_wild(fits: dict[str, Any], grid: np.ndarray) -> dict[str, Any]:
    """Leave out candidates whose uncapped forecast is not a loss or far beyond the supportable annealing gain
    (their parameters are not evidence); refuse when none is left."""
    kept = {k: f for k, f in fits.items() if not f.wild(grid)}
    if not kept:
        raise ValueError(f"every candidate ({', '.join(fits)}) gave an unusable forecast: the observed curve does "
                         "not determine where it is heading (too short, too noisy, or not a falling power law)")
    return kept


def _drop_at_bounds(fits: dict[str, Any]) -> dict[str, Any]:
    """Leave out candidates with a free parameter on its bound, unless every candidate has one: a bound is where
    the optimiser stopped, not what the data says (an MPL with ``L0 = 0`` promises a loss that falls forever)."""
    kept = {k: f for k, f in fits.items() if not f.at_bounds()}
    return kept or fits


def _weights(fits: Mapping[str, Any], errs: Mapping[str, float], st0: ForecastState | None,
             warm: bool, validate: bool, floor: float = _WEIGHT_FLOOR) -> dict[str, float]:
    """Weights ∝ 1/(tail error + floor)²; warm refits keep the last weights; no validation: the first fit."""
    if warm:
        w = {k: st0.weights[k] for k in fits}
    elif validate and any(k in errs for k in fits):
        w = {k: 1.0 / (errs[k] + floor) ** 2 for k in fits if k in errs and math.isfinite(errs[k])}
    else:
        w = {next(iter(fits)): 1.0}
    tot = sum(w.values())
    w = {k: v / tot for k, v in w.items() if v / tot >= _MIN_WEIGHT}
    tot = sum(w.values())
    return {k: v / tot for k, v in w.items()}


def _combine(fits: Mapping[str, Any], weights: Mapping[str, float], grid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Weighted mean of the candidates' log forecasts and their weighted spread (disagreement), per grid step."""
    lp = np.stack([np.log(fits[k].predict(grid)) for k in weights])
    w = np.array([weights[k] for k in weights])[:, None]
    mean = np.sum(w * lp, axis=0)
    spread = np.sqrt(np.sum(w * (lp - mean) ** 2, axis=0))
    return np.exp(mean), spread


# ------------------------------------------------------------------------------------------ stage 4: calibrate
def _calibrate(curve: _Curve, fitter: Callable, confidence: float) -> float:
    """Split-conformal model-error slope: refit on earlier sub-prefixes ending at ``cut`` and take the
    ``confidence`` quantile of each later observed point's |log error| per unit of log distance log(t/cut)."""
    scores = []
    for f_cut in _BACKTEST_CUTS:
        cut = curve.t_first + f_cut * (curve.t_obs - curve.t_first)
        later = curve.bs > cut
        if later.sum() < 2:
            continue
        try:
            fb = fitter(cut, None, n_starts=1)  # the band's slope is a quantile of errors, not one fit's optimum
        except _FIT_ERRORS:
            continue
        dist = np.log(curve.bs[later] / float(curve.bs[curve.bs <= cut][-1]))
        far = dist >= 0.5 * dist.max()  # near the cut the score is noise over a tiny distance
        pb = fb.predict(curve.bs[later][far])
        scores.append(np.abs(np.log(pb) - np.log(curve.by[later][far])) / dist[far])
    sc = np.concatenate(scores) if scores else np.zeros(0)
    sc = sc[np.isfinite(sc)]
    if not sc.size:
        return float("nan")
    return float(np.quantile(sc, min(1.0, math.ceil((sc.size + 1) * confidence) / sc.size)))


def _half_width(curve: _Curve, top: Any, grid: np.ndarray, spread: np.ndarray, q_model: float, e_val: float,
                opts: _Opts) -> tuple[np.ndarray, float]:
    """Log half-width: parameter sd, model error growing with log distance, and the candidates' disagreement."""
    sd, sigma = top.log_sd(grid)
    zq = stats.norm.ppf(0.5 + opts.confidence / 2)
    dist = np.log(np.maximum(grid, curve.t_obs) / curve.t_obs)
    if math.isfinite(q_model):
        e_model = q_model * dist
    else:  # no backtest possible: the held-out tail error per unit log distance
        t_val, _ = _tail_split(curve, opts.holdout)
        e_v = e_val if math.isfinite(e_val) else 0.0
        e_model = e_v * dist / max(math.log(curve.t_obs / max(t_val, 1)), 1e-6)
    if top.at_bounds() or top.capped(grid[-1:]):  # undetermined by the data: widen, do not trust
        e_model = _BOUNDS_WIDEN * e_model
    e_anneal = np.zeros(grid.size) if isinstance(top, _RefFit) else _anneal_uncertainty(curve, grid)
    return np.sqrt((zq * sd) ** 2 + e_model ** 2 + (zq * spread) ** 2 + e_anneal ** 2), sigma


def _anneal_uncertainty(curve: _Curve, grid: np.ndarray) -> np.ndarray:
    """Log-loss uncertainty of the annealing gain still to come: ``_ANNEAL_FRAC`` times the share of the peak LR
    decayed after the last observed step. No prefix measures the gain of a decay it has not seen (nor can the
    backtests, whose futures lie inside the observed part), so the band carries the prior's spread of it."""
    if curve.lr is None or len(curve.forms) < 2:  # constant LR or an explicit method
        return np.zeros(grid.size)
    lr = curve.lr
    eta = lr[np.clip(grid - 1, 0, lr.size - 1)]
    now = lr[min(curve.observed_until, lr.size) - 1]
    return _ANNEAL_FRAC * np.maximum(now - eta, 0.0) / lr.max()


# -------------------------------------------------------------------------------------------- stage 5: package
def _package(curve: _Curve, grid: np.ndarray, pred: np.ndarray, half: np.ndarray, top_key: str, fits: dict,
             errs: dict, state: ForecastState, confidence: float) -> Forecast:
    lower, upper = pred * np.exp(-half), pred * np.exp(half)
    return _checked_forecast(steps=grid, loss=pred, lower=lower, upper=upper, final_loss=float(pred[-1]),
                             final_lower=float(lower[-1]), final_upper=float(upper[-1]), horizon=curve.horizon,
                             method=state.method, params=dict(fits[top_key].params), n_observed=curve.n_obs,
                             observed_until=curve.observed_until, tokens_per_step=curve.tokens_per_step,
                             n_nonfinite=curve.n_nonfinite, confidence=confidence,
                             validation_error=state.validation_error, observed_steps=curve.bs,
                             observed_loss=curve.by, candidates=dict(errs), warm_state=state)


def _is_warm(init: Forecast | None, curve: _Curve, revalidate_every: int, n_refs: int) -> tuple[bool, int, int]:
    """Whether a refit may reuse ``init``'s candidates, weights and band calibration; (warm, n_warm, cold_until).

    The full (cold) validation is redone every ``revalidate_every``-th call and whenever the observed post-warmup
    span grew by more than 25% since the last one.
    """
    st0 = init.warm_state if init is not None else None
    if st0 is None or not st0.weights:
        return False, 0, curve.observed_until
    n_warm = st0.n_warm + 1
    kinds_match = all(k.startswith("ref") for k in st0.weights) == (n_refs > 0)
    grew = (curve.observed_until - curve.w_end) > 1.25 * max(st0.cold_until - curve.w_end, 1)
    if (kinds_match and n_warm < revalidate_every and not grew and math.isfinite(st0.q_model)
            and (n_refs > 0 or all(k.split("@")[0] in curve.forms for k in st0.weights))):
        return True, n_warm, st0.cold_until
    return False, 0, curve.observed_until


def forecast_run(history: Any, horizon: int | None = None, lr_schedule: ArrayLike | None = None, *,
                 law: Any = None, target_loss: float | None = None, confidence: float = 0.9,
                 method: str = "auto", min_points: int = 8, min_fraction: float = 0.0,
                 critical_batch: float | None = None, init: Forecast | None = None, max_bins: int = 96,
                 grid_points: int = 256, validate: bool = True, holdout: float = 0.25, delta: float = 1e-3,
                 lam: float = 0.999, revalidate_every: int = 10, exclude_transient: bool = True,
                 reference: Sequence[Any] | None = None) -> Forecast:
    """Forecast the rest of one run's loss curve from its observed prefix.

    Five stages (``docs/forecast.md``): **prepare** (points before the end of warmup are never fitted; non-finite
    losses are excluded and counted; the rest is averaged in ``max_bins`` windows of log loss, spikes clipped);
    **fit candidates**; **combine**; **calibrate** the band; **package** the :class:`Forecast`.

    Candidates (``method="auto"``): the L(S) form (:func:`lightning_scaling.laws.loss_steps`, in steps or, when a
    critical batch size is known, in ``S_min = S / (1 + B_crit/B)``) from four window starts (0, 10, 25, 40% into
    the observed span, which lets the fit leave out an early transient) and, with a planned schedule that is not
    constant after warmup, the Multi-Power Law and the momentum law beside it (L(S) is then credited with an
    expected anneal, 3% of the loss for a full one). Each candidate is fitted to the first ``1 - holdout`` of the
    observed span, scored on the held-out tail, and refitted to the whole window; the forecast is the weighted mean
    of the candidates' log forecasts with weights ``∝ 1/(tail error + 1e-4)²`` (no single winner), and their
    weighted disagreement enters the band; a candidate whose uncapped forecast is not a positive loss or wants over
    twice the supportable annealing gain is left out (none left: ``ValueError``), and so is one with a parameter on
    its bound while another remains. The annealing terms carry a weak prior relative to the run's own loss (a full
    anneal buys about 3% of the current loss), which an observed decay overrides.

    With ``reference`` (finished runs of the same setup: smaller models or earlier runs, same schedule shape,
    any length) the candidates are curve collapses instead: ``log L(f) = a + b·log L_ref(f)`` at the same
    fraction ``f`` of each run's horizon, fitted on the latest half of the observed span with ``b ~ N(1, 0.1²)``
    (``b = 1`` keeps the log gap to the reference), one per reference, combined as above.

    Band: Laplace parameter uncertainty of the top-weighted candidate, a model-error term ``q·log(t/t_obs)``
    whose slope ``q`` is calibrated by backtests on earlier sub-prefixes of the observed curve (doubled when a
    parameter sits on its bound: a bound is not evidence), and the candidates' disagreement.

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
        target_loss: Optional loss of interest; recorded in the state for callers (use ``steps_to``).
        confidence: Band level in (0, 1).
        method: ``"auto"``, ``"mpl"``, ``"momentum"`` or ``"power"`` (ignored with ``reference``).
        min_points: Minimum finite post-warmup points needed (8 windows are needed in any case).
        min_fraction: Minimum fraction of ``horizon`` that must have been observed.
        critical_batch: Critical batch size (same unit as ``history.batch_size``) for the ``S_min`` conversion.
        init: A previous :class:`Forecast` of the same run: its candidates, weights, band calibration and
            parameters warm-start the fits (tail validation and backtests are skipped), except on periodic
            revalidations (see ``revalidate_every``).
        max_bins: Number of averaging windows.
        grid_points: Maximum size of the future grid.
        validate: Weight the candidates by held-out tail validation (else the first candidate alone).
        holdout: Fraction of the observed post-warmup span held out for validation.
        delta: Huber threshold on log-loss residuals.
        lam: Momentum-law decay.
        revalidate_every: With ``init``, every ``revalidate_every``-th consecutive warm call (and any call where
            the observed post-warmup span grew by more than 25% since the last cold fit) redoes the full
            validation and band calibration; the others reuse them and only refit the parameters.
        exclude_transient: Offer the later L(S) window starts (``False``: fit from the end of warmup only).
        reference: Finished :class:`~lightning_scaling.RunHistory` runs of the same setup (or one run).

    Returns:
        The :class:`Forecast` (``method``: the top-weighted candidate's form, ``"reference"`` with references).

    Raises:
        ValueError: bad arguments, no schedule and no horizon, too little of the curve observed, or an unusable
            reference.

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
    refs = _reference_curves(reference)
    opts = _Opts(delta=delta, lam=lam, holdout=holdout, validate=validate, exclude_transient=exclude_transient,
                 confidence=confidence)
    curve = _prepare(history, horizon, lr_schedule, method=method, law=law, min_points=min_points,
                     min_fraction=min_fraction, max_bins=max_bins, critical_batch=critical_batch)
    warm, n_warm, cold_until = _is_warm(init, curve, revalidate_every, len(refs))
    st0 = init.warm_state if init is not None else None
    fits, errs, fitters = _fit_candidates(curve, opts, refs, st0, warm)
    grid = _future_grid(curve.observed_until + 1, curve.horizon, grid_points)
    if curve.lr is not None and not refs and curve.forms != ["power"] and grid.max() > curve.lr.size:
        raise ValueError(f"the LR schedule covers {curve.lr.size} steps but the forecast needs {grid.max()}")
    fits = _drop_at_bounds(_drop_wild(fits, grid))
    weights = _weights(fits, errs, st0, warm, validate)
    top = max(weights, key=weights.get)
    pred, spread = _combine(fits, weights, grid)
    e_val = (float(sum(weights[k] * errs[k] for k in weights)) if all(k in errs for k in weights)
             else (st0.validation_error if warm else float("nan")))
    q_model = st0.q_model if warm else _calibrate(curve, fitters[top], confidence)
    half, sigma = _half_width(curve, fits[top], grid, spread, q_model, e_val, opts)
    state = ForecastState(method="reference" if refs else top.split("@")[0], weights=weights,
                          params={k: dict(fits[k].params) for k in weights}, validation_error=e_val,
                          q_model=q_model, sigma=sigma, warmup=curve.w_end, n_warm=n_warm, cold_until=cold_until,
                          warm=warm, target_loss=target_loss)
    return _package(curve, grid, pred, half, top, fits, errs, state, confidence)
