"""Live loss forecast and forecast-based early stopping on the quickstart GPT with a cosine schedule.

    python examples/forecast_cosine.py [--steps 1500] [--target 2.3] [--out runs/forecast_cosine]

A 2-layer byte-level GPT trains on the Python standard library's source (no download) for about a minute on CPU,
with warmup + cosine decay. Three callbacks are attached:

- ``LossTrajectory`` records loss vs steps/tokens and the planned per-step LR schedule;
- ``ScalingForecast`` refits a schedule-aware forecast every 100 steps and logs the predicted final loss with its
  90% band, the steps/tokens/seconds to ``--target`` and the ETA (also shown in the progress bar);
- ``ForecastEarlyStopping`` stops the run if, with 90% confidence, ``--target`` cannot be reached within the
  step budget (try ``--target 1.5`` to see it stop).

At the end it replays the forecast from 30% of the run and prints it, with its 90% band, against the actual
final loss.

Open ``tensorboard --logdir runs/forecast_cosine``: the CUSTOM SCALARS tab's "Forecast" chart shows the latest
forecast and its band over the smoothed observed loss (run ``version_N/forecast``, replaced at each refit) and the
predicted final loss at each refit; IMAGES has the forecast figure of each refit.
"""

from __future__ import annotations

import argparse
import time

import lightning.pytorch as pl
import numpy as np
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_scaling.callbacks.early_stopping import ForecastEarlyStopping
from lightning_scaling.callbacks.forecast import ScalingForecast
from lightning_scaling.callbacks.loss_trajectory import LossTrajectory
from lightning_scaling.demo.data import StdlibTextDataModule
from lightning_scaling.demo.model import GPT
from lightning_scaling.forecast import forecast_run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1500, help="optimizer steps (about a minute on 2 CPU cores)")
    parser.add_argument("--target", type=float, default=2.3, help="target training loss (nats/byte)")
    # every 100 steps (1.5 s here): a cold refit takes 0.3-1 s, so none is skipped while the last one runs
    parser.add_argument("--every", type=int, default=100, help="steps between forecast refits")
    parser.add_argument("--out", default="runs/forecast_cosine", help="log folder")
    args = parser.parse_args()

    pl.seed_everything(0)
    data = StdlibTextDataModule(block_size=64, batch_size=16)
    model = GPT(n_layer=2, d_model=64, n_head=4, block_size=64, lr=3e-3, warmup_steps=20, max_steps=args.steps,
                schedule="cosine", min_lr_ratio=0.1)
    traj = LossTrajectory(tokens_per_sample=data.tokens_per_sample, n_params=model.n_params)
    forecast = ScalingForecast(every_n_steps=args.every, target_loss=args.target, confidence=0.9)
    stop = ForecastEarlyStopping(target_loss=args.target, confidence=0.9, patience=3, min_fraction=0.3)
    logger = TensorBoardLogger(args.out, name="gpt")
    trainer = pl.Trainer(max_steps=args.steps, accelerator="cpu", devices=1, logger=logger,
                         callbacks=[traj, forecast, stop], val_check_interval=100, limit_val_batches=10,
                         enable_checkpointing=False, log_every_n_steps=10)
    t0 = time.perf_counter()
    trainer.fit(model, datamodule=data)
    wall = time.perf_counter() - t0

    h = traj.history
    s = forecast.summary
    tail = max(1, len(h) // 20)  # a single step's loss is noisy: compare with the mean of the last 5%
    actual = float(np.nanmean(h.loss[-tail:]))
    print(f"\ntrained {h.step[-1] + 1} steps in {wall:.1f} s; final loss (mean of the last {tail} steps) "
          f"{actual:.3f} nats/byte")
    # forecast/final_loss is logged at each refit's step: what was predicted when?
    acc = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0})
    acc.Reload()
    tag = "forecast/final_loss"
    predicted = {e.step: e.value for e in acc.Scalars(tag)} if tag in acc.Tags()["scalars"] else {}
    finished = h.step[-1] + 1 >= args.steps  # stopped early: the loss at the planned end was never seen
    for at, pred in sorted(predicted.items()):  # logged when each refit was applied (background: a few steps late)
        versus = f"({pred / actual - 1:+.1%})" if finished else "(the run stopped before its end: no actual)"
        print(f"  forecast logged at step {at:5d} ({at / args.steps:4.0%} seen): final loss {pred:.3f} {versus}")
    if forecast.forecast is not None:
        fc = forecast.forecast
        print(f"forecast ({fc.method}, observed until step {fc.observed_until}): final loss {fc.final_loss:.3f} "
              f"[{fc.final_lower:.3f}, {fc.final_upper:.3f}] at step {forecast.resolved_horizon}")
        print(f"steps to target {args.target}: {s.get('forecast/steps_to_target', float('nan')):.0f}, "
              f"ETA {s.get('forecast/eta_seconds', float('nan')):.1f} s")
    else:
        print(f"no forecast was made ({forecast.last_error})")
    # The question a practitioner asks at 30% of a run: where will it end, and how sure is that? Replayed on the
    # finished run's history, so the answer can be checked against what the run then did.
    try:
        f30 = forecast_run(h.truncate(int(0.3 * args.steps)), horizon=args.steps)
    except ValueError as err:
        print(f"no forecast from 30% of the run: {err}")
        return
    end = int(h.step[-1]) + 1 if not finished else args.steps  # compare where the run ended, at the same steps
    at_end = [float(np.interp(end, f30.steps, c)) for c in (f30.loss, f30.lower, f30.upper)]
    inside = at_end[1] <= actual <= at_end[2]
    where = "final loss" if finished else f"loss at step {end} (the run stopped there)"
    print(f"forecast from 30% of the run ({f30.method}): {where} {at_end[0]:.3f} 90% band "
          f"[{at_end[1]:.3f}, {at_end[2]:.3f}]; actual {actual:.3f} ({at_end[0] / actual - 1:+.1%}, "
          f"{'inside' if inside else 'OUTSIDE'} the band)")
    print(f"refits: {forecast.n_refits} ok, {forecast.n_failures} failed; last refit "
          f"{1e3 * (forecast.refit_seconds or 0):.1f} ms, worst training-thread stall "
          f"{1e3 * forecast.max_stall_seconds:.1f} ms, background={forecast.background_active}; "
          f"step time {1e3 * (forecast.step_seconds or 0):.1f} ms")
    print(f"early stopping: {stop.stopped_reason or 'not triggered'}")
    print(f"tensorboard: tensorboard --logdir {args.out}")


if __name__ == "__main__":
    main()
