"""Training-step time of a small GPT with and without LossTrajectory, interleaved per step in one process.

    python benchmarks/overhead.py [--steps 400] [--device cpu|cuda] [--precision 32-true|bf16-mixed]

The callback runs on even optimizer steps only (see ``_timing.Interleaved``; it flushes every 25 of its
steps = every 50 training steps, the default cadence), so "with" and "without" steps alternate under the same
load. Reported: median step time with / without. Target <= 1.01.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger

sys.path.insert(0, str(Path(__file__).parent))
from _timing import report, timer_callbacks  # noqa: E402

from lightning_scaling.callbacks import LossTrajectory  # noqa: E402
from lightning_scaling.demo.data import StdlibTextDataModule  # noqa: E402
from lightning_scaling.demo.model import GPT  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="32-true")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--block", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--out", default="/tmp/ls_bench_overhead")
    args = p.parse_args()

    torch.manual_seed(0)
    data = StdlibTextDataModule(block_size=args.block, batch_size=args.batch)
    model = GPT(n_layer=args.layers, d_model=args.width, n_head=max(1, args.width // 64), block_size=args.block,
                max_steps=args.steps)
    traj = LossTrajectory(tokens_per_sample=data.tokens_per_sample, flush_every_n_steps=25)
    timer, callbacks = timer_callbacks(traj)
    trainer = pl.Trainer(max_steps=args.steps, accelerator=args.device, devices=1, precision=args.precision,
                         logger=TensorBoardLogger(args.out, name="bench"), callbacks=callbacks,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         limit_val_batches=0, log_every_n_steps=50)
    trainer.fit(model, datamodule=data)
    dev = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {dev}; GPT {args.layers} layers x {args.width} (N={model.n_params:,}), batch "
          f"{args.batch}x{args.block}, {args.precision}, {args.steps} steps")
    print(report("LossTrajectory", timer.ratio()))
    assert len(traj.history) == args.steps // 2  # it recorded exactly its own steps


if __name__ == "__main__":
    main()
