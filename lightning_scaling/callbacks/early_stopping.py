"""ForecastEarlyStopping: stop a run once its loss forecast says, with confidence, that finishing is not worth it."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import WarningCache, rank_zero_debug, rank_zero_info
from typing_extensions import override

from lightning_scaling import forecast as _forecast  # module attribute: resolved at call time
from lightning_scaling.callbacks.forecast import ScalingForecast
from lightning_scaling.callbacks.loss_trajectory import LossTrajectory
from lightning_scaling.callbacks.utils import find_callback, run_horizon
from lightning_scaling.history import RunHistory
from lightning_scaling.stopping import (
    ForecastStopRule, PairedReference, current_loss, forecast_stop_reason, reference_final_loss,
)
from lightning_scaling.warnings import ForecastWarning

if TYPE_CHECKING:
    from lightning_scaling.forecast import Forecast

# The rule's names stay importable from here (they live in lightning_scaling.stopping).
__all__ = [
    "ForecastEarlyStopping", "ForecastStopRule", "PairedReference", "forecast_stop_reason", "reference_final_loss",
]


class ForecastEarlyStopping(Callback):
    r"""Stop training when the loss forecast says, with the chosen confidence, that finishing is not worth it.

    Unlike :class:`~lightning.pytorch.callbacks.EarlyStopping`, which waits for a metric to stop improving, this
    looks ahead: at every check it takes the latest forecast of the run's loss curve (from an attached
    :class:`ScalingForecast` with the same ``confidence``, else it refits itself with
    :func:`~lightning_scaling.forecast.forecast_run` on the :class:`LossTrajectory` history) and stops when

    (a) ``target_loss`` cannot be reached within the ``max_steps``/``max_tokens`` budget (default: the planned
        length of the run): the band's lower bound never gets there;
    (b) the predicted remaining improvement, even optimistically, is below ``min_delta``;
    (c) the run is predicted to end worse than ``baseline_loss`` (or the final loss of the ``reference`` run) by
        more than ``margin``: the band's lower bound for the final loss is above ``baseline + margin``.

    A check counts only after ``min_fraction`` of the run and when a new forecast is available; ``patience``
    consecutive positive checks stop the run. Under DDP, rank 0 decides from its own forecast and broadcasts
    the decision (one collective on every rank at every check step), so all ranks count patience on the same
    forecasts and identical seeded runs stop at the same step; then ``trainer.should_stop`` is set. The reason
    is kept in :attr:`stopped_reason` and reported with ``rank_zero_info``.

    Args:
        target_loss: Loss the run must be able to reach.
        max_steps: Step budget for ``target_loss`` (default: the run's planned steps).
        max_tokens: Token budget for ``target_loss`` (needs tokens per step from the history).
        min_delta: Smallest remaining improvement worth training for.
        baseline_loss: Final loss to beat.
        reference: A finished run (:class:`RunHistory` or a path :meth:`RunHistory.load` reads) whose final loss
            (mean of its last 1%) is the baseline.
        paired: With ``reference``, compare against the reference's forecast from the same number of steps
            (:class:`PairedReference`) instead of its final loss, which cancels the error the two forecasts share
            (on real cosine sweeps a forecast from 20-50% of the run under-predicts the annealing gain by
            0.03-0.13 nats; the unpaired comparison then stops even the best run).
        margin: Tolerance on the baseline comparison, in loss units.
        confidence: Coverage of the forecast band used for the decisions, in (0, 1).
        patience: Consecutive positive checks needed to stop.
        min_fraction: Fraction of the run that must be seen before checks count.
        check_every_n_steps: Optimizer steps between checks. Default: the ``every_n_steps`` of an attached
            :class:`ScalingForecast`, else 200.
        horizon: Last step of the run (default: ``trainer.max_steps`` / ``estimated_stepping_batches``).
        law: Prior law for its own refits (see ``forecast_run``).
        method: Forecast method for its own refits.
        verbose: Report the stop (and positive checks at debug level).
        forecast_kwargs: More keyword arguments for its own ``forecast_run`` calls.

    Raises:
        ValueError: no criterion is given, both ``baseline_loss`` and ``reference`` are given, or a number is out
            of range.
        MisconfigurationException: in ``setup``, when no :class:`LossTrajectory` is attached.

    Attributes:
        stopped_reason: Why training was stopped (``None`` if it was not).
        stopped_step: The optimizer step at which it was stopped.
        wait_count: Current number of consecutive positive checks.
        baseline: The baseline final loss in use (from ``baseline_loss`` or ``reference``).

    Example::

        >>> from lightning_scaling.callbacks.loss_trajectory import LossTrajectory
        >>> from lightning_scaling.callbacks.forecast import ScalingForecast
        >>> stop = ForecastEarlyStopping(baseline_loss=3.05, margin=0.01, patience=3, min_fraction=0.25)
        >>> callbacks = [LossTrajectory(), ScalingForecast(), stop]
        >>> trainer = pl.Trainer(max_steps=20000, callbacks=callbacks)  # doctest: +SKIP
        >>> trainer.fit(model)  # doctest: +SKIP
        >>> stop.stopped_reason  # doctest: +SKIP
    """

    def __init__(
        self,
        *,
        target_loss: float | None = None,
        max_steps: int | None = None,
        max_tokens: float | None = None,
        min_delta: float | None = None,
        baseline_loss: float | None = None,
        reference: RunHistory | str | os.PathLike | None = None,
        margin: float = 0.0,
        paired: bool = True,
        confidence: float = 0.9,
        patience: int = 3,
        min_fraction: float = 0.2,
        check_every_n_steps: int | None = None,
        horizon: int | None = None,
        law: Any = None,
        method: str = "auto",
        verbose: bool = True,
        forecast_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("target_loss", target_loss), ("baseline_loss", baseline_loss), ("margin", margin)):
            if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value)):
                raise ValueError(f"`{name}` must be a finite number, got {value!r}")
        for name, value in (("max_steps", max_steps), ("check_every_n_steps", check_every_n_steps),
                            ("horizon", horizon)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"`{name}` must be a positive int or None, got {value!r}")
        if max_tokens is not None and not (isinstance(max_tokens, (int, float)) and max_tokens > 0):
            raise ValueError(f"`max_tokens` must be positive, got {max_tokens!r}")
        if min_delta is not None and not (isinstance(min_delta, (int, float)) and min_delta > 0):
            raise ValueError(f"`min_delta` must be positive, got {min_delta!r}")
        if margin < 0:
            raise ValueError(f"`margin` must be >= 0, got {margin!r}")
        if not (isinstance(confidence, (int, float)) and 0.0 < confidence < 1.0):
            raise ValueError(f"`confidence` must be in (0, 1), got {confidence!r}")
        if not isinstance(patience, int) or patience < 1:
            raise ValueError(f"`patience` must be a positive int, got {patience!r}")
        if not (isinstance(min_fraction, (int, float)) and 0.0 <= min_fraction < 1.0):
            raise ValueError(f"`min_fraction` must be in [0, 1), got {min_fraction!r}")
        if baseline_loss is not None and reference is not None:
            raise ValueError("give either `baseline_loss` or `reference`, not both")
        if target_loss is None and min_delta is None and baseline_loss is None and reference is None:
            raise ValueError(
                "ForecastEarlyStopping needs a criterion: `target_loss`, `min_delta`, `baseline_loss` or `reference`"
            )
        if (max_steps is not None or max_tokens is not None) and target_loss is None:
            raise ValueError("`max_steps`/`max_tokens` are budgets for `target_loss`; give `target_loss` too")
        if reference is not None and not isinstance(reference, RunHistory):
            reference = RunHistory.load(reference)
        self.target_loss = None if target_loss is None else float(target_loss)
        self.max_steps = max_steps
        self.max_tokens = None if max_tokens is None else float(max_tokens)
        self.min_delta = None if min_delta is None else float(min_delta)
        self.reference = reference
        self.baseline = reference_final_loss(reference) if reference is not None else baseline_loss
        self.margin = float(margin)
        self.paired = bool(paired)
        self._paired_ref: PairedReference | None = None
        self.confidence = float(confidence)
        self.patience = patience
        self.min_fraction = float(min_fraction)
        self.check_every_n_steps = check_every_n_steps
        self.horizon = horizon
        self.law = law
        self.method = method
        self.verbose = verbose
        self.forecast_kwargs = dict(forecast_kwargs or {})

        self.stopped_reason: str | None = None
        self.stopped_step: int | None = None
        self._rule: ForecastStopRule | None = None
        self._wait_count = 0
        self._last_used: int | None = None
        self._last_step: int | None = None
        self._prev: Forecast | None = None
        self._warning_cache = WarningCache()

    @property
    def state_key(self) -> str:
        return self._generate_state_key(target_loss=self.target_loss, min_delta=self.min_delta,
                                        baseline=self.baseline, margin=self.margin)

    @property
    def wait_count(self) -> int:
        return self._rule.wait_count if self._rule is not None else self._wait_count

    # ---------------------------------------------------------------------- hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and find_callback(trainer, LossTrajectory) is None:
            raise MisconfigurationException(
                "ForecastEarlyStopping needs the LossTrajectory callback to record the loss curve: "
                "`Trainer(callbacks=[LossTrajectory(...), ForecastEarlyStopping(...)])`."
            )

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        sf = self._scaling_forecast(trainer)
        horizon = run_horizon(trainer, self.horizon)
        if horizon is None:
            self._warning_cache.warn(
                "ForecastEarlyStopping: the run has no known length (set `max_steps` on the Trainer or `horizon`); "
                "it will not stop anything.",
                category=ForecastWarning,
            )
        self._rule = ForecastStopRule(
            horizon=horizon,
            patience=self.patience,
            min_fraction=self.min_fraction,
            target_loss=self.target_loss,
            max_steps=self.max_steps if self.max_steps is not None else horizon,
            max_tokens=self.max_tokens,
            min_delta=self.min_delta,
            baseline_loss=self.baseline,
            margin=self.margin,
        )
        self._rule.wait_count = self._wait_count
        if self.reference is not None and self.paired:
            self._paired_ref = PairedReference(self.reference, horizon=horizon, confidence=self.confidence,
                                               law=self.law, method=self.method, **self.forecast_kwargs)
        if self.check_every_n_steps is None:
            self.check_every_n_steps = sf.every_n_steps if sf is not None else 200
        self._last_step = trainer.global_step

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step == self._last_step or self._rule is None:
            return  # accumulation micro-batch
        self._last_step = step
        # Same steps on every rank: the collectives below line up.
        if step % (self.check_every_n_steps or 200) != 0 or not self._rule.ready(step):
            return
        self._check(trainer, step)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "wait_count": self.wait_count,
            "stopped_reason": self.stopped_reason,
            "stopped_step": self.stopped_step,
            "last_used": self._last_used,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._wait_count = int(state_dict.get("wait_count", 0))
        if self._rule is not None:
            self._rule.wait_count = self._wait_count
        self.stopped_reason = state_dict.get("stopped_reason")
        self.stopped_step = state_dict.get("stopped_step")
        self._last_used = state_dict.get("last_used")

    # -------------------------------------------------------------------- helpers
    def _scaling_forecast(self, trainer: pl.Trainer) -> ScalingForecast | None:
        return find_callback(trainer, ScalingForecast, lambda c: c.confidence == self.confidence)

    def _latest_forecast(self, trainer: pl.Trainer) -> tuple[Forecast | None, float | None]:
        """The newest forecast (ScalingForecast's, else an own refit) and the current smoothed loss."""
        sf = self._scaling_forecast(trainer)
        if sf is not None:
            fc = sf.forecast
            return fc, (current_loss(fc) if fc is not None else None)
        traj = find_callback(trainer, LossTrajectory)
        if traj is None:
            return None, None
        try:
            history = traj.history
            fc = _forecast.forecast_run(history, self._rule.horizon if self._rule else None, None, law=self.law,
                                        target_loss=self.target_loss, confidence=self.confidence,
                                        method=self.method, init=self._prev, **self.forecast_kwargs)
            self._prev = fc  # warm start: a refit from the previous solution costs milliseconds
        except ValueError as err:  # too little data yet
            rank_zero_debug(f"ForecastEarlyStopping: no forecast at step {trainer.global_step} ({err}).")
            return None, None
        except Exception as err:
            self._warning_cache.warn(f"ForecastEarlyStopping: refit failed ({type(err).__name__}: {err}); "
                                     "not stopping on this check.", category=ForecastWarning)
            return None, None
        return fc, current_loss(fc)

    def _decide(self, trainer: pl.Trainer, step: int) -> tuple[int | None, bool, str | None]:
        """This rank's verdict: (``observed_until`` of a new forecast or ``None``, positive, reason)."""
        assert self._rule is not None
        fc, current = self._latest_forecast(trainer)
        if fc is None or int(fc.observed_until) == self._last_used:
            return None, False, None
        try:
            if self._paired_ref is not None:
                self._rule.criteria["baseline_loss"] = self._paired_ref.at(int(fc.observed_until))
            reason = self._rule.check(fc, current_step=step, current_loss=current)
        except Exception as err:
            self._warning_cache.warn(f"ForecastEarlyStopping: check failed ({type(err).__name__}: {err}).",
                                     category=ForecastWarning)
            return None, False, None
        return int(fc.observed_until), reason is not None, reason

    def _check(self, trainer: pl.Trainer, step: int) -> None:
        assert self._rule is not None
        # Rank 0 decides from its own forecast and every rank takes its decision: ranks refit in the background
        # at different moments, so their latest forecasts differ in age, and counting patience on a mix of them
        # made identical seeded runs stop at different steps. One broadcast, on every rank at every check step.
        decision = self._decide(trainer, step) if trainer.is_global_zero else None
        observed, positive, reason = trainer.strategy.broadcast(decision, src=0)
        if observed is None:
            return  # no new forecast on rank 0: nothing is counted
        self._last_used = observed
        stop_reason = self._rule.record(positive, reason)
        if positive and self.verbose:
            rank_zero_debug(f"ForecastEarlyStopping: positive check {self._rule.wait_count}/{self.patience} at "
                            f"step {step}: {reason}")
        if stop_reason is not None:
            trainer.should_stop = True
            self.stopped_reason = stop_reason
            self.stopped_step = step
            if self.verbose:
                rank_zero_info(
                    f"ForecastEarlyStopping: stopping at step {step} after {self._rule.wait_count} consecutive "
                    f"positive checks. Reason: {stop_reason}"
                )
            for lg in trainer.loggers if trainer.is_global_zero else []:
                lg.log_metrics({"forecast/early_stop": 1.0}, step=step)
