"""Fit, predict and compare (Lightning-free: also used by ``lightning-scaling fit``)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from lightning_scaling.history import RunHistory, final_loss, group_by_size, live_b_simple
from lightning_scaling.numerics import first_crossing
from lightning_scaling.study.plan import RunSpec


def first_step_below(history: RunHistory, level: float) -> float:
    """First step at which the smoothed, monotone loss curve reaches ``level`` (NaN if never).

    Example::

        >>> s = np.arange(1, 1001)
        >>> round(first_step_below(RunHistory(step=s, loss=1.0 + 100.0 / s), 1.5))
        200
    """
    from lightning_scaling.fitting import smooth_monotone

    grid, curve = smooth_monotone(history.step, history.loss)
    return float(first_crossing(grid, curve, level, start=float(grid[0])))


def fit_and_predict(
    fit_runs: Sequence[RunHistory],
    *,
    sweep_runs: Sequence[RunHistory] | None = None,
    predict_n: float | None = None,
    batch_size: float | None = None,
    steps: int | None = None,
    target_loss: float | None = None,
    fit_kwargs: Mapping[str, Any] | None = None,
    lr_schedule: Any = None,
) -> dict[str, Any]:
    """Fit ``B_crit(L)`` and ``L(N, S, B)`` and predict a model of ``predict_n`` parameters.

    Args:
        fit_runs: runs of >= 2 sizes (with ``n_params`` and ``batch_size``).
        sweep_runs: runs of one size at >= 2 batch sizes for ``fit_critical_batch_size`` (default: found among
            ``fit_runs``; without any, ``fit_scaling_law`` falls back to the recorded GNS).
        predict_n: non-embedding size to predict (optional).
        batch_size: batch size of the prediction (default: the most common among ``fit_runs``).
        steps: last step of the predicted trajectory (``1..steps``; default: the last step of the longest run).
        target_loss: loss for steps/tokens-to-target predictions (optional).
        fit_kwargs: extra ``fit_scaling_law`` arguments.
        lr_schedule: the predicted run's per-step LR (see :func:`predict_size`).

    Returns:
        A JSON-able dict with ``critical_batch``, ``law``, and when ``predict_n`` is given ``prediction``
        (``steps``, ``loss``, ``lower``, ``upper``, ``final_loss``, ``min_loss``, ``steps_to_target``...); the fitted
        objects are under the keys ``_law`` and ``_critical`` (not JSON-able; drop them before writing).

    Raises:
        ValueError: the runs cannot be fitted (the message says why).

    Example::

        >>> from lightning_scaling.laws import loss_n_s_b
        >>> k = dict(n_c=1e10, alpha_n=0.08, s_c=200.0, alpha_s=0.7, b_star=2e4, alpha_b=0.3)
        >>> s = np.arange(1, 3001, 10)
        >>> runs = [RunHistory(name=f"{n:g}_{b}", n_params=n, batch_size=b, step=s, loss=loss_n_s_b(n, s, b, **k))
        ...         for n, b in [(1e6, 64), (1e7, 64), (3e7, 64), (1e6, 16), (1e6, 256), (1e6, 1024)]]
        >>> out = fit_and_predict(runs, predict_n=1e8, batch_size=64, fit_kwargs={"n_bootstrap": 0})
        >>> bool(abs(out["prediction"]["min_loss"] / (1e10 / 1e8) ** 0.08 - 1) < 0.02)
        True
    """
    from lightning_scaling.fitting import fit_critical_batch_size, fit_scaling_law

    fit_runs = list(fit_runs)
    if not fit_runs:
        raise ValueError("no runs to fit")
    sizes = sorted({r.n_params for r in fit_runs if r.n_params is not None})
    if len(sizes) < 2:
        raise ValueError(f"a size fit needs runs of >= 2 model sizes; got N={[f'{s:g}' for s in sizes]} "
                         f"({len(fit_runs)} runs); train another size or fit the critical batch only")
    out: dict[str, Any] = {}
    critical = None
    if sweep_runs is None:
        by_size = group_by_size(r for r in fit_runs if r.n_params is not None and r.batch_size is not None)
        groups = [g for g in by_size.values() if len({r.batch_size for r in g}) >= 2]
        sweep_runs = [r for g in groups for r in g]
    if sweep_runs:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            try:
                critical = fit_critical_batch_size(list(sweep_runs))
            except ValueError as err:
                out["critical_batch_error"] = str(err)
    kwargs = dict(fit_kwargs or {})
    law = fit_scaling_law(fit_runs, critical_batch=kwargs.pop("critical_batch", critical), **kwargs)
    if critical is None:
        source = "gns/law" if law.models_batch_size else "none"  # none: fitted at one batch size, B_crit unknown
        critical_dict = {"b_star": law.params["b_star"], "alpha_b": law.params["alpha_b"], "source": source}
    else:
        critical_dict = critical.to_dict()
    out.update(critical_batch=critical_dict, law=law.to_dict(), _law=law, _critical=critical)
    if predict_n is None:
        return out
    if batch_size is None:
        values, counts = np.unique([r.batch_size for r in fit_runs], return_counts=True)
        batch_size = float(values[np.argmax(counts)])
    if steps is None:
        steps = int(max(r.step[-1] for r in fit_runs))  # the last recorded step of the longest run
    out["prediction"] = predict_size(law, predict_n, batch_size, steps, target_loss=target_loss,
                                     lr_schedule=lr_schedule)
    return out


def predict_size(law: Any, n_params: float, batch_size: float, steps: int, *, target_loss: float | None = None,
                 lr_schedule: Any = None) -> dict[str, Any]:
    """The trajectory of a model of ``n_params`` predicted by a fitted law, with its interval (JSON-able).

    Args:
        law: a fitted :class:`~lightning_scaling.fitting.ScalingLaw`.
        n_params: non-embedding size to predict.
        batch_size: its batch size.
        steps: last step of the predicted trajectory (``1..steps``).
        target_loss: loss for steps/tokens-to-target predictions (optional).
        lr_schedule: its per-step LR (any scale), e.g. a smaller run's under the same schedule (``None``: the
            schedule all fitted runs shared, else constant).

    Returns:
        ``steps``, ``loss``, ``min_loss`` and with bootstrap refits ``lower``/``upper``; with ``target_loss`` also
        ``steps_to_target``, ``tokens_to_target`` and ``critical_batch_at_target``.
    """
    grid = np.arange(1, int(steps) + 1)
    pred: dict[str, Any] = {"n_params": float(n_params), "batch_size": float(batch_size), "steps": grid.tolist(),
                            "loss": law.predict_loss(n_params, grid, batch_size, lr_schedule).tolist(),
                            "min_loss": float(law.min_loss(n_params))}
    decays = law.params["anneal"] > 0  # the law has an annealing term: a decayed LR lowers the floor too
    if decays:
        pred["min_loss_decayed"] = float(law.min_loss(n_params, decayed=True))
    if len(law.bootstrap):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            lo, hi = law.interval("predict_loss", n_params, grid, batch_size, lr_schedule)
            mlo, mhi = law.interval("min_loss", n_params)
            dlo, dhi = law.interval("min_loss", n_params, decayed=True) if decays else (None, None)
        pred.update(lower=np.asarray(lo).tolist(), upper=np.asarray(hi).tolist(),
                    min_loss_interval=[float(mlo), float(mhi)])
        if decays:
            pred["min_loss_decayed_interval"] = [float(dlo), float(dhi)]
    if target_loss is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            s, tok = law.steps_to_loss(target_loss, n_params, batch_size)
        pred.update(target_loss=float(target_loss), steps_to_target=float(s), tokens_to_target=float(tok))
        if law.models_batch_size:  # a law fitted with critical_batch="none" knows no B_crit
            pred["critical_batch_at_target"] = float(law.critical_batch_size(target_loss))
        if len(law.bootstrap):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                (slo, shi), _ = law.interval("steps_to_loss", target_loss, n_params, batch_size)
            pred["steps_to_target_interval"] = [float(slo), float(shi)]
    return pred


def compare_prediction(prediction: Mapping[str, Any], actual: RunHistory, *,
                       critical: Any = None, law: Any = None) -> dict[str, Any]:
    """Compare a prediction from :func:`fit_and_predict` with the run it predicted.

    Returns:
        A dict of ``predicted``/``actual``/``rel_error`` entries for the final loss, steps to the target loss and
        the critical batch (from the sweep fit vs the live ``B_simple`` of the run).

    Example::

        >>> h = RunHistory(step=np.arange(100), loss=np.full(100, 2.0))
        >>> rows = compare_prediction({"steps": list(range(1, 100)), "loss": [2.2] * 99}, h)
        >>> round(rows["final_loss"]["rel_error"], 3)
        0.1
    """
    final, from_step = final_loss(actual)
    steps = np.asarray(prediction["steps"])
    loss = np.asarray(prediction["loss"])
    sel = (steps >= max(from_step, 1)) & (steps <= int(actual.step[-1]))  # the steps the actual tail averages
    pred_final = float(np.mean(loss[sel])) if sel.any() else float(loss[-1])
    rows: dict[str, Any] = {
        "final_loss": {"predicted": pred_final, "actual": final, "from_step": from_step,
                       "rel_error": pred_final / final - 1.0},
    }
    if "lower" in prediction:
        lo, hi = np.asarray(prediction["lower"]), np.asarray(prediction["upper"])
        rows["final_loss"]["interval"] = [float(np.mean(lo[sel])), float(np.mean(hi[sel]))]
    if "target_loss" in prediction:
        actual_steps = first_step_below(actual, prediction["target_loss"])
        rows["steps_to_target"] = {"target_loss": prediction["target_loss"],
                                   "predicted": prediction["steps_to_target"], "actual": actual_steps,
                                   "rel_error": prediction["steps_to_target"] / actual_steps - 1.0
                                   if math.isfinite(actual_steps) and actual_steps > 0 else float("nan")}
        if "steps_to_target_interval" in prediction:
            rows["steps_to_target"]["interval"] = prediction["steps_to_target_interval"]
    live = live_b_simple(actual)
    b_crit = {"loss": final, "live_b_simple": live}
    if critical is not None:
        b_crit["sweep"] = float(critical(final))
    if law is not None:
        b_crit["law"] = float(law.critical_batch_size(final))
    rows["critical_batch"] = b_crit
    return rows


def _references(fit_specs: Sequence[RunSpec], histories: Mapping[str, RunHistory],
                holdout: RunSpec) -> list[RunHistory] | None:
    """The finished ladder runs at the held-out run's batch size: same setup and schedule, smaller models."""
    refs = [histories[s.name] for s in fit_specs if s.role == "ladder" and s.batch_size == holdout.batch_size
            and s.schedule == holdout.schedule and s.name in histories]
    return refs or None


def _schedule_of(fit_specs: Sequence[RunSpec], histories: Mapping[str, RunHistory],
                 schedule: str | None) -> np.ndarray | None:
    """The per-step LR of the largest finished ladder run under ``schedule`` (``None``: the model's own)."""
    from lightning_scaling.backtest import largest_run_schedule

    return largest_run_schedule([histories[s.name] for s in fit_specs if s.role == "ladder"
                                 and s.schedule == schedule and s.name in histories])


def _half_run_forecast(history: RunHistory, max_steps: int, *, law: Any = None,
                       reference: Sequence[RunHistory] | None = None) -> dict[str, Any] | None:
    """Forecast the run's final loss from its first half (what ScalingForecast shows live mid-run), given the
    finished ladder as reference runs."""
    try:
        from lightning_scaling.forecast import forecast_run
    except ImportError:
        return None
    half = history.truncate(max_steps // 2)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fc = forecast_run(half, horizon=max_steps, law=law, reference=reference)
    except (ValueError, TypeError) as err:
        return {"error": str(err)}
    final = float(np.asarray(fc.final_loss))
    out = {"observed_until": int(half.step[-1]), "final_loss": final, "method": getattr(fc, "method", None)}
    for key in ("final_lower", "final_upper"):
        if hasattr(fc, key):
            out[key] = float(np.asarray(getattr(fc, key)))
    return out
