"""Fit scaling laws to training runs: critical batch size B_crit(L) and L(N, S_min) / L(N, S, B).

Numpy/scipy only. The conventions follow :func:`scipy.optimize.curve_fit`: numpy in and out, keyword-only
options, frozen result objects, and ``ValueError`` with a clear message on unusable input.

Units: batch sizes are in samples (sequences) per optimizer step, as recorded by
:class:`~lightning_scaling.RunHistory`; tokens are derived with ``tokens_per_sample`` when it is known.

The recipe (Kaplan et al. 2020; Su et al. 2024):

1. :func:`fit_critical_batch_size` on runs of one model size at several batch sizes: steps ``S`` and samples
   ``E = B S`` to first reach each loss level, the hyperbola ``S = S_min + E_min / B`` per level,
   ``B_crit(L) = E_min / S_min`` and the power law ``B_crit = B_* / L^(1/alpha_B)``.
2. :func:`fit_scaling_law` on runs of several sizes: each post-warmup point ``(S, L)`` at batch ``B`` becomes
   ``S_min = S / (1 + B_crit(L) / B)`` and ``L(N, S_min) = [E +] (N_c/N)^alpha_N + (S_c/S_min)^alpha_S`` is fitted
   with a summed Huber loss on log loss, a grid of starts and L-BFGS-B, with a bootstrap over runs.
3. The returned :class:`ScalingLaw` predicts the minimum loss, steps and tokens to a loss, the critical batch,
   whole trajectories at any batch size and the compute-optimal allocation, each with bootstrap intervals.

Example::

    >>> import numpy as np
    >>> from lightning_scaling import RunHistory
    >>> from lightning_scaling.fitting import fit_scaling_law
    >>> from lightning_scaling.laws import loss_n_s_b
    >>> true = dict(n_c=1e10, alpha_n=0.08, s_c=200.0, alpha_s=0.7, b_star=2e4, alpha_b=0.3)
    >>> steps = np.arange(0, 3001, 10)
    >>> runs = [RunHistory(name=f"n{n:g}", n_params=n, batch_size=64, tokens_per_sample=128, step=steps,
    ...                    loss=np.minimum(loss_n_s_b(n, steps, 64, **true), 10.0))
    ...         for n in (1e6, 3e6, 1e7, 3e7)]
    >>> law = fit_scaling_law(runs, critical_batch=dict(b_star=2e4, alpha_b=0.3), n_bootstrap=0)
    >>> round(law.params["alpha_n"], 3), round(law.params["alpha_s"], 3)
    (0.08, 0.7)
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np
from numpy.typing import ArrayLike
from scipy.optimize import minimize
from scipy.special import ndtri

try:  # scipy >= 1.12
    from scipy.optimize import isotonic_regression
except ImportError:  # pragma: no cover - older scipy: a running minimum (slightly biased low under noise)
    isotonic_regression = None

from lightning_scaling import laws
from lightning_scaling.history import RunHistory
from lightning_scaling.numerics import first_crossing, huber, json_float, one_blas_thread, percentile_band
from lightning_scaling.numerics import warmup_steps as lr_warmup
from lightning_scaling.warnings import DataWarning, FitWarning

__all__ = [
    "ComputeOptimal",
    "CriticalBatchFit",
    "FitInfo",
    "PowerLawFit",
    "ScalingLaw",
    "fit_critical_batch_size",
    "fit_loss_n_s_b",
    "fit_power_law",
    "fit_scaling_law",
    "isoflop_optima",
    "smooth_monotone",
]

_HUBER_DELTA = 1e-3
_PARAM_NAMES = ("n_c", "alpha_n", "s_c", "alpha_s", "b_star", "alpha_b", "e", "anneal", "anneal_lambda", "l_plateau")
_PARAM_DEFAULTS = {"e": 0.0, "anneal": 0.0, "anneal_lambda": 0.999, "l_plateau": 0.0}


# ================================================================================================================
# BLAS threads: L-BFGS-B calls BLAS on 5-7 element vectors; on a busy 2-core machine OpenBLAS thread hand-offs made
# each call ~10x slower, so fits run with one BLAS thread (best effort, restored afterwards; no-op off Linux).
# ================================================================================================================
def _blas_one_thread(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with one_blas_thread():
            return fn(*args, **kwargs)

    return wrapper


# ================================================================================================================
# Curve smoothing and level crossings
# ================================================================================================================
def smooth_monotone(step: ArrayLike, loss: ArrayLike, *, half_width: float = 0.05,
                    n_grid: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Noise-robust, non-increasing version of a loss curve, on a grid in log step.

    Each grid node takes the median of the losses whose ``log(step)`` lies within ``half_width`` of it (a running
    median: robust to loss spikes), then a weighted isotonic (pool-adjacent-violators) fit makes the curve
    non-increasing so that "first step to reach a loss" is well defined. Non-finite losses and ``step <= 0`` are
    ignored.

    Args:
        step: optimizer steps.
        loss: losses at those steps.
        half_width: half window in natural-log step (0.05 = +-5% of the step).
        n_grid: at most this many grid nodes (log-spaced); fewer when there are fewer points.

    Returns:
        ``(grid_steps, smoothed_loss)``.

    Example::

        >>> s, l = smooth_monotone(np.arange(1, 1001), 1.0 + 10.0 / np.arange(1, 1001))
        >>> bool(np.all(np.diff(l) <= 0)), round(float(l[-1]), 2)
        (True, 1.01)
    """
    step = np.asarray(step, dtype=np.float64)
    loss = np.asarray(loss, dtype=np.float64)
    ok = np.isfinite(loss) & (step > 0)
    if ok.sum() < 2:
        raise ValueError("a loss curve needs at least 2 finite points at step > 0 to be smoothed")
    x = np.log(step[ok])
    y = loss[ok]
    order = np.argsort(x, kind="stable")
    x, y = x[order], y[order]
    grid = x if x.size <= n_grid else np.linspace(x[0], x[-1], n_grid)
    lo = np.searchsorted(x, grid - half_width, side="left")
    hi = np.searchsorted(x, grid + half_width, side="right")
    nonempty = hi > lo  # log-spaced nodes between sparse early steps can have empty windows
    grid, lo, hi = grid[nonempty], lo[nonempty], hi[nonempty]
    med = np.array([np.median(y[a:b]) for a, b in zip(lo, hi)])
    # Pool-adjacent-violators (least-squares monotone fit) rather than a running minimum, which is biased low by
    # the noise minimum and so crosses levels too early on flat late stretches.
    if isotonic_regression is None:  # pragma: no cover
        return np.exp(grid), np.minimum.accumulate(med)
    return np.exp(grid), isotonic_regression(med, weights=(hi - lo).astype(float), increasing=False).x


# ================================================================================================================
# Critical batch size
# ================================================================================================================
@dataclass(frozen=True)
class CriticalBatchFit:
    """Fitted critical batch size ``B_crit(L) = b_star / max(L, l_plateau)^(1/alpha_b)`` in samples.

    Attributes:
        b_star: ``B_*`` in samples (``b_star * tokens_per_sample`` tokens).
        alpha_b: ``alpha_B``; ``inf`` means a constant critical batch ``b_star``.
        table: per loss level: ``loss``, ``s_min``, ``e_min`` (samples), ``b_crit`` (samples), ``n_params``
            (NaN rows are levels whose hyperbola fit failed), and for fitted laws ``fitted`` (1 where the level
            entered the power law) and ``residual`` (``log(b_crit / law)``).
        tokens_per_sample: tokens per sample when known.
        source: how it was obtained (``"hyperbola"``, ``"gns"``, ``"joint"`` or ``"given"``).
        alpha_b_interval: 90% bootstrap interval of ``alpha_b`` over the sweep's runs, when fitted from a sweep.
        min_loss: the lowest loss level the law was fitted at (NaN if unknown); :class:`ScalingLaw` predictions
            that reach below it warn.
        plateau_auto: ``fit_scaling_law`` may replace ``l_plateau`` by 0 when its own larger sizes are predicted
            better with the power law extrapolated (set by ``fit_critical_batch_size(plateau=None)``, the default).
        l_plateau: B_crit is held at its value there below this loss (0: the power law extrapolated). A fit from
            a batch sweep sets it to ``min_loss``: B_crit plateaus late in training (Merrill et al. 2025), and on
            the CPU study's held-out larger models the extrapolated power law converted their steps to S_min far
            too aggressively (docs/fitting.md).

    Example::

        >>> fit = CriticalBatchFit(b_star=1e4, alpha_b=0.5)
        >>> float(fit(10.0))
        100.0
    """

    b_star: float
    alpha_b: float
    table: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    tokens_per_sample: float | None = None
    source: str = "given"
    alpha_b_interval: tuple[float, float] | None = None
    min_loss: float = float("nan")
    l_plateau: float = 0.0
    plateau_auto: bool = False

    def __call__(self, loss: ArrayLike) -> np.ndarray:
        """Critical batch size in samples at ``loss``."""
        return laws.critical_batch(loss, b_star=self.b_star, alpha_b=self.alpha_b, l_plateau=self.l_plateau)

    def tokens(self, loss: ArrayLike) -> np.ndarray:
        """Critical batch size in tokens at ``loss`` (needs ``tokens_per_sample``)."""
        if self.tokens_per_sample is None:
            raise ValueError("tokens_per_sample is unknown: pass tokens_per_sample= to fit_critical_batch_size")
        return self(loss) * self.tokens_per_sample

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (non-finite values written as the strings ``"Infinity"``, ``"NaN"``)."""
        return {"b_star": self.b_star, "alpha_b": json_float(self.alpha_b),
                "tokens_per_sample": self.tokens_per_sample, "source": self.source,
                "alpha_b_interval": None if self.alpha_b_interval is None else list(self.alpha_b_interval),
                "min_loss": json_float(self.min_loss), "l_plateau": self.l_plateau,
                "plateau_auto": self.plateau_auto,
                "table": {k: [json_float(v) for v in np.asarray(a, dtype=float)] for k, a in self.table.items()}}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CriticalBatchFit:
        """Inverse of :meth:`to_dict`."""
        return cls(b_star=float(data["b_star"]), alpha_b=float(data["alpha_b"]),
                   table={k: np.asarray(v, dtype=float) for k, v in data.get("table", {}).items()},
                   tokens_per_sample=data.get("tokens_per_sample"), source=data.get("source", "given"),
                   alpha_b_interval=None if data.get("alpha_b_interval") is None
                   else tuple(float(v) for v in data["alpha_b_interval"]),
                   min_loss=float(data.get("min_loss", "nan")), l_plateau=float(data.get("l_plateau", 0.0)),
                   plateau_auto=bool(data.get("plateau_auto", False)))


def _normal_quantile(level: float) -> float:
    """Half-width of a central ``level`` interval of a standard normal (1.645 at 0.9)."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    return float(ndtri((1.0 + level) / 2.0))


def _exp(x: float) -> float:
    """``exp`` that overflows to ``inf`` instead of raising (bounded optimisers can probe extreme corners)."""
    return math.exp(x) if x < 709.0 else float("inf")


def _check_runs(runs: Sequence[RunHistory] | RunHistory, what: str) -> list[RunHistory]:
    if isinstance(runs, RunHistory):
        runs = [runs]
    runs = list(runs)
    if not runs:
        raise ValueError(f"{what} needs at least one RunHistory, got none")
    for r in runs:
        if not isinstance(r, RunHistory):
            raise ValueError(f"{what} takes RunHistory objects, got {type(r).__name__}")
    return runs


# The least of each run the L(N, S_min) fit drops as the post-warmup transient. benchmarks/validate.py cross-size
# task, candidates 0.05, 0.1, 0.2 (mean worst final error per dataset): 0.1 is best on all datasets together
# (2.9% against 3.4% and 3.8%) and the leave-one-dataset-out choice for CPU study, Gemstones and Schaipp; for MPL
# the other datasets pick 0.2 by 2e-5 (there 0.2 fails one 2-size cosine fit: alpha_N at its bound, 10% error).
_TRANSIENT_FRACTION = 0.1


def _warmup_end(run: RunHistory, warmup_steps: int | str | None, *, transient: bool = True) -> int:
    """Last step of the warmup transient to drop.

    ``"auto"``: the step at which the recorded LR first reaches 99.9% of its maximum (the end of a linear warmup)
    and at least 1% of the run's last step; with ``transient`` (the L(N, S_min) power-law fit) twice that step and
    at least ``_TRANSIENT_FRACTION`` (10%) of the run. Level crossings (B_crit) need no power law, so they keep
    the early levels. The loss keeps falling faster than any power law for a while after the LR peaks (Adam's
    moment estimates and the initial descent settle), and log-step binning gives those early steps as much weight
    as the late ones; on real curves (Schaipp et al. 2025 constant-LR runs, 33M-152M -> 208M) dropping this
    transient cut the held-out final-loss error from 0.40% to 0.11%.
    """
    if warmup_steps is None:
        return 0
    if isinstance(warmup_steps, str):
        if warmup_steps != "auto":
            raise ValueError(f"warmup_steps must be an int, 'auto' or None, got {warmup_steps!r}")
        if not len(run):
            return 0
        last = int(run.step[-1])
        mult, frac = (2, _TRANSIENT_FRACTION) if transient else (1, 0.01)
        end = int(frac * last)
        lr = run.lr
        if lr is not None and np.isfinite(lr).any():
            peak = np.nanmax(lr)
            if peak > 0:
                i = lr_warmup(np.nan_to_num(lr, nan=0.0))
                end = max(end, mult * int(run.step[i]))
        # Never drop more than half of the run (an LR that peaks late, e.g. a long warmup, would leave nothing).
        return min(end, last // 2)
    if int(warmup_steps) < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    return int(warmup_steps)


def _tokens_per_sample(runs: Sequence[RunHistory], given: float | None) -> float | None:
    if given is not None:
        if not (given > 0 and math.isfinite(given)):
            raise ValueError(f"tokens_per_sample must be a positive number, got {given!r}")
        return float(given)
    vals = {r.tokens_per_sample for r in runs if r.tokens_per_sample is not None}
    if len(vals) > 1:
        raise ValueError(f"runs disagree on tokens_per_sample ({sorted(vals)}); pass tokens_per_sample= explicitly")
    return vals.pop() if vals else None


@dataclass
class _CrossingTable:
    """First-crossing steps ``steps[run, level]`` of runs of one size, reused by the bootstrap."""

    n_params: float
    batch: np.ndarray
    levels: np.ndarray
    steps: np.ndarray
    members: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=int))  # the rows' indices in the runs


def _as_levels(levels: ArrayLike) -> np.ndarray:
    """User-given loss levels as a descending float array (the order ``first_crossing`` rows follow)."""
    try:
        lv = np.asarray(levels, dtype=np.float64).ravel()
    except (TypeError, ValueError):
        raise ValueError(f"`levels` must be a sequence of positive losses, got {levels!r}") from None
    if lv.size < 2 or not np.all(np.isfinite(lv)) or np.any(lv <= 0):
        raise ValueError(f"`levels` must hold >= 2 positive finite losses, got {lv.tolist()}")
    return np.sort(lv)[::-1]


def _crossing_table(runs: Sequence[RunHistory], *, levels: ArrayLike | None, n_levels: int,
                    warmup_steps: int | str | None) -> _CrossingTable:
    curves = []
    for r in runs:
        keep = r.step > _warmup_end(r, warmup_steps, transient=False)
        curves.append(smooth_monotone(r.step[keep], r.loss[keep]))
    if levels is None:
        # Levels spanning what any run covers after warmup; each level is fitted with the runs that cross it
        # (a run already below it at its first post-warmup point, or never reaching it, gives NaN), so runs of very
        # different speeds still give a wide loss range, which pins down the power law.
        top = max(c[1][0] for c in curves)
        bottom = min(c[1][-1] for c in curves)
        if not top > bottom:
            raise ValueError("the runs cover no loss range after warmup; train longer or pass levels=")
        span = math.log(top) - math.log(bottom)
        lv = np.exp(np.linspace(math.log(bottom) + 0.05 * span, math.log(top) - 0.3 * span, n_levels))[::-1]
    else:
        lv = _as_levels(levels)
    steps = np.vstack([first_crossing(g, c, lv) for g, c in curves])
    n = runs[0].n_params
    return _CrossingTable(n_params=float(n) if n is not None else float("nan"),
                          batch=np.array([float(r.batch_size) for r in runs]), levels=lv, steps=steps)


def _hyperbolas(table: _CrossingTable, rows: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Per level, weighted least squares of ``S = S_min + E_min / B`` (weights 1/S: relative step noise)."""
    steps = table.steps if rows is None else table.steps[rows]
    batch = table.batch if rows is None else table.batch[rows]
    k = table.levels.size
    smin, emin = np.full(k, np.nan), np.full(k, np.nan)
    need = min(3, np.unique(batch).size)  # 3 batch sizes per level when the sweep has them: 2 fit any line
    for j in range(k):
        ok = np.isfinite(steps[:, j])
        if np.unique(batch[ok]).size < need:
            continue
        s, inv_b = steps[ok, j], 1.0 / batch[ok]
        a = np.column_stack([np.ones_like(s), inv_b]) / s[:, None]
        coef, *_ = np.linalg.lstsq(a, np.ones_like(s), rcond=None)
        if coef[0] > 0 and coef[1] > 0:
            smin[j], emin[j] = coef
    return {"loss": table.levels.copy(), "s_min": smin, "e_min": emin, "b_crit": emin / smin,
            "n_params": np.full(k, table.n_params)}


# B_crit(L) flattens at the high losses of early training (Kaplan Fig. 10; the CPU study's sweep), and a law is
# used where the larger model trains, below every level of the sweep: the power law is fitted on the lower part
# of the levels' log-loss range only (at least _LOW_LEVELS_MIN levels).
_LOW_LEVELS_FRACTION = 1 / 3
_LOW_LEVELS_MIN = 4


def _low_end(loss: np.ndarray, ok: np.ndarray) -> np.ndarray:
    """Usable levels in the lower ``_LOW_LEVELS_FRACTION`` of their log-loss range (at least the lowest 4)."""
    ll = np.log(np.where(ok, loss, np.nan))
    lo, hi = np.nanmin(ll), np.nanmax(ll)
    keep = ok & (ll <= lo + _LOW_LEVELS_FRACTION * (hi - lo) + 1e-12)
    if keep.sum() < _LOW_LEVELS_MIN:
        order = np.argsort(np.where(ok, ll, np.inf))[:_LOW_LEVELS_MIN]
        keep = np.zeros_like(ok)
        keep[order[ok[order]]] = True
    return keep


def _power_law_b_crit(loss: np.ndarray, b_crit: np.ndarray, *,
                      low_end: bool = False) -> tuple[float, float, np.ndarray]:
    """``(b_star, alpha_b, levels used)`` of the log-log line through the usable levels (the low end only)."""
    ok = np.isfinite(b_crit) & (b_crit > 0) & np.isfinite(loss) & (loss > 0)
    if ok.sum() < 2 or np.unique(loss[ok]).size < 2:
        raise ValueError(f"only {int(ok.sum())} loss level(s) gave a usable hyperbola fit (need >= 2 at distinct "
                         "losses): use runs at >= 3 batch sizes spanning B_crit, or pass levels=")
    if low_end:
        ok = _low_end(loss, ok)
    slope, intercept = np.polyfit(np.log(loss[ok]), np.log(b_crit[ok]), 1)
    if slope >= 0:
        raise ValueError(f"B_crit does not fall with the loss (log-log slope {slope:.3g} >= 0); the law "
                         "B_crit = B_*/L^(1/alpha_B) does not describe these runs")
    return float(math.exp(intercept)), float(-1.0 / slope), ok


def _sweeps(runs: Sequence[RunHistory], scheds: Sequence[np.ndarray | None]) -> list[np.ndarray]:
    """Indices of the batch sweeps among the runs: one size and one LR schedule shape, >= 2 batch sizes.

    Runs of one size under other schedules (a cosine and a WSD run beside the constant-LR sweep) cross the loss
    levels at steps the hyperbola cannot explain, and made the CPU study's sweep unusable.
    """
    groups: list[tuple[float, np.ndarray | None, list[int]]] = []  # (size, post-warmup shape, members)
    for i, (r, sc) in enumerate(zip(runs, scheds)):
        size, shape = float(r.n_params) if r.n_params is not None else math.nan, _shape(sc)
        same = (g for g in groups if g[0] == size and (g[1] is None) == (shape is None)
                and (shape is None or float(np.max(np.abs(g[1] - shape))) <= 0.02))
        group = next(same, None)
        if group is None:
            groups.append((size, shape, [i]))
        else:
            group[2].append(i)
    return [np.array(g) for _, _, g in groups if len({runs[i].batch_size for i in g}) >= 2]


def _shape(sc: np.ndarray | None) -> np.ndarray | None:
    """The LR schedule's shape after warmup on 32 points of the run's own time (relative to its peak): runs of any
    length with one shape (a token-matched sweep), recorded as ``lr`` or ``planned_lr``, agree within 2%."""
    if sc is None or sc.size == 0 or not np.nanmax(sc) > 0:
        return None
    sc = np.nan_to_num(np.asarray(sc, dtype=float), nan=0.0)
    tail = sc[lr_warmup(sc):] / sc.max()
    if tail.size < 2:
        return np.ones(32)
    return np.interp(np.linspace(0.0, 1.0, 32), np.linspace(0.0, 1.0, tail.size), tail)


def _sweep_tables(runs: Sequence[RunHistory], scheds: Sequence[np.ndarray | None], *, levels: ArrayLike | None,
                  n_levels: int, warmup_steps: int | str | None) -> list[_CrossingTable]:
    """One crossing table per batch sweep (:func:`_sweeps`), each knowing its runs' indices."""
    return [replace(_crossing_table([runs[i] for i in g], levels=levels, n_levels=n_levels,
                                    warmup_steps=warmup_steps), members=g) for g in _sweeps(runs, scheds)]


_BCRIT_BOOTSTRAP = 50


def fit_critical_batch_size(runs: Sequence[RunHistory], *, levels: ArrayLike | None = None,
                            tokens_per_sample: float | None = None, n_levels: int = 12,
                            warmup_steps: int | str | None = "auto",
                            n_bootstrap: int = _BCRIT_BOOTSTRAP, plateau: bool | None = None) -> CriticalBatchFit:
    """Fit ``B_crit(L) = B_* / L^(1/alpha_B)`` from runs at several batch sizes.

    Runs are grouped by model size and LR schedule shape (Kaplan found B_crit depends on L, not N, so the levels of
    all groups are pooled into one power law). Per group and loss level the first step ``S`` reaching the level on
    the smoothed, monotone curve (:func:`smooth_monotone`) gives one point per run; a weighted regression of ``S``
    on ``1/B`` fits the hyperbola ``S = S_min + E_min / B``, and ``B_crit = E_min / S_min``. The power law is fitted
    on the levels in the lower third of the log-loss range (at least 4): at the high losses of early training B_crit
    flattens, and the law is used below the sweep's levels, where a larger model trains. ``table["residual"]`` holds
    every level's ``log(B_crit / law)``, ``alpha_b_interval`` a bootstrap interval over the runs.

    Args:
        runs: histories with ``batch_size`` set, at >= 2 (better >= 4, over >= 1 decade) batch sizes per size.
        levels: loss levels; default ``n_levels`` log-spaced levels that every run of a group reaches.
        tokens_per_sample: tokens per sample (default: from the runs).
        n_levels: number of default levels.
        warmup_steps: steps to drop at the start of each run (``"auto"``: end of LR warmup; see
            :func:`fit_scaling_law`).
        n_bootstrap: resamples of the runs for ``alpha_b_interval`` (0: none).
        plateau: below the lowest level fitted, hold B_crit at its value there (``l_plateau = min_loss``)
            instead of extrapolating the power law. ``None`` (default): held, and :func:`fit_scaling_law` may switch
            to the power law when its own larger sizes say so (``plateau_auto``); ``True`` / ``False``: fixed.
            B_crit plateaus late in training (Merrill et al. 2025); on the CPU study's held-out larger models (the
            suite's one batch sweep) the extrapolated law, still growing below the sweep, made the final-loss error
            8.97% against 1.46% held (docs/fitting.md).

    Returns:
        A :class:`CriticalBatchFit` (batch sizes in samples).

    Raises:
        ValueError: missing batch sizes, fewer than 2 batch sizes per size, or no usable levels.

    Example::

        >>> import numpy as np
        >>> from lightning_scaling import RunHistory
        >>> from lightning_scaling.laws import loss_n_s_b
        >>> k = dict(n_c=1e10, alpha_n=0.08, s_c=200.0, alpha_s=0.7, b_star=2e4, alpha_b=0.3)
        >>> steps = np.arange(0, 20001, 5)
        >>> runs = [RunHistory(name=f"b{b}", n_params=1e7, batch_size=b, step=steps,
        ...                    loss=loss_n_s_b(1e7, steps, b, **k)) for b in (16, 64, 256, 1024, 4096)]
        >>> fit = fit_critical_batch_size(runs, warmup_steps=None)
        >>> round(fit.alpha_b, 1), round(fit.b_star / 2e4, 1)
        (0.3, 1.0)
    """
    runs = _check_runs(runs, "fit_critical_batch_size")
    if plateau is not None and not isinstance(plateau, (bool, np.bool_)):
        raise ValueError(f"plateau must be None, True or False, got {plateau!r}")
    if isinstance(n_bootstrap, bool) or not isinstance(n_bootstrap, (int, np.integer)) or n_bootstrap < 0:
        raise ValueError(f"n_bootstrap must be an integer >= 0, got {n_bootstrap!r}")
    missing = [r.name for r in runs if r.batch_size is None]
    if missing:
        raise ValueError(f"runs without batch_size: {missing}; set RunHistory.batch_size (samples per step)")
    tables = _sweep_tables(runs, [_run_schedule(r) for r in runs], levels=levels, n_levels=n_levels,
                           warmup_steps=warmup_steps)
    if not tables:
        raise ValueError("fit_critical_batch_size needs runs of one model size and LR schedule at >= 2 distinct "
                         "batch sizes; got "
                         f"batch sizes {sorted({r.batch_size for r in runs})} over sizes "
                         f"{sorted({r.n_params for r in runs if r.n_params is not None})}")
    return _critical_from_tables(tables, tokens_per_sample=_tokens_per_sample(runs, tokens_per_sample),
                                 n_bootstrap=n_bootstrap, plateau=plateau)


def _critical_from_tables(tables: Sequence[_CrossingTable], *, tokens_per_sample: float | None,
                          rows: Sequence[np.ndarray] | None = None, n_bootstrap: int = 0,
                          plateau: bool | None = None) -> CriticalBatchFit:
    """Hyperbolas per level, the power law through the low-loss levels, residuals, and an interval on alpha_B."""
    parts = [_hyperbolas(t, None if rows is None else rows[i]) for i, t in enumerate(tables)]
    table = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    b_star, alpha_b, fitted = _power_law_b_crit(table["loss"], table["b_crit"], low_end=True)
    with np.errstate(all="ignore"):
        table["residual"] = np.log(table["b_crit"] / laws.critical_batch(table["loss"], b_star=b_star,
                                                                          alpha_b=alpha_b))
    table["fitted"] = fitted.astype(float)
    rng = np.random.default_rng(0)
    alphas = []
    for _ in range(n_bootstrap):  # resample each sweep's runs: the noise of the crossing steps
        try:
            alphas.append(_critical_from_tables(
                tables, tokens_per_sample=None, rows=[rng.integers(0, t.batch.size, t.batch.size) for t in tables],
                plateau=plateau).alpha_b)
        except ValueError:
            continue
    interval = tuple(float(v) for v in np.percentile(alphas, [5, 95])) if len(alphas) >= 10 else None
    min_loss = float(np.min(table["loss"][fitted]))
    return CriticalBatchFit(b_star=b_star, alpha_b=alpha_b, table=table, tokens_per_sample=tokens_per_sample,
                            source="hyperbola", alpha_b_interval=interval, min_loss=min_loss,
                            l_plateau=min_loss if plateau is not False else 0.0, plateau_auto=plateau is None)


def _critical_from_gns(runs: Sequence[RunHistory], tokens_per_sample: float | None) -> CriticalBatchFit | None:
    """Power law through (smoothed loss at the GNS step, B_simple) pairs of all runs; None if none recorded."""
    ls, bs = [], []
    for r in runs:
        if r.gns_step is None or r.gns_b_simple is None or len(r.gns_step) == 0:
            continue
        ok = np.isfinite(r.loss)
        if ok.sum() < 2:
            continue
        loss_at = np.interp(r.gns_step, r.step[ok], r.loss[ok])
        good = np.isfinite(r.gns_b_simple) & (r.gns_b_simple > 0) & (r.gns_step > 0)
        ls.append(loss_at[good])
        bs.append(r.gns_b_simple[good])
    if not ls or sum(len(x) for x in ls) == 0:
        return None
    loss, b = np.concatenate(ls), np.concatenate(bs)
    table = {"loss": loss, "s_min": np.full(loss.size, np.nan), "e_min": np.full(loss.size, np.nan), "b_crit": b,
             "n_params": np.full(loss.size, np.nan)}
    warnings.warn("critical batch from the gradient noise scale B_simple: a proxy that can sit far below the true "
                  "critical batch under Adam; validate it with a batch-size sweep (fit_critical_batch_size)",
                  FitWarning, stacklevel=5)
    try:
        b_star, alpha_b, _ = _power_law_b_crit(loss, b)
    except ValueError:
        # No usable trend in L: a constant critical batch (alpha_B = inf) at the median measurement.
        b_star, alpha_b = float(np.median(b)), float("inf")
    return CriticalBatchFit(b_star=b_star, alpha_b=alpha_b, table=table, tokens_per_sample=tokens_per_sample,
                            source="gns", min_loss=float(np.min(loss)))


def _critical_from_joint(bins: Sequence[tuple[np.ndarray, np.ndarray, float, float]],
                         tokens_per_sample: float | None) -> CriticalBatchFit | None:
    """``B_crit(L)`` from a joint fit of ``L(N, S, B)`` to the binned curves; None below 2 batch sizes.

    Runs of different sizes at different batch sizes (no sweep at one size) still constrain ``B_crit(L)``: it
    shifts each curve in log step by ``log(1 + B_crit(L)/B)``, which changes along the curve as ``L`` falls. The
    constraint is weak (confounded with the size term), hence the warning.
    """
    if len({bb for *_, bb in bins}) < 2:
        return None
    n = np.concatenate([np.full(bs.size, nn) for bs, _, nn, _ in bins])
    b = np.concatenate([np.full(bs.size, bb) for bs, _, _, bb in bins])
    s = np.concatenate([bs for bs, *_ in bins])
    loss = np.concatenate([bl for _, bl, _, _ in bins])
    try:
        law = fit_loss_n_s_b(n, s, b, loss, n_starts=4)
    except ValueError:
        return None
    b_star, alpha_b = float(law.params["b_star"]), float(law.params["alpha_b"])
    if not (math.isfinite(b_star) and b_star > 0 and alpha_b > 0):
        return None
    warnings.warn("critical batch fitted jointly with L(N, S, B) from the curves at their different batch sizes "
                  "(no usable batch sweep at one size): weakly identified; a batch sweep at one size "
                  "(fit_critical_batch_size) pins it down", FitWarning, stacklevel=5)
    return CriticalBatchFit(b_star=b_star, alpha_b=alpha_b, tokens_per_sample=tokens_per_sample, source="joint")


_NO_CRITICAL = ("none", "ignore", "off")


def _as_critical(critical_batch: Any, tokens_per_sample: float | None) -> CriticalBatchFit:
    if isinstance(critical_batch, CriticalBatchFit):
        return critical_batch
    if isinstance(critical_batch, str):
        if critical_batch.lower() in _NO_CRITICAL:
            # B_crit = 0: S_min = S, i.e. a plain L(N, S) at the batch size the runs used (see fit_scaling_law).
            return CriticalBatchFit(b_star=0.0, alpha_b=float("inf"), tokens_per_sample=tokens_per_sample,
                                    source="none")
        raise ValueError(f"critical_batch string must be 'none' (batch size effects not modelled), got "
                         f"{critical_batch!r}")
    if isinstance(critical_batch, Mapping):
        try:
            return CriticalBatchFit(b_star=float(critical_batch["b_star"]), alpha_b=float(critical_batch["alpha_b"]),
                                    tokens_per_sample=tokens_per_sample,
                                    l_plateau=float(critical_batch.get("l_plateau", 0.0)))
        except KeyError as err:
            raise ValueError(f"critical_batch dict needs 'b_star' (samples) and 'alpha_b', missing {err}") from None
    if isinstance(critical_batch, (tuple, list)) and len(critical_batch) == 2:
        b_star, alpha_b = float(critical_batch[0]), float(critical_batch[1])
    elif isinstance(critical_batch, (int, float, np.integer, np.floating)) and not isinstance(critical_batch, bool):
        b_star, alpha_b = float(critical_batch), float("inf")  # a constant critical batch, in samples
    else:
        raise ValueError("critical_batch must be a CriticalBatchFit, a dict with b_star and alpha_b, a "
                         "(b_star, alpha_b) pair, a number (a constant critical batch in samples) or 'none'; got "
                         f"{critical_batch!r}")
    if not (b_star >= 0 and math.isfinite(b_star)) or not alpha_b > 0:
        raise ValueError(f"critical_batch needs a finite b_star >= 0 (samples) and alpha_b > 0, got b_star={b_star!r},"
                         f" alpha_b={alpha_b!r}")
    return CriticalBatchFit(b_star=b_star, alpha_b=alpha_b, tokens_per_sample=tokens_per_sample,
                            source="none" if b_star == 0 else "given")


# ================================================================================================================
# L(N, S_min) fit
# ================================================================================================================
@dataclass(frozen=True)
class FitInfo:
    """Optimiser report of a fit (check ``success`` and that the fit moved from its start).

    Attributes:
        success: L-BFGS-B converged *and* the law is identified (see ``identified``).
        message: its message.
        nfev: objective evaluations of the best start.
        nit: iterations of the best start.
        objective: summed Huber loss at the optimum.
        n_starts: starts run with L-BFGS-B (the best of the grid).
        n_grid: size of the start grid.
        n_points: points fitted.
        n_runs: runs fitted.
        moved: the optimum differs from its starting point.
        form: the law form fitted.
        critical_batch_source: where B_crit(L) came from.
        validation: held-out RMS relative error of the larger sizes' final losses per form (``form="auto"``)
            and, for a B_crit from a batch sweep, with B_crit held below the sweep or the power law extrapolated
            (``"b_crit held"``, ``"b_crit power law"``; the better one is used).
        n_bootstrap: successful bootstrap refits.
        identified: the data determine the law: no exponent sits at its bound, the constants are finite and the
            law predicts finite losses. ``False`` also warns with a :class:`~lightning_scaling.warnings.FitWarning`.
        at_bounds: fitted parameters that sit at a bound of the search box.
        messages: why the law is not identified, or what the fit dropped, one sentence each.
        n_dropped: points not fitted, by reason (``"nonfinite"``, ``"nonpositive"``).
    """

    success: bool
    message: str
    nfev: int
    nit: int
    objective: float
    n_starts: int
    n_grid: int
    n_points: int
    n_runs: int
    moved: bool
    form: str
    critical_batch_source: str
    validation: dict[str, float] = field(default_factory=dict)
    n_bootstrap: int = 0
    identified: bool = True
    at_bounds: tuple[str, ...] = ()
    messages: tuple[str, ...] = ()
    n_dropped: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class ComputeOptimal:
    """Compute-optimal plan for a budget, training at the critical batch size.

    Attributes:
        compute: the budget in FLOPs (``6 N B S``, ``B`` in tokens).
        n_params: model size.
        batch_size: critical batch at the final loss, in samples.
        steps: optimizer steps (``2 S_min``).
        tokens: tokens processed (``2 E_min``; samples if ``tokens_per_sample`` is unknown).
        loss: predicted final loss.
        intervals: ``name -> (low, high)`` bootstrap prediction intervals at ``level``.
        level: interval level.
    """

    compute: float
    n_params: float
    batch_size: float
    steps: float
    tokens: float
    loss: float
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)
    level: float = 0.9

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict."""
        return {"compute": self.compute, "n_params": self.n_params, "batch_size": self.batch_size,
                "steps": self.steps, "tokens": self.tokens, "loss": self.loss, "level": self.level,
                "intervals": {k: list(v) for k, v in self.intervals.items()}}

    def __getitem__(self, key: str) -> Any:
        """Dict-style access (``plan["n_params"]``)."""
        return getattr(self, key)


def _bootstrap_rows(bootstrap: ArrayLike | None) -> np.ndarray:
    """Bootstrap parameter sets as ``(n, len(PARAM_NAMES))``; rows saved before the later columns (annealing,
    B_crit plateau) get their defaults, which reproduce the older law."""
    boot = np.empty((0, len(_PARAM_NAMES))) if bootstrap is None else np.asarray(bootstrap, dtype=float)
    if boot.ndim == 2 and 6 < boot.shape[1] < len(_PARAM_NAMES):
        pad = [np.full(len(boot), _PARAM_DEFAULTS[k]) for k in _PARAM_NAMES[boot.shape[1]:]]
        boot = np.column_stack([boot, *pad])
    return boot.reshape(-1, len(_PARAM_NAMES))


def _as_schedule(lr: ArrayLike) -> np.ndarray:
    try:
        arr = np.asarray(lr, dtype=np.float64).ravel()
    except (TypeError, ValueError):
        raise ValueError(f"lr_schedule must be a sequence of learning rates, got {type(lr).__name__}") from None
    if arr.size == 0 or not np.all(np.isfinite(arr)) or np.any(arr < 0) or not arr.max() > 0:
        raise ValueError("lr_schedule must be a non-empty sequence of finite, non-negative learning rates with a "
                         "positive peak")
    return arr


# Relative model error added to every loss interval, in quadrature with the fit's own held-out error
# (ScalingLaw.interval): what a fit cannot see on its own sizes (a held-out size trained with another LR or batch,
# a fit of 2 sizes). benchmarks/validate.py, task intervals: the value closest to 90% coverage over all datasets
# (MPL, Schaipp, Gemstones, CPU study); each dataset's reported coverage uses the value chosen without it
# (`lodo_choose`: 0.025 for MPL, Gemstones and the CPU study, 0.02 for Schaipp; pooled coverage 96% of 26).
MODEL_ERROR_FLOOR = 0.025


class ScalingLaw:
    """A fitted ``L(N, S, B)`` law with bootstrap uncertainty (returned by :func:`fit_scaling_law`).

    The law: ``L(N, S_min) = e + (n_c/N)^alpha_n + (s_c/S_min)^alpha_s`` with ``S_min = S / (1 + B_crit(L)/B)`` and
    ``B_crit(L) = b_star / L^(1/alpha_b)`` (``e = 0`` for the Kaplan form). Batch sizes are in samples; tokens use
    ``tokens_per_sample``.

    Uncertainty: every prediction method ``m`` has a bootstrap interval ``law.interval("m", *args, level=0.9)``
    (percentiles of ``m`` evaluated with each bootstrap parameter set); :meth:`compute_optimal` returns its
    intervals directly, and :meth:`param_intervals` gives them for the constants.

    Attributes:
        params: ``n_c``, ``alpha_n``, ``s_c``, ``alpha_s``, ``b_star`` (samples), ``alpha_b``, ``e``.
        form: ``"kaplan"`` or ``"kaplan+irreducible"``.
        tokens_per_sample: tokens per sample, or None.
        bootstrap: array ``(n_bootstrap, 7)`` of parameter sets in ``PARAM_NAMES`` order.
        info: a :class:`FitInfo`.
        loss_cap: predictions never exceed this (the largest initial loss seen in the fit), so the trajectory
            at step 0, where the power law diverges, stays finite.
        fitted_batch_sizes: batch sizes (samples) of the runs fitted, or None.

    A law fitted with ``critical_batch="none"`` has ``b_star = 0`` (``S_min = S``): it describes the fitted batch
    size only; :meth:`critical_batch_size`, :meth:`min_samples`, :meth:`min_tokens` and :meth:`compute_optimal`
    raise ``ValueError`` and batch-dependent predictions at other batch sizes warn.

    Example::

        >>> law = ScalingLaw(dict(n_c=6.5e13, alpha_n=0.077, s_c=2100.0, alpha_s=0.76, b_star=2.1e8 / 1024,
        ...                       alpha_b=0.21), tokens_per_sample=1024)
        >>> round(float(law.min_loss(1e9)), 3)
        2.347
        >>> steps, tokens = law.steps_to_loss(2.5, 1e9, 512)
        >>> bool(np.isclose(law.predict_loss(1e9, steps, 512), 2.5))
        True
    """

    PARAM_NAMES = _PARAM_NAMES

    def __init__(self, params: Mapping[str, float], *, form: str | None = None,
                 tokens_per_sample: float | None = None, bootstrap: ArrayLike | None = None,
                 info: FitInfo | None = None, loss_cap: float = float("inf"),
                 fitted_batch_sizes: Sequence[float] | None = None, schedule: ArrayLike | None = None,
                 model_error: Mapping[str, float] | None = None, bcrit_min_loss: float | None = None) -> None:
        missing = [k for k in _PARAM_NAMES[:6] if k not in params]
        if missing:
            raise ValueError(f"ScalingLaw params miss {missing}")
        self.params: dict[str, float] = {k: float(params.get(k, _PARAM_DEFAULTS.get(k, 0.0))) for k in _PARAM_NAMES}
        self.form = form or ("kaplan" if self.params["e"] == 0 else "kaplan+irreducible")
        self.tokens_per_sample = None if tokens_per_sample is None else float(tokens_per_sample)
        self.bootstrap = _bootstrap_rows(bootstrap)
        self.info = info
        self.loss_cap = float(loss_cap)
        self.fitted_batch_sizes = None if fitted_batch_sizes is None else [float(b) for b in fitted_batch_sizes]
        self.schedule = None if schedule is None else np.asarray(schedule, dtype=np.float64).ravel()
        self.model_error = dict(model_error or {})
        self.bcrit_min_loss = None if bcrit_min_loss is None or not math.isfinite(bcrit_min_loss) \
            else float(bcrit_min_loss)
        self._warned_batch = False
        self._warned_range = False

    def __repr__(self) -> str:
        p = ", ".join(f"{k}={v:.4g}" for k, v in self.params.items())
        return f"ScalingLaw(form={self.form!r}, {p}, tokens_per_sample={self.tokens_per_sample})"

    # ------------------------------------------------------------------ predictions
    @property
    def _kw(self) -> dict[str, float]:
        return {k: v for k, v in self.params.items() if k not in ("anneal", "anneal_lambda")}

    @property
    def _kw_ns(self) -> dict[str, float]:
        p = self.params
        return {"n_c": p["n_c"], "alpha_n": p["alpha_n"], "s_c": p["s_c"], "alpha_s": p["alpha_s"], "e": p["e"]}

    def _to_tokens(self, samples: np.ndarray) -> np.ndarray:
        if self.tokens_per_sample is None:
            warnings.warn("tokens_per_sample is unknown: returning samples instead of tokens", DataWarning,
                          stacklevel=3)
            return samples
        return samples * self.tokens_per_sample

    @property
    def models_batch_size(self) -> bool:
        """Whether the law has a critical batch, i.e. models how the batch size changes the trajectory."""
        return self.params["b_star"] > 0

    def _need_critical(self, what: str) -> None:
        if not self.models_batch_size:
            raise ValueError(f"{what} needs a critical batch size, but this law was fitted with critical_batch='none'"
                             " (B_crit unknown): refit with critical_batch=fit_critical_batch_size(...), a "
                             "(b_star, alpha_b) pair or a constant in samples")

    def _check_batch(self, batch_size: ArrayLike) -> None:
        if self.models_batch_size or self._warned_batch or self.fitted_batch_sizes is None:
            return
        b = np.asarray(batch_size, dtype=float)
        known = np.asarray(self.fitted_batch_sizes)
        if np.any(np.min(np.abs(b.reshape(-1, 1) / known.reshape(1, -1) - 1.0), axis=1) > 1e-6):
            self._warned_batch = True
            warnings.warn(f"this law was fitted with critical_batch='none' at batch sizes {self.fitted_batch_sizes}"
                          " (samples): the batch size effect is not modelled, so other batch sizes get the same "
                          "per-step curve", FitWarning, stacklevel=3)

    def predict_loss(self, n_params: ArrayLike, steps: ArrayLike, batch_size: ArrayLike,
                     lr_schedule: ArrayLike | None = None) -> np.ndarray:
        """Loss after ``steps`` optimizer steps at ``batch_size`` samples (the full trajectory; broadcasts).

        Solves the implicit ``L = L(N, S_min(S_eff, B, B_crit(L)))`` per point (unique root; see
        :func:`lightning_scaling.laws.loss_n_s_b`), times the annealing factor ``exp(-anneal * a)``, capped at
        :attr:`loss_cap`. ``S_eff`` and ``a`` come from the LR schedule (:func:`schedule_features`): the area under
        the LR relative to its peak and the annealed fraction of the peak LR, so a cosine or WSD schedule is
        predicted from a law fitted on any mix of schedules. ``steps`` counts optimizer updates applied
        (``RunHistory.step``); ``batch_size`` is in samples per optimizer step (not tokens).

        Args:
            n_params, steps, batch_size: where to predict (broadcast together).
            lr_schedule: the per-step LR (``lr_schedule[i]`` used by update ``i``; any scale: only its shape
                relative to the peak matters; steps past its end continue at its last value). ``None``: the
                schedule every fitted run shared (:attr:`schedule`, e.g. a ladder trained with one cosine recipe),
                or a constant LR when they did not share one.

        Example::

            >>> law = ScalingLaw(dict(n_c=1e10, alpha_n=0.08, s_c=200.0, alpha_s=0.7, b_star=2e4, alpha_b=0.3))
            >>> l = law.predict_loss(1e7, [100, 1000, 10000], 64)
            >>> bool(np.all(np.diff(l) < 0))
            True
        """
        self._check_batch(batch_size)
        lr = self.schedule if lr_schedule is None else _as_schedule(lr_schedule)
        p = self.params
        s_eff, a = schedule_features(lr, steps, lam=p["anneal_lambda"])
        # B_crit is a function of the current (annealed) loss L = f L', f = exp(-c a): with B_crit(f L') =
        # B_crit(L') f^(-1/alpha_B) (plateau l_p at L becomes l_p / f at L'), L' solves the constant-LR law at the
        # batch B f^(1/alpha_B).
        kw = self._kw
        b_eff = batch_size
        f = np.exp(-p["anneal"] * a)
        if p["anneal"]:
            b_eff = np.asarray(batch_size, dtype=float) * f ** (1.0 / p["alpha_b"])
            kw["l_plateau"] = p["l_plateau"] / f
        out = np.minimum(laws.loss_n_s_b(n_params, s_eff, b_eff, **kw) * f, self.loss_cap)
        self._check_bcrit_range(out)
        return out

    def _check_bcrit_range(self, loss: np.ndarray) -> None:
        """Warn once when a prediction needs B_crit(L) below the lowest loss level it was fitted at."""
        if self._warned_range or self.bcrit_min_loss is None or not self.models_batch_size:
            return
        with np.errstate(all="ignore"):
            low = float(np.nanmin(loss)) if np.size(loss) and np.isfinite(loss).any() else float("inf")
        if low < self.bcrit_min_loss:

            self._warned_range = True
            there = "held at its value there" if self.params["l_plateau"] > 0 else "the power law extrapolated"
            warnings.warn(f"this prediction reaches loss {low:.4g}, below the lowest level ({self.bcrit_min_loss:.4g})"
                          f" at which B_crit(L) was measured: the critical batch there is {there}; a batch sweep "
                          "that trains further pins it down", FitWarning, stacklevel=3)

    def min_loss(self, n_params: ArrayLike, *, decayed: bool = False) -> np.ndarray:
        """Lowest loss a model of ``n_params`` reaches (infinite steps): ``e + (n_c/N)^alpha_n`` at a constant LR;
        with ``decayed=True`` after the LR has also decayed to zero, times the annealing factor ``exp(-anneal)``
        (the two agree for a law fitted without decayed runs). A decayed run's predicted loss can lie below the
        constant-LR minimum, never below the decayed one."""
        floor = self.params["e"] + laws.loss_n(n_params, n_c=self.params["n_c"], alpha_n=self.params["alpha_n"])
        return floor * math.exp(-self.params["anneal"]) if decayed else floor

    def critical_batch_size(self, loss: ArrayLike) -> np.ndarray:
        """Critical batch size in samples at ``loss`` (``* tokens_per_sample`` for tokens)."""
        self._need_critical("critical_batch_size")
        p = self.params
        return laws.critical_batch(loss, b_star=p["b_star"], alpha_b=p["alpha_b"], l_plateau=p["l_plateau"])

    def min_steps(self, loss: ArrayLike, n_params: ArrayLike) -> np.ndarray:
        """``S_min``: steps to reach ``loss`` at an infinite batch (``inf`` if below :meth:`min_loss`)."""
        return laws.min_steps_for_loss(loss, n_params, **self._kw_ns)

    def min_samples(self, loss: ArrayLike, n_params: ArrayLike) -> np.ndarray:
        """``E_min`` in samples: data to reach ``loss`` at a vanishing batch."""
        self._need_critical("min_samples / min_tokens")
        return self.critical_batch_size(loss) * self.min_steps(loss, n_params)

    def min_tokens(self, loss: ArrayLike, n_params: ArrayLike) -> np.ndarray:
        """``E_min`` in tokens (samples, with a warning, if ``tokens_per_sample`` is unknown)."""
        return self._to_tokens(self.min_samples(loss, n_params))

    def steps_to_loss(self, loss: ArrayLike, n_params: ArrayLike,
                      batch_size: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
        """Steps and tokens to reach ``loss`` at ``batch_size`` samples: ``S = S_min (1 + B_crit/B)``, ``B S``.

        ``inf`` where ``loss`` is at or below :meth:`min_loss`. Tokens are samples if ``tokens_per_sample`` is
        unknown (with a warning).
        """
        self._check_batch(batch_size)
        steps, samples = laws.steps_for_loss(loss, n_params, batch_size, **self._kw)
        return steps, self._to_tokens(samples)

    def compute_optimal(self, compute: float, *, level: float = 0.9,
                        tokens_per_sample: float | None = None) -> ComputeOptimal:
        """Best model size, batch and steps for ``compute`` FLOPs (``C = 6 N B S``, ``B`` in tokens).

        Kaplan App. B: train at the critical batch ``B = B_crit(L)``, which spends ``2 C_min``; the model size
        minimising the loss for ``C_min = compute / 2`` is found exactly (closed form when ``e = 0``). The
        intervals come from the bootstrap parameter sets.

        Args:
            compute: FLOPs.
            level: interval level.
            tokens_per_sample: tokens per sample (sequence length); overrides the law's, needed when the runs
                did not record it.

        Raises:
            ValueError: ``tokens_per_sample`` is unknown, ``compute`` is not positive, or the law has no critical
                batch (fitted with ``critical_batch="none"``).
        """
        if tokens_per_sample is not None:
            if not (tokens_per_sample > 0 and math.isfinite(tokens_per_sample)):
                raise ValueError(f"tokens_per_sample must be a positive number, got {tokens_per_sample!r}")
            law = ScalingLaw(self.params, form=self.form, tokens_per_sample=tokens_per_sample,
                             bootstrap=self.bootstrap, info=self.info, loss_cap=self.loss_cap,
                             fitted_batch_sizes=self.fitted_batch_sizes, schedule=self.schedule,
                             model_error=self.model_error, bcrit_min_loss=self.bcrit_min_loss)
            return law.compute_optimal(compute, level=level)
        if self.tokens_per_sample is None:
            raise ValueError("compute_optimal needs tokens_per_sample to convert FLOPs (6*N*tokens) to steps: pass "
                             "compute_optimal(compute, tokens_per_sample=...) or set RunHistory.tokens_per_sample")
        self._need_critical("compute_optimal")
        if not (compute > 0 and math.isfinite(compute)):
            raise ValueError(f"compute must be a positive number of FLOPs, got {compute!r}")
        values = self._compute_optimal_values(compute, self.params)
        intervals: dict[str, tuple[float, float]] = {}
        if len(self.bootstrap):
            samples = np.array([list(self._compute_optimal_values(compute, self._params_from_row(row)).values())
                                for row in self.bootstrap])
            los, his = percentile_band(samples, level)
            intervals = {key: (float(los[i]), float(his[i])) for i, key in enumerate(values)}
        return ComputeOptimal(compute=float(compute), intervals=intervals, level=level, **values)

    def _compute_optimal_values(self, compute: float, p: Mapping[str, float]) -> dict[str, float]:
        out = laws.compute_optimal_allocation(compute / 2.0, n_c=p["n_c"], alpha_n=p["alpha_n"], s_c=p["s_c"],
                                              alpha_s=p["alpha_s"], b_star=p["b_star"], alpha_b=p["alpha_b"],
                                              e=p["e"], tokens_per_sample=self.tokens_per_sample,
                                              l_plateau=p["l_plateau"])
        steps = 2.0 * float(out["s_min"])
        batch = float(out["b_crit"])
        return {"n_params": float(out["n"]), "batch_size": batch, "steps": steps,
                "tokens": steps * batch * self.tokens_per_sample, "loss": float(out["loss"])}

    # ------------------------------------------------------------------ uncertainty
    def _params_from_row(self, row: np.ndarray) -> dict[str, float]:
        return dict(zip(_PARAM_NAMES, map(float, row)))

    def with_params(self, params: Mapping[str, float]) -> ScalingLaw:
        """A copy with other constants (no bootstrap)."""
        law = ScalingLaw({**self.params, **params}, form=self.form, tokens_per_sample=self.tokens_per_sample,
                         info=self.info, loss_cap=self.loss_cap, fitted_batch_sizes=self.fitted_batch_sizes,
                         schedule=self.schedule, model_error=self.model_error, bcrit_min_loss=self.bcrit_min_loss)
        law._warned_batch = law._warned_range = True  # the bootstrap evaluates copies: the caller's law warns
        return law

    def interval(self, method: str, *args: Any, level: float = 0.9, **kwargs: Any) -> Any:
        """Bootstrap prediction interval of any prediction method.

        Args:
            method: a method name, e.g. ``"predict_loss"``, ``"min_loss"``, ``"steps_to_loss"``.
            *args: its arguments. **kwargs: its keyword arguments.
            level: central interval level.

        Returns:
            ``(low, high)`` arrays; for tuple-valued methods a tuple of ``(low, high)`` pairs.

        Raises:
            ValueError: the law has no bootstrap samples or the method is unknown.

        Example::

            >>> law = ScalingLaw(dict(n_c=1e10, alpha_n=0.08, s_c=200.0, alpha_s=0.7, b_star=2e4, alpha_b=0.3),
            ...                  bootstrap=[[1e10, a, 200.0, 0.7, 2e4, 0.3, 0.0] for a in (0.07, 0.08, 0.09)])
            >>> lo, hi = law.interval("min_loss", 1e6, level=0.9)
            >>> bool(lo < law.min_loss(1e6) < hi)
            True
        """
        if method not in {"predict_loss", "min_loss", "critical_batch_size", "min_steps", "min_samples",
                          "min_tokens", "steps_to_loss"}:
            raise ValueError(f"no interval for method {method!r}")
        if not len(self.bootstrap):
            raise ValueError("this law has no bootstrap samples: fit with n_bootstrap > 0")
        outs = [getattr(self.with_params(self._params_from_row(row)), method)(*args, **kwargs)
                for row in self.bootstrap]

        def band(stack: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                return percentile_band(np.stack([np.asarray(s, dtype=float) for s in stack]), level)

        if isinstance(outs[0], tuple):
            return tuple(band([o[i] for o in outs]) for i in range(len(outs[0])))
        lo, hi = band(outs)
        if method in ("predict_loss", "min_loss"):
            lo, hi = self._with_model_error(np.asarray(getattr(self, method)(*args, **kwargs), dtype=float), lo, hi,
                                            _normal_quantile(level) * self.model_sigma(args[0]))
        return lo, hi

    @staticmethod
    def _with_model_error(centre: np.ndarray, lo: np.ndarray, hi: np.ndarray,
                          half: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Bootstrap spread (noise) and the relative model error ``half`` in quadrature, in log loss.

        In log space a loss interval stays positive however large the model error of a far extrapolation (added
        to the loss itself, ``half * centre`` took the lower end below zero); for small errors it is the same.
        """
        with np.errstate(divide="ignore", invalid="ignore"):
            down = np.log(centre / np.maximum(np.minimum(lo, centre), np.finfo(float).tiny))
            up = np.log(np.maximum(hi, centre) / centre)
        return centre * np.exp(-np.hypot(down, half)), centre * np.exp(np.hypot(up, half))

    def model_sigma(self, n_params: ArrayLike) -> np.ndarray:
        """Relative model error of a loss prediction at ``n_params`` (one standard deviation).

        ``hypot(sigma, MODEL_ERROR_FLOOR)`` with ``sigma`` the RMS error the fit made predicting its own larger
        sizes from its smaller ones (:attr:`model_error`), grown linearly with the extrapolation distance in
        ``log N`` beyond the largest fitted size (in units of the distance that error was measured over).

        Example::

            >>> law = ScalingLaw(dict(n_c=1e10, alpha_n=0.08, s_c=200.0, alpha_s=0.7, b_star=2e4, alpha_b=0.3),
            ...                  model_error={"sigma": 0.02, "distance": 1.0, "n_max": 1e7})
            >>> round(float(law.model_sigma(1e7) / law.model_sigma(np.exp(2.0) * 1e7)), 3)
            0.5
        """
        me = self.model_error
        base = math.hypot(float(me.get("sigma", 0.0)), MODEL_ERROR_FLOOR)
        n = np.asarray(n_params, dtype=float)
        dist, n_max = float(me.get("distance", 0.0)), float(me.get("n_max", 0.0))
        if not (dist > 0 and n_max > 0):
            return np.full(n.shape, base)
        return base * np.maximum(1.0, np.log(np.maximum(n, n_max) / n_max) / dist)

    def param_intervals(self, *, level: float = 0.9) -> dict[str, tuple[float, float]]:
        """Bootstrap percentile intervals of the constants (empty without bootstrap)."""
        if not len(self.bootstrap):
            return {}
        out = {}
        for k, col in zip(_PARAM_NAMES, self.bootstrap.T):
            # Held-fixed constants (e.g. alpha_b = inf for a constant B_crit) have a point interval.
            lo, hi = (col[0], col[0]) if np.all(col == col[0]) else percentile_band(col, level)
            out[k] = (float(lo), float(hi))
        return out

    @property
    def stderr(self) -> dict[str, float]:
        """Bootstrap standard deviation of each constant (NaN without bootstrap)."""
        if len(self.bootstrap) < 2:
            return {k: float("nan") for k in _PARAM_NAMES}
        return {k: 0.0 if np.all(col == col[0]) else float(np.std(col, ddof=1))
                for k, col in zip(_PARAM_NAMES, self.bootstrap.T)}

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (round-trips through :meth:`from_dict`)."""
        info = None
        if self.info is not None:
            info = {k: getattr(self.info, k) for k in self.info.__dataclass_fields__}
        return {"type": "ScalingLaw", "form": self.form, "params": dict(self.params),
                "tokens_per_sample": self.tokens_per_sample, "loss_cap": json_float(self.loss_cap),
                "bootstrap": self.bootstrap.tolist(), "info": info, "fitted_batch_sizes": self.fitted_batch_sizes,
                "schedule": None if self.schedule is None else self.schedule.tolist(),
                "model_error": self.model_error, "bcrit_min_loss": self.bcrit_min_loss}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ScalingLaw:
        """Inverse of :meth:`to_dict`."""
        info = None
        if data.get("info"):  # JSON turned the tuple fields into lists
            info = FitInfo(**{k: tuple(v) if k in ("at_bounds", "messages") else v for k, v in data["info"].items()})
        return cls(data["params"], form=data.get("form"), tokens_per_sample=data.get("tokens_per_sample"),
                   bootstrap=data.get("bootstrap") or None, info=info,
                   loss_cap=float(data.get("loss_cap", "inf")), fitted_batch_sizes=data.get("fitted_batch_sizes"),
                   schedule=data.get("schedule"), model_error=data.get("model_error"),
                   bcrit_min_loss=data.get("bcrit_min_loss"))


# ------------------------------------------------------------------------------------------------------------------
# LR schedules: effective steps and the annealing fraction (Tissue et al. 2024 sums, science.md section 4.1)
# ------------------------------------------------------------------------------------------------------------------
_LAMBDAS = (0.99, 0.995, 0.999)  # annealing-momentum decays tried by a fit on decayed runs (best objective wins)


def schedule_features(lr: ArrayLike | None, steps: ArrayLike, *, lam: float = 0.999) -> tuple[np.ndarray, np.ndarray]:
    """Effective steps ``S1 / eta_max`` and annealed fraction ``(1 - lam) S2 / eta_max`` after ``steps`` updates.

    ``S1`` (the area under the LR, warmup counted at the peak) and ``S2`` (the annealing momentum) are those of
    :func:`lightning_scaling.forecast.momentum_sums`. At a constant LR the effective steps are the steps and the
    fraction is 0; after a long decay to ``eta_min`` the fraction approaches ``1 - eta_min / eta_max``. Steps past
    the end of ``lr`` continue at its last value. ``lr=None`` means a constant LR.

    Args:
        lr: per-step LR (``lr[i]`` used by update ``i``), or None.
        steps: optimizer steps (floats allowed: interpolated).
        lam: momentum decay ``lambda``.

    Returns:
        ``(effective_steps, annealed_fraction)`` arrays shaped like ``steps``.

    Example::

        >>> s, a = schedule_features(np.r_[np.ones(100), np.full(100, 0.1)], [100, 200], lam=0.9)
        >>> s.round(1).tolist(), a.round(3).tolist()
        ([100.0, 110.0], [0.0, 0.9])
    """
    s = np.asarray(steps, dtype=np.float64)
    if lr is None:
        return s.copy(), np.zeros_like(s)
    if not 0.0 < lam < 1.0:
        raise ValueError(f"lam must be in (0, 1), got {lam!r}")
    from lightning_scaling.forecast import momentum_sums

    eta = np.asarray(lr, dtype=np.float64).ravel()
    peak = float(eta.max()) if eta.size else 0.0
    if not peak > 0:
        return s.copy(), np.zeros_like(s)
    eta = np.concatenate([eta, eta[-1:]])  # one step past the end: the last momentum increment below
    n = eta.size - 1
    grid = np.arange(1, n + 2)
    s1, s2 = momentum_sums(eta, grid, lam=lam)
    x = np.concatenate([[0.0], grid[:-1]])
    s1_in = np.interp(s, x, np.concatenate([[0.0], s1[:-1]]))
    s2_in = np.interp(s, x, np.concatenate([[0.0], s2[:-1]]))
    # Past the end the LR stays at its last value: S1 grows linearly and the momentum decays geometrically, in
    # closed form (no per-step arrays for a prediction a million steps out).
    over = np.maximum(np.nan_to_num(s, nan=0.0) - n, 0.0)
    m_last = s2[-1] - s2[-2]
    s1_out = s1[-2] + eta[-1] * over
    s2_out = s2[-2] + m_last * (1.0 - lam ** over) / (1.0 - lam)
    past = s > n
    return (np.where(past, s1_out, s1_in) / peak, np.where(past, s2_out, s2_in) * (1.0 - lam) / peak)


def _run_schedule(run: RunHistory) -> np.ndarray | None:
    """The run's per-step LR (recorded ``planned_lr`` or ``lr``; None without one or when it is constant)."""
    from lightning_scaling.backtest import run_schedule  # the suite's own reading of a run's schedule

    lr, _ = run_schedule(run)
    if lr is None or lr.size == 0 or not lr.max() > 0:
        return None
    tail = lr[lr_warmup(lr):]  # from the first step within 1e-3 of the peak: the same tolerance marks "constant"
    return None if tail.min() >= (1.0 - 1e-3) * lr.max() else np.asarray(lr, dtype=np.float64)


def _shared_schedule(scheds: Sequence[np.ndarray | None]) -> np.ndarray | None:
    """The fitted runs' common LR schedule (relative to its peak) when they all used one decayed schedule."""
    if not scheds or any(s is None for s in scheds) or len({s.size for s in scheds}) > 1:
        return None
    rel = [s / s.max() for s in scheds]
    return rel[0] if all(np.allclose(r, rel[0], rtol=1e-6, atol=1e-9) for r in rel[1:]) else None


# ------------------------------------------------------------------------------------------------------------------
# Objective: summed Huber on log loss, in decorrelated parameters
#   theta = (a_n, alpha_n, a_s, alpha_s[, e][, c]) with size term exp(a_n - alpha_n u), u = log(N/N_ref), step
#   term exp(a_s - alpha_s v), v = log(S_min/S_ref) (a_n, a_s: the terms' logs at the reference point), and the
#   annealing factor exp(-c a), a the annealed fraction of schedule_features.
# ------------------------------------------------------------------------------------------------------------------
@dataclass
class _Points:
    u: np.ndarray
    v: np.ndarray
    log_loss: np.ndarray
    n_ref: float
    s_ref: float
    run_index: np.ndarray
    anneal: np.ndarray
    weight: np.ndarray


@dataclass(frozen=True)
class _Layout:
    """Which optional parameters theta holds: the irreducible loss ``e`` and the annealing coefficient ``c``."""

    irreducible: bool
    anneal: bool = False

    @property
    def names(self) -> tuple[str, ...]:
        return ("a_n", "alpha_n", "a_s", "alpha_s") + ("e",) * self.irreducible + ("anneal",) * self.anneal


def _take(pts: _Points, sel: np.ndarray) -> _Points:
    return _Points(u=pts.u[sel], v=pts.v[sel], log_loss=pts.log_loss[sel], n_ref=pts.n_ref, s_ref=pts.s_ref,
                   run_index=pts.run_index[sel], anneal=pts.anneal[sel], weight=pts.weight[sel])


def _huber(r: np.ndarray, w: np.ndarray) -> tuple[float, np.ndarray]:
    """Summed Huber loss (delta ``_HUBER_DELTA``) of residuals ``r`` with weights ``w``, and its derivative."""
    rho, psi = huber(r, _HUBER_DELTA)
    return float(np.sum(w * rho)), w * psi


def _log_pred(theta: np.ndarray, pts: _Points, lay: _Layout) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(log prediction, size term, step term, e + size + step)`` at the points."""
    a_n, alpha_n, a_s, alpha_s = theta[:4]
    e = theta[4] if lay.irreducible else 0.0
    c = theta[-1] if lay.anneal else 0.0
    tn = np.exp(a_n - alpha_n * pts.u)
    ts = np.exp(a_s - alpha_s * pts.v)
    base = e + tn + ts
    return np.log(base) - c * pts.anneal, tn, ts, base


def _huber_objective(theta: np.ndarray, pts: _Points, lay: _Layout) -> tuple[float, np.ndarray]:
    logp, tn, ts, base = _log_pred(theta, pts, lay)
    # Summed (not averaged) Huber: O(1) gradients, so L-BFGS does not stop at its start (Besiroglu et al. 2024).
    f, dr = _huber(logp - pts.log_loss, pts.weight)
    psi = dr / base
    g = [np.sum(psi * tn), -np.sum(psi * tn * pts.u), np.sum(psi * ts), -np.sum(psi * ts * pts.v)]
    if lay.irreducible:
        g.append(np.sum(psi))
    if lay.anneal:
        g.append(-np.sum(dr * pts.anneal))
    return f, np.asarray(g)


def _theta_to_params(theta: np.ndarray, pts: _Points, lay: _Layout, lam: float) -> dict[str, float]:
    a_n, alpha_n, a_s, alpha_s = map(float, theta[:4])
    return {"n_c": pts.n_ref * _exp(a_n / alpha_n), "alpha_n": alpha_n,
            "s_c": pts.s_ref * _exp(a_s / alpha_s), "alpha_s": alpha_s,
            "e": float(theta[4]) if lay.irreducible else 0.0,
            "anneal": float(theta[-1]) if lay.anneal else 0.0, "anneal_lambda": lam}


def _multistart(objective: Callable[[np.ndarray], tuple[float, np.ndarray]], grid: Sequence[np.ndarray],
                bounds: Sequence[tuple[float, float]], n_starts: int) -> Any:
    """L-BFGS-B from the ``n_starts`` best points of ``grid``: the one optimiser of every L(N, S, B) fit."""
    lo, hi = np.array([b[0] for b in bounds]), np.array([b[1] for b in bounds])
    grid = [np.clip(g, lo, hi) for g in grid]
    vals = np.array([objective(t)[0] for t in grid]) if len(grid) > 1 else np.zeros(1)
    best = None
    for i in np.argsort(vals, kind="stable")[:n_starts]:
        res = minimize(objective, grid[i], jac=True, method="L-BFGS-B", bounds=bounds,
                       options={"maxiter": 3000, "ftol": 1e-15, "gtol": 1e-10, "maxcor": 20})
        res.start, res.bounds = grid[i], list(bounds)
        if best is None or res.fun < best.fun:
            best = res
    best.n_grid = len(grid)
    return best


def _optimise(pts: _Points, lay: _Layout, *, n_starts: int,
              x0: np.ndarray | None = None) -> tuple[np.ndarray, Any, int]:
    lmin = float(np.exp(pts.log_loss.min()))
    lmed = float(np.exp(np.median(pts.log_loss)))
    bounds = [(-30.0, math.log(10 * lmed)), (1e-3, 3.0), (-30.0, math.log(10 * lmed)), (1e-2, 6.0)]
    bounds += [(0.0, 0.999 * lmin)] * lay.irreducible + [(0.0, 3.0)] * lay.anneal
    if x0 is not None:
        grid = [x0]
    else:
        grid = []
        for ef in ((0.0,) if not lay.irreducible else (0.0, 0.3, 0.6, 0.85)):
            rest = lmed - ef * lmin
            for an in (0.03, 0.08, 0.2, 0.5):
                for as_ in (0.3, 0.6, 1.0, 1.8):
                    for split in (0.5, 0.8, 0.95):
                        for c in ((0.0,) if not lay.anneal else (0.05, 0.3)):
                            th = [math.log(split * rest), an, math.log((1 - split) * rest), as_]
                            grid.append(np.array(th + [ef * lmin] * lay.irreducible + [c] * lay.anneal))
    res = _multistart(lambda t: _huber_objective(t, pts, lay), grid, bounds, n_starts)
    return res.x, res, res.n_grid


def _bin_runs(runs: Sequence[RunHistory], *, warmup_steps: int | str | None,
              points_per_run: int) -> list[tuple[np.ndarray, np.ndarray, float, float]]:
    """Per run: (step, loss) medians of log-step bins after warmup, N and B."""
    out = []
    for r in runs:
        keep = (r.step > _warmup_end(r, warmup_steps)) & np.isfinite(r.loss) & (r.loss > 0)
        s, l = r.step[keep].astype(float), r.loss[keep]
        if s.size < 3:
            raise ValueError(f"run {r.name!r} has only {s.size} finite post-warmup points; need >= 3")
        # Median-bin in log step: keeps the power law's leverage, cuts noise and cost (5000 -> <= points_per_run).
        x = np.log(s)
        edges = np.linspace(x[0], x[-1] + 1e-12, points_per_run + 1)
        b = np.clip(np.searchsorted(edges, x, side="right") - 1, 0, points_per_run - 1)
        counts = np.bincount(b, minlength=points_per_run)
        splits = np.split(np.argsort(b, kind="stable"), np.cumsum(counts)[:-1])
        bs = np.array([np.exp(np.mean(x[g])) for g in splits if g.size])
        bl = np.array([np.median(l[g]) for g in splits if g.size])
        out.append((bs, bl, float(r.n_params), float(r.batch_size)))
    return out


@dataclass
class _Binned:
    """The binned runs of a fit with their LR schedules (None: constant) and the annealing decay in use."""

    bins: list[tuple[np.ndarray, np.ndarray, float, float]]
    scheds: list[np.ndarray | None]
    lam: float = 0.999
    _features: dict[float, list[tuple[np.ndarray, np.ndarray]]] = field(default_factory=dict, repr=False)

    def features(self, lam: float) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per run ``schedule_features`` at its bins, computed once per decay (the bootstrap reuses them)."""
        if lam not in self._features:
            self._features[lam] = [schedule_features(sc, bs, lam=lam) for (bs, *_), sc in zip(self.bins, self.scheds)]
        return self._features[lam]

    @property
    def decayed(self) -> bool:
        return any(s is not None for s in self.scheds)


def _collect_points(data: _Binned, cb: CriticalBatchFit, ref: tuple[float, float] | None = None,
                    lam: float | None = None) -> _Points:
    """Fit points ``(log N, log S_min, log L, a)`` with ``S_min = S_eff / (1 + B_crit(L)/B)``."""
    lam = data.lam if lam is None else lam
    feats = data.features(lam)
    n = np.concatenate([np.full(bs.size, nn) for bs, _, nn, _ in data.bins])
    smin = np.concatenate([laws.s_min(f[0], bb, cb(bl)) for (_, bl, _, bb), f in zip(data.bins, feats)])
    loss = np.concatenate([bl for _, bl, _, _ in data.bins])
    idx = np.concatenate([np.full(bs.size, i) for i, (bs, _, _, _) in enumerate(data.bins)])
    if ref is None:
        ref = (float(np.exp(np.mean(np.log(n)))), float(np.exp(np.mean(np.log(smin)))))
    n_ref, s_ref = ref
    # Each model size weighs the same: a batch sweep at one size (5 runs) would otherwise outweigh the ladder's
    # other sizes, and its S_min conversions (through an uncertain B_crit) pulled the fit off the ladder.
    runs_of = {nn: sum(b[2] == nn for b in data.bins) for _, _, nn, _ in data.bins}
    weight = np.concatenate([np.full(bs.size, 1.0 / runs_of[nn]) for bs, _, nn, _ in data.bins])
    return _Points(u=np.log(n / n_ref), v=np.log(smin / s_ref), log_loss=np.log(loss), n_ref=n_ref, s_ref=s_ref,
                   run_index=idx, anneal=np.concatenate([f[1] for f in feats]), weight=weight)


def _subset(pts: _Points, rows: np.ndarray) -> _Points:
    """Points of the given run indices (with repeats, for the bootstrap), same reference point."""
    return _take(pts, np.concatenate([np.flatnonzero(pts.run_index == i) for i in rows]))


def _block_resample(pts: _Points, rng: np.random.Generator, block: int = 8) -> _Points:
    """Moving-block bootstrap within each run: contiguous blocks of (log-step ordered) points, same count per run."""
    sel = []
    for i in np.unique(pts.run_index):
        idx = np.flatnonzero(pts.run_index == i)  # in log-step order (bins are built in order)
        b = min(block, idx.size)
        starts = rng.integers(0, idx.size - b + 1, -(-idx.size // b))
        sel.append(np.concatenate([idx[s:s + b] for s in starts])[:idx.size])
    return _take(pts, np.concatenate(sel))


def _val_view(run: RunHistory) -> RunHistory:
    """The run's validation curve as a RunHistory (LR interpolated at the validation steps, for warmup detection)."""
    if run.val_step is None or run.val_loss is None or len(run.val_step) == 0:
        raise ValueError(f"run {run.name!r} has no validation curve (val_step/val_loss) for loss_source='val'")
    lr = None
    if run.lr is not None and len(run) and np.isfinite(run.lr).any():
        ok = np.isfinite(run.lr)
        lr = np.interp(run.val_step, run.step[ok], run.lr[ok])
    return RunHistory(name=run.name, n_params=run.n_params, batch_size=run.batch_size,
                      tokens_per_sample=run.tokens_per_sample, step=run.val_step, loss=run.val_loss, lr=lr,
                      planned_lr=run.planned_lr)


def _check_token_units(runs: Sequence[RunHistory], tps: float | None) -> None:
    """Warn when recorded tokens disagree with step * batch_size * tokens_per_sample (batch given in tokens?)."""
    if tps is None:
        return
    for r in runs:
        if r.tokens is None or not len(r) or r.batch_size is None:
            continue
        ok = np.isfinite(r.tokens) & (r.step > 0)
        if not ok.any():
            continue
        ratio = float(np.median(r.tokens[ok] / (r.step[ok] * r.batch_size * tps)))
        if not 0.9 < ratio < 1.1:
            warnings.warn(f"run {r.name!r}: recorded tokens are {ratio:.3g}x step * batch_size * tokens_per_sample; "
                          "batch_size must be in samples (sequences) per optimizer step, not tokens, and "
                          "tokens_per_sample the tokens per sample", DataWarning, stacklevel=3)
            return


# ------------------------------------------------------------------------------------------------------------------
# fit_scaling_law stages: resolve the critical batch, bin the runs, choose the form, fit, calibrate, bootstrap
# ------------------------------------------------------------------------------------------------------------------
_NO_BCRIT_HELP = (
    " Either pass critical_batch='none' to fit L(N, S) at the batch size used (predictions then hold for that batch "
    "only; min_tokens/compute_optimal need B_crit), or a critical batch: critical_batch=fit_critical_batch_size(sweep)"
    " from runs of one size at >= 3 batch sizes, a (b_star, alpha_b) pair or a constant in samples; or include such a"
    " sweep in runs, or record the gradient noise scale (GradientNoiseScale callback -> gns_b_simple)")


def _resolve_critical(runs: Sequence[RunHistory], data: _Binned, critical_batch: Any, tps: float | None,
                      level_kwargs: Mapping[str, Any] | None,
                      warmup_steps: int | str | None) -> tuple[CriticalBatchFit, list[_CrossingTable]]:
    """Stage 1: B_crit(L) given, from a batch sweep in the runs, from the GNS record, or jointly fitted."""
    if critical_batch is not None:
        return _as_critical(critical_batch, tps), []
    kw = dict(level_kwargs or {})
    tables = _sweep_tables(runs, data.scheds, levels=kw.get("levels"), n_levels=kw.get("n_levels", 12),
                           warmup_steps=kw.get("warmup_steps", warmup_steps))
    sweep_error = None
    if tables:
        try:
            # no alpha_B interval: the law's bootstrap refits B_crit on resampled runs itself
            return _critical_from_tables(tables, tokens_per_sample=tps, plateau=kw.get("plateau")), tables
        except ValueError as err:  # an unusable sweep: fall back to the GNS record if there is one
            sweep_error = err
    fallback = _critical_from_gns(runs, tps) or _critical_from_joint(data.bins, tps)
    if fallback is None:
        why = f" (the batch sweep failed: {sweep_error})" if sweep_error else ""
        batches = sorted({float(r.batch_size) for r in runs})
        raise ValueError("no critical batch size available" + why + f" (runs use batch sizes {batches} samples and "
                         "record no gradient noise scale)." + _NO_BCRIT_HELP)
    if sweep_error is not None:
        using = "the recorded gradient noise scale" if fallback.source == "gns" else "a joint fit of L(N, S, B)"
        warnings.warn(f"batch-size sweep unusable ({sweep_error}); using {using}", FitWarning, stacklevel=4)
    return fallback, []


def _fit_points(data: _Binned, cb: CriticalBatchFit, lay: _Layout, n_starts: int,
                ref: tuple[float, float] | None = None) -> tuple[np.ndarray, Any, int, _Points]:
    """Stage 4: the multi-start fit; with an annealing term also the momentum decay (best objective of _LAMBDAS).

    Sets ``data.lam`` to the decay chosen. The effective steps do not depend on it, so the points' reference is
    the same for every decay and the objectives compare.
    """
    best = None
    for lam in (_LAMBDAS if lay.anneal else (data.lam,)):
        pts = _collect_points(data, cb, ref, lam=lam)
        theta, res, n_grid = _optimise(pts, lay, n_starts=n_starts)
        if best is None or res.fun < best[1].fun:
            best = (theta, res, n_grid, pts, lam)
    data.lam = best[4]
    return best[:4]


def _held_out_error(train: _Points, test: _Points, lay: _Layout, n_starts: int) -> np.ndarray:
    """Fit ``train``, relative error on the last quarter of each ``test`` run's points (their final losses)."""
    theta, _, _ = _optimise(train, lay, n_starts=n_starts)
    errs = []
    for i in np.unique(test.run_index):
        sub = _take(test, test.run_index == i)
        tail = slice(-max(1, sub.u.size // 4), None)
        errs.append(float(np.mean(np.exp(_log_pred(theta, sub, lay)[0][tail] - sub.log_loss[tail]) - 1.0)))
    return np.asarray(errs)


def _size_split(runs: Sequence[RunHistory], sizes: Sequence[float], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Run indices of the ``k`` smallest sizes and of the rest."""
    small = np.array([float(r.n_params) in set(sizes[:k]) for r in runs])
    return np.flatnonzero(small), np.flatnonzero(~small)


def _choose_form(data: _Binned, cb: CriticalBatchFit, runs: Sequence[RunHistory], sizes: Sequence[float],
                 form: str, anneal: bool, n_starts: int) -> tuple[str, dict[str, float], np.ndarray | None]:
    """Stage 3: ``form="auto"`` keeps the form that predicts the largest fitted size better from the others.

    Returns the form, the RMS held-out error per form and the chosen form's per-run errors (reused by
    :func:`_calibrate`, which would otherwise repeat the same held-out fit).
    """
    if form != "auto":
        return form, {}, None
    if len(sizes) < 3:
        warnings.warn("form='auto' needs >= 3 model sizes to validate on the largest; using 'kaplan'",
                      FitWarning, stacklevel=4)
        return "kaplan", {}, None
    pts = _collect_points(data, cb)
    fit_idx, test_idx = _size_split(runs, sizes, _inner_split(len(sizes)))
    train, test = _subset(pts, fit_idx), _subset(pts, test_idx)
    errs = {name: _held_out_error(train, test, _Layout(irreducible=name != "kaplan", anneal=anneal), n_starts)
            for name in ("kaplan", "kaplan+irreducible")}
    validation = {name: float(np.sqrt(np.mean(e**2))) for name, e in errs.items()}
    chosen = min(validation, key=validation.get)
    return chosen, validation, errs[chosen]


def _choose_plateau(data: _Binned, cb: CriticalBatchFit, runs: Sequence[RunHistory], sizes: Sequence[float],
                    anneal: bool, n_starts: int) -> tuple[CriticalBatchFit, dict[str, float]]:
    """Stage 1b: below the sweep's levels, B_crit held (the default) or the power law, whichever predicts better.

    The calibration's protocol: fit the smaller two thirds of the sizes with each, predict the rest's final
    losses. Held wins ties (then the larger sizes never trained below the sweep, and B_crit plateaus late in
    training: Merrill et al. 2025); a ladder whose larger sizes train where the power law still holds picks it.
    Returns the choice and both RMS errors (``FitInfo.validation``).
    """
    if len(sizes) < 3 or not cb.l_plateau > 0:
        return replace(cb, plateau_auto=False), {}
    fit_idx, test_idx = _size_split(runs, sizes, _inner_split(len(sizes)))
    lay = _Layout(irreducible=False, anneal=anneal)

    def rms(c: CriticalBatchFit) -> float:
        pts = _collect_points(data, c)
        return float(np.sqrt(np.mean(_held_out_error(_subset(pts, fit_idx), _subset(pts, test_idx), lay,
                                                     n_starts) ** 2)))

    cb = replace(cb, plateau_auto=False)
    power = replace(cb, l_plateau=0.0)
    errs = {"b_crit held": rms(cb), "b_crit power law": rms(power)}
    return (power if errs["b_crit power law"] < errs["b_crit held"] - 1e-6 else cb), errs


def _inner_split(n_sizes: int) -> int:
    """Sizes fitted when a fit validates itself: the smaller two thirds (>= 2, leaving >= 1 to predict)."""
    return min(max(2, int(round(n_sizes * 2 / 3))), n_sizes - 1)


def _calibrate(pts: _Points, runs: Sequence[RunHistory], sizes: Sequence[float], lay: _Layout,
               n_starts: int, err: np.ndarray | None = None) -> dict[str, float]:
    """Stage 5: the model error the fit makes on its own larger sizes, for prediction intervals.

    The suite's protocol replayed inside the fit: fit the smaller two thirds of the sizes, predict the final
    losses of the rest. ``sigma`` is the RMS relative error, ``distance`` the log-size span it extrapolated over
    (``log(N_max / N_fit_max)``) and ``n_max`` the largest fitted size; :meth:`ScalingLaw.interval` scales sigma
    with the extrapolation distance of a prediction. Resampling runs (the bootstrap) only measures noise.
    ``err``: these errors when :func:`_choose_form` already measured them.
    """
    if len(sizes) < 3:
        return {"sigma": 0.0, "distance": 0.0, "n_max": float(sizes[-1]), "n_sizes": 0}
    k = _inner_split(len(sizes))
    fit_idx, test_idx = _size_split(runs, sizes, k)
    if err is None:
        err = _held_out_error(_subset(pts, fit_idx), _subset(pts, test_idx), lay, n_starts)
    return {"sigma": float(np.sqrt(np.mean(err**2))), "distance": float(math.log(sizes[-1] / sizes[k - 1])),
            "n_max": float(sizes[-1]), "n_sizes": len(sizes) - k}


def _critical_params(cb: CriticalBatchFit) -> dict[str, float]:
    """The law's B_crit(L) constants."""
    return {"b_star": cb.b_star, "alpha_b": cb.alpha_b, "l_plateau": cb.l_plateau}


def _bootstrap(runs: Sequence[RunHistory], data: _Binned, pts: _Points, cb: CriticalBatchFit,
               tables: Sequence[_CrossingTable], lay: _Layout, theta: np.ndarray, tps: float | None,
               n_bootstrap: int, seed: int | None) -> list[list[float]]:
    """Stage 6: parameter sets refitted on resampled runs (B_crit refitted too when it came from a sweep)."""
    rng = np.random.default_rng(seed)
    rows_boot: list[list[float]] = []
    n_runs = len(runs)

    def row(th: np.ndarray, sub: _Points, c: CriticalBatchFit) -> list[float]:
        p = {**_theta_to_params(th, sub, lay, data.lam), **_critical_params(c)}
        return [p[k] for k in _PARAM_NAMES]

    while n_runs < 4 and len(rows_boot) < n_bootstrap:
        sub = _block_resample(pts, rng)
        rows_boot.append(row(_optimise(sub, lay, n_starts=1, x0=theta)[0], sub, cb))
    attempts = 0
    members = [t.members for t in tables]
    while n_runs >= 4 and len(rows_boot) < n_bootstrap and attempts < 3 * n_bootstrap:
        attempts += 1
        rows = rng.integers(0, n_runs, n_runs)
        if len({float(runs[i].n_params) for i in rows}) < 2:
            continue
        cb_b, sub = cb, None
        if tables:
            # Refit B_crit on the resampled runs of each batch sweep, then recompute S_min for all points.
            try:
                picked = [np.concatenate([np.flatnonzero(m == i) for i in rows if i in m]) if m.size else m
                          for m in members]
                cb_b = _critical_from_tables(tables, tokens_per_sample=tps, plateau=cb.l_plateau > 0,
                                             rows=[p if p.size else np.arange(len(m)) for p, m in zip(picked, members)])
                sub = _subset(_collect_points(data, cb_b, ref=(pts.n_ref, pts.s_ref)), rows)
            except ValueError:
                continue
        if sub is None:
            sub = _subset(pts, rows)
        rows_boot.append(row(_optimise(sub, lay, n_starts=1, x0=theta)[0], sub, cb_b))
    return rows_boot


@_blas_one_thread
def fit_scaling_law(runs: Sequence[RunHistory], *, critical_batch: CriticalBatchFit | Mapping[str, float]
                    | tuple[float, float] | None = None,
                    form: Literal["kaplan", "kaplan+irreducible", "auto"] = "kaplan",
                    warmup_steps: int | str | None = "auto", n_bootstrap: int = 100, seed: int | None = 0,
                    tokens_per_sample: float | None = None, points_per_run: int = 64, n_starts: int = 6,
                    level_kwargs: Mapping[str, Any] | None = None,
                    loss_source: Literal["train", "val"] = "train") -> ScalingLaw:
    """Fit ``L(N, S_min)`` (and so ``L(N, S, B)``) jointly to runs of several model sizes.

    Steps are converted to ``S_min = S / (1 + B_crit(L)/B)`` with the critical batch from, in order:
    ``critical_batch``; a :func:`fit_critical_batch_size` on the runs when some size was run at >= 2 batch sizes;
    the gradient-noise-scale ``B_simple`` recorded in the histories (``gns_b_simple``); a joint fit of all
    constants of ``L(N, S, B)`` to the curves (:func:`fit_loss_n_s_b`) when the runs use >= 2 batch sizes but no
    size was run at two (weakly identified: a warning says so); else ``ValueError``.
    Post-warmup points are median-binned in log step (``points_per_run`` per run) and fitted by minimising the
    summed Huber loss (delta 1e-3) of log loss with L-BFGS-B from the ``n_starts`` best points of a grid of starts,
    within bounds. The bootstrap resamples whole runs and refits B_crit too when it was fitted from the runs; a
    ``critical_batch`` passed in is held fixed, so its own uncertainty is not propagated. With fewer than 4 runs a
    run-level resample is degenerate (2 runs have one resample with both sizes), so it resamples contiguous blocks
    of log-step bins within each run instead (a moving-block bootstrap: neighbouring points of a curve are
    correlated); such intervals reflect curve noise, not run-to-run variation, and are a lower bound.

    Robustness: non-finite losses are ignored; logging may be sparse (>= 3 points after warmup per run); runs may
    have very different lengths (each run contributes at most ``points_per_run`` median-binned points, so long or
    densely logged runs do not dominate); noisy per-step training losses are median-binned.

    Args:
        runs: histories with ``n_params`` and ``batch_size``; >= 2 distinct model sizes.
        critical_batch: a :class:`CriticalBatchFit`, a dict ``{"b_star": samples, "alpha_b": ...}``, a
            ``(b_star, alpha_b)`` pair, a number (a constant critical batch in samples), or ``"none"``: runs at a
            single batch size carry no information on B_crit, and ``"none"`` fits a plain ``L(N, S)`` at that
            batch (``B_crit = 0``, so ``S_min = S``). Such a law predicts trajectories, final and minimum losses
            and steps at the fitted batch size; at another batch size it returns the same per-step curve (with a
            warning), and ``critical_batch_size``, ``min_tokens`` and ``compute_optimal`` raise ``ValueError``.
            Batch sizes are always in samples (sequences) per optimizer step, never tokens.
        form: ``"kaplan"`` (``(N_c/N)^a_N + (S_c/S_min)^a_S``), ``"kaplan+irreducible"`` (adds a constant ``e``)
            or ``"auto"``: fit both on all but the largest model and keep the one predicting it better.
        warmup_steps: steps to drop from each run's start: an int, None, or ``"auto"`` (twice the step where the
            recorded LR first reaches its peak, at least 10% and at most 50% of the run: the post-warmup transient).
        n_bootstrap: bootstrap refits over runs (0 to skip).
        seed: bootstrap seed.
        tokens_per_sample: tokens per sample (default: from the runs).
        points_per_run: log-step bins per run.
        n_starts: grid starts refined with L-BFGS-B.
        level_kwargs: extra keyword arguments for :func:`fit_critical_batch_size` when it is fitted here.
        loss_source: ``"train"`` fits ``RunHistory.loss``; ``"val"`` fits the validation curve
            (``val_step``/``val_loss``) of each run instead.

    Returns:
        A :class:`ScalingLaw`.

    Raises:
        ValueError: missing ``n_params``/``batch_size``, fewer than 2 sizes, or no source of B_crit.

    Example::

        >>> import numpy as np
        >>> from lightning_scaling import RunHistory
        >>> from lightning_scaling.laws import loss_n_s_b
        >>> k = dict(n_c=1e10, alpha_n=0.08, s_c=200.0, alpha_s=0.7, b_star=2e4, alpha_b=0.3)
        >>> steps = np.arange(0, 3001, 10)
        >>> runs = [RunHistory(name=f"n{n:g}", n_params=n, batch_size=64, tokens_per_sample=128, step=steps,
        ...                    loss=np.minimum(loss_n_s_b(n, steps, 64, **k), 10.0)) for n in (1e6, 1e7, 3e7)]
        >>> law = fit_scaling_law(runs, critical_batch=(2e4, 0.3), n_bootstrap=10)
        >>> plan = law.compute_optimal(1e18)
        >>> bool(plan.intervals["loss"][0] <= plan.loss <= plan.intervals["loss"][1])
        True
    """
    runs = _check_runs(runs, "fit_scaling_law")
    if loss_source not in ("train", "val"):
        raise ValueError(f"loss_source must be 'train' or 'val', got {loss_source!r}")
    if loss_source == "val":
        runs = [_val_view(r) for r in runs]
    if form not in ("kaplan", "kaplan+irreducible", "auto"):
        raise ValueError(f"form must be 'kaplan', 'kaplan+irreducible' or 'auto', got {form!r}")
    bad = [r.name for r in runs if r.n_params is None or r.batch_size is None]
    if bad:
        raise ValueError(f"runs {bad} lack n_params or batch_size; both are needed to fit L(N, S, B)")
    sizes = sorted({float(r.n_params) for r in runs})
    if len(sizes) < 2:
        raise ValueError(f"fit_scaling_law needs runs of >= 2 model sizes, got only N={sizes}")
    if n_bootstrap < 0 or points_per_run < 3 or n_starts < 1:
        raise ValueError("n_bootstrap must be >= 0, points_per_run >= 3 and n_starts >= 1")
    tps = _tokens_per_sample(runs, tokens_per_sample)
    _check_token_units(runs, tps)

    data = _Binned(_bin_runs(runs, warmup_steps=warmup_steps, points_per_run=points_per_run),
                   [_run_schedule(r) for r in runs])
    cb, tables = _resolve_critical(runs, data, critical_batch, tps, level_kwargs, warmup_steps)
    anneal = data.decayed
    plateau_check: dict[str, float] = {}
    if cb.plateau_auto:
        cb, plateau_check = _choose_plateau(data, cb, runs, sizes, anneal, n_starts)
    pre_lay, pre = _Layout(irreducible=False, anneal=True), None
    if anneal and form == "auto":  # judge the forms at the momentum decay a Kaplan fit chooses
        pre = _fit_points(data, cb, pre_lay, n_starts)
    chosen, validation, held_err = _choose_form(data, cb, runs, sizes, form, anneal, n_starts)
    lay = _Layout(irreducible=chosen == "kaplan+irreducible", anneal=anneal)
    # the fit above is this fit when the Kaplan form wins (same points, layout and decays): reuse it
    theta, res, n_grid, pts = pre if pre is not None and lay == pre_lay else _fit_points(data, cb, lay, n_starts)
    params = {**_theta_to_params(theta, pts, lay, data.lam), **_critical_params(cb)}
    calibration = _calibrate(pts, runs, sizes, lay, n_starts, held_err)
    rows_boot = _bootstrap(runs, data, pts, cb, tables, lay, theta, tps, n_bootstrap, seed)

    info = FitInfo(success=bool(res.success), message=str(res.message), nfev=int(res.nfev), nit=int(res.nit),
                   objective=float(res.fun), n_starts=n_starts, n_grid=n_grid, n_points=int(pts.u.size),
                   n_runs=len(runs), moved=bool(np.any(np.abs(res.x - res.start) > 1e-8)), form=chosen,
                   critical_batch_source=cb.source, validation={**validation, **plateau_check},
                   n_bootstrap=len(rows_boot))
    cap = max(float(np.nanmax(np.where(np.isfinite(r.loss), r.loss, np.nan))) for r in runs)
    law = ScalingLaw(params, form=chosen, tokens_per_sample=tps, bootstrap=np.array(rows_boot) if rows_boot else None,
                     info=info, loss_cap=cap, fitted_batch_sizes=sorted({float(r.batch_size) for r in runs}),
                     schedule=_shared_schedule(data.scheds), model_error=calibration, bcrit_min_loss=cb.min_loss)
    longest = max(runs, key=lambda r: float(r.step[-1]))
    probe = (sizes[-1], float(longest.step[-1]), float(longest.batch_size))
    return _judged(law, theta, res.bounds, lay.names, _dropped_losses(runs), total=sum(len(r) for r in runs),
                   probe=probe)


def _dropped_losses(runs: Sequence[RunHistory]) -> dict[str, int]:
    """Loss points a fit cannot use, by reason (fits are on log loss)."""
    loss = np.concatenate([np.asarray(r.loss, dtype=np.float64) for r in runs])
    finite = np.isfinite(loss)
    return {"nonfinite": int(np.sum(~finite)), "nonpositive": int(np.sum(loss[finite] <= 0))}


# Exponents at a bound mean the data do not determine them; the amplitudes' bounds are wide and harmless.
_EXPONENTS = ("alpha_n", "alpha_s", "alpha_b")
_DROPPED_WARN_FRACTION = 0.1


def _judged(law: ScalingLaw, theta: np.ndarray, bounds: Sequence[tuple[float, float]], names: Sequence[str],
            dropped: Mapping[str, int], *, total: int, probe: tuple[float, float, float]) -> ScalingLaw:
    """Check that a fitted law is identified and report dropped points: ``FitInfo`` fields and a ``FitWarning``.

    ``probe`` is an ``(N, S, B)`` inside the data (largest size, longest run) where the law must predict a finite
    loss. A law that fails a check keeps its parameters (for inspection) but gets ``success=False``.
    """
    from lightning_scaling.warnings import FitWarning

    at_bounds = tuple(name for name, x, (lo, hi) in zip(names, theta, bounds)
                      if name in _EXPONENTS and (abs(x - lo) <= 1e-6 * max(1.0, abs(lo))
                                                 or abs(x - hi) <= 1e-6 * max(1.0, abs(hi))))
    problems = []
    if "alpha_n" in at_bounds and theta[names.index("alpha_n")] <= bounds[names.index("alpha_n")][0] * 1.001:
        problems.append("the loss does not improve with model size N (alpha_n sits at its lower bound)")
    elif at_bounds:
        problems.append(f"exponent(s) {', '.join(at_bounds)} sit at a bound of the search range")
    bad = [k for k in ("n_c", "s_c") if not (math.isfinite(law.params[k]) and 0 < law.params[k] < 1e100)]
    if bad:
        values = ", ".join(f"{law.params[k]:.3g}" for k in bad)
        problems.append(f"constant(s) {', '.join(bad)} are degenerate ({values})")
    with np.errstate(all="ignore"):  # the probe is no prediction of the user's: a copy, so their warnings stay
        pred = float(np.asarray(law.with_params({}).predict_loss(*probe)).ravel()[0])
    if not (math.isfinite(pred) and pred > 0):
        problems.append(f"it predicts a loss of {pred} inside the data (N={probe[0]:g}, S={probe[1]:g})")
    n_drop = sum(dropped.values())
    messages = list(problems)
    fitted, box = dict(zip(names, theta)), dict(zip(names, bounds))  # names may list an e the form did not fit
    if "e" in fitted and fitted["e"] <= box["e"][0] + 1e-6 * max(1.0, abs(box["e"][1])):  # as at_bounds above
        # a legitimate value (the law becomes Kaplan's), not an unidentified fit, but its floor is then no estimate
        messages.append("the irreducible loss e sits at 0, its lower bound: the runs show no floor, so min_loss "
                        "falls toward 0 as N grows and is no estimate of the data's floor")
    if n_drop:
        messages.append(f"{n_drop} of {total} points dropped: " +
                        ", ".join(f"{v} {k}" for k, v in dropped.items() if v))
    info = replace(law.info, success=law.info.success and not problems, identified=not problems,
                   at_bounds=at_bounds, messages=tuple(messages), n_dropped=dict(dropped))
    law.info = info
    if problems:
        warnings.warn("fitted law is not identified by the data: " + "; ".join(problems) + " (info.success=False)",
                      FitWarning, stacklevel=4)
    if total and n_drop > _DROPPED_WARN_FRACTION * total:
        warnings.warn(f"the fit dropped {messages[-1]} (losses must be finite and positive)", FitWarning,
                      stacklevel=4)
    return law


# ================================================================================================================
# Final-loss data: fit L(N, S, B) directly to (N, S, B, final loss) points
# ================================================================================================================
@_blas_one_thread
def fit_loss_n_s_b(n_params: ArrayLike, steps: ArrayLike, batch_size: ArrayLike, loss: ArrayLike, *,
                   form: Literal["kaplan", "kaplan+irreducible"] = "kaplan", tokens_per_sample: float | None = None,
                   n_starts: int = 8) -> ScalingLaw:
    """Fit all constants of the implicit ``L(N, S, B)`` law to one final loss per run.

    For data sets that hold only final losses (e.g. one point per run at its end of schedule), B_crit cannot be
    fitted from curve crossings, so ``(n_c, alpha_n, s_c, alpha_s, b_star, alpha_b[, e])`` are fitted jointly:
    summed Huber (delta 1e-3) on log loss, the prediction solved by :func:`lightning_scaling.laws.loss_n_s_b`,
    L-BFGS-B (exact gradients by implicit differentiation) from the best ``n_starts`` points of a start grid.

    Args:
        n_params, steps, batch_size, loss: one entry per run (batch in samples).
        form: ``"kaplan"`` or ``"kaplan+irreducible"``.
        tokens_per_sample: stored on the returned law.
        n_starts: grid starts refined.

    Returns:
        A :class:`ScalingLaw` (no bootstrap).

    Example::

        >>> import numpy as np
        >>> from lightning_scaling.laws import loss_n_s_b
        >>> rng = np.random.default_rng(0)
        >>> n = rng.choice([1e6, 3e6, 1e7, 3e7], 60); b = rng.choice([16, 64, 256, 1024], 60)
        >>> s = rng.choice([300, 1000, 3000, 10000], 60)
        >>> k = dict(n_c=1e10, alpha_n=0.08, s_c=200.0, alpha_s=0.7, b_star=2e4, alpha_b=0.3)
        >>> law = fit_loss_n_s_b(n, s, b, loss_n_s_b(n, s, b, **k), n_starts=2)
        >>> bool(np.allclose(law.predict_loss(n, s, b), loss_n_s_b(n, s, b, **k), rtol=1e-3))
        True
    """
    if form not in ("kaplan", "kaplan+irreducible"):
        raise ValueError(f"form must be 'kaplan' or 'kaplan+irreducible', got {form!r}")
    n, s, b, l = (np.asarray(a, dtype=float).ravel() for a in np.broadcast_arrays(n_params, steps, batch_size, loss))
    ok = np.isfinite(n) & np.isfinite(s) & np.isfinite(b) & np.isfinite(l) & (n > 0) & (s > 0) & (b > 0) & (l > 0)
    if ok.sum() < 8:
        raise ValueError(f"fit_loss_n_s_b needs >= 8 finite points, got {int(ok.sum())}")
    n_nonfinite = int(np.sum(~(np.isfinite(n) & np.isfinite(s) & np.isfinite(b) & np.isfinite(l))))
    dropped = {"nonfinite": n_nonfinite, "nonpositive": int(np.sum(~ok)) - n_nonfinite}
    n, s, b, l = n[ok], s[ok], b[ok], l[ok]
    irr = form == "kaplan+irreducible"
    n_ref, s_ref, b_ref = (float(np.exp(np.mean(np.log(a)))) for a in (n, s, b))
    l_ref = float(np.exp(np.mean(np.log(l))))
    ll = np.log(l)

    # theta = (a_n, alpha_n, a_s, alpha_s, log(b_star/b_ref), alpha_b[, e]); b_star relative to L_ref^(1/alpha_b).
    def unpack(th: np.ndarray) -> dict[str, float]:
        a_n, alpha_n, a_s, alpha_s, lb, alpha_b = th[:6]
        return {"n_c": n_ref * _exp(a_n / alpha_n), "alpha_n": alpha_n, "s_c": s_ref * _exp(a_s / alpha_s),
                "alpha_s": alpha_s, "b_star": b_ref * _exp(lb) * l_ref ** (1 / alpha_b), "alpha_b": alpha_b,
                "e": float(th[6]) if irr else 0.0}

    def obj(th: np.ndarray) -> tuple[float, np.ndarray]:
        p = unpack(th)
        if not all(math.isfinite(v) for v in p.values()):
            return 1e6, np.zeros_like(th)
        with np.errstate(all="ignore"):
            pred = laws.loss_n_s_b(n, s, b, iterations=56, **p)
            r = np.log(pred) - ll
        if not np.all(np.isfinite(r)):
            return 1e6, np.zeros_like(th)
        f, dr = _huber(r, np.ones_like(r))
        # Gradient by implicit differentiation of F(L, theta) = L - e - T_N - T_S(L) = 0: dL/dth = -F_th / F_L,
        # with F_L = 1 + alpha_S T_S q / (alpha_B L) > 0 (the same monotonicity that makes the root unique).
        t_n = pred * 0 + laws.loss_n(n, n_c=p["n_c"], alpha_n=p["alpha_n"])
        t_s = pred - p["e"] - t_n
        rho = laws.critical_batch(pred, b_star=p["b_star"], alpha_b=p["alpha_b"]) / b
        q = rho / (1.0 + rho)
        w = np.log(s / s_ref) - np.log1p(rho)
        alpha_s, alpha_b = p["alpha_s"], p["alpha_b"]
        dlogbc_dab = -np.log(l_ref / pred) / alpha_b**2
        f_theta = [-t_n, np.log(n / n_ref) * t_n, -t_s, w * t_s, -alpha_s * q * t_s,
                   -alpha_s * t_s * q * dlogbc_dab]
        if irr:
            f_theta.append(-np.ones_like(pred))
        f_l = 1.0 + alpha_s * t_s * q / (alpha_b * pred)
        psi = dr / pred
        g = np.array([np.sum(psi * (-ft / f_l)) for ft in f_theta])
        return f, g

    lmin = float(l.min())
    bounds = [(-30.0, math.log(10 * l_ref)), (1e-3, 3.0), (-30.0, math.log(10 * l_ref)), (1e-2, 6.0),
              (-15.0, 15.0), (0.02, 5.0)] + ([(0.0, 0.999 * lmin)] if irr else [])
    grid = []
    for ef in ((0.0,) if not irr else (0.2, 0.5, 0.8)):
        rest = l_ref - ef * lmin
        for an in (0.05, 0.2, 0.5):
            for as_ in (0.4, 0.8, 1.5):
                for lb in (-2.0, 0.0, 2.0):
                    for ab in (0.2, 0.5):
                        grid.append(np.array([math.log(0.7 * rest), an, math.log(0.3 * rest), as_, lb, ab]
                                             + ([ef * lmin] if irr else [])))
    best = _multistart(obj, grid, bounds, n_starts)
    info = FitInfo(success=bool(best.success), message=str(best.message), nfev=int(best.nfev), nit=int(best.nit),
                   objective=float(best.fun), n_starts=n_starts, n_grid=len(grid), n_points=int(n.size),
                   n_runs=int(n.size), moved=bool(np.any(np.abs(best.x - best.start) > 1e-8)), form=form,
                   critical_batch_source="joint")
    law = ScalingLaw(unpack(best.x), form=form, tokens_per_sample=tokens_per_sample, info=info)
    names = ("a_n", "alpha_n", "a_s", "alpha_s", "log_b_star", "alpha_b", "e")
    return _judged(law, best.x, bounds, names, dropped, total=int(ok.size), probe=(n.max(), s.max(), b.min()))


# ================================================================================================================
# IsoFLOP analysis (Chinchilla Approach 2; Porian et al. 2024)
# ================================================================================================================
@dataclass(frozen=True)
class PowerLawFit:
    """``y = coef * x^exponent`` fitted by least squares in log-log space.

    Example::

        >>> fit = fit_power_law([1.0, 10.0, 100.0], [2.0, 20.0, 200.0])
        >>> round(fit.exponent, 6), round(fit.coef, 6), round(fit.r2, 6)
        (1.0, 2.0, 1.0)
    """

    exponent: float
    coef: float
    r2: float

    def __call__(self, x: ArrayLike) -> np.ndarray:
        """``coef * x^exponent``."""
        return self.coef * np.asarray(x, dtype=float) ** self.exponent


def fit_power_law(x: ArrayLike, y: ArrayLike) -> PowerLawFit:
    """Least-squares line through ``(log x, log y)`` (finite positive pairs only).

    Raises:
        ValueError: fewer than 2 usable points or a single distinct ``x``.
    """
    x, y = np.asarray(x, dtype=float).ravel(), np.asarray(y, dtype=float).ravel()
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same length, got {x.size} and {y.size}")
    ok = np.isfinite(x) & np.isfinite(y) & (x > 0) & (y > 0)
    if ok.sum() < 2 or np.unique(x[ok]).size < 2:
        raise ValueError("fit_power_law needs >= 2 finite positive points at distinct x")
    lx, ly = np.log(x[ok]), np.log(y[ok])
    slope, intercept = np.polyfit(lx, ly, 1)
    resid = ly - (slope * lx + intercept)
    ss_tot = float(np.sum((ly - ly.mean()) ** 2))
    r2 = 1.0 - float(np.sum(resid**2)) / ss_tot if ss_tot > 0 else 1.0
    return PowerLawFit(exponent=float(slope), coef=float(math.exp(intercept)), r2=r2)


def isoflop_optima(flops: ArrayLike, n_params: ArrayLike, loss: ArrayLike, *, window: int = 3,
                   tokens: ArrayLike | None = None) -> dict[str, np.ndarray]:
    """Per compute budget, the loss-minimising model size from a parabola in ``log N``.

    For each budget the points are sorted by ``N``; a quadratic in ``log N`` is fitted to the ``2 window + 1``
    points around the lowest loss (a parabola only describes the valley near its minimum) and its vertex gives
    ``N_opt`` and ``loss_opt``. Budgets with < 3 points or an upward-open fit are skipped.

    Args:
        flops: compute budget of each run.
        n_params: model size of each run.
        loss: final loss of each run.
        window: neighbours on each side of the best run used in the parabola.
        tokens: tokens of each run (optional): ``tokens_opt = flops / (6 N_opt)`` is returned either way.

    Returns:
        Dict of arrays ``flops``, ``n_opt``, ``tokens_opt``, ``loss_opt`` (one entry per usable budget).

    Example::

        >>> n = np.geomspace(1e6, 1e9, 13)
        >>> c = np.repeat([1e17, 1e18], 13); nn = np.tile(n, 2)
        >>> l = 2 + 0.05 * (np.log(nn) - np.log(1e7 * (c / 1e17) ** 0.5)) ** 2
        >>> opt = isoflop_optima(c, nn, l)
        >>> round(fit_power_law(opt["flops"], opt["n_opt"]).exponent, 6)
        0.5
    """
    c, n, l = (np.asarray(a, dtype=float).ravel() for a in (flops, n_params, loss))
    if not (c.size == n.size == l.size):
        raise ValueError("flops, n_params and loss must have the same length")
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    ok = np.isfinite(c) & np.isfinite(n) & np.isfinite(l) & (n > 0) & (c > 0)
    out: dict[str, list[float]] = {"flops": [], "n_opt": [], "tokens_opt": [], "loss_opt": []}
    for budget in np.unique(c[ok]):
        idx = np.flatnonzero(ok & (c == budget))
        idx = idx[np.argsort(n[idx])]
        best = int(np.argmin(l[idx]))
        sel = idx[max(0, best - window): best + window + 1]
        if sel.size < 3 or np.unique(n[sel]).size < 3:
            continue
        q2, q1, q0 = np.polyfit(np.log(n[sel]), l[sel], 2)
        if q2 <= 0:
            continue
        x = -q1 / (2 * q2)
        out["flops"].append(float(budget))
        out["n_opt"].append(math.exp(x))
        out["tokens_opt"].append(float(budget) / (6.0 * math.exp(x)))
        out["loss_opt"].append(q0 - q1 * q1 / (4 * q2))
    if not out["flops"]:
        raise ValueError("no budget had >= 3 model sizes around its minimum with a valley-shaped loss")
    return {k: np.asarray(v) for k, v in out.items()}
