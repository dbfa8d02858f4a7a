"""Would a ``torchmetrics.Metric`` simplify LossTrajectory's device-side loss buffer? Host cost per step, measured.

Records ``steps`` per-step losses (device tensors) with flushes every ``chunk`` steps, two ways:

* ``LossRecorder``: the project's recorder (a list of 0-d tensors, one ``stack`` and host copy per chunk, the
  chunk reduced by one all-reduce under DDP);
* ``CatMetric``: ``torchmetrics.aggregation.CatMetric`` (the list state a per-step buffer needs), ``update`` per
  step and ``compute`` + ``reset`` per chunk (under DDP ``compute`` all-gathers every rank's list).

Both avoid a per-step host sync; the question is only what each costs and what it leaves to write. Run:
``python benchmarks/recorder_vs_metric.py [--device cuda]``; prints the median microseconds per step of each.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from lightning_scaling.recorder import LossRecorder


def _recorder(losses: list[torch.Tensor], chunk: int) -> float:
    rec = LossRecorder(counts_tokens=True)
    t = time.perf_counter()
    for step, loss in enumerate(losses):
        rec.micro_batch(step, samples=8, tokens=8 * 64)
        rec.optimizer_step([1e-3])
        rec.add_loss(loss)
        rec.end_micro_batch(step, device=loss.device)
        if rec.n_pending >= chunk:
            rec.flush()
    rec.flush()
    return (time.perf_counter() - t) / len(losses)


def _metric(losses: list[torch.Tensor], chunk: int) -> float:
    from torchmetrics.aggregation import CatMetric

    metric = CatMetric(nan_strategy="disable").to(losses[0].device)
    host: list[np.ndarray] = []
    t = time.perf_counter()
    for step, loss in enumerate(losses):
        metric.update(loss)
        if (step + 1) % chunk == 0:
            host.append(metric.compute().cpu().numpy())
            metric.reset()
    return (time.perf_counter() - t) / len(losses)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=5000)
    p.add_argument("--chunk", type=int, default=50)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cpu")
    a = p.parse_args()
    losses = [torch.rand((), device=a.device) for _ in range(a.steps)]
    res = {"LossRecorder": [], "CatMetric": []}
    for _ in range(a.repeats):  # interleaved: both under the same machine load
        res["LossRecorder"].append(_recorder(losses, a.chunk))
        res["CatMetric"].append(_metric(losses, a.chunk))
    for name, times in res.items():
        print(f"{name:>12}: {1e6 * float(np.median(times)):7.1f} us/step (median of {a.repeats}, {a.device})")


if __name__ == "__main__":
    main()
