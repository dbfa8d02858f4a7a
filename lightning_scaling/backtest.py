"""Backtests on finished runs: how accurate would the forecasts and the cross-size fit have been?

A user who has finished runs of a setup can learn how far to trust the live forecast on *that* setup: replay
:func:`~lightning_scaling.forecast.forecast_run` from 10-70% prefixes of each run (with the run's whole schedule,
as the live callback sees it) and compare with what the run really did; and hold the largest model of a ladder
out of :func:`~lightning_scaling.fitting.fit_scaling_law` and predict its whole curve. Every figure comes with a
simple baseline measured in the same call: a schedule-blind power law ``L_inf + A*S^-alpha`` fitted by
:func:`scipy.optimize.curve_fit` on the same prefix, and the plain Kaplan ``L(N, S)`` with no critical batch.

The same functions are the engine of the project's own validation suite (``benchmarks/validate.py``).

Definitions (one for every table):

- *final loss*: the mean loss over the last 5% of the run's steps (at least 3 records), compared with the mean
  of the prediction at the same steps, so noise and the slope of the last stretch cancel;
- *curve error*: the remaining (future) records cut into at most 32 contiguous windows; the mean of
  ``|mean(pred)/mean(actual) - 1|`` over the windows;
- *covered*: the band (or interval) averaged over the final window holds the actual final loss.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lightning_scaling.history import FINAL_FRACTION, RunHistory
from lightning_scaling.numerics import warmup_steps

__all__ = ["PREFIXES", "BacktestResult", "backtest", "replay_forecast", "holdout_cross_size", "summarize",
           "power_law_baseline", "final_window", "run_schedule", "KaplanBaseline"]

PREFIXES = (0.1, 0.2, 0.3, 0.5, 0.7)
_CURVE_WINDOWS = 32


# ----------------------------------------------------------------------------------------------------------------
# Shared definitions
# ----------------------------------------------------------------------------------------------------------------
def final_window(steps: np.ndarray, *, fraction: float = FINAL_FRACTION, min_points: int = 3) -> np.ndarray:
    """Mask of the records in the last ``fraction`` of the run's steps (at least ``min_points`` records).

    Example::

        >>> final_window(np.arange(0, 101, 10)).nonzero()[0].tolist()
        [8, 9, 10]
    """
    steps = np.asarray(steps)
    mask = steps >= steps[-1] - fraction * (steps[-1] - steps[0])
    if mask.sum() < min_points:
        mask = np.zeros(steps.size, bool)
        mask[-min(min_points, steps.size):] = True
    return mask


def _windows(n: int, k: int = _CURVE_WINDOWS) -> list[np.ndarray]:
    return [w for w in np.array_split(np.arange(n), min(k, n)) if w.size]


def curve_error(pred: np.ndarray, actual: np.ndarray) -> float:
    """Mean over contiguous windows of ``|mean(pred)/mean(actual) - 1|`` (noise in ``actual`` averages out)."""
    errs = [abs(pred[w].mean() / actual[w].mean() - 1) for w in _windows(actual.size)]
    return float(np.mean(errs)) if errs else float("nan")


def run_schedule(run: RunHistory) -> tuple[np.ndarray | None, int]:
    """The per-step LR a replay gives the forecast, and the run's horizon (its last recorded step).

    A finished run's schedule is known: ``planned_lr`` when it was recorded and covers the run, else the recorded
    ``lr`` interpolated to every step (a constant LR yields the schedule-blind form), else ``None``.
    """
    horizon = int(run.step[-1])
    planned = run.planned_lr
    if planned is not None and planned.size >= horizon and np.all(np.isfinite(planned[:horizon])):
        return np.asarray(planned, dtype=np.float64), horizon
    lr = run.lr
    if lr is not None:
        ok = np.isfinite(lr) & (lr >= 0)
        if ok.sum() >= max(3, 0.9 * lr.size):
            return np.interp(np.arange(horizon), run.step[ok], lr[ok]), horizon
    return None, horizon


def largest_run_schedule(runs: Sequence[RunHistory]) -> np.ndarray | None:
    """The per-step LR (:func:`run_schedule`) of the largest of ``runs`` by N: the schedule a larger model of the
    same setup trains with (``None`` without runs or a recorded LR)."""
    sized = [r for r in runs if r.n_params is not None]
    return run_schedule(max(sized, key=lambda r: r.n_params))[0] if sized else None


def _warmup_end(lr: np.ndarray | None) -> float:
    """The step where a schedule's warmup ends (0 without a schedule)."""
    if lr is None or lr.size == 0:
        return 0.0
    return float(warmup_steps(lr))


def power_law_baseline(steps: np.ndarray, loss: np.ndarray, *, start: float = 0.0) -> Callable[[np.ndarray], np.ndarray]:
    """Schedule-blind baseline: ``L_inf + A * S^-alpha`` fitted by :func:`scipy.optimize.curve_fit`.

    Fitted to the finite records at ``step > start`` (the end of warmup), in log loss so every point counts the
    same. Returns the fitted curve as a function of steps.

    Raises:
        ValueError: fewer than 4 usable records.
        RuntimeError: ``curve_fit`` did not converge.

    Example::

        >>> s = np.arange(10, 2001, 10)
        >>> f = power_law_baseline(s, 2.0 + 3.0 * s ** -0.5)
        >>> round(float(f(np.array([4000]))[0]), 3)
        2.047
    """
    from scipy.optimize import curve_fit

    s, y = np.asarray(steps, dtype=np.float64), np.asarray(loss, dtype=np.float64)
    ok = np.isfinite(y) & (y > 0) & (s > max(start, 0.0))
    s, y = s[ok], y[ok]
    if s.size < 4:
        raise ValueError(f"the power-law baseline needs >= 4 records after warmup, got {s.size}")

    def model(x: np.ndarray, l_inf: float, log_a: float, alpha: float) -> np.ndarray:
        return np.log(l_inf + np.exp(log_a) * x ** -alpha)

    y_min = float(y.min())
    p0 = (0.5 * y_min, math.log(max(y[0] - 0.5 * y_min, 1e-3)) + 0.5 * math.log(s[0]), 0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p, _ = curve_fit(model, s, np.log(y), p0=p0, bounds=([0.0, -50.0, 1e-3], [y_min, 50.0, 5.0]),
                         maxfev=5000)
    return lambda x: np.exp(model(np.asarray(x, dtype=np.float64), *p))


# ----------------------------------------------------------------------------------------------------------------
# Forecast replay
# ----------------------------------------------------------------------------------------------------------------
def replay_forecast(run: RunHistory, fraction: float, *, reference: Sequence[RunHistory] | None = None,
                    **forecast_kwargs: Any) -> dict[str, Any]:
    """Forecast ``run`` from its first ``fraction`` of steps and score it against what the run really did.

    The forecast gets the run's whole schedule (:func:`run_schedule`) and horizon, as the live callback does.
    ``reference`` (finished runs of the same setup) is passed on to :func:`forecast_run`.

    Returns:
        A row: ``run``, ``fraction``, ``observed_until``, ``horizon``, ``actual`` (final loss),
        ``predicted``, ``final_err`` (signed relative error), ``curve_err``, ``covered``, ``width`` (band width
        over the prediction), ``method``, the same for the power-law baseline (``baseline_*``), and ``error``
        (the message when the forecast refused; its numbers are then NaN).
    """
    from lightning_scaling.forecast import forecast_run

    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    lr, horizon = run_schedule(run)
    cut = int(round(run.step[0] + fraction * (horizon - run.step[0])))
    fin = final_window(run.step)
    fut = (run.step > cut) & np.isfinite(run.loss)
    actual = float(np.nanmean(run.loss[fin]))
    row: dict[str, Any] = {"run": run.name, "fraction": fraction, "observed_until": cut, "horizon": horizon,
                           "actual": actual, "error": None}
    nan_cols = ("predicted", "final_err", "curve_err", "width", "baseline_predicted", "baseline_err",
                "baseline_curve_err")
    row.update({k: float("nan") for k in nan_cols}, covered=None, method=None)
    prefix = run.truncate(cut)
    w_end = _warmup_end(lr)
    try:
        base = power_law_baseline(prefix.step, prefix.loss, start=w_end)
        bp = base(run.step[fin])
        row.update(baseline_predicted=float(bp.mean()), baseline_err=float(bp.mean() / actual - 1),
                   baseline_curve_err=curve_error(base(run.step[fut]), run.loss[fut]))
    except (ValueError, RuntimeError) as exc:
        row["baseline_error"] = str(exc)
    kw = dict(forecast_kwargs)
    if reference:
        kw["reference"] = list(reference)
    try:
        f = forecast_run(prefix, horizon=horizon, lr_schedule=lr, **kw)
    except (ValueError, FloatingPointError, np.linalg.LinAlgError) as exc:
        row["error"] = str(exc)
        return row
    at = lambda curve, s: np.interp(s, f.steps, curve)  # noqa: E731
    pred, lo, hi = (float(at(c, run.step[fin]).mean()) for c in (f.loss, f.lower, f.upper))
    row.update(predicted=pred, final_err=pred / actual - 1, covered=bool(lo <= actual <= hi),
               width=(hi - lo) / pred, method=f.method,
               curve_err=curve_error(at(f.loss, run.step[fut]), run.loss[fut]))
    return row


def keep_gap_baseline(run: RunHistory, reference: RunHistory, fraction: float) -> float:
    """"Keep the loss gap to the reference run": the reference's final loss plus today's gap.

    Runs are aligned by the fraction of their own horizon (any lengths); the gap is taken between the mean losses
    of the last 5% of the observed prefix and of the reference at the same fractions.
    """
    def frac_of(h: RunHistory) -> np.ndarray:
        return (h.step - h.step[0]) / max(h.step[-1] - h.step[0], 1)

    fr, fref = frac_of(run), frac_of(reference)
    win = (fr <= fraction) & (fr >= fraction - FINAL_FRACTION)
    if win.sum() == 0:
        win = fr <= fraction
    lo_f, hi_f = float(fr[win].min()), float(fr[win].max())
    rwin = (fref >= lo_f) & (fref <= hi_f)
    ref_now = float(np.nanmean(reference.loss[rwin])) if rwin.any() else float(np.interp(fraction, fref,
                                                                                          reference.loss))
    ref_final = float(np.nanmean(reference.loss[final_window(reference.step)]))
    return ref_final + float(np.nanmean(run.loss[win])) - ref_now


# ----------------------------------------------------------------------------------------------------------------
# Cross-size replay
# ----------------------------------------------------------------------------------------------------------------
def _fit(train: Sequence[RunHistory], **kwargs: Any) -> tuple[Any, str | None]:
    """``fit_scaling_law`` as a user calls it; with one batch size it needs ``critical_batch="none"``."""
    from lightning_scaling.fitting import fit_scaling_law

    try:
        return fit_scaling_law(train, **kwargs), None
    except ValueError as exc:
        if "critical_batch" in kwargs or "batch" not in str(exc):
            raise
        return fit_scaling_law(train, critical_batch="none", **kwargs), "critical_batch='none' (one batch size)"


def score_law(law: Any, run: RunHistory, *, level: float = 0.9, lr_schedule: np.ndarray | None = None
              ) -> dict[str, Any]:
    """Final-loss and curve errors of a fitted law on a held-out run (and whether its interval covers).

    ``lr_schedule`` (the run's per-step LR) is passed to ``predict_loss``/``interval`` when given, for laws that
    model the schedule.
    """
    s = run.step.astype(np.float64)
    ok = np.isfinite(run.loss) & (s >= 0.1 * s[-1]) & (s > 0)
    fin = final_window(run.step) & ok
    sched = {} if lr_schedule is None else {"lr_schedule": lr_schedule}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pred = law.predict_loss(run.n_params, s[ok], run.batch_size, **sched)
        pf = law.predict_loss(run.n_params, s[fin], run.batch_size, **sched)
    actual = float(run.loss[fin].mean())
    out = {"run": run.name, "n_params": run.n_params, "batch_size": run.batch_size, "actual": actual,
           "predicted": float(pf.mean()), "final_err": float(pf.mean() / actual - 1),
           "curve_err": curve_error(pred, run.loss[ok]), "covered": None}
    if len(getattr(law, "bootstrap", ())):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            lo, hi = law.interval("predict_loss", run.n_params, s[fin], run.batch_size, level=level, **sched)
        out["interval"] = (float(np.mean(lo)), float(np.mean(hi)))
        out["covered"] = bool(out["interval"][0] <= actual <= out["interval"][1])
    return out


class KaplanBaseline:
    """The plain Kaplan ``L(N, S) = (N_c/N)^a_N + (S_c/S)^a_S`` fitted by :func:`scipy.optimize.curve_fit`.

    Independent of :mod:`lightning_scaling.fitting` on purpose, so the baseline does not move when the project's
    fit does: no critical batch, no irreducible term, no schedule; every finite record after the first 10% of each
    run (the post-warmup transient), log-spaced to at most 64 records per run, in log loss.

    Example::

        >>> s = np.arange(0, 3001, 10)
        >>> runs = [RunHistory(name=f"n{n:g}", n_params=n, step=s, loss=(1e10 / n) ** 0.08 + (200 / np.maximum(s, 1))
        ...                    ** 0.7) for n in (1e6, 1e7)]
        >>> law = KaplanBaseline(runs)
        >>> round(float(law.predict_loss(1e8, 3000, None)) / ((1e10 / 1e8) ** 0.08 + (200 / 3000) ** 0.7), 3)
        1.0
    """

    bootstrap: tuple = ()

    def __init__(self, runs: Sequence[RunHistory]) -> None:
        from scipy.optimize import curve_fit

        n, s, y = [], [], []
        for r in runs:
            ok = np.isfinite(r.loss) & (r.loss > 0) & (r.step >= max(1.0, 0.1 * r.step[-1]))
            idx = np.unique(np.geomspace(1, ok.sum(), min(64, int(ok.sum()))).astype(int) - 1) if ok.any() else []
            n += [float(r.n_params)] * len(idx)
            s += list(r.step[ok][idx].astype(float))
            y += list(r.loss[ok][idx])
        if len(set(n)) < 2:
            raise ValueError("the Kaplan baseline needs runs of >= 2 sizes")
        self._n_ref, self._s_ref = float(np.exp(np.mean(np.log(n)))), float(np.exp(np.mean(np.log(s))))
        x = np.vstack([np.log(np.asarray(n) / self._n_ref), np.log(np.asarray(s) / self._s_ref)])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self._p, _ = curve_fit(self._log_model, x, np.log(y), p0=(0.0, 0.1, -1.0, 0.5),
                                   bounds=([-20, 1e-3, -20, 1e-3], [20, 3.0, 20, 3.0]), maxfev=20000)

    @staticmethod
    def _log_model(x: np.ndarray, a_n: float, alpha_n: float, a_s: float, alpha_s: float) -> np.ndarray:
        return np.log(np.exp(a_n - alpha_n * x[0]) + np.exp(a_s - alpha_s * x[1]))

    def predict_loss(self, n_params: Any, steps: Any, batch_size: Any) -> np.ndarray:
        """Loss at ``n_params`` and ``steps`` (``batch_size`` is ignored: the baseline has no batch axis)."""
        n, s = np.broadcast_arrays(np.asarray(n_params, float), np.asarray(steps, float))
        x = np.vstack([np.log(n.ravel() / self._n_ref), np.log(np.maximum(s.ravel(), 1) / self._s_ref)])
        return np.exp(self._log_model(x, *self._p)).reshape(n.shape)


def holdout_cross_size(train: Sequence[RunHistory], test: Sequence[RunHistory], *,
                       fit_kwargs: Mapping[str, Any] | None = None, baseline: bool = True) -> list[dict[str, Any]]:
    """Fit on ``train`` with the default call, predict every ``test`` run's whole curve at its own batch size.

    The baseline is the plain Kaplan ``L(N, S)`` with no critical batch (:class:`KaplanBaseline`), fitted on the
    same runs.
    """
    kw = dict(fit_kwargs or {})
    rows: list[dict[str, Any]] = []
    try:
        law, note = _fit(train, **kw)
    except (ValueError, RuntimeError) as exc:
        return [{"run": t.name, "error": str(exc)} for t in test]
    base = None
    if baseline:
        try:
            base = KaplanBaseline(train)
        except (ValueError, RuntimeError):
            base = None
    for t in test:
        row = score_law(law, t)
        row.update(note=note, error=None)
        if base is not None:
            b = score_law(base, t)
            row.update(baseline_predicted=b["predicted"], baseline_err=b["final_err"],
                       baseline_curve_err=b["curve_err"])
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------------------------------
# Summary and the user-facing entry point
# ----------------------------------------------------------------------------------------------------------------
def summarize(rows: Sequence[Mapping[str, Any]], *, by: str = "fraction") -> dict[Any, dict[str, float]]:
    """Per value of ``by``: count, refused, median and worst |final error|, mean curve error, band coverage,
    and the baseline's median and worst |final error| over the same rows.

    Example::

        >>> rows = [{"fraction": 0.5, "final_err": e, "curve_err": 0.01, "covered": True, "baseline_err": 0.05,
        ...          "error": None} for e in (0.01, -0.03)]
        >>> s = summarize(rows)[0.5]
        >>> round(s["median"], 3), round(s["worst"], 3), s["coverage"]
        (0.02, 0.03, 1.0)
    """
    out: dict[Any, dict[str, float]] = {}
    for key in sorted({r[by] for r in rows}):
        rs = [r for r in rows if r[by] == key]
        ok = [r for r in rs if not r.get("error") and math.isfinite(r.get("final_err", float("nan")))]
        e = np.abs([r["final_err"] for r in ok])
        cov = [r["covered"] for r in ok if r.get("covered") is not None]
        be = np.abs([r["baseline_err"] for r in rs if math.isfinite(r.get("baseline_err", float("nan")))])
        out[key] = {
            "n": len(rs), "refused": len(rs) - len(ok),
            "median": float(np.median(e)) if e.size else float("nan"),
            "worst": float(e.max()) if e.size else float("nan"),
            "curve": float(np.nanmean([r["curve_err"] for r in ok])) if ok else float("nan"),
            "coverage": float(np.mean(cov)) if cov else float("nan"),
            "baseline_median": float(np.median(be)) if be.size else float("nan"),
            "baseline_worst": float(be.max()) if be.size else float("nan"),
        }
    return out


def _pct(x: float) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{100 * x:.1f}%"


@dataclass
class BacktestResult:
    """What :func:`backtest` found: one row per replayed forecast and per held-out size, with summaries.

    Attributes:
        forecast: rows of :func:`replay_forecast` (every run x prefix).
        cross_size: rows of :func:`holdout_cross_size` (the largest size held out), empty without a ladder.
        notes: why a part was skipped.
    """

    forecast: list[dict[str, Any]] = field(default_factory=list)
    cross_size: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> dict[Any, dict[str, float]]:
        """:func:`summarize` of the forecast rows, per prefix."""
        return summarize(self.forecast) if self.forecast else {}

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (non-finite numbers as ``None``)."""
        def enc(v: Any) -> Any:
            if isinstance(v, float):
                return v if math.isfinite(v) else None
            if isinstance(v, (np.floating, np.integer)):
                return enc(v.item())
            if isinstance(v, Mapping):
                return {str(k): enc(x) for k, x in v.items()}
            if isinstance(v, (list, tuple)):
                return [enc(x) for x in v]
            return v
        return enc({"forecast": self.forecast, "cross_size": self.cross_size,
                    "summary": {str(k): v for k, v in self.summary().items()}, "notes": self.notes})

    def format(self) -> str:
        """A plain-text report: forecast accuracy per prefix beside the baseline, then the cross-size check."""
        lines = ["Forecast replayed from a prefix of each finished run (final loss = mean of the last 5%)",
                 f"{'prefix':>6}  {'runs':>4}  {'median err':>10}  {'worst err':>9}  {'curve err':>9}  "
                 f"{'90% band holds':>14}  {'power law: median / worst':>25}"]
        for frac, s in self.summary().items():
            lines.append(f"{frac:>6.0%}  {s['n'] - s['refused']:>4}  {_pct(s['median']):>10}  {_pct(s['worst']):>9}"
                         f"  {_pct(s['curve']):>9}  {_pct(s['coverage']):>14}  "
                         f"{_pct(s['baseline_median']) + ' / ' + _pct(s['baseline_worst']):>25}")
        refused = [r for r in self.forecast if r.get("error")]
        if refused:
            lines.append(f"refused: {len(refused)} replays (e.g. {refused[0]['run']} at "
                         f"{refused[0]['fraction']:.0%}: {refused[0]['error']})")
        if self.cross_size:
            lines += ["", "Largest size held out of fit_scaling_law, its whole curve predicted",
                      f"{'run':<24} {'N':>10} {'final err':>9} {'curve err':>9} {'interval holds':>14} "
                      f"{'Kaplan L(N,S): final / curve':>28}"]
            for r in self.cross_size:
                if r.get("error"):
                    lines.append(f"{r['run']:<24} fit refused: {r['error']}")
                    continue
                cov = "-" if r.get("covered") is None else ("yes" if r["covered"] else "no")
                lines.append(f"{r['run']:<24} {r['n_params']:>10.3g} {_pct(r['final_err']):>9} "
                             f"{_pct(r['curve_err']):>9} {cov:>14} "
                             f"{_pct(r.get('baseline_err', float('nan'))) + ' / ' + _pct(r.get('baseline_curve_err', float('nan'))):>28}")  # noqa: E501
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def backtest(runs: Sequence[RunHistory] | RunHistory, prefixes: Sequence[float] = PREFIXES, *,
             cross_size: bool = True, forecast_kwargs: Mapping[str, Any] | None = None,
             fit_kwargs: Mapping[str, Any] | None = None) -> BacktestResult:
    """Replay the forecast on prefixes of finished runs and the cross-size fit on their ladder.

    Args:
        runs: finished runs (``RunHistory``), e.g. ``RunHistory.load_many("runs/")``.
        prefixes: fractions of each run's steps the forecast is given.
        cross_size: also hold the largest model size out of ``fit_scaling_law`` (needs >= 3 sizes with
            ``n_params`` and ``batch_size``) and predict its whole curve.
        forecast_kwargs: extra arguments of ``forecast_run`` (default: none, the default call).
        fit_kwargs: extra arguments of ``fit_scaling_law`` (default: none, the default call).

    Returns:
        A :class:`BacktestResult`; ``print(result.format())`` shows the tables.

    Raises:
        ValueError: no runs, or a prefix outside (0, 1).

    Example::

        >>> s = np.arange(0, 2001, 10)
        >>> runs = [RunHistory(name=f"r{a}", step=s, loss=2.0 + a * np.maximum(s, 1) ** -0.4, lr=np.full(s.size, 1e-3))
        ...         for a in (2.0, 3.0)]
        >>> res = backtest(runs, prefixes=(0.5,), cross_size=False)
        >>> res.summary()[0.5]["worst"] < 0.01
        True
    """
    runs = [runs] if isinstance(runs, RunHistory) else list(runs)
    if not runs:
        raise ValueError("backtest needs at least one finished run")
    for p in prefixes:
        if not 0.0 < p < 1.0:
            raise ValueError(f"prefixes must be in (0, 1), got {p}")
    res = BacktestResult()
    for run in runs:
        if run.step.size < 8:
            res.notes.append(f"{run.name}: only {run.step.size} records, not replayed")
            continue
        res.forecast += [replay_forecast(run, p, **dict(forecast_kwargs or {})) for p in prefixes]
    if cross_size:
        sized = [r for r in runs if r.n_params and r.batch_size]
        sizes = sorted({r.n_params for r in sized})
        if len(sizes) < 3:
            res.notes.append(f"cross-size check skipped: needs >= 3 model sizes with n_params and batch_size, "
                             f"got {len(sizes)}")
        else:
            test = [r for r in sized if r.n_params == sizes[-1]]
            train = [r for r in sized if r.n_params != sizes[-1]]
            res.cross_size = holdout_cross_size(train, test, fit_kwargs=fit_kwargs)
    return res
