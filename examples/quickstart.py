"""Quickstart: train a small byte-level GPT for about a minute on CPU with LossTrajectory attached.

    python examples/quickstart.py [--steps 2400] [--out runs/quickstart]

Data is the Python standard library's own source (no download). At the end it prints where the run's history
and TensorBoard logs are; open them with ``tensorboard --logdir runs/quickstart``.
"""

from __future__ import annotations

import argparse

import lightning.pytorch as pl
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_scaling.callbacks import LossTrajectory
from lightning_scaling.demo.data import StdlibTextDataModule
from lightning_scaling.demo.model import GPT


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2400, help="optimizer steps (about a minute on a 2-core CPU)")
    parser.add_argument("--out", default="runs/quickstart", help="log folder")
    args = parser.parse_args()

    pl.seed_everything(0)
    data = StdlibTextDataModule(block_size=64, batch_size=16)
    model = GPT(n_layer=2, d_model=64, n_head=4, block_size=64, lr=3e-3, warmup_steps=20, max_steps=args.steps)
    traj = LossTrajectory(tokens_per_sample=data.tokens_per_sample, n_params=model.n_params)
    logger = TensorBoardLogger(args.out, name="gpt")
    trainer = pl.Trainer(max_steps=args.steps, accelerator="cpu", devices=1, logger=logger, callbacks=[traj],
                         val_check_interval=50, limit_val_batches=10, enable_checkpointing=False)
    trainer.fit(model, datamodule=data)

    h = traj.history
    print(f"\n{h}")
    print(f"final loss {h.loss[-1]:.3f} nats/byte after {h.step[-1] + 1} steps and {h.tokens[-1]:.3g} tokens")
    print(f"history:     {traj.history_path(trainer)}")
    print(f"tensorboard: tensorboard --logdir {logger.log_dir}")


if __name__ == "__main__":
    main()
