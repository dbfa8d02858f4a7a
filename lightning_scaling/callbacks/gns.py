"""Live gradient noise scale (``B_simple``) for Lightning runs: a thin adapter over :mod:`lightning_scaling.gns`."""

from __future__ import annotations

import functools
import math
import numbers
import statistics
import time
import warnings
from typing import Any, Callable, Literal, Optional

import lightning.pytorch as pl
import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.rank_zero import WarningCache
from torch import Tensor, nn

from typing_extensions import override

from lightning_scaling.callbacks.loss_trajectory import LossTrajectory
from lightning_scaling.callbacks.utils import find_callback
from lightning_scaling.gns import GNSEstimator, GNSReading
from lightning_scaling.numerics import infer_batch_size
from lightning_scaling.warnings import ScalingWarning

__all__ = ["GradientNoiseScale"]

_METHODS = ("auto", "ddp", "accumulation", "per_example")
_LAYERS = ("norm", "norm+linear")
_MAX_EVERY = 64  # measure_every_n_steps="auto" measures at least one step in this many

warning_cache = WarningCache()


def _every_from_decay(saved: Any, ema_decay: float) -> int:
    """The cadence ``n`` of an estimator saved with decay ``ema_decay ** n`` (1 when it cannot be told)."""
    if not (isinstance(saved, numbers.Real) and 0.0 < saved < 1.0 and 0.0 < ema_decay < 1.0):
        return 1
    return max(1, round(math.log(saved) / math.log(ema_decay)))


# --------------------------------------------------------------------------- Trainer internals, wrapped in one place
def _scaler(trainer: "pl.Trainer") -> Any:
    return getattr(trainer.precision_plugin, "scaler", None)


def _scale_tensor(scaler: Any) -> Optional[Tensor]:
    """The current loss scale as a device tensor (no host sync); ``None`` without a scaler."""
    if scaler is None or not getattr(scaler, "is_enabled", lambda: True)():
        return None
    scale = getattr(scaler, "_scale", None)  # private, but get_scale() would sync every step
    if isinstance(scale, Tensor):
        return scale.detach().reshape(())
    return torch.tensor(float(scaler.get_scale()))


def _optimizer_unscales_itself(optimizer: Any) -> bool:
    try:
        from lightning.fabric.plugins.precision.amp import _optimizer_handles_unscaling

        return bool(_optimizer_handles_unscaling(optimizer))
    except Exception:  # pragma: no cover - internal moved
        return bool(getattr(optimizer, "_step_supports_amp_scaling", False))


def _is_sharded(trainer: "pl.Trainer") -> bool:
    try:
        from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

        return isinstance(trainer.strategy, (FSDPStrategy, ModelParallelStrategy))
    except ImportError:  # pragma: no cover
        return False


def _is_deepspeed(trainer: "pl.Trainer") -> bool:
    return type(trainer.strategy).__name__.startswith("DeepSpeed")


def _may_accumulate(trainer: "pl.Trainer") -> bool:
    """Whether a step may hold several micro-batches: now, or later through Lightning's GradientAccumulationScheduler
    (which needs the Trainer's value at 1 and raises it at an epoch start)."""
    from lightning.pytorch.callbacks import GradientAccumulationScheduler

    return trainer.accumulate_grad_batches >= 2 or any(
        isinstance(c, GradientAccumulationScheduler) and c.going_to_accumulate_grad_batches()
        for c in trainer.callbacks)


def _dist_ready() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_reduce_sum(t: Tensor) -> Tensor:
    """Sum over ranks (every rank must call it); identity on a single process."""
    if _dist_ready():
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def _sq_norm(tensors: list[Tensor]) -> Tensor:
    """Sum of squared L2 norms in fp32 (local shards for DTensors)."""
    local = [t.to_local() if hasattr(t, "to_local") else t for t in tensors]
    if not local:
        return torch.zeros(())
    try:  # fp32 accumulation without copying low-precision gradients
        norms = torch._foreach_norm(local, 2, dtype=torch.float32)
    except (TypeError, RuntimeError):  # older torch without the dtype argument
        norms = [torch.linalg.vector_norm(t, dtype=torch.float32) for t in local]
    return torch.stack(list(norms)).square().sum()


def _is_norm_module(m: nn.Module) -> Optional[str]:
    """'ln' / 'rms' for LayerNorm/RMSNorm-like modules with a 1-D+ affine weight, else None."""
    if isinstance(m, nn.LayerNorm):
        return "ln" if m.elementwise_affine else None
    rms_cls = getattr(nn, "RMSNorm", None)
    if rms_cls is not None and isinstance(m, rms_cls):
        return "rms" if m.elementwise_affine else None
    name = type(m).__name__
    w = getattr(m, "weight", None)
    if isinstance(w, nn.Parameter) and w.dim() >= 1:
        if name.endswith("RMSNorm"):
            return "rms"
        if name.endswith("LayerNorm"):
            return "ln"
    return None


def _layer_norm_stats(output: Tensor) -> Optional[tuple[Tensor, Tensor]]:
    """(mean, rstd) that autograd saved for a native layer norm's backward, or ``None`` for any other node."""
    node = output.grad_fn
    if type(node).__name__ != "NativeLayerNormBackward0":
        return None
    try:
        return node._saved_result1, node._saved_result2
    except (AttributeError, RuntimeError):  # freed or renamed: recompute instead
        return None


class _CadenceTimer:
    """Times optimizer steps with and without a measurement, for ``measure_every_n_steps="auto"``.

    Per step it times the span from the step's first ``on_train_batch_start`` to its ``on_before_optimizer_step``
    (forward, backward and the measurement: where a measurement's work runs, nothing else the loop does every few
    steps, such as validation, logging or the read-out), and for unmeasured steps also the whole step (to the next
    step's start), the denominator. Marks are host clock readings, or CUDA events on a CUDA device (recorded on the
    stream; read once, when the cadence is chosen: no per-step sync, and the device's time, not the host's).
    """

    SKIP = 4  # steps after each (re)start not timed: allocator, caches and lazy initialisation slow them anyway
    NEED = 10  # timed spans of each kind before choosing

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.reset()

    def reset(self) -> None:
        self.seen = 0
        self.start: Optional[tuple[int, Any, bool]] = None  # (step, mark, measured)
        self.spans: dict[bool, list[tuple[Any, Any]]] = {True: [], False: []}
        self.whole: list[tuple[Any, Any]] = []  # unmeasured steps, start to the next step's start

    def mark(self, device: Optional[torch.device]) -> Any:
        if device is not None and device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return self.clock()

    def step_start(self, step: int, measured: bool, device: Optional[torch.device]) -> None:
        if self.start is not None and self.start[0] == step:
            return  # a later micro-batch of the same step
        now = self.mark(device)
        if self.start is not None and self.start[0] == step - 1 and not self.start[2] and self.seen > self.SKIP:
            self.whole.append((self.start[1], now))
        self.start = (step, now, measured)

    def step_end(self, step: int, device: Optional[torch.device]) -> None:
        if self.start is None or self.start[0] != step:
            return
        self.seen += 1
        if self.seen > self.SKIP:
            self.spans[self.start[2]].append((self.start[1], self.mark(device)))

    def ready(self) -> bool:
        """Enough steps timed; the counts follow the steps alone, so every rank is ready at the same step."""
        return min(len(self.spans[True]), len(self.spans[False])) >= self.NEED and len(self.whole) >= self.NEED // 2

    def overhead(self) -> float:
        """Median extra time of a measured span over an unmeasured one, as a share of a whole unmeasured step."""
        marks = [m for pairs in (*self.spans.values(), self.whole) for pair in pairs for m in pair]
        for e in marks:  # CUDA events: the one wait of the timing (a no-op once the latest has completed)
            if not isinstance(e, float):
                e.synchronize()

        def med(pairs: list[tuple[Any, Any]]) -> float:
            return statistics.median(b - a if isinstance(a, float) else a.elapsed_time(b) / 1e3 for a, b in pairs)

        return (med(self.spans[True]) - med(self.spans[False])) / med(self.whole)


class GradientNoiseScale(Callback):
    r"""Logs the gradient noise scale ``B_simple = tr(Σ)/|G|²`` and the batch size relative to it, while training.

    ``B_simple`` (McCandlish et al. 2018, https://arxiv.org/abs/1812.06162) estimates the critical batch size: the
    batch beyond which doubling the batch no longer roughly halves the number of steps. ``gns/batch_over_bsimple``
    = current global batch / ``B_simple``: far below 1 the run wastes time (steps), far above 1 it wastes compute.
    Under Adam it is a proxy only; validate it with a batch-size sweep.

    The small-batch squared gradient norms come from one of:

    * ``"ddp"``: each rank's local gradient, read in a DDP communication hook before the all-reduce (cost: one scalar
      all-reduce per measured step). ``b_small`` = local batch × accumulation, ``b_big`` = × world size.
    * ``"accumulation"``: each micro-batch gradient, read by per-parameter tensor hooks before it is added into
      ``.grad`` (no copy). Needs ``accumulate_grad_batches >= 2``. ``b_small`` = micro-batch.
    * ``"per_example"``: exact per-example gradient norms of LayerNorm/RMSNorm affine parameters from module hooks
      (``b_small = 1``), paired with the norm-layer-only full-batch gradient: the **"LN-proxy" GNS** of Gray et al.
      2024 (https://arxiv.org/abs/2411.00999). ``per_example_layers="norm+linear"`` adds exact per-example norms of
      ``nn.Linear`` layers (with a sequence dimension, via the Gram/"ghost" norm or a batched product), which costs
      roughly another backward.
    * ``"auto"``: ``"ddp"`` when ``world_size > 1``, else ``"accumulation"`` when ``accumulate_grad_batches >= 2``,
      else ``"per_example"``; the choice is logged.

    The full-batch gradient is read in ``on_before_optimizer_step`` (after AMP unscaling, before clipping). AMP loss
    scales are divided out (also for fused optimizers, which Lightning does not unscale), non-finite steps are
    skipped and counted, the last short accumulation window is skipped, and sharded (FSDP) squared norms are
    summed over ranks. Samples are what the batch holds (sequences for language models, not tokens).

    Logged with ``logger.log_metrics`` at the optimizer step (rank 0) every ``log_every_n_steps`` steps:
    ``gns/b_simple``, ``gns/b_simple_tokens`` (if tokens per sample are known), ``gns/grad_sq_norm``,
    ``gns/trace_sigma``, ``gns/batch_over_bsimple``, ``gns/b_simple_ci_low``, ``gns/b_simple_ci_high`` and
    ``gns/skipped_steps``. When a :class:`~lightning_scaling.callbacks.LossTrajectory` is attached, each read-out is
    also appended to its ``RunHistory`` via ``record_gns``.

    Args:
        method: Source of the small-batch gradients (see above).
        ema_decay: Decay of the EMAs of ``|G|²`` and ``tr(Σ)``, per optimizer step.
        measure_every_n_steps: Measure on one optimizer step in this many (1: every step), or ``"auto"``
            (default). A measured step costs more on small models (the demo GPT on one CPU thread: about 10%, see
            ``benchmarks/gns_overhead.py``), so ``"auto"`` measures every other step while it times, from the fifth
            step of the fit on, ten steps of each kind: the span from a step's first micro-batch to its optimizer
            step (where the measurement's work runs; CUDA events on a GPU, read once, no per-step sync), and the
            whole unmeasured step. Then it measures one step in ``ceil(overhead / max_overhead)`` (``overhead``:
            the median extra span over the median whole step; 1 when that is within ``max_overhead``; at most 64).
            Rank 0's choice is broadcast once, so all ranks measure the same steps. Each measurement stands for
            ``n`` steps in the EMAs (decay ``ema_decay ** n`` per measurement), so the averaging window in steps
            stays the same while it holds ``n`` times fewer measurements (a ``sqrt(n)`` wider confidence band).
            Which steps are measured depends only on ``global_step`` and ``n``, so every rank and every
            micro-batch of a step agree; the cadence is checkpointed and continues on resume (a checkpoint saved
            while timing times again, one of version 0.2 keeps its cadence). ``estimator.read().n_steps`` counts
            measurements, not steps. As ``"auto"`` is chosen from timings, a rerun of a seeded run may measure
            other steps; pass an integer for reproducible readings.
        max_overhead: The share of step time that measurements may add under ``measure_every_n_steps="auto"``
            (ignored with an integer cadence; exceeded when even one step in 64 costs more).
        log_every_n_steps: Read-out and logging interval in optimizer steps; ``None`` uses the Trainer's.
        tokens_per_sample: Tokens per sample for ``gns/b_simple_tokens``; ``None`` takes it from an attached
            ``LossTrajectory`` if it knows it.
        batch_size_fn: ``batch -> int``, samples in a (local) micro-batch. Defaults to the leading dimension of the
            first tensor in the batch. In a LightningCLI config pass a dotted import path.
        per_example_layers: ``"norm"`` (LN-proxy, cheap) or ``"norm+linear"`` (adds exact Linear norms).
        loss_reduction: How ``training_step`` reduces the per-example losses over the micro-batch: ``"mean"``
            (default) or ``"sum"``. Only ``per_example`` needs it.
        z: Normal quantile of the logged confidence band.
        log_prefix: Tag prefix (change it to run several instances side by side, e.g. to compare methods).

    Raises:
        ValueError: On invalid arguments.

    Attributes:
        estimator: The :class:`~lightning_scaling.gns.GNSEstimator` (raw per-step statistics: ``estimator.raw()``).
        method_used: The resolved method after ``on_fit_start`` (``None`` before).
        label: ``"GNS"`` or ``"LN-proxy GNS"`` / ``"LN+Linear-proxy GNS"`` for ``per_example``.
        last_reading: The most recent :class:`~lightning_scaling.gns.GNSReading` (``None`` before the first log).
        n_partial_windows: Optimizer steps skipped because their accumulation window was short.
        measure_every: The cadence in use: one optimizer step in this many is measured (2 while ``"auto"`` is
            still timing steps).
        measured_overhead: What a measured step cost over an unmeasured one, as a share of the unmeasured step's
            time, as ``"auto"`` timed it (``None`` before that, or with a fixed cadence).

    Example::

        >>> import lightning.pytorch as pl
        >>> from lightning_scaling.callbacks.gns import GradientNoiseScale
        >>> gns = GradientNoiseScale(method="auto", tokens_per_sample=1024)
        >>> trainer = pl.Trainer(callbacks=[gns], accumulate_grad_batches=4, logger=False)  # doctest: +SKIP
    """

    def __init__(
        self,
        method: Literal["auto", "ddp", "accumulation", "per_example"] = "auto",
        *,
        ema_decay: float = 0.99,
        measure_every_n_steps: int | Literal["auto"] = "auto",
        max_overhead: float = 0.02,
        log_every_n_steps: Optional[int] = None,
        tokens_per_sample: Optional[int] = None,
        batch_size_fn: Optional[Callable[[Any], int]] = None,
        per_example_layers: Literal["norm", "norm+linear"] = "norm",
        loss_reduction: Literal["mean", "sum"] = "mean",
        z: float = 1.96,
        log_prefix: str = "gns/",
    ) -> None:
        if method not in _METHODS:
            raise ValueError(f"`method` must be one of {_METHODS}, got {method!r}.")
        if per_example_layers not in _LAYERS:
            raise ValueError(f"`per_example_layers` must be one of {_LAYERS}, got {per_example_layers!r}.")
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"`loss_reduction` must be 'mean' or 'sum', got {loss_reduction!r}.")
        if log_every_n_steps is not None and (int(log_every_n_steps) != log_every_n_steps or log_every_n_steps < 1):
            raise ValueError(f"`log_every_n_steps` must be a positive integer or None, got {log_every_n_steps}.")
        if not isinstance(log_prefix, str) or not log_prefix:
            raise ValueError(f"`log_prefix` must be a non-empty string, got {log_prefix!r}.")
        if batch_size_fn is not None and not callable(batch_size_fn):
            raise ValueError("`batch_size_fn` must be callable (batch -> number of samples) or None.")
        auto = measure_every_n_steps == "auto"
        if not auto and (not isinstance(measure_every_n_steps, numbers.Integral)
                         or isinstance(measure_every_n_steps, bool) or measure_every_n_steps < 1):
            raise ValueError("`measure_every_n_steps` must be a positive integer or 'auto', got "
                             f"{measure_every_n_steps!r}.")
        if not (isinstance(max_overhead, numbers.Real) and 0.0 < max_overhead < 1.0):
            raise ValueError(f"`max_overhead` must be in (0, 1), got {max_overhead!r}.")
        self.measure_every_n_steps: int | str = "auto" if auto else int(measure_every_n_steps)
        self.max_overhead = float(max_overhead)
        # GNSEstimator validates ema_decay, tokens_per_sample and z.
        self.estimator = GNSEstimator(ema_decay=ema_decay, tokens_per_sample=tokens_per_sample, z=z)
        self.ema_decay = ema_decay
        self.measured_overhead: Optional[float] = None
        self._calibrated = not auto
        self._timer = _CadenceTimer(time.perf_counter)  # a test replaces its clock
        self._set_every(2 if auto else int(measure_every_n_steps))
        self.method = method
        self.log_every_n_steps = log_every_n_steps
        self.tokens_per_sample = tokens_per_sample
        self.batch_size_fn = batch_size_fn
        self.per_example_layers = per_example_layers
        self.loss_reduction = loss_reduction
        self.log_prefix = log_prefix
        self.method_used: Optional[str] = None
        self.label = "GNS"
        self.last_reading: Optional[GNSReading] = None
        self.n_partial_windows = 0
        self._enabled = False
        self._warned_size = False
        self._good_samples = 0.0  # samples of this rank's last measurable window
        self._handles: list[Any] = []
        self._tracked: list[nn.Parameter] = []
        self._reset_window()

    @property
    def state_key(self) -> str:
        # Lightning reads state_key on every hook call (profiler names): build it once.
        key = self.__dict__.get("_state_key")
        if key is None:
            key = self._state_key = self._generate_state_key(
                method=self.method, per_example_layers=self.per_example_layers, log_prefix=self.log_prefix
            )
        return key

    # ------------------------------------------------------------------ cadence
    def _set_every(self, n: int) -> None:
        """Measure one optimizer step in ``n``; each measurement then weighs as ``n`` steps in the EMAs."""
        self.measure_every = n
        self.estimator.ema_decay = self.ema_decay ** n

    def _choose_every(self, trainer: "pl.Trainer") -> None:
        """``measure_every_n_steps="auto"``: once enough steps are timed, measure one in as many as the budget allows.

        Every rank times the same steps (the measured ones are even), so all reach the broadcast at the same step;
        rank 0's choice holds everywhere.
        """
        extra = self._timer.overhead()
        n = 1 if extra <= self.max_overhead else min(_MAX_EVERY, math.ceil(extra / self.max_overhead - 1e-9))
        n = int(trainer.strategy.broadcast(n, src=0))
        self.measured_overhead, self._calibrated = extra, True
        self._set_every(n)
        rank_zero_info(f"GradientNoiseScale: a measurement added {extra:+.1%} to the step time; measuring one step "
                       f"in {n} (max_overhead={self.max_overhead:g}).")

    # ------------------------------------------------------------------ window accounting
    def _reset_window(self) -> None:
        self._n_micro = 0
        self._n_samples = 0
        self._micro_sizes: list[int] = []
        self._hook_norms: list[Tensor] = []  # accumulation: per-parameter micro-batch grad norms
        self._ddp_sq: list[Tensor] = []  # ddp: per-bucket local squared norms
        self._ddp_syncs = 0
        self._pe_sq: list[Tensor] = []  # per_example: per-micro-batch sums of per-example squared norms
        self._pe_rows: list[Tensor] = []  # per_example: this micro-batch's per-example norm-layer gradients
        self._in_backward_window = False
        self._bad_window = False  # a micro-batch of this window had no batch size (DDP: skipped on every rank)

    # ------------------------------------------------------------------ setup
    def _resolve_method(self, trainer: "pl.Trainer") -> str:
        k = trainer.accumulate_grad_batches
        if self.method != "auto":
            return self.method
        if trainer.world_size > 1:
            reason = self._ddp_possible(trainer)
            if reason is None:
                return "ddp"
            rank_zero_warn(f"GradientNoiseScale(method='auto'): not using the DDP comm hook because {reason}.",
                           category=ScalingWarning)
        if k >= 2:
            return "accumulation"
        return "per_example"

    def _ddp_possible(self, trainer: "pl.Trainer") -> Optional[str]:
        """``None`` if a DDP comm hook can be installed, else the reason why not."""
        from lightning.pytorch.strategies import DDPStrategy

        strategy = trainer.strategy
        if not isinstance(strategy, DDPStrategy) or _is_deepspeed(trainer):
            return f"the strategy is {type(strategy).__name__}, not DDP"
        model = strategy.model
        if not isinstance(model, nn.parallel.DistributedDataParallel):
            return "the model is not wrapped in DistributedDataParallel"
        if getattr(model, "_comm_hooks", None) or getattr(strategy, "_ddp_comm_hook", None) is not None:
            return (
                "a DDP communication hook is already set (PyTorch allows one per model). Remove `ddp_comm_hook` from"
                " DDPStrategy, or use method='accumulation' / 'per_example'"
            )
        return None

    @override
    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._remove_hooks()
        self._reset_window()
        self._enabled = False
        if _is_deepspeed(trainer):
            rank_zero_warn("GradientNoiseScale: DeepSpeed owns the gradients; no gradient noise scale is measured.",
                           category=ScalingWarning)
            return
        if not pl_module.automatic_optimization:
            rank_zero_warn("GradientNoiseScale supports automatic optimization only; no noise scale is measured.",
                           category=ScalingWarning)
            return
        method = self._resolve_method(trainer)
        if method == "ddp":
            reason = self._ddp_possible(trainer)
            if reason is not None:
                if trainer.world_size > 1 or self.method == "ddp":
                    raise ValueError(f"GradientNoiseScale(method='ddp') cannot run: {reason}.")
        self.method_used = method
        self._world = max(int(trainer.world_size), 1)
        if method == "ddp":
            trainer.strategy.model.register_comm_hook(state=None, hook=self._comm_hook)
            self._tracked = [p for p in pl_module.parameters() if p.requires_grad]
            self.label = "GNS"
        else:
            self._tracked = self._install_local_hooks(pl_module)
            self.label = "GNS" if method == "accumulation" else (
                "LN-proxy GNS" if self.per_example_layers == "norm" else "LN+Linear-proxy GNS"
            )
            if method == "per_example" and not self._tracked:
                layers = ("LayerNorm/RMSNorm layers (per_example_layers='norm'; "
                          "per_example_layers='norm+linear' adds Linear layers)" if self.per_example_layers == "norm"
                          else "LayerNorm/RMSNorm or Linear layers")
                rank_zero_warn(f"GradientNoiseScale(method='per_example') found no {layers} with trainable, unshared "
                               "parameters; no noise scale is measured. accumulate_grad_batches >= 2 measures it "
                               "exactly for any model (method='accumulation').", category=ScalingWarning)
                self._remove_hooks()
                return
        if method == "accumulation" and self._world == 1 and not _may_accumulate(trainer):
            rank_zero_warn("GradientNoiseScale(method='accumulation') needs accumulate_grad_batches >= 2 (it compares "
                           "the micro-batch gradients with their mean; with one there is nothing to compare): no "
                           "noise scale is measured. Use method='auto'.", category=ScalingWarning)
            self._remove_hooks()
            return
        self._enabled = True
        rank_zero_info(
            f"GradientNoiseScale: method={method!r} ({self.label}), accumulate_grad_batches="
            f"{trainer.accumulate_grad_batches}, world_size={trainer.world_size}."
        )

    def _install_local_hooks(self, pl_module: nn.Module) -> list[nn.Parameter]:
        """Tensor hooks (accumulation) or module hooks (per_example); returns the parameters of the big norm."""
        if self.method_used == "accumulation":
            tracked = [p for p in pl_module.parameters() if p.requires_grad]
            for p in tracked:
                self._handles.append(p.register_hook(self._param_hook))
            return tracked
        return self._install_module_hooks(pl_module)

    def _install_module_hooks(self, pl_module: nn.Module) -> list[nn.Parameter]:
        counts: dict[int, int] = {}
        for m in pl_module.modules():
            for p in m.parameters(recurse=False):
                counts[id(p)] = counts.get(id(p), 0) + 1
        tracked: list[nn.Parameter] = []
        seen: set[int] = set()
        for m in pl_module.modules():
            kind = _is_norm_module(m)
            if kind is None and self.per_example_layers == "norm+linear" and isinstance(m, nn.Linear):
                kind = "linear"
            if kind is None:
                continue
            params = [p for p in m.parameters(recurse=False) if p.requires_grad]
            # A parameter shared with another module gets gradient from both; its per-example norm is not local.
            if not params or any(counts[id(p)] > 1 for p in params):
                if params:
                    warning_cache.warn(f"GradientNoiseScale: skipping {type(m).__name__} with shared parameters.",
                                       category=ScalingWarning)
                continue
            self._handles.append(m.register_forward_hook(functools.partial(self._fwd_hook, kind)))
            for p in params:
                if id(p) not in seen:
                    seen.add(id(p))
                    tracked.append(p)
        return tracked

    def _remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _disable(self) -> None:
        self._remove_hooks()
        self._reset_window()
        self._enabled = False

    @override
    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        self._disable()

    # ------------------------------------------------------------------ hooks (no host syncs in any of them)
    def _comm_hook(self, state, bucket):  # no annotations: DDP checks them, and they are strings here
        """DDP comm hook: sum the bucket's local squared norm, then do the default averaging all-reduce."""
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        if self._in_backward_window:
            buf = bucket.buffer()
            self._ddp_sq.append(torch.linalg.vector_norm(buf, dtype=torch.float32).square())
            if bucket.is_last():
                self._ddp_syncs += 1
        return allreduce_hook(state, bucket)  # the usual averaging all-reduce

    def _param_hook(self, grad: Tensor) -> None:
        if self._in_backward_window:
            g = grad.to_local() if hasattr(grad, "to_local") else grad
            self._hook_norms.append(torch.linalg.vector_norm(g, dtype=torch.float32))

    def _fwd_hook(self, kind: str, module: nn.Module, args: tuple, output: Any) -> None:
        if not (self._in_backward_window and module.training and torch.is_grad_enabled()):
            return
        if not isinstance(output, Tensor) or not output.requires_grad or not args or not isinstance(args[0], Tensor):
            return
        # Autograd already keeps the input of LayerNorm/Linear for their own backward: holding it costs no memory.
        x = args[0]
        stats = _layer_norm_stats(output) if kind == "ln" else None
        output.register_hook(functools.partial(self._bwd_hook, kind, module, x, stats))

    def _bwd_hook(self, kind: str, module: nn.Module, x: Tensor, stats: Optional[tuple[Tensor, Tensor]],
                  grad_out: Tensor) -> None:
        with torch.no_grad():
            if kind == "linear":
                self._pe_sq.append(self._linear_sq_sum(module, x, grad_out))
            else:  # squared and summed once per micro-batch, in on_after_backward
                self._pe_rows.extend(self._norm_rows(kind, module, x, grad_out, stats))

    def _mean_factor(self, b: int) -> float:
        """Undoes the mean reduction of the loss over the micro-batch in squared per-example norms (×B²)."""
        return float(b * b) if self.loss_reduction == "mean" else 1.0

    def _linear_sq_sum(self, module: nn.Module, x: Tensor, g: Tensor) -> Tensor:
        """Σ_b |∂ℓ_b/∂θ|² of a Linear layer over the micro-batch."""
        b = x.shape[0]
        x = x.detach().float().reshape(b, -1, x.shape[-1])
        g = g.detach().float().reshape(b, -1, g.shape[-1])
        weight, bias = module.weight, getattr(module, "bias", None)
        t, d_in, d_out = x.shape[1], x.shape[2], g.shape[2]
        total = x.new_zeros(())
        if weight is not None and weight.requires_grad:
            if t == 1:
                total = total + (x.square().sum((1, 2)) * g.square().sum((1, 2))).sum()
            elif t * (d_in + d_out) < d_in * d_out:  # Gram ("ghost") norm: Σ_tt' (a_t·a_t')(δ_t·δ_t')
                total = total + (torch.bmm(x, x.transpose(1, 2)) * torch.bmm(g, g.transpose(1, 2))).sum()
            else:  # explicit per-example weight gradients
                total = total + torch.bmm(g.transpose(1, 2), x).square().sum()
        if isinstance(bias, Tensor) and bias.requires_grad:
            total = total + g.sum(1).square().sum()
        return total * self._mean_factor(b)

    def _norm_rows(self, kind: str, module: nn.Module, x: Tensor, g: Tensor,
                   stats: Optional[tuple[Tensor, Tensor]] = None) -> list[Tensor]:
        """Per-example gradients ``(B, d)`` of a LayerNorm/RMSNorm weight (and bias), before the ×B² factor.

        ``stats``: LayerNorm's own (mean, rstd) from its autograd node, which make x̂ two elementwise ops instead
        of a second layer norm (the costliest part of the hook on a small model).
        """
        b = x.shape[0]
        x, g = x.detach().float(), g.detach().float()
        weight, bias = module.weight, getattr(module, "bias", None)
        d, shape = weight.numel(), tuple(weight.shape)
        g = g.reshape(b, -1, d)
        rows = []
        if weight.requires_grad:
            eps = getattr(module, "eps", None)
            if eps is None:  # e.g. Hugging Face RMSNorm; None for RMSNorm means finfo(dtype).eps, as in torch
                eps = getattr(module, "variance_epsilon", None)
            if kind == "ln" and stats is not None:
                xhat = (x - stats[0].float()) * stats[1].float()
            elif kind == "ln":
                xhat = F.layer_norm(x, shape, eps=1e-5 if eps is None else eps)
            else:
                xhat = F.rms_norm(x, shape, eps=eps)
            rows.append((g * xhat.reshape(b, -1, d)).sum(1))
        if isinstance(bias, Tensor) and bias.requires_grad:
            rows.append(g.sum(1))
        return rows

    # ------------------------------------------------------------------ per micro-batch
    @override
    def on_train_batch_start(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any, batch_idx: int
    ) -> None:
        if not self._enabled:
            return
        measured = trainer.global_step % self.measure_every == 0
        if not self._calibrated:
            self._timer.step_start(trainer.global_step, measured, pl_module.device)
        if not measured:
            return  # the hooks stay closed (they check the backward window)
        fn = self.batch_size_fn or infer_batch_size
        try:
            self._micro_sizes.append(int(fn(batch)))
        except Exception as err:  # never raise into the training loop
            if self._world == 1:  # warn and stop measuring
                rank_zero_warn(f"GradientNoiseScale: cannot get the batch size ({err}); pass `batch_size_fn`. "
                               "Disabled.", category=ScalingWarning)
                self._disable()
                return
            # Stopping on this rank alone would leave the others waiting in its all-reduces: the window is measured
            # as usual, its statistics poisoned, and every rank skips the step (_measure).
            self._micro_sizes.append(0)
            self._bad_window = True
            if not self._warned_size:  # from the rank that failed (a rank-zero warning would hide rank 1's)
                self._warned_size = True
                warnings.warn(f"GradientNoiseScale (rank {trainer.global_rank}): cannot get the batch size ({err}); "
                              "pass `batch_size_fn`. The steps it fails on are skipped on every rank (counted in "
                              "skipped_steps).", ScalingWarning, stacklevel=2)
        self._in_backward_window = True

    @override
    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._timer.reset()  # timed within one fit; after a restore its first steps are skipped again

    @override
    def on_after_backward(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self._enabled and self._in_backward_window:
            self._n_micro += 1
            if self._pe_rows:  # one fused norm over every norm layer of the micro-batch
                rows, self._pe_rows = self._pe_rows, []
                self._pe_sq.append(_sq_norm(rows) * self._mean_factor(rows[0].shape[0]))

    # ------------------------------------------------------------------ per optimizer step
    @override
    def on_before_optimizer_step(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", optimizer: torch.optim.Optimizer
    ) -> None:
        if not self._enabled or trainer.sanity_checking:
            return
        try:
            if self._in_backward_window:  # a measured step (see measure_every_n_steps)
                self._measure(trainer, optimizer)
        finally:
            self._reset_window()
        step = trainer.global_step
        if not self._calibrated:  # the span ends here: the read-out below is not a measurement's cost
            self._timer.step_end(step, pl_module.device)
            if self._timer.ready():
                self._choose_every(trainer)
        every = self.log_every_n_steps or max(int(getattr(trainer, "log_every_n_steps", 50) or 50), 1)
        if (step + 1) % every == 0:
            self._log(trainer, step)

    def _measure(self, trainer: "pl.Trainer", optimizer: torch.optim.Optimizer) -> None:
        k = int(trainer.accumulate_grad_batches)
        n_micro = self._n_micro
        sizes = self._micro_sizes[-n_micro:] if n_micro else []
        if n_micro != k or len(self._micro_sizes) != n_micro:
            # Lightning's last short window (or a skipped backward): gradients are rescaled wrongly; skip.
            self.n_partial_windows += 1
            return
        local_samples = float(sum(sizes))
        # A window this rank cannot measure (batch size unknown or empty) still runs every collective below, its
        # statistics poisoned with NaN, so no rank waits for it in an all-reduce and every rank skips the step.
        bad = self._bad_window or local_samples <= 0
        if bad:
            if self._world == 1:
                return
            poison = float("nan")
            local_samples = self._good_samples or max(local_samples, 1.0)  # a placeholder: the step is skipped
        else:
            poison, self._good_samples = 1.0, local_samples
        grads = [p.grad for p in self._tracked if p.grad is not None]
        if not grads:
            warning_cache.warn("GradientNoiseScale: no gradients at the optimizer step; skipped.",
                               category=ScalingWarning)
            return
        device = grads[0].device
        big = _sq_norm(grads).to(device)
        if _is_sharded(trainer):
            big = _all_reduce_sum(big)
        # Loss scale: hooks always see scaled gradients; .grad is scaled only for self-unscaling (fused) optimizers.
        scale = _scale_tensor(_scaler(trainer))
        inv2 = None if scale is None else 1.0 / scale.to(device=device, dtype=torch.float32).square()
        if inv2 is not None and _optimizer_unscales_itself(optimizer):
            big = big * inv2
        world = self._world
        method = self.method_used
        if method == "ddp":
            if self._ddp_syncs != 1 or not self._ddp_sq:
                warning_cache.warn(
                    "GradientNoiseScale(method='ddp'): the gradient was all-reduced "
                    f"{self._ddp_syncs} times in this window (expected once, under no_sync); step skipped.",
                    category=ScalingWarning,
                )
                return
            local_sq = torch.stack(self._ddp_sq).sum() * poison  # |local window-mean grad|² (× scale²)
            # One scalar all-reduce on every rank (on NCCL it is queued on the stream: no host sync).
            small = _all_reduce_sum(local_sq) / world
            b_small, b_big = local_samples, local_samples * world
        elif method == "accumulation":
            if not self._hook_norms:
                warning_cache.warn(
                    "GradientNoiseScale(method='accumulation'): the parameter hooks saw no gradients (a strategy"
                    " that manages gradients itself, e.g. FSDP1 flat parameters?). Try method='per_example'.",
                    category=ScalingWarning,
                )
                return
            # Lightning divides each micro loss by K: micro mean-grad = K × hook grad, so |·|² gains K².
            local = torch.stack(self._hook_norms).square().sum() * (float(k * k) / k * poison)  # mean over K micro
            if _is_sharded(trainer):
                # Sharded gradients are reduce-scattered after every micro-batch (no no_sync): each rank holds a
                # shard of the *global* micro-batch gradient, so the squared norm is the sum over ranks.
                small = _all_reduce_sum(local)
                b_small = local_samples / k * world
            else:  # local micro-batch gradients: average their squared norms over ranks
                small = _all_reduce_sum(local) / world
                b_small = local_samples / k
            b_big = local_samples * world
            if not bad and any(s != sizes[0] for s in sizes):
                warning_cache.warn("GradientNoiseScale: unequal micro-batch sizes; using their mean as b_small.",
                                   category=ScalingWarning)
        else:
            if not self._pe_sq:
                return
            local_sum = torch.stack(self._pe_sq).sum() * (float(k * k) * poison)
            if _dist_ready():
                n = torch.full((), local_samples, dtype=local_sum.dtype, device=local_sum.device)  # fill, not H2D
                totals = _all_reduce_sum(torch.stack([local_sum, n]))
                small = totals[0] / totals[1]
            else:  # one process: the sample count is already a host number
                small = local_sum / local_samples
            b_small, b_big = 1.0, local_samples * world
        if inv2 is not None:
            small = small * inv2
        self.estimator.update(small, big, b_small=b_small, b_big=b_big, step=trainer.global_step)

    # ------------------------------------------------------------------ read-out
    def _tokens_per_sample(self, traj: LossTrajectory | None) -> Optional[float]:
        if self.tokens_per_sample is not None:
            return self.tokens_per_sample
        return None if traj is None else traj.tokens_per_sample

    def _log(self, trainer: "pl.Trainer", step: int) -> None:
        traj = find_callback(trainer, LossTrajectory)
        r = self.estimator.read(tokens_per_sample=self._tokens_per_sample(traj))  # one host sync per interval
        self.last_reading = r
        if r.n_steps == 0:
            self._give_up_if_no_batch_size(trainer, r)
            return
        metrics = {
            "grad_sq_norm": r.grad_sq_norm,
            "trace_sigma": r.trace_sigma,
            "skipped_steps": float(r.n_skipped),
        }
        if math.isfinite(r.b_simple) and r.b_simple > 0:
            metrics["b_simple"] = r.b_simple
            metrics["batch_over_bsimple"] = r.b_big / r.b_simple
            if math.isfinite(r.b_simple_tokens):
                metrics["b_simple_tokens"] = r.b_simple_tokens
            if math.isfinite(r.ci_low):
                metrics["b_simple_ci_low"] = r.ci_low
                metrics["b_simple_ci_high"] = r.ci_high
        metrics = {self.log_prefix + k: v for k, v in metrics.items()}
        for lg in trainer.loggers:
            lg.log_metrics(metrics, step=step)
        if traj is not None and self.log_prefix == "gns/":  # one series per run history
            traj.record_gns(step, r.b_simple, r.grad_sq_norm, r.trace_sigma)

    def _give_up_if_no_batch_size(self, trainer: "pl.Trainer", r: GNSReading) -> None:
        """Under DDP, stop measuring on every rank when no step so far could be measured because some rank never
        had a batch size (its windows poisoned every step): hooks and all-reduces would cost the run for nothing.

        The estimator's counts are the same on every rank (its statistics are all-reduced), so every rank gets here
        at the same step and takes part in the one collective that asks whether a rank's batch sizes failed.
        """
        if self._world == 1 or r.n_skipped == 0:
            return
        if trainer.strategy.reduce_boolean_decision(self._warned_size, all=False):
            rank_zero_warn(f"GradientNoiseScale: none of the first {r.n_skipped} measured steps had a batch size on "
                           "every rank (see the rank's warning); pass `batch_size_fn`. Disabled.",
                           category=ScalingWarning)
            self._disable()

    @override
    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self._enabled:  # final read-out for programmatic use (one host sync, once)
            self.last_reading = self.estimator.read(
                tokens_per_sample=self._tokens_per_sample(find_callback(trainer, LossTrajectory)))

    # ------------------------------------------------------------------ state
    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "estimator": self.estimator.state_dict(),
            "method_used": self.method_used,
            "n_partial_windows": self.n_partial_windows,
            "measure_every": self.measure_every if self._calibrated else None,
            "measured_overhead": self.measured_overhead,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.measure_every_n_steps == "auto":  # the checkpoint's cadence continues (a fixed one given wins)
            if "measure_every" in state_dict:
                every = state_dict["measure_every"]
            else:  # saved before 0.3, which measured one step in n at decay ema_decay ** n
                every = _every_from_decay(state_dict.get("estimator", {}).get("ema_decay"), self.ema_decay)
            self._calibrated = bool(every)  # None: saved while still timing, which starts again
            self._set_every(int(every) if every else 2)
            self.measured_overhead = state_dict.get("measured_overhead") if every else None
        if "estimator" in state_dict:
            self.estimator.load_state_dict(state_dict["estimator"])
        self.n_partial_windows = int(state_dict.get("n_partial_windows", 0))
