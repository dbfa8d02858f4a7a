"""The recipe's runner (Su et al. 2024, step by step) for any LightningModule and DataModule.

1. **Batch sweep**: one model size at several batch sizes -> the critical batch ``B_crit(L)``
   (:func:`~lightning_scaling.fitting.fit_critical_batch_size`).
2. **Size ladder**: every size but the largest at one batch size -> ``L(N, S_min)`` and so ``L(N, S, B)``
   (:func:`~lightning_scaling.fitting.fit_scaling_law`).
3. **Prediction before training**: the largest model's whole trajectory, its steps to a target loss and its
   critical batch are predicted and written to ``prediction.json`` *before* that model is trained.
4. **Check**: the largest model is trained and compared with the prediction.

This is the one module of :mod:`lightning_scaling.study` that imports Lightning (inside the functions that
train): the config, the plan and its checks, the fit and comparison and the run lock are in ``config``, ``plan``,
``predict`` and ``lock``. Every run logs to TensorBoard under ``<out>/runs/<run name>`` with
:class:`LossTrajectory`, :class:`GradientNoiseScale` and :class:`ScalingForecast` attached. The recipe is
resumable at the run level: a run whose folder holds a complete ``scaling/history.json`` and a
``scaling/done.json`` with the same settings is loaded, not retrained. ``lightning-scaling demo`` is this recipe
with the built-in config of :func:`lightning_scaling.demo.demo_config`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


from lightning_scaling.history import RunHistory, final_loss, live_b_simple
from lightning_scaling.numerics import dumps, model_n_params
from lightning_scaling.study.config import DONE_FILENAME, PREDICTION_FILENAME, REPORT_FILENAME, RecipeConfig
from lightning_scaling.study.lock import RunLock
from lightning_scaling.study.plan import (
    RunSpec, _probe_size, _tokens_per_sample, _world_size, build_run, plan_runs, shard_runs, validate_config,
)
from lightning_scaling.study.predict import (
    _half_run_forecast, _references, _schedule_of, compare_prediction, fit_and_predict, predict_size,
)
from lightning_scaling.warnings import ForecastWarning, ScalingWarning


def _done_record(cfg: RecipeConfig, spec: RunSpec) -> dict[str, Any]:
    # What must match for a finished run to be reused, in its JSON form (as read back from done.json).
    return json.loads(json.dumps({"spec": spec.to_dict(), "model": cfg.model, "data": cfg.data,
                                  "max_steps": cfg.max_steps, "seed": cfg.seed}, default=str))


def _load_finished(run_dir: Path, cfg: RecipeConfig, spec: RunSpec) -> RunHistory | None:
    done, hist = run_dir / "scaling" / DONE_FILENAME, run_dir / "scaling" / "history.json"
    if not (done.exists() and hist.exists()):
        return None
    try:
        record = json.loads(done.read_text())
        history = RunHistory.from_json(hist)
    except (ValueError, OSError):
        return None
    same = _done_record(cfg, spec) == record.get("settings")
    if not same or len(history) == 0 or int(history.step[-1]) < cfg.max_steps - 1:
        return None
    return history


def _callbacks(cfg: RecipeConfig, model: Any, data: Any, spec: RunSpec,
               forecast_extra: Mapping[str, Any] | None = None) -> list[Any]:
    from lightning_scaling.callbacks.loss_trajectory import LossTrajectory

    tps = _tokens_per_sample(cfg, data)
    n = model_n_params(model)
    cbs: list[Any] = [LossTrajectory(tokens_per_sample=tps, n_params=n, name=spec.name,
                                     flush_every_n_steps=min(50, max(1, cfg.max_steps // 10)))]
    if cfg.gns is not None:
        from lightning_scaling.callbacks.gns import GradientNoiseScale

        cbs.append(GradientNoiseScale(**cfg.gns))
    if cfg.forecast is not None:
        from lightning_scaling.callbacks.forecast import ScalingForecast

        args = {**cfg.forecast, **(forecast_extra or {})}
        cbs.append(ScalingForecast(**args))
    return cbs


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM, e.g. a preempted cluster job) during a run: which run stopped at which step, and that it
    resumes from its checkpoint."""

    def __init__(self, run: str, step: int, checkpoint_step: int | None, sigterm: bool = False) -> None:
        self.run, self.step, self.checkpoint_step, self.sigterm = run, step, checkpoint_step, sigterm
        resume = ("rerun the same command to resume it from its checkpoint at step "
                  f"{checkpoint_step}" if checkpoint_step is not None else "it restarts from step 0 on rerun")
        by = " (SIGTERM)" if sigterm else ""
        super().__init__(f"run {run} interrupted{by} at step {step}; {resume} (finished runs are kept)")


class _RunProgress:
    """Where a run started (its resume step) and stopped, and a ``last.ckpt`` save on Ctrl-C.

    The save on Ctrl-C (single-process runs) makes the resumed run lose no step.
    """

    def __init__(self, path: Path, every: int) -> None:
        self.path, self.every = path, every
        self.start: int | None = None
        self.step: int | None = None
        self.saved_step: int | None = None
        self.sigterm = False

    def checkpoint_step(self) -> int | None:
        """The step the run will resume from after an interrupt."""
        if self.saved_step is not None:
            return self.saved_step
        periodic = (self.step or 0) // self.every * self.every  # ModelCheckpoint saves at multiples of `every`
        return max(periodic, self.start or 0) or None

    def callback(self) -> Any:
        from lightning.pytorch.callbacks import Callback

        outer = self

        class _Hook(Callback):
            def on_train_start(self, trainer: Any, pl_module: Any) -> None:
                outer.start = int(trainer.global_step)  # after the checkpoint was restored

            def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
                from lightning.pytorch.utilities.exceptions import SIGTERMException

                # Ctrl-C, or SIGTERM: Lightning stops after the step (SIGTERMException), unless the signal also
                # reached the DataLoader workers (SLURM signals the whole job), whose death ends the step first
                sigterm = isinstance(exception, SIGTERMException) or bool(getattr(trainer, "received_sigterm", False))
                if not (isinstance(exception, KeyboardInterrupt) or sigterm):
                    return
                outer.step, outer.sigterm = int(trainer.global_step), sigterm
                if trainer.world_size == 1:  # under DDP a save is a collective the other ranks may never join
                    try:
                        trainer.save_checkpoint(outer.path)
                        outer.saved_step = outer.step
                    except Exception:
                        pass  # the periodic checkpoint stays the resume point
        return _Hook()


def _checkpoint_every(cfg: RecipeConfig) -> int:
    # A tenth of the run by default: a preempted run loses at most 10% of its steps, and the save costs little.
    return cfg.checkpoint_every if cfg.checkpoint_every is not None else max(1, cfg.max_steps // 10)


def _resume_point(run_dir: Path, cfg: RecipeConfig, spec: RunSpec) -> Path | None:
    """``last.ckpt`` of a partial run with the same settings, or ``None`` (the folder is then cleared)."""
    ckpt, settings = run_dir / "checkpoints" / "last.ckpt", run_dir / "checkpoints" / "settings.json"
    try:
        same = json.loads(settings.read_text()) == _done_record(cfg, spec)
    except (OSError, ValueError):
        return None
    return ckpt if same and ckpt.is_file() else None


def train_run(cfg: RecipeConfig, spec: RunSpec, out_dir: Path, *, progress: bool = True,
              forecast_extra: Mapping[str, Any] | None = None) -> RunHistory:
    """Train one run (or load it if already finished with the same settings) and return its history.

    The run saves ``<run>/checkpoints/last.ckpt`` every ``checkpoint_every`` steps (and on Ctrl-C); a partial run
    with the same settings resumes from it, its :class:`LossTrajectory` history restored from the checkpoint.
    ``forecast_extra`` adds ``ScalingForecast`` arguments (the recipe gives the held-out run the fitted law as a
    prior and the target loss).

    Raises:
        RunInterrupted: Ctrl-C or SIGTERM stopped the run (a ``KeyboardInterrupt``; its message says where it
            resumes; a checkpoint of the step it stopped at is saved on one process).

    Example::

        >>> from lightning_scaling.demo import demo_config
        >>> cfg = demo_config(quick=True)
        >>> history = train_run(cfg, plan_runs(cfg)[0], Path("demo_out"))  # doctest: +SKIP
    """
    import lightning.pytorch as pl

    run_dir = out_dir / "runs" / spec.name
    finished = _load_finished(run_dir, cfg, spec)
    if finished is not None:
        return finished
    resume = _resume_point(run_dir, cfg, spec)
    if resume is None and run_dir.exists() and _is_rank_zero():
        shutil.rmtree(run_dir)  # an outdated or checkpoint-less partial run starts over: one history per folder
    if _is_rank_zero():
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        (run_dir / "checkpoints" / "settings.json").write_text(json.dumps(_done_record(cfg, spec)))
    pl.seed_everything(cfg.seed, verbose=False)
    model, data = build_run(cfg, spec)
    callbacks = _callbacks(cfg, model, data, spec, forecast_extra)
    run = _RunProgress(run_dir / "checkpoints" / "last.ckpt", _checkpoint_every(cfg))
    trainer = pl.Trainer(**_trainer_args(cfg, spec, out_dir, progress, [*callbacks, run.callback()]))
    started, start = time.time(), time.perf_counter()
    try:
        trainer.fit(model, datamodule=data, ckpt_path=str(resume) if resume is not None else None)
    except BaseException:  # Ctrl-C: sys.exit(1) after Lightning's shutdown; SIGTERM: SIGTERMException, or whatever
        if run.step is None:  # the killed loader workers raised (even during teardown, replacing the first)
            raise
        signal.signal(signal.SIGINT, signal.default_int_handler)  # Lightning ignores further Ctrl-C from here on
        raise RunInterrupted(spec.name, run.step, run.checkpoint_step(), run.sigterm) from None
    wall = time.perf_counter() - start
    resumed_from = run.start if resume is not None else None
    history = callbacks[0].history
    if history.batch_size is not None and abs(history.batch_size - spec.batch_size) > 1e-9:
        raise ValueError(f"run {spec.name}: measured batch size {history.batch_size} != planned {spec.batch_size}; "
                         f"check batch_size_arg={cfg.batch_size_arg!r}")
    history.meta.update(size=spec.size, role=spec.role, wall_s=wall, started_at=started, finished_at=time.time(),
                        resumed_from_step=resumed_from)
    if trainer.is_global_zero:
        history.to_json(run_dir / "scaling" / "history.json")
        record = {"settings": _done_record(cfg, spec), "wall_s": wall, "resumed_from_step": resumed_from}
        (run_dir / "scaling" / DONE_FILENAME).write_text(json.dumps(record, indent=1))
    return history


def _trainer_args(cfg: RecipeConfig, spec: RunSpec, out_dir: Path, progress: bool,
                  callbacks: Sequence[Any]) -> dict[str, Any]:
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import TensorBoardLogger

    # save_top_k=0 + save_last: one rolling last.ckpt per run, nothing ranked by a metric.
    ckpt = ModelCheckpoint(dirpath=out_dir / "runs" / spec.name / "checkpoints", save_top_k=0, save_last=True,
                           every_n_train_steps=_checkpoint_every(cfg), save_on_train_epoch_end=False)
    args: dict[str, Any] = {
        "max_steps": cfg.max_steps,
        "logger": TensorBoardLogger(save_dir=str(out_dir / "runs"), name=spec.name, version="",
                                    default_hp_metric=False),
        "enable_checkpointing": True,
        "enable_model_summary": False,
        "enable_progress_bar": progress,
        "num_sanity_val_steps": 0,
        "log_every_n_steps": max(1, min(50, cfg.max_steps // 20)),
    }
    if cfg.val_every is not None:
        args.update(val_check_interval=cfg.val_every, check_val_every_n_epoch=None)
    args.update(cfg.trainer)
    args["callbacks"] = [*callbacks, ckpt, *args.get("callbacks", [])]
    if args["enable_progress_bar"]:
        from lightning_scaling.callbacks.progress import progress_bar

        args["callbacks"].append(progress_bar())  # step-bounded runs: no "Epoch 0/-2"
    return args


@dataclass
class RecipeResult:
    """What :func:`run_recipe` returns (and writes to ``report.json``).

    Attributes:
        out_dir: the output folder.
        report: the JSON-able report.
        histories: run name -> history.
        table: the printed comparison table.
        figures: paths of the PNG plots.
    """

    out_dir: Path
    report: dict[str, Any]
    histories: dict[str, RunHistory]
    table: str
    figures: list[str] = field(default_factory=list)


def _locking(cfg: RecipeConfig) -> bool:
    # Under DDP every rank runs the recipe and must train the same runs in the same order; a rank skipping a run
    # another process locked would hang the collectives, so multi-device recipes rely on --shard instead.
    return _world_size(cfg.trainer) == 1 and int(os.environ.get("WORLD_SIZE", "1") or 1) == 1


def try_train_run(cfg: RecipeConfig, spec: RunSpec, out_dir: Path, *, progress: bool = False,
                  forecast_extra: Mapping[str, Any] | None = None) -> RunHistory | None:
    """Train (or load) one run under its :class:`RunLock`; ``None`` when another process holds the lock.

    Without locks (a multi-device trainer, see :func:`_locking`) this is :func:`train_run`.

    Example::

        >>> from lightning_scaling.demo import demo_config
        >>> cfg = demo_config(quick=True)
        >>> history = try_train_run(cfg, plan_runs(cfg)[0], Path("demo_out"))  # doctest: +SKIP
    """
    finished = _load_finished(out_dir / "runs" / spec.name, cfg, spec)
    if finished is not None:
        return finished
    if not _locking(cfg):
        return train_run(cfg, spec, out_dir, progress=progress, forecast_extra=forecast_extra)
    (out_dir / "runs").mkdir(parents=True, exist_ok=True)
    lock = RunLock(out_dir / "runs" / f"{spec.name}.lock")
    if not lock.acquire():
        return None
    try:  # train_run re-reads done.json: the previous holder may have finished it since the check above
        return train_run(cfg, spec, out_dir, progress=progress, forecast_extra=forecast_extra)
    finally:
        lock.release()


class _Runner:
    """Trains runs of the plan with a backend, skipping or waiting for the runs other processes hold."""

    def __init__(self, cfg: RecipeConfig, out: Path, say: Callable[[str], None], progress: bool,
                 backend: str = "local", poll_s: float = 5.0) -> None:
        if backend not in ("local", "ray"):
            raise ValueError(f"backend must be 'local' or 'ray', got {backend!r}")
        if backend == "ray":
            try:  # fail before the first run, not after the local stages
                import ray  # noqa: F401
            except ImportError:
                raise ValueError("--backend ray needs Ray: pip install 'lightning-scaling[ray]'") from None
        self.cfg, self.out, self.say, self.progress, self.backend = cfg, out, say, progress, backend
        self.poll_s = poll_s
        self.histories: dict[str, RunHistory] = {}
        self.trained: list[str] = []
        self.n_total = len(plan_runs(cfg))
        self.t0, self.started = time.perf_counter(), time.time()

    def train(self, specs: Sequence[RunSpec], *, wait: bool, extra: Mapping[str, Mapping[str, Any]] | None = None,
              take_over: bool = True) -> None:
        """Train or load ``specs``; runs locked by another process are skipped, or with ``wait`` waited for.

        ``extra`` maps a run's name to its extra ``ScalingForecast`` arguments (the held-out runs' law and
        references). ``take_over=False`` (other shards' runs when locks are off under DDP) only waits for them.
        """
        pending = [s for s in specs if s.name not in self.histories]
        if not take_over and not _locking(self.cfg):
            self._wait_finished(pending)
            pending = []
        while pending:
            self._train_once(pending, extra)
            pending = [s for s in pending if s.name not in self.histories]
            if not pending:
                return
            holders = {s.name: RunLock(self.out / "runs" / f"{s.name}.lock").holder() or {} for s in pending}
            self.say(f"{', '.join(holders)}: locked by another process ("
                     + ", ".join(f"pid {h.get('pid')} on {h.get('host')}" for h in holders.values())
                     + (f"); waiting for it (polling every {self.poll_s:g} s)" if wait else "); left to it"))
            if not wait:
                return
            self._wait(pending)

    def _train_once(self, specs: Sequence[RunSpec], extra: Mapping[str, Mapping[str, Any]] | None) -> None:
        extra = extra or {}
        if self.backend == "ray":
            from lightning_scaling.study.ray_backend import train_runs_ray

            for spec in specs:
                self._announce(spec, " (submitted to Ray)")
            done = train_runs_ray(self.cfg, specs, self.out, forecast_extra=extra)  # all at once
            for spec in specs:
                history = _load_finished(self.out / "runs" / spec.name, self.cfg, spec) if done[spec.name] else None
                self._record(spec, history, trained=True)
            return
        for spec in specs:
            reused = _load_finished(self.out / "runs" / spec.name, self.cfg, spec) is not None
            self._announce(spec, " (finished earlier: loaded)" if reused else "")
            history = try_train_run(self.cfg, spec, self.out, progress=self.progress and not reused,
                                    forecast_extra=extra.get(spec.name))
            self._record(spec, history, trained=not reused)

    def _announce(self, spec: RunSpec, note: str) -> None:
        k = next(i for i, s in enumerate(plan_runs(self.cfg), 1) if s.name == spec.name)
        self.say(f"[{k}/{self.n_total}] {spec.name}: {spec.role}, batch {spec.batch_size}, {self.cfg.max_steps} "
                 f"steps{note}  [{time.perf_counter() - self.t0:.0f} s elapsed]")
        sys.stdout.flush()

    def _record(self, spec: RunSpec, history: RunHistory | None, *, trained: bool) -> None:
        if history is not None:
            self.histories[spec.name] = history
            if trained and (history.meta.get("started_at") or 0.0) >= self.started:  # not another process's
                self.trained.append(spec.name)

    def _wait_finished(self, specs: Sequence[RunSpec]) -> None:
        for spec in specs:
            if _load_finished(self.out / "runs" / spec.name, self.cfg, spec) is None:
                self.say(f"{spec.name}: another shard's run; waiting for it to finish (polling every "
                         f"{self.poll_s:g} s)")
            while (history := _load_finished(self.out / "runs" / spec.name, self.cfg, spec)) is None:
                time.sleep(self.poll_s)
            self._announce(spec, " (finished by another shard: loaded)")
            self._record(spec, history, trained=False)

    def _wait(self, pending: Sequence[RunSpec]) -> None:
        # Until one of them is finished or its lock is gone (holder done, or died: then we take it over).
        while True:
            for spec in pending:
                lock = RunLock(self.out / "runs" / f"{spec.name}.lock")
                info = lock.holder()
                if _load_finished(self.out / "runs" / spec.name, self.cfg, spec) is not None or info is None \
                        or (info and lock.is_stale(info)):
                    return
            time.sleep(self.poll_s)


def trainer_arguments() -> frozenset[str]:
    """The argument names of ``lightning.pytorch.Trainer`` (for :func:`check_config`, which imports no Lightning)."""
    import inspect

    from lightning.pytorch import Trainer

    return frozenset(inspect.signature(Trainer.__init__).parameters) - {"self"}


class _Quiet:
    """Silence Lightning's per-run banners (GPU/TPU availability, tips) but keep the progress bars."""

    def __enter__(self) -> _Quiet:
        self._loggers = [logging.getLogger(n) for n in ("lightning.pytorch", "lightning.fabric", "lightning")]
        self._levels = [lg.level for lg in self._loggers]
        for lg in self._loggers:
            lg.setLevel(logging.WARNING)
        self._warn = warnings.catch_warnings()
        self._warn.__enter__()
        from lightning.fabric.utilities.warnings import PossibleUserWarning

        # By class: Lightning's advice (dataloader workers, logging interval) and the per-refit forecast refusals
        # (the report compares the prediction with the run; a refused live refit keeps the last good one).
        warnings.simplefilter("ignore", PossibleUserWarning)
        warnings.simplefilter("ignore", ForecastWarning)
        # torch's deprecation of the LeafSpec/TreeSpec names Lightning still uses.
        warnings.filterwarnings("ignore", message=".*(LeafSpec|TreeSpec).*", category=FutureWarning)
        # Two of this package's own: the noise-scale callback's notes on small models and the B_simple proxy note
        # (the recipe reports B_crit from its sweep); other ScalingWarnings (FitWarning, DataWarning) stay visible.
        for pattern in (".*GradientNoiseScale.*", ".*critical batch from the gradient noise.*"):
            warnings.filterwarnings("ignore", message=pattern, category=ScalingWarning)
        # ...but not that it measures nothing on this model (the report's B_simple column would be empty unexplained)
        warnings.filterwarnings("default", category=ScalingWarning, message=".*GradientNoiseScale.*(noise scale is "
                                "measured|Disabled|cannot get the batch size|saw no gradients)")
        if not _is_rank_zero():  # under DDP every rank fits the same runs: rank 0's warnings are enough
            warnings.simplefilter("ignore")
        return self

    def __exit__(self, *exc: Any) -> None:
        self._warn.__exit__(*exc)
        for lg, level in zip(self._loggers, self._levels):
            lg.setLevel(level)


def run_recipe(cfg: RecipeConfig, out_dir: str | os.PathLike[str], *, progress: bool = True, plots: bool = True,
               echo: Callable[[str], None] | None = print, backend: str = "local",
               shard: tuple[int, int] | None = None) -> RecipeResult:
    """Run the whole recipe: train the sweep and the ladder, fit, predict the held-out size, train it, compare.

    Several processes may share ``out_dir`` (each run is trained once, under its :class:`RunLock`): a process
    skips the runs another one holds and waits for them before the fit. With ``shard=(I, N)`` a process trains
    only its share of the runs (:func:`shard_runs`); the shard that owns the last run (the held-out one) also
    takes over unstarted runs of the others, waits for the running ones, fits, predicts and writes the report.

    Args:
        cfg: the :class:`RecipeConfig`.
        out_dir: output folder (created; finished runs in it are reused, partial ones resumed).
        progress: show Lightning's progress bar per run and an overall counter line.
        plots: write the PNG figures.
        echo: where status lines go (``None``: silent); only rank 0 prints under DDP.
        backend: ``"local"`` (runs one after another in this process) or ``"ray"`` (each run a Ray task with
            ``cfg.resources``; see :mod:`lightning_scaling.study.ray_backend`).
        shard: ``(I, N)``: train only shard ``I`` of ``N``.

    Returns:
        A :class:`RecipeResult` (for a shard without the held-out run: its runs and a one-paragraph table).

    Raises:
        ValueError: a check of :func:`check_config` fails (before any training) or a fit fails.
        RunInterrupted: Ctrl-C stopped a run.

    Example::

        >>> result = run_recipe(demo_config(quick=True), "demo_out", progress=False)  # doctest: +SKIP
        >>> print(result.table)  # doctest: +SKIP
    """
    say = echo if echo is not None and _is_rank_zero() else (lambda s: None)
    # a config that would make the result meaningless fails before any training
    validate_config(cfg, say, trainer_arguments=trainer_arguments())
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if _is_rank_zero():
        (out / "config.json").write_text(dumps(cfg.to_dict(), indent=1))
    specs = plan_runs(cfg)
    runner = _Runner(cfg, out, say, progress, backend)
    report: dict[str, Any] = {"name": cfg.name, "config": cfg.to_dict(), "runs": {}, "timings": {}}
    import torch

    threads = torch.get_num_threads()
    if cfg.torch_threads is not None:
        torch.set_num_threads(cfg.torch_threads)
    try:
        with _Quiet():
            final = _run_all(cfg, specs, out, report, say, runner, shard)
    finally:
        torch.set_num_threads(threads)
    if not final:
        return _shard_result(cfg, specs, out, report, runner, shard)
    return _finish_report(out, report, runner, plots)


def _finish_report(out: Path, report: dict[str, Any], runner: _Runner, plots: bool) -> RecipeResult:
    from lightning_scaling.report import format_table, write_figures

    fitted = report.pop("_fitted")
    table = format_table(report)
    figures = []
    if plots and _is_rank_zero():
        t_plot = time.perf_counter()
        with _Quiet():
            figures = write_figures(report, runner.histories, fitted.get("_law"), fitted.get("_critical"), out)
        report["timings"]["plots_s"] = time.perf_counter() - t_plot
    report["timings"]["total_s"] = time.perf_counter() - runner.t0
    report["figures"] = figures
    report["trained_here"] = runner.trained
    if _is_rank_zero():
        _write_atomic(out / REPORT_FILENAME, dumps(report, indent=1))
    return RecipeResult(out_dir=out, report=report, histories=runner.histories, table=table, figures=figures)


def _shard_result(cfg: RecipeConfig, specs: Sequence[RunSpec], out: Path, report: dict[str, Any], runner: _Runner,
                  shard: tuple[int, int] | None) -> RecipeResult:
    index, count = shard or (0, 1)
    mine = [s.name for s in shard_runs(specs, shard)]
    report.update(shard=f"{index}/{count}", shard_runs=mine, trained_here=runner.trained)
    for spec in specs:
        if spec.name in runner.histories:
            report["runs"][spec.name] = _run_row(spec, runner.histories[spec.name], out)
    table = (f"shard {index}/{count}: runs {', '.join(mine)}; trained here: {', '.join(runner.trained) or 'none'}.\n"
             f"The fit, the prediction and the report come from the shard with the held-out run {specs[-1].name} "
             f"(shard {(len(specs) - 1) % count}/{count}), or from rerunning without --shard once all runs are "
             "finished.")
    return RecipeResult(out_dir=out, report=report, histories=runner.histories, table=table)


def _run_row(spec: RunSpec, h: RunHistory, out: Path) -> dict[str, Any]:
    return {
        "size": spec.size, "role": spec.role, "schedule": spec.schedule, "n_params": h.n_params,
        "batch_size": h.batch_size,
        "tokens_per_sample": h.tokens_per_sample, "steps": int(h.step[-1]) + 1 if len(h) else 0,
        "final_loss": final_loss(h)[0] if len(h) else None, "live_b_simple": live_b_simple(h),
        "wall_s": h.meta.get("wall_s"), "path": str(out / "runs" / spec.name),
    }


def _run_all(cfg: RecipeConfig, specs: Sequence[RunSpec], out: Path, report: dict[str, Any],
             say: Callable[[str], None], runner: _Runner, shard: tuple[int, int] | None) -> bool:
    """Train, fit, predict, train the held-out run, compare; ``False`` for a shard that stops after its runs."""
    mine = shard_runs(specs, shard)
    fit_specs = [s for s in specs if s.role != "holdout"]
    runner.train([s for s in fit_specs if s in mine], wait=False)
    if specs[-1] not in mine:
        return False
    # Other shards' or processes' runs: loaded, taken over when unstarted, or waited for.
    runner.train(fit_specs, wait=True, take_over=shard is None)
    histories = runner.histories
    fitted = _fit_before_holdout(cfg, specs, histories, out, say)
    report.update({k: v for k, v in fitted.items() if not k.startswith("_")})
    report["timings"]["fit_s"] = fitted.pop("_fit_s")
    holdouts = [s for s in specs if s.role == "holdout"]  # the model's own schedule first, then cfg.schedules
    refs = {s.name: _references(fit_specs, histories, s) for s in holdouts}  # the finished ladder of its schedule
    extra: dict[str, dict[str, Any]] = {}
    for spec in holdouts:  # each trains with the law and its references
        target = (_prediction_for(fitted, spec) or {}).get("target_loss")
        extra[spec.name] = {"law": fitted.get("_law"), "reference": refs[spec.name],
                            **({"target_loss": target} if target is not None else {})}
    runner.train(holdouts, wait=True, extra=extra)  # together: Ray or other processes may train them at once
    for spec in specs:
        report["runs"][spec.name] = _run_row(spec, histories[spec.name], out)
    for spec in holdouts:
        pred = _prediction_for(fitted, spec)
        if pred is None:
            continue
        own = spec.schedule is None  # the B_crit comparison is the ladder's (the sweep's schedule)
        comp = compare_prediction(pred, histories[spec.name], critical=fitted.get("_critical") if own else None,
                                  law=fitted.get("_law") if own else None)
        comp["live_forecast"] = _half_run_forecast(histories[spec.name], cfg.max_steps, law=fitted.get("_law"),
                                                   reference=refs[spec.name])
        if own:
            report["comparison"] = comp
        else:
            report.setdefault("schedule_comparisons", {})[spec.schedule] = comp
    report["timings"]["train_s"] = sum((r.get("wall_s") or 0.0) for r in report["runs"].values())
    report["_fitted"] = fitted
    return True


def _prediction_for(fitted: Mapping[str, Any], spec: RunSpec) -> dict[str, Any] | None:
    """The prediction made before training for a held-out run (its schedule's, for one of ``cfg.schedules``)."""
    if spec.schedule is None:
        return fitted.get("prediction")
    return (fitted.get("schedule_predictions") or {}).get(spec.schedule)


def _write_atomic(path: Path, text: str) -> None:
    # Two processes finishing one study may both write the report: a reader never sees half a file.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _is_rank_zero() -> bool:
    # Under a multi-device launcher every rank runs the recipe (same runs, same order); only rank 0 writes files.
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) or 0) == 0


def _fit_before_holdout(cfg: RecipeConfig, specs: Sequence[RunSpec], histories: Mapping[str, RunHistory],
                        out: Path, say: Callable[[str], None]) -> dict[str, Any]:
    """Fit on every finished non-holdout run and write ``prediction.json`` before the held-out run trains."""
    t = time.perf_counter()
    fit_specs = [s for s in specs if s.role != "holdout"]
    fit_runs = [histories[s.name] for s in fit_specs]  # every schedule: the law fits any mix
    sweep = [histories[s.name] for s in fit_specs if s.size_index == cfg.sweep_size and s.schedule is None]
    holdouts = [s for s in specs if s.role == "holdout"]
    holdout = next((s for s in holdouts if s.schedule is None), None)
    target = cfg.target_loss
    if target is None and holdout is not None:
        # The largest fitted model's final loss: the held-out model should get there sooner.
        largest = max((s for s in fit_specs if s.role == "ladder" and s.schedule is None), key=lambda s: s.size_index)
        target = round(final_loss(histories[largest.name])[0], 3)
    predict_n = None
    if holdout is not None:
        predict_n = _probe_size(cfg, holdout)
    say("fitting B_crit(L) on the batch sweep and L(N, S, B) on the ladder"
        + (f" ({len(cfg.schedules) + 1} LR schedules)" if cfg.schedules else "")
        + (f"; predicting {holdout.name} (N={predict_n:,.0f}) before training it" if holdout else ""))
    own_schedule = _schedule_of(fit_specs, histories, None) if cfg.schedules else None
    fitted = fit_and_predict(fit_runs, sweep_runs=sweep, predict_n=predict_n,
                             batch_size=holdout.batch_size if holdout else None, steps=cfg.max_steps - 1,
                             target_loss=target, fit_kwargs=cfg.fit, lr_schedule=own_schedule)
    if predict_n is not None and cfg.schedules:
        # Each other schedule's shape is read off its smaller runs (same max_steps, so the same schedule).
        fitted["schedule_predictions"] = {
            s.schedule: predict_size(fitted["_law"], predict_n, s.batch_size, cfg.max_steps - 1,
                                     lr_schedule=_schedule_of(fit_specs, histories, s.schedule))
            for s in holdouts if s.schedule is not None}
    fitted["_fit_s"] = time.perf_counter() - t
    if "prediction" in fitted and holdout is not None and _is_rank_zero():
        # compared with the actual runs below: the predictions on file, each made before its run trained
        record = _write_predictions(cfg, holdouts, fitted, out, say)
        fitted.update({k: record[k] for k in ("prediction", "schedule_predictions") if k in record})
    return fitted


def _write_predictions(cfg: RecipeConfig, holdouts: Sequence[RunSpec], fitted: Mapping[str, Any],
                       out: Path, say: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Write ``prediction.json``: each held-out run's prediction, made before that run trained.

    An entry whose run is finished, partly trained (a checkpoint it will resume from), or being trained by another
    process (which wrote the file before it started), is kept as the file has it: a resumed study, or one given
    another schedule or target later, never rewrites a prediction after its run began to train. A run that restarts
    from step 0 gets a new one. Nothing new: the file is left alone. Returns the record on file.
    """
    path = out / PREDICTION_FILENAME
    try:
        old = json.loads(path.read_text()) if path.exists() else {}
    except (ValueError, OSError):
        old = {}

    def settled(spec: RunSpec) -> bool:
        run_dir = out / "runs" / spec.name
        return (_load_finished(run_dir, cfg, spec) is not None or _resume_point(run_dir, cfg, spec) is not None
                or (_locking(cfg) and RunLock(out / "runs" / f"{spec.name}.lock").held_elsewhere()))

    own = next(s for s in holdouts if s.schedule is None)
    new = {k: v for k, v in fitted.items() if not k.startswith("_") and k != "schedule_predictions"}
    began = settled(own)
    keep_own = "prediction" in old and began
    if keep_own:
        record = {k: v for k, v in old.items() if k != "schedule_predictions"}
        was, now = (d.get("prediction", {}).get("target_loss") for d in (old, new))
        say(f"{PREDICTION_FILENAME} kept: made before {own.name} began training"
            + (f" (target loss {was}; the config's is now {now})" if was != now else ""))
    else:  # a file gone or unreadable while the run began: the new prediction is not one made before it
        record = {"written_after_training_began" if began else "written_before_training": own.name,
                  "time": time.time(), **new}
        if began:
            say(f"{PREDICTION_FILENAME} was missing or unreadable and {own.name} has begun training: the new "
                "prediction is marked as made after it began")
    changed = not keep_own
    kept, made = old.get("schedule_predictions") or {}, fitted.get("schedule_predictions") or {}
    others = {}
    for spec in (s for s in holdouts if s.schedule is not None):
        if spec.schedule in kept and settled(spec):
            others[spec.schedule] = kept[spec.schedule]
        else:
            others[spec.schedule], changed = made[spec.schedule], True
    if others:
        record["schedule_predictions"] = others
    if changed:
        _write_atomic(path, dumps(record, indent=1))
    return record
