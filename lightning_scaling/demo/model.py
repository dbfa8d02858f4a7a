"""A small, readable GPT (nanoGPT-style) LightningModule for byte-level language modelling.

Size is set by depth and width; the non-embedding parameter count follows Kaplan et al. 2020,
``N = 12 * n_layer * d_model**2`` (attention 4·d², MLP 8·d² per layer; biases, LayerNorms and embeddings excluded).
"""

from __future__ import annotations

import math

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GPT", "LRSchedule", "kaplan_n_params"]


def kaplan_n_params(n_layer: int, d_model: int) -> int:
    """Kaplan et al.'s non-embedding parameter count ``N = 12 * n_layer * d_model**2``.

    Example::

        >>> kaplan_n_params(2, 64)
        98304
    """
    return 12 * int(n_layer) * int(d_model) ** 2


class LRSchedule:
    """Linear warmup, then a LambdaLR factor: cosine to ``min_ratio``, constant, or WSD.

    ``"wsd"`` (warmup-stable-decay) holds the peak, then decays linearly to ``min_ratio`` over the last
    ``cooldown_fraction`` of ``max_steps``. A callable object (not a lambda) so it pickles with checkpoints and
    deep-copies for LR-schedule simulation.

    Example::

        >>> f = LRSchedule(warmup_steps=10, max_steps=100, kind="cosine", min_ratio=0.1)
        >>> round(f(0), 3), round(f(10), 3), round(f(100), 3)
        (0.1, 1.0, 0.1)
        >>> w = LRSchedule(warmup_steps=10, max_steps=100, kind="wsd", min_ratio=0.0, cooldown_fraction=0.2)
        >>> round(w(79), 3), round(w(90), 3), round(w(100), 3)
        (1.0, 0.5, 0.0)
    """

    KINDS = ("cosine", "constant", "wsd")

    def __init__(self, *, warmup_steps: int, max_steps: int, kind: str = "cosine", min_ratio: float = 0.1,
                 cooldown_fraction: float = 0.2) -> None:
        if kind not in self.KINDS:
            raise ValueError(f"schedule must be one of {self.KINDS}, got {kind!r}")
        if not 0.0 < cooldown_fraction <= 1.0:
            raise ValueError(f"cooldown_fraction must be in (0, 1], got {cooldown_fraction}")
        self.warmup_steps = int(warmup_steps)
        self.max_steps = int(max_steps)
        self.kind = kind
        self.min_ratio = float(min_ratio)
        self.cooldown_fraction = float(cooldown_fraction)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.kind == "constant":
            return 1.0
        if self.kind == "wsd":
            start = self.max_steps * (1.0 - self.cooldown_fraction)
            progress = min(max((step - start) / max(self.max_steps - start, 1.0), 0.0), 1.0)
            return 1.0 + (self.min_ratio - 1.0) * progress
        span = max(self.max_steps - self.warmup_steps, 1)
        progress = min(max((step - self.warmup_steps) / span, 0.0), 1.0)
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_head: int) -> None:
        super().__init__()
        self.n_head = n_head
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.proj = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).contiguous().view(b, t, c))


class Block(nn.Module):
    def __init__(self, d_model: int, n_head: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_head)
        self.ln2 = nn.LayerNorm(d_model)
        self.fc = nn.Linear(d_model, 4 * d_model, bias=False)
        self.out = nn.Linear(4 * d_model, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT(pl.LightningModule):
    """Decoder-only transformer over bytes (vocabulary 256), trained with AdamW and warmup + cosine LR.

    ``training_step`` returns the mean next-byte cross-entropy in nats and logs it as ``train_loss``;
    ``validation_step`` logs ``val_loss``. The LR schedule steps per optimizer step.

    Args:
        n_layer: Number of transformer blocks.
        d_model: Width.
        n_head: Attention heads (must divide ``d_model``).
        block_size: Maximum context length.
        vocab_size: Vocabulary size (256 for bytes).
        lr: Peak learning rate.
        warmup_steps: Linear warmup steps.
        max_steps: Steps over which the cosine schedule decays (match ``Trainer(max_steps=...)``).
        schedule: ``"cosine"``, ``"constant"`` or ``"wsd"`` (after warmup; see :class:`LRSchedule`).
        min_lr_ratio: Final LR as a fraction of ``lr`` for the cosine and WSD schedules.
        cooldown_fraction: Fraction of ``max_steps`` over which the WSD schedule decays linearly.
        weight_decay: AdamW weight decay on matrices (not on LayerNorms, biases or embeddings).
        betas: AdamW betas.
        tie_embeddings: Share the input embedding with the output head.

    Example::

        >>> model = GPT(n_layer=2, d_model=64, n_head=4, block_size=32)
        >>> model.n_params
        98304
        >>> x = torch.randint(0, 256, (2, 32))
        >>> tuple(model(x).shape)
        (2, 32, 256)
    """

    def __init__(
        self,
        n_layer: int = 2,
        d_model: int = 64,
        n_head: int = 4,
        block_size: int = 64,
        vocab_size: int = 256,
        lr: float = 3e-3,
        warmup_steps: int = 20,
        max_steps: int = 1000,
        schedule: str = "cosine",
        min_lr_ratio: float = 0.1,
        cooldown_fraction: float = 0.2,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        tie_embeddings: bool = True,
    ) -> None:
        super().__init__()
        if n_layer < 1 or d_model < 1 or n_head < 1 or block_size < 1 or vocab_size < 1:
            raise ValueError("n_layer, d_model, n_head, block_size and vocab_size must all be >= 1")
        if d_model % n_head:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_head ({n_head})")
        if lr <= 0:
            raise ValueError(f"lr must be positive, got {lr}")
        if warmup_steps < 0 or max_steps < 1:
            raise ValueError(f"need warmup_steps >= 0 and max_steps >= 1, got {warmup_steps}, {max_steps}")
        if schedule not in LRSchedule.KINDS:
            raise ValueError(f"schedule must be one of {LRSchedule.KINDS}, got {schedule!r}")
        self.save_hyperparameters()
        self.n_layer, self.d_model, self.block_size = int(n_layer), int(d_model), int(block_size)
        self.tok_emb = nn.Embedding(vocab_size, d_model)
        self.pos_emb = nn.Embedding(block_size, d_model)
        self.blocks = nn.ModuleList(Block(d_model, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        if tie_embeddings:
            self.head.weight = self.tok_emb.weight
        self.apply(self._init_weights)
        # GPT-2 scaling of residual projections keeps the residual stream's variance independent of depth.
        for name, p in self.named_parameters():
            if name.endswith(("attn.proj.weight", "out.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    @property
    def n_params(self) -> int:
        """Non-embedding parameter count by Kaplan's convention, ``12 * n_layer * d_model**2``."""
        return kaplan_n_params(self.n_layer, self.d_model)

    def count_non_embedding_params(self) -> int:
        """Actual parameters excluding the token/position embeddings and the (tied or untied) output head.

        Equals :attr:`n_params` plus the LayerNorm parameters (``(4 * n_layer + 2) * d_model``).
        """
        skip = {id(self.tok_emb.weight), id(self.pos_emb.weight), id(self.head.weight)}
        return sum(p.numel() for p in self.parameters() if id(p) not in skip)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        if t > self.block_size:
            raise ValueError(f"sequence length {t} exceeds block_size {self.block_size}")
        pos = torch.arange(t, device=idx.device)
        x = self.tok_emb(idx) + self.pos_emb(pos)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))

    def _loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self.log("val_loss", self._loss(batch), prog_bar=True, sync_dist=True)

    def configure_optimizers(self):
        hp = self.hparams
        decay, no_decay = [], []
        for p in self.parameters():  # parameters() de-duplicates the tied head/embedding weight
            if not p.requires_grad:
                continue
            is_embedding = p is self.tok_emb.weight or p is self.pos_emb.weight
            (decay if p.dim() >= 2 and not is_embedding else no_decay).append(p)
        groups = [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        opt = torch.optim.AdamW(groups, lr=hp.lr, betas=tuple(hp.betas))
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt,
            LRSchedule(warmup_steps=hp.warmup_steps, max_steps=hp.max_steps, kind=hp.schedule,
                       min_ratio=hp.min_lr_ratio, cooldown_fraction=hp.get("cooldown_fraction", 0.2)),
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}
