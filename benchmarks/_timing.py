"""Shared timing helpers for the benchmarks: per-step wall time inside Lightning, with A/B interleaved per step.

Interleaving per optimizer step (callback active on even steps only) puts "with" and "without" under the same
machine load, so the ratio survives a noisy, shared CPU far better than alternating whole runs.
"""

from __future__ import annotations

import time

import lightning.pytorch as pl
import numpy as np
import torch

_PER_BATCH = ("on_train_batch_start", "on_before_backward", "on_after_backward", "on_before_optimizer_step",
              "on_before_zero_grad", "on_train_batch_end")
_ALWAYS = ("setup", "teardown", "on_fit_start", "on_fit_end", "on_train_start", "on_train_end",
           "on_train_epoch_start", "on_train_epoch_end", "on_validation_end", "on_save_checkpoint",
           "on_exception", "state_dict", "load_state_dict")


class Interleaved(pl.Callback):
    """Runs ``inner``'s per-batch hooks only on optimizer steps where ``global_step % 2 == 0``."""

    def __init__(self, inner: pl.Callback) -> None:
        self.inner = inner
        self.active = False
        for name in _ALWAYS:
            setattr(self, name, getattr(inner, name))
        for name in _PER_BATCH:
            setattr(self, name, self._gate(getattr(inner, name), name == "on_train_batch_start"))

    @property
    def state_key(self) -> str:
        return "Interleaved[" + self.inner.state_key + "]"

    def _gate(self, hook, decides: bool):
        def call(trainer, *args, **kwargs):
            if decides:
                self.active = trainer.global_step % 2 == 0
            if self.active:
                return hook(trainer, *args, **kwargs)
        return call


class StepTimer(pl.Callback):
    """Wall time of each batch (start to end) keyed by the step parity; syncs CUDA only around the timing."""

    def __init__(self) -> None:
        self.times: dict[int, list[float]] = {0: [], 1: []}
        self._t0 = 0.0
        self._parity = 0

    def _sync(self, pl_module: pl.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize()

    def start(self, trainer, pl_module) -> None:
        self._sync(pl_module)
        self._parity = trainer.global_step % 2
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._sync(pl_module)
        self.times[self._parity].append(time.perf_counter() - self._t0)

    def ratio(self, warmup: int = 4) -> tuple[float, float, float, float]:
        """(median paired ratio on/off, 25th and 75th percentile of pair ratios, median off time in s)."""
        on, off = np.asarray(self.times[0][warmup:]), np.asarray(self.times[1][warmup:])
        n = min(on.size, off.size)
        pairs = on[:n] / off[:n]
        lo, hi = np.percentile(pairs, [25, 75])
        # Ratio of medians is the headline; pair-ratio quartiles show the noise.
        return float(np.median(on) / np.median(off)), float(lo), float(hi), float(np.median(off))


def timer_callbacks(inner: pl.Callback | None) -> tuple[StepTimer, list[pl.Callback]]:
    """A StepTimer placed last (so it times the other callbacks) and the inner callback gated per step."""
    timer = StepTimer()
    cbs: list[pl.Callback] = [] if inner is None else [Interleaved(inner)]
    return timer, [_StartClock(timer), *cbs, timer]


class _StartClock(pl.Callback):
    def __init__(self, timer: StepTimer) -> None:
        self.timer = timer

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.timer.start(trainer, pl_module)


def report(name: str, result: tuple[float, float, float, float]) -> str:
    r, lo, hi, base = result
    return f"{name:<32} ratio {r:.4f}  (pair-ratio IQR {lo:.3f}-{hi:.3f}; step without {base * 1e3:.2f} ms)"
