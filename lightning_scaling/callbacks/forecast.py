"""ScalingForecast: refit the run's loss curve while it trains and log where it is heading."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.rank_zero import WarningCache, rank_zero_debug, rank_zero_info
from typing_extensions import override

from lightning_scaling.callbacks.loss_trajectory import LossTrajectory
from lightning_scaling.callbacks.utils import find_callback, run_horizon
from lightning_scaling.refit import RefitJob, RefitResult, RefitScheduler, recent_mean_loss
from lightning_scaling.warnings import ForecastWarning

if TYPE_CHECKING:
    from lightning_scaling.forecast import Forecast
    from lightning_scaling.history import RunHistory

__all__ = ["ScalingForecast", "predictable", "recent_mean_loss"]

#: ``background`` -> where refits run (see :class:`~lightning_scaling.refit.RefitScheduler`).
_BACKGROUND_MODES = {"auto": "process", True: "process", "thread": "thread", False: "inline"}
# Progress-bar keys (short: the bar is one line).
PBAR_LOSS = "pred_loss"
PBAR_ETA = "eta_min"
PBAR_AVG = "avg_loss"
#: Longest wait (seconds) for the refits still in flight when training ends.
_MAX_END_WAIT = 120.0
#: Summary keys that do not depend on the forecast's band (logged even while the forecast is not predictable).
_TIME_KEYS = ("forecast/refit_seconds", "forecast/remaining_seconds", "forecast/critical_batch")


def _finite(x: Any) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _load_reference(reference: Any) -> list[RunHistory] | None:
    """Reference runs as a list of histories: given as histories, or read once from a folder or file."""
    from lightning_scaling.history import RunHistory

    if reference is None:
        return None
    if isinstance(reference, (str, os.PathLike)):
        return RunHistory.load_many(reference)
    refs = [reference] if isinstance(reference, RunHistory) else list(reference)
    bad = [type(r).__name__ for r in refs if not isinstance(r, RunHistory)]
    if bad or not refs:
        raise ValueError(f"`reference` must be RunHistory runs or a folder of runs, got {bad or 'an empty list'}")
    return refs


class ScalingForecast(Callback):
    r"""Refit the run's loss curve while it trains and log the predicted final loss, band, ETA and target steps.

    Every ``every_n_steps`` optimizer steps (whatever the validation cadence; ``refit_on_validation=True`` adds a
    refit after each validation run) it fits :func:`~lightning_scaling.forecast.forecast_run` to the history
    recorded by :class:`LossTrajectory` (a default one is added in ``setup`` when none is attached) and logs, at
    the step of the refit, to every logger (rank 0):

    - ``forecast/final_loss``, ``forecast/final_loss_lower``, ``forecast/final_loss_upper``: predicted loss at the
      last step of the run (``horizon``) with its ``confidence`` band;
    - ``forecast/steps_to_target``, ``forecast/tokens_to_target``: when the mean forecast reaches ``target_loss``;
    - ``forecast/eta_seconds``: wall-clock seconds until ``target_loss`` is reached (until the end of the run when
      no target is set), from the measured time per optimizer step (an EMA of ``time.perf_counter`` deltas,
      validation included, the refits themselves excluded); ``forecast/remaining_seconds``: until the end;
    - ``forecast/critical_batch``: the latest gradient noise scale B_simple (samples) when
      :class:`GradientNoiseScale` feeds the history.

    Non-finite values (a target that is never reached) are not logged; they stay in :attr:`summary`. The
    progress bar shows ``pred_loss`` (the predicted final loss), ``eta_min`` (0 once the run ends) and
    ``avg_loss``, the mean training loss of the last few logged steps (the bar's own ``train_loss`` is the last
    batch, far noisier than the forecast). While the band is wider than the predicted loss itself the forecast is
    *not yet predictable*: ``pred_loss`` is left out of the bar and an info line says so. With a
    :class:`~lightning.pytorch.loggers.TensorBoardLogger` it also writes, on rank 0, the custom-scalars layout
    (once per run), the latest forecast curve with the smoothed observed loss as one run ``<log_dir>/forecast``
    (replaced at each refit, see :mod:`~lightning_scaling.report.tensorboard`), a figure of the curve, forecast and
    band (``forecast/curve``) and the latest forecast with its fitted parameters as
    ``<log_dir>/forecast/latest.json``.

    **Cost.** The refit must not stall training. By default (``background="auto"``) the training thread only
    takes a snapshot of the history at each cadence step and hands it to a worker process at a lower priority
    (:class:`~lightning_scaling.refit.RefitScheduler`), which fits; the result is logged at the first optimizer
    step after it is back, at the step it was made for. A cold fit is about a second of Python work: in a thread
    it would hold the GIL against the training loop and slow every step. While a refit is in flight the next due
    snapshot waits (a newer one replaces it), so refits always belong to a cadence step. ``background="thread"``
    uses a thread, ``False`` the training thread. The worker process also writes the TensorBoard forecast run and
    ``latest.json`` at every refit. The figure (and, with a thread or inline, the forecast run) is made on the
    training thread when a result is picked up, only while it costs at most ``max_overhead`` of the training time
    so far: the forecast run (hundredths of a second) first, the figure (matplotlib alone takes a second to import)
    once the budget also pays for it, so short runs get a coarser cadence and no figure. A worker that cannot
    start falls back to the training thread with one warning. The cost of the latest refit is in
    :attr:`refit_seconds`, every refit's step and cost in :attr:`refit_log`, the time the training thread
    spent on refits in :attr:`stall_seconds`. When training ends, the refits still in flight are waited for at most
    ``max_overhead`` of the training time (2 minutes at most); one that is later is dropped.

    **Failures.** A failed fit never raises into the training loop: the last good forecast is kept and the
    first failure of each kind is warned about once. ``forecast_run`` refuses (``ValueError``) while too little of
    the curve is seen; that is expected early on and only reported at the end of training if no refit ever
    succeeded.

    Args:
        every_n_steps: Optimizer steps between refits.
        target_loss: Loss to reach; enables ``steps_to_target``, ``tokens_to_target`` and a target ETA.
        horizon: Last optimizer step to forecast to. Default: ``trainer.max_steps`` or
            ``trainer.estimated_stepping_batches``.
        lr_schedule: Per-step LR schedule (index ``i`` = LR of step ``i``) passed to ``forecast_run``. Default: the
            planned schedule recorded by :class:`LossTrajectory`.
        confidence: Coverage of the band, in (0, 1).
        law: Optional prior law from smaller runs of the same setup (see ``forecast_run``).
        method: Forecast method passed to ``forecast_run``.
        background: ``"auto"`` or ``True`` (a worker process), ``"thread"`` (a background thread) or ``False``
            (the training thread).
        max_overhead: Fraction of the training time that figures and forecast files may cost in all; above it
            a refit logs the numbers only (a coarser figure cadence).
        refit_on_validation: Also refit after each validation run (off: the cadence is ``every_n_steps``).
        figure: Log a matplotlib figure of the forecast to TensorBoard at each refit (needs matplotlib).
        forecast_runs: Write the latest forecast to the TensorBoard run ``<log_dir>/forecast`` (replaced at each
            refit whose forecast is predictable) and ``latest.json``.
        prog_bar: Show ``pred_loss`` and ``eta_min`` in the progress bar.
        warm_start: Start each refit from the previous forecast (``forecast_run(init=...)``: milliseconds instead
            of a full search); ``forecast_run`` itself redoes the full validation periodically
            (``revalidate_every``, or when the observed span grew by a quarter).
        forecast_kwargs: More keyword arguments for ``forecast_run``.
        reference: Finished runs of the same setup (smaller models or earlier runs, same schedule shape) that
            sharpen the forecast (``forecast_run(reference=...)``): a :class:`~lightning_scaling.RunHistory`, a
            list of them, or a folder (or file) of runs read once here with :meth:`RunHistory.load_many`.

    Raises:
        ValueError: ``every_n_steps`` or ``horizon`` is not a positive int, ``confidence`` not in (0, 1),
            ``max_overhead`` not positive, ``target_loss`` not finite or ``background`` not one of
            ``"auto"``, ``True``, ``"thread"``, ``False``; ``reference`` is not runs or a path holding runs.
        FileNotFoundError: ``reference`` is a path that does not exist.

    Attributes:
        forecast: The latest successful :class:`~lightning_scaling.forecast.Forecast` (``None`` before the first).
        summary: The latest logged summary (Python floats, non-finite kept), restored from checkpoints.
        n_refits: Successful refits; ``n_failures``: failed ones.
        refit_seconds: Wall time of the latest refit (fit, figure and files), where it ran.
        refit_log: ``(cadence step, refit seconds)`` of every refit picked up, in order.
        stall_seconds: Time the training thread spent on the latest refit; ``max_stall_seconds`` the worst.
        step_seconds: Measured seconds per optimizer step (EMA), ``None`` before two steps.
        background_active: Whether refits currently run off the training thread.

    Example::

        >>> from lightning_scaling.callbacks.loss_trajectory import LossTrajectory
        >>> callbacks = [LossTrajectory(tokens_per_sample=256), ScalingForecast(every_n_steps=100, target_loss=3.2)]
        >>> trainer = pl.Trainer(max_steps=5000, callbacks=callbacks)  # doctest: +SKIP
        >>> trainer.fit(model)  # doctest: +SKIP
        >>> callbacks[1].summary["forecast/final_loss"]  # doctest: +SKIP
    """

    def __init__(
        self,
        every_n_steps: int = 200,
        *,
        target_loss: float | None = None,
        horizon: int | None = None,
        lr_schedule: Any = None,
        confidence: float = 0.9,
        law: Any = None,
        method: str = "auto",
        background: bool | str = "auto",
        max_overhead: float = 0.02,
        refit_on_validation: bool = False,
        figure: bool = True,
        forecast_runs: bool = True,
        prog_bar: bool = True,
        warm_start: bool = True,
        forecast_kwargs: Mapping[str, Any] | None = None,
        reference: Any = None,
    ) -> None:
        super().__init__()
        if not isinstance(every_n_steps, int) or isinstance(every_n_steps, bool) or every_n_steps < 1:
            raise ValueError(f"`every_n_steps` must be a positive int, got {every_n_steps!r}")
        if horizon is not None and (not isinstance(horizon, int) or horizon < 1):
            raise ValueError(f"`horizon` must be a positive int or None, got {horizon!r}")
        if not (isinstance(confidence, (int, float)) and 0.0 < confidence < 1.0):
            raise ValueError(f"`confidence` must be in (0, 1), got {confidence!r}")
        if target_loss is not None and _finite(target_loss) is None:
            raise ValueError(f"`target_loss` must be a finite number or None, got {target_loss!r}")
        if not (isinstance(max_overhead, (int, float)) and max_overhead > 0):
            raise ValueError(f"`max_overhead` must be a positive fraction, got {max_overhead!r}")
        if not any(background is k or (isinstance(k, str) and background == k) for k in _BACKGROUND_MODES):
            raise ValueError(f"`background` must be 'auto', True, 'thread' or False, got {background!r}")
        self.every_n_steps = every_n_steps
        self.target_loss = float(target_loss) if target_loss is not None else None
        self.horizon = horizon
        # Plain float64 (a torch tensor would make the refit worker import torch to unpickle it).
        self.lr_schedule = None if lr_schedule is None else np.asarray(lr_schedule, dtype=np.float64)
        self.confidence = float(confidence)
        self.law = law
        self.method = method
        self.background = background
        self.max_overhead = float(max_overhead)
        self.refit_on_validation = refit_on_validation
        self.figure = figure
        self.forecast_runs = forecast_runs
        self.prog_bar = prog_bar
        self.warm_start = warm_start
        self.forecast_kwargs = dict(forecast_kwargs or {})
        self.reference = _load_reference(reference)

        self.forecast: Forecast | None = None
        self.summary: dict[str, float] = {}
        self.n_refits = 0
        self.n_failures = 0
        self.refit_seconds: float | None = None
        self.refit_log: list[tuple[int, float]] = []
        self.stall_seconds: float | None = None
        self.max_stall_seconds = 0.0
        self.background_active = background is not False
        self.last_error: str | None = None
        self._step_ema: float | None = None
        self._ema_weight = 0.0  # for bias correction of the EMA
        self._warning_cache = WarningCache()
        self._traj: LossTrajectory | None = None
        self._resolved_horizon: int | None = None
        self._scheduler: RefitScheduler | None = None
        self._last_observed: int | None = None
        self._seen_step: int | None = None
        self._t_last: float | None = None
        self._train_seconds = 0.0  # training time measured so far (inline refits excluded)
        self._pbar_pending = False
        self._said_unpredictable = False  # the "not yet predictable" line is printed once per such stretch

    @property
    def state_key(self) -> str:
        return self._generate_state_key(every_n_steps=self.every_n_steps, target_loss=self.target_loss)

    @property
    def step_seconds(self) -> float | None:
        """Seconds per optimizer step: bias-corrected EMA of wall-clock deltas (``None`` before two steps)."""
        if self._step_ema is None or self._ema_weight <= 0:
            return None
        return self._step_ema / self._ema_weight

    @property
    def resolved_horizon(self) -> int | None:
        """The horizon in use (``horizon`` or the trainer's planned number of steps), set at train start."""
        return self._resolved_horizon if self._resolved_horizon is not None else self.horizon

    # ---------------------------------------------------------------------- hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._traj = find_callback(trainer, LossTrajectory)
        if self._traj is None:
            # Composable configs: forecast.yaml alone, or with scaling.yaml, must not make two LossTrajectory
            # (same state key) or none. First in the list, so it records each step before the others read it.
            self._traj = LossTrajectory()
            trainer.callbacks.insert(0, self._traj)
            self._traj.setup(trainer, pl_module, stage)  # the running setup loop has passed index 0
            rank_zero_info(
                "ScalingForecast: no LossTrajectory attached, so one was added; it does not count tokens. Attach "
                "`LossTrajectory(tokens_per_sample=...)` (or callbacks/scaling.yaml) to get tokens-to-target."
            )

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        from lightning_scaling.report.tensorboard import write_custom_scalars

        for lg in trainer.loggers:
            if isinstance(lg, TensorBoardLogger):
                try:
                    write_custom_scalars(lg.experiment)
                except Exception as err:  # a logging nicety must not stop training
                    self._warning_cache.warn(f"ScalingForecast: could not write the TensorBoard layout ({err}).",
                                             category=ForecastWarning)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._resolved_horizon = run_horizon(trainer, self.horizon)
        if self._last_observed is not None and trainer.global_step < self._last_observed:
            # fit() called again for a new run: nothing of the last one may warm-start or stand for this one.
            self.forecast, self.summary, self._last_observed = None, {}, None
        self._seen_step = trainer.global_step
        self._made_here: list[int] = []  # steps of this fit's successful refits (n_refits counts a resumed run's too)
        self._t_last = None
        self._train_seconds = 0.0
        self._shutdown()
        self._scheduler = RefitScheduler(_mode(self.background), max_overhead=self.max_overhead)
        self._scheduler.start()  # the worker's start-up (about a second) overlaps the first steps, not a refit

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step == self._seen_step:
            return  # accumulation micro-batch: no optimizer step yet
        now = time.perf_counter()
        if self._t_last is not None and self._seen_step is not None:
            n = max(step - self._seen_step, 1)
            dt = (now - self._t_last) / n
            self._update_ema(dt)
            self._train_seconds += now - self._t_last
        self._t_last, self._seen_step = now, step
        self._poll(trainer)
        if step % self.every_n_steps == 0:
            self._refit(trainer)
        if self._pbar_pending:
            self._log_prog_bar(pl_module)
        horizon = self.resolved_horizon
        if self.prog_bar and horizon is not None and step >= horizon and self.n_refits > 0:
            self._log_pbar_value(pl_module, PBAR_ETA, 0.0)  # the run is over: no time left, whatever the EMA says

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not self.refit_on_validation or trainer.state.fn != "fit":
            return
        self._poll(trainer)
        self._refit(trainer)
        self._t_last = time.perf_counter() if self._t_last is not None else None

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._scheduler is not None:  # pick up the last refits, waiting no longer than the refit budget
            wait = min(_MAX_END_WAIT, self.max_overhead * self._train_seconds)
            self._apply_all(trainer, self._scheduler.finish(timeout=wait))
            self._warn_unmade(wait)
        self._shutdown()
        if self.n_refits == 0 and self.last_error is not None:
            self._warning_cache.warn(
                f"ScalingForecast: no forecast could be made during this run; last error: {self.last_error}",
                category=ForecastWarning)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._shutdown()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._shutdown()

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "summary": dict(self.summary),
            "step_ema": self._step_ema,
            "ema_weight": self._ema_weight,
            "n_refits": self.n_refits,
            "n_failures": self.n_failures,
            "refit_seconds": self.refit_seconds,
            "last_observed": self._last_observed,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.summary = dict(state_dict.get("summary", {}))
        self._step_ema = state_dict.get("step_ema")
        self._ema_weight = float(state_dict.get("ema_weight", 0.0))
        self.n_refits = int(state_dict.get("n_refits", 0))
        self.n_failures = int(state_dict.get("n_failures", 0))
        self.refit_seconds = state_dict.get("refit_seconds")
        self._last_observed = state_dict.get("last_observed")

    # -------------------------------------------------------------------- helpers
    def _update_ema(self, dt: float, beta: float = 0.95) -> None:
        self._step_ema = beta * (self._step_ema or 0.0) + (1 - beta) * dt
        self._ema_weight = beta * self._ema_weight + (1 - beta)

    def _refit(self, trainer: pl.Trainer) -> None:
        """Snapshot the history on the training thread and hand it to the scheduler (due at this step)."""
        traj = self._traj or find_callback(trainer, LossTrajectory)
        if traj is None or self._scheduler is None:
            return
        t0 = time.perf_counter()
        try:
            history = traj.history  # fresh arrays: a private snapshot for the worker
        except Exception as err:
            self._warning_cache.warn(f"ScalingForecast: could not read the loss history ({err}).",
                                     category=ForecastWarning)
            return
        if len(history) == 0 or int(history.step[-1]) == self._last_observed:
            return  # nothing new since the last refit
        self._last_observed = int(history.step[-1])
        self._scheduler.submit(self._job(trainer, history))
        self.background_active = self._scheduler.mode != "inline"
        self._apply_all(trainer, self._scheduler.poll())  # inline: the result is ready now
        self._record_stall(time.perf_counter() - t0)
        if self._t_last is not None:
            self._t_last = time.perf_counter()  # the refit is not training time

    def _job(self, trainer: pl.Trainer, history: RunHistory) -> RefitJob:
        tb = next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)
        # Figures and files only where TensorBoard shows them (rank 0), within budget on the training thread: the
        # forecast run first (the main view, cheap), the figure when the budget also pays for it.
        shown = tb is not None and trainer.is_global_zero
        budget = self._scheduler.wants_extras
        write_run = shown and self.forecast_runs and budget(self._train_seconds, ("run",))
        draw = shown and self.figure and budget(self._train_seconds, ("run", "figure") if write_run else ("figure",))
        fit_kwargs = dict(horizon=self.resolved_horizon, lr_schedule=self.lr_schedule, law=self.law,
                          target_loss=self.target_loss, reference=self.reference, confidence=self.confidence,
                          method=self.method, **self.forecast_kwargs)
        if self.warm_start and self.forecast is not None:
            fit_kwargs["init"] = self.forecast
        return RefitJob(history, at_step=trainer.global_step, fit_kwargs=fit_kwargs, draw=bool(draw),
                        log_dir=tb.log_dir if shown and self.forecast_runs else None, write_run=bool(write_run),
                        target_loss=self.target_loss)

    def _record_stall(self, seconds: float) -> None:
        self.stall_seconds = seconds
        self.max_stall_seconds = max(self.max_stall_seconds, seconds)

    def _poll(self, trainer: pl.Trainer) -> None:
        """Apply finished refits (training thread); a pipe check when none is in flight."""
        if self._scheduler is None or not self._scheduler.busy:
            return
        t0 = time.perf_counter()
        results = self._scheduler.poll()
        if results:
            self._apply_all(trainer, results)
            self._record_stall(time.perf_counter() - t0)

    def _apply_all(self, trainer: pl.Trainer, results: list[RefitResult]) -> None:
        for result in results:
            self._apply(trainer, result)

    def _apply(self, trainer: pl.Trainer, result: RefitResult) -> None:
        self.refit_seconds = result.total_seconds
        self.refit_log.append((result.at_step, result.total_seconds))
        if result.forecast is None:
            self.n_failures += 1
            err = result.error
            self.last_error = f"{type(err).__name__}: {err}"
            if isinstance(err, ValueError) and self.n_refits == 0:
                rank_zero_debug(f"ScalingForecast: no forecast yet at step {result.at_step} ({self.last_error}).")
            else:
                self._warn_failure(err, result.at_step)
            return
        if result.error is not None:  # the fit worked; drawing or writing files did not
            self._warn_failure(result.error, result.at_step)
        self.forecast = result.forecast
        self.n_refits += 1
        self._made_here.append(result.at_step)
        self.summary = self._summarise(result, trainer.global_step)
        self._pbar_pending = self.prog_bar
        if not trainer.is_global_zero:
            return
        metrics = {k: v for k, v in self.summary.items() if k.startswith("forecast/") and math.isfinite(v)}
        ok = predictable(self.summary)
        if not ok:  # numbers from a band wider than the loss would only mislead
            metrics = {k: v for k, v in metrics.items() if k in _TIME_KEYS}
        metrics["forecast/predictable"] = float(ok)
        step = result.at_step  # the step the snapshot was taken at, even when the result came back later
        for lg in trainer.loggers:
            try:
                lg.log_metrics(metrics, step=step)
                if result.image is not None and isinstance(lg, TensorBoardLogger):
                    lg.experiment.add_image("forecast/curve", result.image, global_step=step, dataformats="HWC")
            except Exception as err:
                self._warn_failure(err, step)

    def _warn_unmade(self, waited: float) -> None:
        """Say which refits the run never got (a newer one replaced them while the worker was busy, or the run ended
        first): a forecast that silently lags, or never comes, looks like a working one."""
        sch, made = self._scheduler, self._made_here  # both set in on_train_start
        skipped, pending = list(sch.skipped_steps), sch.pending_steps
        if made and sch.submitted_steps and sch.submitted_steps[-1] in pending:
            # the refit of the run's last step: the run is over, its own end says more than a forecast of it
            pending.remove(sch.submitted_steps[-1])
        if not (skipped or pending):
            return
        parts = []
        if skipped:
            parts.append(f"{len(skipped)} skipped while the previous refit was still running (steps "
                         f"{_steps_text(skipped)}: a refit takes longer than every_n_steps={self.every_n_steps} steps)")
        if pending:
            parts.append(f"{len(pending)} still unfinished when training ended (steps {_steps_text(pending)}; "
                         f"waited {waited:.2g} s, max_overhead={self.max_overhead:g} of the training time)")
        last = (f"the last forecast is from step {made[-1]}" if made
                else "no forecast was made during this run; for runs this short pass background=False (refits on "
                     "the training thread)")
        self._warning_cache.warn(f"ScalingForecast: {len(skipped) + len(pending)} of {len(sch.submitted_steps)} refits "
                                 f"were not made: {'; '.join(parts)}; {last}.", category=ForecastWarning)

    def _warn_failure(self, err: BaseException | None, step: int) -> None:
        key = type(err).__name__
        if key not in self._warning_cache:
            self._warning_cache.warn(
                f"ScalingForecast: refit at step {step} failed ({key}: {err}); keeping the last good forecast. "
                f"Further {key} failures are not reported.",
                category=ForecastWarning,
            )
            # WarningCache keys on the message; remember the kind so that other messages of it stay silent.
            self._warning_cache.add(key)

    def _summarise(self, result: RefitResult, current_step: int) -> dict[str, float]:
        fc = result.forecast
        assert fc is not None
        horizon = self.resolved_horizon
        if horizon is None and len(fc.steps):
            horizon = int(fc.steps[-1])
        dt = self.step_seconds
        nan = math.nan
        out = {
            "forecast/final_loss": float(fc.final_loss),
            "forecast/final_loss_lower": float(fc.final_lower),
            "forecast/final_loss_upper": float(fc.final_upper),
            "at_step": float(result.at_step),
            "observed_until": float(fc.observed_until),
            "forecast/refit_seconds": float(result.total_seconds),
        }
        remaining = nan
        if dt is not None and horizon is not None:
            remaining = max(horizon - current_step, 0) * dt
        out["forecast/remaining_seconds"] = remaining
        eta = remaining
        if self.target_loss is not None:
            steps_to = float(fc.steps_to(self.target_loss))
            out["forecast/steps_to_target"] = steps_to
            try:
                out["forecast/tokens_to_target"] = float(fc.tokens_to(self.target_loss))
            except Exception:  # tokens unknown
                out["forecast/tokens_to_target"] = nan
            eta = max(steps_to - current_step, 0.0) * dt if dt is not None else nan
        out["forecast/eta_seconds"] = eta
        if result.critical_batch is not None:
            out["forecast/critical_batch"] = result.critical_batch
        out["smoothed_loss"] = result.smoothed_loss if result.smoothed_loss is not None else nan
        return out

    def _log_prog_bar(self, pl_module: pl.LightningModule) -> None:
        self._pbar_pending = False
        summary = self.summary
        loss, eta = summary.get("forecast/final_loss"), summary.get("forecast/eta_seconds")
        if predictable(summary):
            self._said_unpredictable = False
            self._log_pbar_value(pl_module, PBAR_LOSS, loss)
        elif not self._said_unpredictable:
            self._said_unpredictable = True
            rank_zero_info(
                f"ScalingForecast: step {int(summary.get('at_step', 0))}: final loss not yet predictable (band "
                f"[{summary.get('forecast/final_loss_lower', math.nan):.3g}, "
                f"{summary.get('forecast/final_loss_upper', math.nan):.3g}] is wider than the loss); "
                f"`{PBAR_LOSS}` appears in the progress bar once the band narrows."
            )
        self._log_pbar_value(pl_module, PBAR_ETA, None if eta is None else eta / 60.0)
        self._log_pbar_value(pl_module, PBAR_AVG, summary.get("smoothed_loss"))

    def _log_pbar_value(self, pl_module: pl.LightningModule, key: str, value: float | None) -> None:
        # CPU tensors: the progress bar converts logged values with .item() on every batch; on a CPU tensor that
        # is no host-device synchronisation.
        if value is None or not math.isfinite(value):
            return
        try:
            pl_module.log(key, torch.tensor(float(value)), prog_bar=True, logger=False, on_step=True, on_epoch=False,
                          batch_size=1)
        except Exception as err:  # e.g. logging disabled in this context
            self._warning_cache.warn(f"ScalingForecast: could not update the progress bar ({err}).",
                                     category=ForecastWarning)

    def _shutdown(self) -> None:
        if self._scheduler is not None:
            self._scheduler.close()
            self._scheduler = None


def _steps_text(steps: list[int], most: int = 6) -> str:
    return ", ".join(map(str, steps[:most])) + (f", ... ({len(steps)} in all)" if len(steps) > most else "")


def _mode(background: bool | str) -> str:
    return _BACKGROUND_MODES[background]  # validated in __init__: True/False/"auto"/"thread" only


def predictable(summary: Mapping[str, float]) -> bool:
    """Whether a forecast summary is worth showing as a number: its band is narrower than the predicted loss.

    A band wider than the loss itself (early in a run: e.g. [0.09, 35.8] nats) says nothing about the final loss.

    Example::

        >>> band = lambda lo, hi: {"forecast/final_loss_lower": lo, "forecast/final_loss_upper": hi}
        >>> predictable({"forecast/final_loss": 3.0, **band(2.9, 3.2)})
        True
        >>> predictable({"forecast/final_loss": 3.0, **band(0.09, 35.8)})
        False
    """
    from lightning_scaling.report.figures import is_predictable

    return is_predictable(*(summary.get(f"forecast/final_loss{k}", math.nan) for k in ("", "_lower", "_upper")))
