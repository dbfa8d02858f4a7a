"""Small Lightning modules shared by the callback tests."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset


class TinyLM(pl.LightningModule):
    """Embedding + linear next-token model on a fixed synthetic token stream (deterministic, CPU-fast)."""

    def __init__(self, vocab: int = 16, dim: int = 8, lr: float = 0.05, schedule: str = "constant",
                 max_steps: int = 100, nan_at: int | None = None):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, dim)
        self.proj = torch.nn.Linear(dim, vocab)
        self.lr, self.schedule, self.max_steps, self.nan_at = lr, schedule, max_steps, nan_at

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.cross_entropy(self.proj(self.emb(x)).flatten(0, 1), y.flatten())
        if self.nan_at is not None and self.global_step == self.nan_at:
            # NaN value with finite gradients (like an fp16 overflow step the scaler skips).
            loss = loss + float("nan")
        return loss

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.lr)
        if self.schedule == "constant":
            return opt
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.max_steps, eta_min=self.lr / 10)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def token_loader(n: int = 64, seq: int = 6, batch_size: int = 4, vocab: int = 16, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    data = torch.randint(0, vocab, (n, seq + 1), generator=g)
    return DataLoader(TensorDataset(data[:, :-1], data[:, 1:]), batch_size=batch_size, shuffle=False)


def trainer_kwargs(tmp_path, **kw):
    base = dict(default_root_dir=tmp_path, accelerator="cpu", devices=1, enable_progress_bar=False,
                enable_model_summary=False, enable_checkpointing=False, logger=False)
    base.update(kw)
    return base


class RankHistoryDump(pl.Callback):
    """Writes each rank's LossTrajectory history to its own file (spawned ranks can't return objects)."""

    def __init__(self, out_dir: str):
        self.out_dir = out_dir

    def on_train_end(self, trainer, pl_module):
        from lightning_scaling.callbacks import LossTrajectory

        traj = next(c for c in trainer.callbacks if isinstance(c, LossTrajectory))
        traj.history.to_json(f"{self.out_dir}/rank{trainer.global_rank}.json")
