"""The Lightning-free recorder behind :class:`~lightning_scaling.callbacks.LossTrajectory`.

:class:`LossRecorder` keeps one record per optimizer step (step, mean micro-batch loss, samples and tokens consumed
before it, LR per parameter group) plus the GNS and validation readings. Losses stay on their device in a pending
list until :meth:`LossRecorder.flush` copies a chunk to the host, so recording costs no per-step host-device
synchronisation; under DDP the caller passes the chunk's reduction (one collective per chunk). The callback only
maps Lightning's hooks onto :meth:`~LossRecorder.micro_batch`, :meth:`~LossRecorder.optimizer_step`,
:meth:`~LossRecorder.add_loss` and :meth:`~LossRecorder.end_micro_batch`, as ``ThroughputMonitor`` does over
fabric's ``Throughput``.

Example::

    >>> import torch
    >>> rec = LossRecorder(counts_tokens=True)
    >>> for step in range(3):
    ...     rec.micro_batch(step, samples=4, tokens=32)
    ...     rec.optimizer_step([0.1])
    ...     rec.add_loss(torch.tensor(3.0 - step))
    ...     rec.end_micro_batch(step, device="cpu")
    True
    True
    True
    >>> rec.flush()
    0
    >>> h = rec.history(name="run")
    >>> h.loss.tolist(), h.tokens.tolist(), rec.batch_size
    ([3.0, 2.0, 1.0], [0.0, 32.0, 64.0], 4.0)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from lightning_scaling.history import AppendArray, RunHistory

__all__ = ["LossRecorder"]

GNS_KEYS = ("step", "b_simple", "grad_sq_norm", "trace_sigma")
#: ``(losses, counts) -> (losses, counts)`` reduced over ranks: mean of the losses, sum of the counts.
Reduce = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def _tensor(column: AppendArray) -> torch.Tensor:
    return torch.from_numpy(column.view().copy())


def _numpy(values: Any) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().numpy()
    return np.asarray(values)


class LossRecorder:
    """Per-optimizer-step records of one run, device-side until flushed (see the module docstring).

    Args:
        counts_tokens: tokens are counted (else the tokens column is NaN).
    """

    def __init__(self, *, counts_tokens: bool) -> None:
        self.counts_tokens = counts_tokens
        # Host-side, flushed records (global over ranks), in numpy columns: a 1M-step run stays ~50 MB.
        self.step = AppendArray(np.int64)
        self.loss = AppendArray(np.float64)
        self.samples = AppendArray(np.float64)  # cumulative, before the step
        self.tokens = AppendArray(np.float64)
        self.lr = AppendArray(np.float64, width=1)  # one column per parameter group
        self.samples_total = 0.0
        self.tokens_total = 0.0
        self.gns = {k: AppendArray(np.int64 if k == "step" else np.float64) for k in GNS_KEYS}
        self.val = {k: AppendArray(np.int64 if k == "step" else np.float64) for k in ("step", "loss")}
        self.batch_size: float | None = None  # samples per optimizer step, global (first measured step)
        # Device-side, pending records of this rank (not yet flushed).
        self._pending_loss: list[torch.Tensor] = []
        self._pending_counts: list[tuple[float, float]] = []  # local (samples, tokens) per step
        self._pending_step: list[int] = []
        self._pending_lr: list[list[float]] = []
        self._close_window()

    def _close_window(self) -> None:
        self._win_loss: torch.Tensor | None = None
        self._win_micro = 0
        self._win_samples = 0.0
        self._win_tokens = 0.0
        self._win_step: int | None = None
        self._win_lr: list[float] | None = None
        self._stepped = False

    @property
    def n_pending(self) -> int:
        """Optimizer steps recorded on the device and not flushed yet."""
        return len(self._pending_loss)

    # ------------------------------------------------------------------ recording (the training hot path)
    def micro_batch(self, step: int, *, samples: float, tokens: float) -> None:
        """A micro-batch starts at optimizer step ``step`` with ``samples`` samples and ``tokens`` tokens."""
        if self._win_step is None:
            self._win_step = step
        self._win_samples += samples
        self._win_tokens += tokens

    def optimizer_step(self, lrs: list[float]) -> None:
        """The optimizer is about to step with these per-group LRs (the first call of a window counts)."""
        if self._win_lr is None:
            self._win_lr = lrs
        self._stepped = True

    def add_loss(self, value: torch.Tensor) -> None:
        """A micro-batch's loss, already undone from any division by the accumulation (stays on its device)."""
        self._win_loss = value if self._win_loss is None else self._win_loss + value
        self._win_micro += 1

    def end_micro_batch(self, fallback_step: int, *, device: Any) -> bool:
        """Close the window when the optimizer stepped; ``True`` then (one pending record more)."""
        if not self._stepped:
            return False
        if self._win_loss is None or self._win_micro == 0:
            mean = torch.tensor(math.nan, device=device)
        else:
            mean = self._win_loss / self._win_micro
        self._pending_loss.append(mean)
        self._pending_counts.append((self._win_samples, self._win_tokens))
        self._pending_step.append(int(self._win_step if self._win_step is not None else fallback_step))
        self._pending_lr.append(self._win_lr or [])
        self._close_window()
        return True

    def record_gns(self, step: int, b_simple: float, grad_sq_norm: float, trace_sigma: float) -> None:
        """Append a gradient-noise-scale reading (a step already recorded, from a resumed run, is skipped)."""
        steps = self.gns["step"].view()
        if steps.size and step <= steps[-1]:
            return
        for key, value in zip(GNS_KEYS, (step, b_simple, grad_sq_norm, trace_sigma)):
            self.gns[key].extend([value])

    def record_val(self, step: int, value: float) -> None:
        """Append a validation loss (once per validation run; an earlier or repeated step is skipped)."""
        steps = self.val["step"].view()
        if steps.size and step <= steps[-1]:
            return
        self.val["step"].extend([step])
        self.val["loss"].extend([value])

    # ------------------------------------------------------------------ flushing
    def flush(self, reduce: Reduce | None = None) -> int:
        """Move pending records to the host (reduced over ranks by ``reduce`` when given).

        Returns:
            How many of the flushed losses are not finite (kept and flagged in the history).
        """
        if not self._pending_loss:
            return 0
        losses = torch.stack(self._pending_loss)
        counts = torch.tensor(self._pending_counts, dtype=torch.float64)
        if reduce is not None:
            losses, counts = reduce(losses, counts)
        host_loss = losses.cpu().double().numpy()
        counts = counts.numpy()
        # Cumulative counts *before* each step: the running totals shifted by one step.
        before = np.cumsum(counts, axis=0) - counts + [self.samples_total, self.tokens_total]
        self.step.extend(self._pending_step)
        self.loss.extend(host_loss)
        self.samples.extend(before[:, 0])
        self.tokens.extend(before[:, 1] if self.counts_tokens else np.full(len(host_loss), math.nan))
        self.append_lr(self._pending_lr)
        self.samples_total += float(counts[:, 0].sum())
        self.tokens_total += float(counts[:, 1].sum())
        if self.batch_size is None and np.any(counts[:, 0] > 0):
            self.batch_size = float(counts[np.argmax(counts[:, 0] > 0), 0])
        self._pending_loss, self._pending_counts, self._pending_step, self._pending_lr = [], [], [], []
        return int(np.sum(~np.isfinite(host_loss)))

    def append_lr(self, rows: Any) -> None:
        """Append per-group LR rows (ragged lists or a 2-D array), widening the columns when groups appear."""
        arr = _numpy(rows) if isinstance(rows, (torch.Tensor, np.ndarray)) else None
        if arr is None or arr.ndim != 2:  # ragged lists (pending rows, version-1 checkpoints); [] = unknown
            rows = [list(r) for r in rows]
            arr = np.full((len(rows), max(map(len, rows), default=1)), math.nan)
            for i, r in enumerate(rows):
                arr[i, : len(r)] = r
        width = max(self.lr.width, arr.shape[1])
        if width > self.lr.width:  # a parameter group was added: earlier rows get NaN for it
            old = self.lr.view()
            self.lr = AppendArray(np.float64, width=width)
            self.lr.extend(np.pad(old, ((0, 0), (0, width - old.shape[1])), constant_values=math.nan))
        self.lr.extend(np.pad(arr, ((0, 0), (0, width - arr.shape[1])), constant_values=math.nan))

    # ------------------------------------------------------------------ reading and state
    def history(self, *, name: str, n_params: float | None = None, tokens_per_sample: float | None = None,
                planned_lr: list[float] | None = None) -> RunHistory:
        """The flushed records as a :class:`~lightning_scaling.history.RunHistory` (copies: callers may change it)."""
        lr_groups = self.lr.view()
        meta: dict[str, Any] = {}
        if lr_groups.shape[1] > 1:
            meta["lr_groups"] = lr_groups.tolist()
        kwargs: dict[str, Any] = {}
        if len(self.gns["step"]):
            kwargs.update({f"gns_{k}": v.view().copy() for k, v in self.gns.items()})
        if len(self.val["step"]):
            kwargs.update(val_step=self.val["step"].view().copy(), val_loss=self.val["loss"].view().copy())
        return RunHistory(
            name=name, n_params=n_params, batch_size=self.batch_size, tokens_per_sample=tokens_per_sample,
            step=self.step.view().copy(), loss=self.loss.view().copy(), samples=self.samples.view().copy(),
            tokens=self.tokens.view().copy() if self.counts_tokens else None, lr=lr_groups[:, 0].copy(),
            planned_lr=planned_lr, meta=meta, **kwargs,
        )

    def state_dict(self) -> dict[str, Any]:
        """The flushed records as CPU tensors (compact, and ``torch.load(weights_only=True)`` reads them)."""
        return {
            "step": _tensor(self.step), "loss": _tensor(self.loss), "samples": _tensor(self.samples),
            "tokens": _tensor(self.tokens), "lr": _tensor(self.lr),
            "samples_total": self.samples_total, "tokens_total": self.tokens_total, "batch_size": self.batch_size,
            "gns": {k: _tensor(v) for k, v in self.gns.items()}, "val": {k: _tensor(v) for k, v in self.val.items()},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Append the records of :meth:`state_dict` (to a fresh recorder)."""
        for key in ("step", "loss", "samples", "tokens"):
            getattr(self, key).extend(_numpy(state_dict.get(key, [])))
        self.append_lr(state_dict.get("lr", []))
        self.samples_total = float(state_dict.get("samples_total", 0.0))
        self.tokens_total = float(state_dict.get("tokens_total", 0.0))
        self.batch_size = state_dict.get("batch_size")
        for store, saved in ((self.gns, state_dict.get("gns", {})), (self.val, state_dict.get("val", {}))):
            for key, values in saved.items():
                if key in store:
                    store[key].extend(_numpy(values))
