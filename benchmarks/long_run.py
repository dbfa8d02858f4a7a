"""Checkpoint overhead, resume time and history size of a 1M-step run (issue 12, item 7).

    python benchmarks/long_run.py [--steps 1000000] [--out DIR]

The recorders are filled directly, as training would leave them (no need to train 1M steps): LossTrajectory
with 1M steps of loss, tokens, samples and LR plus a 1M-step planned cosine schedule and a GNS reading every 50
steps; GradientNoiseScale's estimator with 1M raw per-step rows fed through its device-buffer flush. Measured,
best of ``--repeats``:

* checkpoint overhead on the training thread: ``state_dict()`` of both callbacks + ``torch.save`` of them, plus
  what ``on_save_checkpoint`` costs the training thread (the history snapshot; the JSON is written by a thread);
* the time that writer thread takes, and the size of ``history.json``;
* resume: ``torch.load(weights_only=True)`` + ``load_state_dict`` of both callbacks;
* memory held by the columns, and the GNS raw rows kept (bounded by ``max_raw``).

Targets: checkpoint overhead < 1 s, history < 50 MB.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import torch

from lightning_scaling.callbacks import GradientNoiseScale, LossTrajectory


def filled(steps: int) -> tuple[LossTrajectory, GradientNoiseScale]:
    rng = np.random.default_rng(0)
    traj = LossTrajectory(tokens_per_sample=1024, name="long")
    s = np.arange(steps)
    traj._step.extend(s)
    traj._loss.extend(2.0 + 3.0 * (1.0 + s / 100.0) ** -0.3 * np.exp(rng.normal(0.0, 0.01, steps)))
    traj._samples.extend(s * 256.0)
    traj._tokens.extend(s * 256.0 * 1024)
    lr = 3e-4 * 0.5 * (1.0 + np.cos(math.pi * s / steps))
    traj._lr.extend(lr[:, None])
    traj._planned_lr = lr.tolist()
    traj._batch_size, traj.n_params = 256.0, 1.2e8
    traj._samples_total, traj._tokens_total = steps * 256.0, steps * 256.0 * 1024
    traj._n_logged = steps
    for step in range(49, steps, 50):
        traj.record_gns(step, 300.0, 1.0, 300.0)
    gns = GradientNoiseScale(method="accumulation")
    est = gns.estimator
    for start in range(0, steps, est.buffer_size):  # what the device-buffer flushes append
        n = min(est.buffer_size, steps - start)
        est._append_raw(rng.random((n, 6)), np.arange(start, start + n))
    return traj, gns


def best(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None, help="folder for history.json (default: a temporary one)")
    args = parser.parse_args()
    out = Path(args.out or tempfile.mkdtemp())
    traj, gns = filled(args.steps)
    path = out / "scaling" / "history.json"
    traj._history_path = path
    rank0 = types.SimpleNamespace(is_global_zero=True)

    def checkpoint() -> bytes:
        buf = io.BytesIO()
        torch.save({"callbacks": {traj.state_key: traj.state_dict(), gns.state_key: gns.state_dict()}}, buf)
        return buf.getvalue()

    t_ckpt, blob = best(checkpoint, args.repeats)

    def snapshot() -> None:
        traj._write(rank0, wait=False)  # what the training thread pays in on_save_checkpoint

    t_snap, _ = best(snapshot, args.repeats)
    t0 = time.perf_counter()
    traj._join_writer()  # waits for the last writer thread
    t_thread = time.perf_counter() - t0
    t_json, _ = best(lambda: traj.history.to_json(path), 1)

    def resume() -> None:
        state = torch.load(io.BytesIO(blob), weights_only=True)["callbacks"]
        LossTrajectory(tokens_per_sample=1024, name="long").load_state_dict(state[traj.state_key])
        GradientNoiseScale(method="accumulation").load_state_dict(state[gns.state_key])

    t_resume, _ = best(resume, args.repeats)
    t_read, back = best(lambda: __import__("lightning_scaling").RunHistory.from_json(path), 1)
    assert np.array_equal(back.loss, traj.history.loss) and np.array_equal(back.planned_lr, traj.history.planned_lr)
    columns = sum(c._buf.nbytes for c in (traj._step, traj._loss, traj._samples, traj._tokens, traj._lr))
    raw_rows = len(gns.estimator._raw_steps)
    result = {
        "steps": args.steps,
        "checkpoint_seconds": round(t_ckpt + t_snap, 3),
        "state_dict_and_torch_save_seconds": round(t_ckpt, 3),
        "history_snapshot_seconds": round(t_snap, 3),
        "history_writer_thread_seconds": round(max(t_thread, t_json), 3),
        "checkpoint_callback_state_mb": round(len(blob) / 1e6, 1),
        "history_json_mb": round(path.stat().st_size / 1e6, 1),
        "history_json_read_seconds": round(t_read, 3),
        "resume_load_seconds": round(t_resume, 3),
        "recorder_columns_mb": round(columns / 1e6, 1),
        "gns_raw_rows_kept": raw_rows,
        "gns_raw_stride": gns.estimator.raw_stride,
        "gns_raw_mb": round(gns.estimator._raw_host._buf.nbytes / 1e6, 1),
    }
    print(json.dumps(result, indent=1))
    ok = result["checkpoint_seconds"] < 1.0 and result["history_json_mb"] < 50
    print("targets (checkpoint < 1 s, history < 50 MB):", "met" if ok else "NOT met")


if __name__ == "__main__":
    main()
