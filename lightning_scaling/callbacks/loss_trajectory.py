"""LossTrajectory: record loss versus steps and tokens, the LR schedule (past and planned) and N for every run."""

from __future__ import annotations

import copy
import math
import threading
import warnings
import weakref
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.rank_zero import WarningCache, rank_zero_info, rank_zero_warn
from typing_extensions import override

from lightning_scaling.callbacks.utils import run_horizon
from lightning_scaling.history import HISTORY_FILENAME, RunHistory
from lightning_scaling.numerics import count_non_embedding_params, infer_batch_size
from lightning_scaling.recorder import LossRecorder
from lightning_scaling.report.tensorboard import scalars_summary
from lightning_scaling.warnings import DataWarning, ScalingWarning

__all__ = ["LossTrajectory", "count_non_embedding_params", "default_batch_size"]

# Schedules longer than this are not simulated at train start (it costs ~10 µs per step in Python).
_MAX_SIMULATED_STEPS = 2_000_000


#: The default ``batch_size_fn`` (one definition, :func:`lightning_scaling.numerics.infer_batch_size`).
default_batch_size = infer_batch_size


class LossTrajectory(Callback):
    r"""Record a run's loss against optimizer steps and tokens, its learning rate and planned schedule.

    Per optimizer step it records the step, the cumulative samples and tokens consumed before it (summed over
    gradient-accumulation micro-batches and DDP ranks), the training loss undone from Lightning's division by
    ``accumulate_grad_batches`` and averaged over micro-batches and ranks, and the LR of every parameter group.
    At train start it simulates the LR scheduler on a dummy optimizer up to ``max_steps`` and stores the
    **planned** per-step LR, which schedule-aware forecasts need.

    Losses stay on the device and are copied to the host in chunks of ``flush_every_n_steps`` steps, with one
    all-reduce per chunk under DDP: there is no per-step host-device synchronisation. At each flush it logs
    ``scaling/loss``, ``scaling/lr``, ``scaling/tokens`` and ``scaling/samples`` at their exact steps to every
    logger and, with a :class:`~lightning.pytorch.loggers.TensorBoardLogger`, the loss against tokens to the
    run ``<log_dir>/by_tokens`` (same tag, tokens as the step axis). The history is written to
    ``<log_dir>/scaling/history.json`` at every checkpoint (from a snapshot, by a writer thread: the training
    thread pays ~0.1 s at 1M steps) and at the end of training or on an exception (on the training thread). It
    is part of the callback's checkpointed state (compact CPU tensors), under a state key made of the
    constructor's ``name`` only, so a resumed run (whose logger gets a new version) continues one history under
    its first name: the steps between the checkpoint and a kill are recomputed, never doubled.

    Args:
        tokens_per_sample: Tokens per sample (the context length for packed LM batches). Tokens are then
            samples × this.
        batch_size_fn: ``batch -> int`` samples in a micro-batch. Default: the leading dimension of the first
            tensor in the batch. Under LightningCLI give a dotted import path.
        tokens_fn: ``batch -> int`` tokens in a micro-batch (e.g. non-padding tokens); overrides
            ``tokens_per_sample`` for counting.
        n_params: Non-embedding parameter count N. Default: trainable parameters outside ``nn.Embedding``.
        flush_every_n_steps: Optimizer steps between host copies, logging and all-reduces.
        name: Run name stored in the history (default: the logger's name/version or ``"run"``).
        save_dir: Folder for ``history.json`` (default: ``<trainer.log_dir>/scaling``; without a logger
            ``<default_root_dir>/scaling``, or its ``version_<k>`` subfolder beside an earlier run's history).
        log_by_tokens: Write the loss-versus-tokens TensorBoard run.
        val_loss_key: Metric name (in ``trainer.callback_metrics``) of the validation loss to record.

    Raises:
        ValueError: a size argument is not positive, or a callable argument is not callable.

    Example::

        >>> import lightning.pytorch as pl
        >>> from lightning_scaling.callbacks import LossTrajectory
        >>> traj = LossTrajectory(tokens_per_sample=128)
        >>> trainer = pl.Trainer(max_steps=100, callbacks=[traj])  # doctest: +SKIP
        >>> trainer.fit(model)  # doctest: +SKIP
        >>> traj.history.loss[-1]  # doctest: +SKIP
    """

    def __init__(
        self,
        tokens_per_sample: int | None = None,
        batch_size_fn: Callable[[Any], int] | None = None,
        tokens_fn: Callable[[Any], int] | None = None,
        n_params: int | None = None,
        flush_every_n_steps: int = 50,
        name: str | None = None,
        save_dir: str | None = None,
        log_by_tokens: bool = True,
        val_loss_key: str = "val_loss",
    ) -> None:
        super().__init__()
        for arg, value in (("tokens_per_sample", tokens_per_sample), ("n_params", n_params)):
            if value is not None and not (isinstance(value, (int, float)) and value > 0):
                raise ValueError(f"`{arg}` must be a positive number or None, got {value!r}")
        if not isinstance(flush_every_n_steps, int) or flush_every_n_steps < 1:
            raise ValueError(f"`flush_every_n_steps` must be a positive int, got {flush_every_n_steps!r}")
        for arg, fn in (("batch_size_fn", batch_size_fn), ("tokens_fn", tokens_fn)):
            if fn is not None and not callable(fn):
                raise ValueError(f"`{arg}` must be callable, got {fn!r}")
        self.tokens_per_sample = float(tokens_per_sample) if tokens_per_sample is not None else None
        self.batch_size_fn = batch_size_fn or default_batch_size
        self.tokens_fn = tokens_fn
        self.n_params = n_params
        self.flush_every_n_steps = flush_every_n_steps
        self.name = name
        self._name_arg = name  # the state key's part: the resolved name may come from a logger version
        self.save_dir = save_dir
        self.log_by_tokens = log_by_tokens
        self.val_loss_key = val_loss_key
        self._warning_cache = WarningCache()
        self._tokens_checked = False  # tokens_per_sample checked against a batch's shape (once)
        self._by_tokens_writer: Any = None
        self._writer_thread: threading.Thread | None = None
        self._writer_error: BaseException | None = None
        self._reset_state()

    def _reset_state(self) -> None:
        # The records (device-side until flushed) live in the Lightning-free recorder; the callback only adds the
        # planned schedule and what it logged.
        self._rec = LossRecorder(counts_tokens=self._counts_tokens)
        self._planned_lr: list[float] | None = None
        self._n_logged = 0

    @property
    def state_key(self) -> str:
        # Constructor arguments only: a resumed run gets a new logger version, and its state must still match.
        return self._generate_state_key(name=self._name_arg)

    # ----------------------------------------------------------------- public API
    @property
    def batch_size(self) -> float | None:
        """Samples per optimizer step, global over ranks and accumulation (``None`` until measured)."""
        return self._rec.batch_size

    @property
    def history(self) -> RunHistory:
        """The run so far as a :class:`~lightning_scaling.history.RunHistory`.

        Records not yet flushed are copied to the host (a synchronisation; read it at log or refit intervals,
        not every step). Under DDP it holds the records up to the last collective flush (every
        ``flush_every_n_steps`` steps), identical on every rank.
        """
        trainer = self._trainer()
        if trainer is None or trainer.world_size == 1:
            self._flush(trainer=None)  # no collective: other ranks may not be reading the history now
        return self._rec.history(name=self.name or "run", n_params=self.n_params,
                                 tokens_per_sample=self.tokens_per_sample, planned_lr=self._planned_lr)

    def record_gns(self, step: int, b_simple: float, grad_sq_norm: float, trace_sigma: float) -> None:
        """Append a gradient-noise-scale reading (called by :class:`GradientNoiseScale` at its log interval)."""
        self._rec.record_gns(step, b_simple, grad_sq_norm, trace_sigma)

    @property
    def _counts_tokens(self) -> bool:
        return self.tokens_per_sample is not None or self.tokens_fn is not None

    def _check_tokens_per_sample(self, batch: Any) -> None:
        """Warn once when ``tokens_per_sample`` disagrees with the sequence length of the batch's token tensor.

        Only shapes are read (host metadata, no sync). The token tensor is ``batch["input_ids"]`` or the first
        2-D integer tensor of the batch; batches without one (images, ...) are not checked.
        """
        self._tokens_checked = True
        if self.tokens_per_sample is None or self.tokens_fn is not None:
            return
        if isinstance(batch, Mapping):
            items = [batch.get("input_ids"), *batch.values()]
        else:
            items = list(batch) if isinstance(batch, (list, tuple)) else [batch]
        tokens = next((t for t in items if isinstance(t, torch.Tensor) and t.ndim == 2
                       and not t.is_floating_point() and not t.is_complex()), None)
        if tokens is None or tokens.shape[1] == self.tokens_per_sample:
            return
        seq = int(tokens.shape[1])
        rank_zero_warn(
            f"LossTrajectory: tokens_per_sample={self.tokens_per_sample:g} but the first batch's token tensor holds "
            f"{seq} tokens per sample, so token counts (and gns/b_simple_tokens) would be "
            f"{self.tokens_per_sample / seq:.3g}x off. Set tokens_per_sample={seq}, or pass tokens_fn= to count "
            "tokens per batch (e.g. non-padding tokens).",
            category=DataWarning,
        )

    # ---------------------------------------------------------------------- hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        # trainer.log_dir broadcasts, so resolve it here where every rank runs, not in rank-zero-only writes.
        self._history_path = self._base_path(trainer)
        self._restored, self._history_dir = False, None
        if not pl_module.automatic_optimization:
            self._warning_cache.warn(
                "LossTrajectory: manual optimization; the returned loss is recorded once per optimizer step "
                "as returned, without undoing any accumulation.",
                category=ScalingWarning,
            )
        if self.name is None and trainer.logger is not None:
            version = trainer.logger.version
            self.name = f"{trainer.logger.name}/{version if isinstance(version, str) else f'version_{version}'}"

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Restored state is visible here under every strategy (FSDP restores after on_fit_start).
        self._choose_history_dir(trainer)
        if self.n_params is None:
            self.n_params = count_non_embedding_params(pl_module)
        try:
            self._planned_lr = self._simulate_schedule(trainer)
        except Exception as err:  # an exotic scheduler must never stop training
            self._planned_lr = None
            self._warning_cache.warn(f"LossTrajectory: could not simulate the LR schedule ({err}); forecasts "
                                     "will be schedule-blind.", category=DataWarning)

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if not self._tokens_checked:  # the first batch this callback sees
            self._check_tokens_per_sample(batch)
        samples = float(self.batch_size_fn(batch))
        if self.tokens_fn is not None:
            tokens = float(self.tokens_fn(batch))
        else:
            tokens = samples * self.tokens_per_sample if self.tokens_per_sample is not None else 0.0
        self._rec.micro_batch(trainer.global_step, samples=samples, tokens=tokens)

    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        self._rec.optimizer_step([float(g["lr"]) for g in optimizer.param_groups])

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if isinstance(loss, torch.Tensor):
            # Lightning divides each micro-batch loss by accumulate_grad_batches (read now: it may change).
            factor = trainer.accumulate_grad_batches if pl_module.automatic_optimization else 1
            self._rec.add_loss(loss.detach().float() * factor)
        elif loss is not None and not (isinstance(outputs, Mapping) and not outputs):
            raise TypeError(
                f"LossTrajectory: training_step must return a Tensor or a mapping with 'loss', got {type(loss)}"
            )
        stepped = self._rec.end_micro_batch(trainer.global_step - 1, device=pl_module.device)
        if stepped and self._rec.n_pending >= self.flush_every_n_steps:
            self._flush(trainer)

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        value = trainer.callback_metrics.get(self.val_loss_key)
        if value is None:
            return
        self._rec.record_val(trainer.global_step, float(value))  # once per validation run, not per step

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._flush(trainer)
        path = self._write(trainer, wait=True)
        if path is not None:
            rank_zero_info(f"LossTrajectory: history of {len(self._rec.step)} steps written to {path}")
        self._close_writer()

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        try:  # keep what was recorded; never mask the user's exception
            self._flush(trainer=None)
            self._write(trainer, wait=True)
        except Exception:
            pass
        self._close_writer()

    @override
    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        self._write(trainer, wait=False)  # off the training thread: a 1M-step JSON takes seconds

    @override
    def state_dict(self) -> dict[str, Any]:
        # Called on every rank when a checkpoint is dumped, so the collective flush is safe here.
        self._flush(self._trainer())
        # CPU tensors, not lists: compact (8 bytes a value), fast to save, and torch.load(weights_only=True) reads them.
        return {"version": 2, **self._rec.state_dict(), "n_params": self.n_params, "name": self.name,
                "n_logged": self._n_logged, "history_dir": getattr(self, "_history_dir", None)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._reset_state()
        self._restored, self._history_dir = True, state_dict.get("history_dir")
        self._rec.load_state_dict(state_dict)
        if self.n_params is None:
            self.n_params = state_dict.get("n_params")
        if self._name_arg is None and state_dict.get("name"):
            self.name = state_dict["name"]  # setup() named it after the new logger version; keep one run name
        self._n_logged = int(state_dict.get("n_logged", len(self._rec.step)))

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # state_dict() gets no trainer argument but must run the collective flush.
        self._trainer_ref = weakref.ref(trainer)

    # -------------------------------------------------------------------- helpers
    def _trainer(self) -> pl.Trainer | None:
        ref = getattr(self, "_trainer_ref", None)
        return ref() if ref is not None else None

    def _flush(self, trainer: pl.Trainer | None) -> None:
        """Move pending records to the host; under DDP (``trainer`` given) reduce them over ranks first.

        With a ``trainer`` it also logs every record not logged yet, including those an earlier flush without a
        trainer (a read of :attr:`history`) moved, so the checkpointed ``n_logged`` is exact.
        """
        if not self._rec.n_pending:
            if trainer is not None and self._n_logged < len(self._rec.step):
                self._log(trainer)
            return
        world = trainer.world_size if trainer is not None else 1
        n_bad = self._rec.flush(self._ddp_reduce(trainer) if world > 1 else None)
        if n_bad:
            self._warning_cache.warn(
                f"LossTrajectory: {n_bad} non-finite loss value(s) recorded (kept and flagged in the history).",
                category=DataWarning,
            )
        if trainer is not None:
            self._log(trainer)

    @staticmethod
    def _ddp_reduce(trainer: pl.Trainer) -> Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        def reduce(losses: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            # One all-reduce per chunk, on every rank (the flush points are the same step on all ranks).
            losses = trainer.strategy.reduce(losses.clone(), reduce_op="mean")
            return losses, trainer.strategy.reduce(counts.to(losses.device), reduce_op="sum").cpu()

        return reduce

    def _log(self, trainer: pl.Trainer) -> None:
        if not trainer.loggers or not trainer.is_global_zero:
            return
        start = self._n_logged
        rec = self._rec
        step, loss, samples = (c.view()[start:].tolist() for c in (rec.step, rec.loss, rec.samples))
        lr, tokens = rec.lr.view()[start:, 0].tolist(), rec.tokens.view()[start:].tolist()
        if self._n_logged == 0 and step:
            sizes = {"scaling/n_params": self.n_params, "scaling/batch_size": rec.batch_size,
                     "scaling/tokens_per_sample": self.tokens_per_sample}
            sizes = {k: float(v) for k, v in sizes.items() if v is not None}
            for lg in trainer.loggers:
                lg.log_metrics(sizes, step=step[0])
        events = [_event_writer(lg) for lg in trainer.loggers]
        for i in range(len(step)):
            metrics = {"scaling/loss": loss[i], "scaling/samples": samples[i]}
            if math.isfinite(lr[i]):
                metrics["scaling/lr"] = lr[i]
            if self._counts_tokens:
                metrics["scaling/tokens"] = tokens[i]
            for lg, events_of_lg in zip(trainer.loggers, events):
                if events_of_lg is None:
                    lg.log_metrics(metrics, step=step[i])
                else:
                    events_of_lg.add_summary(scalars_summary(metrics), global_step=step[i])
        writer = self._tokens_writer(trainer)
        if writer is not None:
            for i in range(len(step)):
                if math.isfinite(loss[i]):
                    summary = scalars_summary({"scaling/loss": loss[i]})
                    writer.file_writer.add_summary(summary, global_step=int(tokens[i]))
            writer.flush()
        self._n_logged = len(rec.step)

    def _tokens_writer(self, trainer: pl.Trainer) -> Any:
        if not (self.log_by_tokens and self._counts_tokens):
            return None
        if self._by_tokens_writer is None:
            tb = next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)
            if tb is None:
                return None
            from torch.utils.tensorboard import SummaryWriter

            self._by_tokens_writer = SummaryWriter(log_dir=str(Path(tb.log_dir) / "by_tokens"))
        return self._by_tokens_writer

    def _close_writer(self) -> None:
        if self._by_tokens_writer is not None:
            self._by_tokens_writer.close()
            self._by_tokens_writer = None

    def history_path(self, trainer: pl.Trainer) -> Path:
        """Where the history is written: ``save_dir`` or ``<log_dir>/scaling``, plus ``history.json``; without a
        logger or ``save_dir``, a new run beside an earlier run's history uses ``scaling/version_<k>/`` (known once
        training started).

        Reads ``trainer.log_dir``, a collective under DDP: call it on every rank.
        """
        return self._in_history_dir(self._base_path(trainer))

    def _base_path(self, trainer: pl.Trainer) -> Path:
        base = Path(self.save_dir) if self.save_dir else Path(trainer.log_dir or trainer.default_root_dir) / "scaling"
        return base / HISTORY_FILENAME

    def _in_history_dir(self, base: Path) -> Path:
        subdir = getattr(self, "_history_dir", None)
        return base.parent / subdir / base.name if subdir else base

    def _choose_history_dir(self, trainer: pl.Trainer) -> None:
        """Without a logger or ``save_dir`` every run shares ``<default_root_dir>/scaling``: a new run writes beside
        an earlier run's history, in the next free ``version_<k>`` folder, instead of over it; a resumed run goes on
        writing where it wrote (its checkpoint says which folder)."""
        base = self._history_path
        if trainer.loggers or self.save_dir:
            self._history_dir = None
        elif not self._restored and base.exists():
            k = 1
            while (base.parent / f"version_{k}" / base.name).exists():
                k += 1
            self._history_dir = f"version_{k}"
            rank_zero_info(f"LossTrajectory: {base} holds an earlier run's history; this run's goes to "
                           f"{self._in_history_dir(base)} (a logger or `save_dir` chooses the place).")

    def _write(self, trainer: pl.Trainer, *, wait: bool) -> Path | None:
        """Write ``history.json`` (rank 0): now, or (``wait=False``) from a snapshot in a writer thread."""
        if not trainer.is_global_zero or not (len(self._rec.step) or self._rec.n_pending):
            return None
        path = self._in_history_dir(getattr(self, "_history_path", None) or self._base_path(trainer))
        history = self.history  # a snapshot (copies), taken on the training thread
        self._join_writer()  # one write at a time, in order
        if wait:
            history.to_json(path)
        else:
            self._writer_thread = threading.Thread(target=self._write_in_thread, args=(history, path),
                                                   name="LossTrajectory-history", daemon=True)
            self._writer_thread.start()
        return path

    def _write_in_thread(self, history: RunHistory, path: Path) -> None:
        try:
            history.to_json(path)  # atomic: a process killed mid-write leaves the previous file
        except Exception as err:  # reported on the training thread by the next write
            self._writer_error = err

    def _join_writer(self) -> None:
        if self._writer_thread is not None:
            self._writer_thread.join()
            self._writer_thread = None
        if self._writer_error is not None:
            err, self._writer_error = self._writer_error, None
            self._warning_cache.warn(f"LossTrajectory: writing history.json failed ({err}); retrying at the next "
                                     "checkpoint.", category=ScalingWarning)

    def _simulate_schedule(self, trainer: pl.Trainer) -> list[float] | None:
        """Per-step LR of optimizer 0's first group from step 0 to max_steps - 1, by stepping copies of the
        schedulers on a parameter-free stand-in optimizer (the real optimizer state is never copied)."""
        max_steps = run_horizon(trainer)
        if max_steps is None or max_steps > _MAX_SIMULATED_STEPS or not trainer.optimizers:
            return None
        optimizer = trainer.optimizers[0]
        configs = [c for c in trainer.lr_scheduler_configs if getattr(c.scheduler, "optimizer", None) is optimizer]
        current = trainer.global_step
        past = self._rec.lr.view()[:current, 0].tolist() if len(self._rec.lr) >= current else []
        lr_now = float(optimizer.param_groups[0]["lr"])
        if not configs:
            return (past if len(past) == current else [lr_now] * current) + [lr_now] * (max_steps - current)

        stand_in = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr_now)
        stand_in.param_groups = [
            {**{k: copy.deepcopy(v) for k, v in g.items() if k != "params"}, "params": [torch.zeros(1)]}
            for g in optimizer.param_groups
        ]
        memo = {id(optimizer): stand_in}
        schedulers = []
        for cfg in configs:
            if cfg.reduce_on_plateau:
                return None  # depends on future metrics: not simulatable
            schedulers.append((copy.deepcopy(cfg.scheduler, memo), cfg.interval, max(1, cfg.frequency)))
        steps_per_epoch = None
        if any(interval == "epoch" for _, interval, _ in schedulers):
            batches = trainer.num_training_batches
            if not math.isfinite(batches):
                return None
            steps_per_epoch = max(1, math.ceil(batches / trainer.accumulate_grad_batches))
        future = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for step in range(current, max_steps):
                future.append(float(stand_in.param_groups[0]["lr"]))
                done = step + 1  # optimizer steps completed after this one
                for sched, interval, freq in schedulers:
                    if interval == "step" and done % freq == 0:
                        sched.step()
                    elif interval == "epoch" and steps_per_epoch and done % steps_per_epoch == 0:
                        if (done // steps_per_epoch) % freq == 0:
                            sched.step()
        if len(past) != current:
            past = [math.nan] * current
        return past + future


def _event_writer(logger: Any) -> Any:
    """The event-file writer of a plain, unprefixed Lightning ``TensorBoardLogger`` on torch's ``SummaryWriter``.

    Through it a step's scalars go out as one event (one ``Summary`` holding every value, the same tags and step)
    instead of one event per value: an event costs about 40 us of Python (protobuf, TensorBoard's pure-Python record
    checksums) under the training thread's GIL, which made the four per-step scalars two thirds of
    ``LossTrajectory``'s cost on the demo GPT. ``None`` for anything else (a subclass, a prefix, tensorboardX, other
    loggers): those get ``log_metrics``.
    """
    from torch.utils.tensorboard import SummaryWriter

    if type(logger) is not TensorBoardLogger or getattr(logger, "_prefix", None) != "":
        return None
    writer = logger.experiment
    if not isinstance(writer, SummaryWriter):
        return None
    return getattr(writer, "file_writer", None)
