"""The early-stopping rule on a loss forecast, Lightning-free: the maths behind ``ForecastEarlyStopping``.

:func:`forecast_stop_reason` says whether one forecast already shows that finishing the run is not worth it
(target reachable or out of budget, no meaningful gain left, worse than a baseline or a paired reference run);
:class:`ForecastStopRule` counts consecutive positive checks (patience) from a minimum fraction of the run on.
:class:`~lightning_scaling.callbacks.ForecastEarlyStopping` feeds it forecasts and stops the trainer.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from lightning_scaling import forecast as _forecast  # module attribute: resolved at call time
from lightning_scaling.history import RunHistory, final_loss

if TYPE_CHECKING:
    from lightning_scaling.forecast import Forecast

__all__ = ["ForecastStopRule", "PairedReference", "current_loss", "forecast_stop_reason", "reference_final_loss"]


def reference_final_loss(history: RunHistory, *, tail_fraction: float = 0.01) -> float:
    """Final loss of a finished reference run: :func:`~lightning_scaling.history.final_loss` over its last
    ``tail_fraction`` of finite losses (at least one point).

    Raises:
        ValueError: the history has no finite loss, or ``tail_fraction`` is not in (0, 1].

    Example::

        >>> h = RunHistory(step=range(200), loss=[3.0] * 198 + [2.9, 3.1])
        >>> round(reference_final_loss(h), 6)
        3.0
    """
    if not 0.0 < tail_fraction <= 1.0:
        raise ValueError(f"`tail_fraction` must be in (0, 1], got {tail_fraction!r}")
    return final_loss(history, fraction=tail_fraction, min_points=1)[0]


class PairedReference:
    """Baseline from a finished reference run, corrected for the forecast's shared bias.

    Two runs of the same setup and schedule share most of a law's extrapolation error at a given fraction of
    training (e.g. the annealing gain of a cosine decay, under-predicted mid-run). So at step ``s`` the reference's
    own prefix up to ``s`` is forecast the same way, and the baseline is shifted by that forecast's error on the
    reference: ``baseline(s) = final_ref + (forecast_ref(s).final_loss - final_ref) = forecast_ref(s).final_loss``.
    Comparing ``final_lower > baseline(s) + margin`` then asks whether this run is predicted to end worse than the
    reference *was predicted to at the same point*, which cancels the common-mode error. Refits of the reference
    warm-start from the previous one. Steps the reference does not cover fall back to its final loss.

    Args:
        reference: The finished reference run.
        horizon: Horizon used for both runs' forecasts.
        **forecast_kwargs: Passed to ``forecast_run`` (``confidence``, ``law``, ``method``, ...).

    Example::

        >>> s = np.arange(0, 3001, 10)
        >>> ref = RunHistory(step=s, loss=2.0 + (np.maximum(s, 1) / 50.0) ** -0.5)
        >>> pr = PairedReference(ref, horizon=3000)
        >>> round(pr.final, 3), bool(abs(pr.at(1500) - pr.final) < 0.01)
        (2.129, True)
    """

    def __init__(self, reference: RunHistory, *, horizon: int | None, **forecast_kwargs: Any) -> None:
        self.reference = reference
        self.horizon = horizon
        self.final = reference_final_loss(reference)
        self.forecast_kwargs = forecast_kwargs
        self._prev: Forecast | None = None
        self._cache: dict[int, float] = {}

    def at(self, step: int) -> float:
        """The bias-corrected baseline for a forecast made from ``step`` observed steps."""
        step = int(step)
        ref_steps = np.asarray(self.reference.step)
        if ref_steps.size == 0 or step >= ref_steps[-1] or step in self._cache:
            return self._cache.get(step, self.final)
        try:
            fc = _forecast.forecast_run(self.reference.truncate(step), self.horizon, init=self._prev,
                                        **self.forecast_kwargs)
        except Exception:  # too little of the reference seen, or a failed fit: no correction
            return self.final
        self._prev = fc
        self._cache[step] = float(fc.final_loss) if math.isfinite(fc.final_loss) else self.final
        return self._cache[step]


def forecast_stop_reason(
    forecast: Forecast,
    *,
    current_step: int,
    target_loss: float | None = None,
    max_steps: int | None = None,
    max_tokens: float | None = None,
    min_delta: float | None = None,
    baseline_loss: float | None = None,
    margin: float = 0.0,
    current_loss: float | None = None,
) -> str | None:
    """Decide from one forecast whether the run should stop; the reason, or ``None`` to continue.

    Uses the forecast's band (``lower``/``upper``, made at the forecast's confidence) so each test is
    conservative, i.e. it stops only if even the optimistic (lower) bound says so:

    (c) **baseline**: ``final_lower > baseline_loss + margin``: even optimistically the run ends worse than the
        baseline;
    (a) **target**: the lower bound never reaches ``target_loss`` at or before the budget (the smallest of
        ``max_steps``, ``max_tokens / tokens_per_step`` and the forecast's last step). Undecidable, hence no stop,
        when the budget lies beyond the forecast or the target is already reached (``current_loss``);
    (b) **min_delta**: the optimistic remaining improvement, forecast level at ``current_step`` minus
        ``final_lower``, is below ``min_delta``.

    Args:
        forecast: A :class:`~lightning_scaling.forecast.Forecast` (only ``steps``, ``loss``, ``lower``,
            ``final_lower`` and ``tokens_per_step`` are read).
        current_step: The optimizer step now.
        target_loss: Loss the run must reach.
        max_steps: Step budget for ``target_loss``.
        max_tokens: Token budget for ``target_loss``.
        min_delta: Smallest remaining improvement worth training for.
        baseline_loss: Final loss to beat.
        margin: Tolerance added to ``baseline_loss``.
        current_loss: The smoothed observed loss now (target already reached -> never stop for the target).

    Returns:
        A human-readable reason starting with ``"baseline"``, ``"target"`` or ``"min_delta"``, or ``None``.

    Example::

        >>> import types
        >>> steps = np.arange(0, 1001, 100)
        >>> loss = 3.0 + 1.0 / np.sqrt(1 + steps / 100)
        >>> f = types.SimpleNamespace(steps=steps, loss=loss, lower=loss - 0.02, final_lower=loss[-1] - 0.02,
        ...                           tokens_per_step=None)
        >>> forecast_stop_reason(f, current_step=300, target_loss=3.1) is not None
        True
        >>> forecast_stop_reason(f, current_step=300, target_loss=3.4) is None
        True
    """
    steps = np.asarray(forecast.steps, dtype=np.float64)
    lower = np.asarray(forecast.lower, dtype=np.float64)
    final_lower = float(forecast.final_lower)
    if steps.size == 0 or not math.isfinite(final_lower):
        return None
    if baseline_loss is not None and final_lower > baseline_loss + margin:
        return (
            f"baseline: predicted final loss is at least {final_lower:.4f} (lower bound), worse than the baseline "
            f"{baseline_loss:.4f} + margin {margin:g}"
        )
    if target_loss is not None and not (current_loss is not None and current_loss <= target_loss):
        budgets = [float(steps[-1])]
        if max_steps is not None:
            budgets.append(float(max_steps))
        tps = getattr(forecast, "tokens_per_step", None)
        if max_tokens is not None and tps is not None and math.isfinite(tps) and tps > 0:
            budgets.append(float(max_tokens) / float(tps))
        budget = min(budgets)
        explicit = budgets[1:]
        # A budget past the forecast's end is undecidable (1 step / 1% slack: horizons count steps from 0 or 1).
        beyond = bool(explicit) and min(explicit) > steps[-1] * 1.01 + 1
        within = steps <= budget
        reachable = bool(np.any(lower[within] <= target_loss)) if within.any() else True
        if not reachable and not beyond:
            best = float(np.nanmin(lower[within]))
            return (
                f"target: loss {target_loss:.4f} is not reached within the budget of {budget:.0f} steps even "
                f"optimistically (lower bound {best:.4f})"
            )
    if min_delta is not None:
        level = float(np.interp(current_step, steps, np.asarray(forecast.loss, dtype=np.float64)))
        gain = level - final_lower
        if math.isfinite(gain) and gain < min_delta:
            return (
                f"min_delta: at most {gain:.4f} more improvement is predicted (from {level:.4f} now to "
                f"{final_lower:.4f} lower bound), below min_delta {min_delta:g}"
            )
    return None


class ForecastStopRule:
    """The stopping protocol, free of Lightning: criteria, ``patience`` and ``min_fraction``.

    Feed it one forecast per check with :meth:`update`; it counts consecutive positive checks and returns the
    reason once ``patience`` is reached. Checks before ``min_fraction`` of ``horizon`` are ignored. The
    callback uses it, and it replays recorded runs offline (see the tests).

    Args:
        horizon: Last optimizer step of the run (for ``min_fraction``).
        patience: Consecutive positive checks needed to stop.
        min_fraction: Fraction of ``horizon`` that must be seen before any check counts.
        **criteria: Keyword arguments of :func:`forecast_stop_reason` (``target_loss``, ``max_steps``,
            ``max_tokens``, ``min_delta``, ``baseline_loss``, ``margin``).

    Example::

        >>> import types
        >>> steps = np.arange(0, 1001, 100.0)
        >>> f = types.SimpleNamespace(steps=steps, loss=3.5 - steps / 1e4, lower=3.45 - steps / 1e4,
        ...                           final_lower=3.35, tokens_per_step=None)
        >>> rule = ForecastStopRule(horizon=1000, patience=2, min_fraction=0.2, baseline_loss=3.2)
        >>> [rule.update(f, current_step=s) is not None for s in (100, 200, 300)]
        [False, False, True]
    """

    def __init__(self, *, horizon: int | None, patience: int = 3, min_fraction: float = 0.2, **criteria: Any) -> None:
        if not isinstance(patience, int) or patience < 1:
            raise ValueError(f"`patience` must be a positive int, got {patience!r}")
        if not 0.0 <= min_fraction < 1.0:
            raise ValueError(f"`min_fraction` must be in [0, 1), got {min_fraction!r}")
        self.horizon = horizon
        self.patience = patience
        self.min_fraction = min_fraction
        self.criteria = criteria
        self.wait_count = 0
        self.last_reason: str | None = None

    def ready(self, current_step: int) -> bool:
        """Whether ``min_fraction`` of the run has been seen (always false for an unknown horizon)."""
        return self.horizon is not None and current_step >= self.min_fraction * self.horizon

    def check(self, forecast: Forecast, *, current_step: int, current_loss: float | None = None) -> str | None:
        """One positive/negative verdict, without updating the patience counter."""
        if not self.ready(current_step):
            return None
        return forecast_stop_reason(forecast, current_step=current_step, current_loss=current_loss, **self.criteria)

    def record(self, positive: bool, reason: str | None = None) -> str | None:
        """Count one (collectively agreed) verdict; the reason when ``patience`` is reached, else ``None``."""
        if positive:
            self.wait_count += 1
            self.last_reason = reason or self.last_reason
        else:
            self.wait_count = 0
        return self.last_reason if self.wait_count >= self.patience else None

    def update(self, forecast: Forecast, *, current_step: int, current_loss: float | None = None) -> str | None:
        """:meth:`check` then :meth:`record`: the stop reason once ``patience`` positive checks in a row."""
        if not self.ready(current_step):
            return None
        reason = self.check(forecast, current_step=current_step, current_loss=current_loss)
        return self.record(reason is not None, reason)


def current_loss(fc: Forecast) -> float:
    """The forecast's view of the loss now: its last smoothed observed point, else the start of the forecast."""
    observed = np.asarray(getattr(fc, "observed_loss", ()), dtype=np.float64)
    if observed.size and math.isfinite(observed[-1]):
        return float(observed[-1])
    return float(np.asarray(fc.loss, dtype=np.float64)[0])
