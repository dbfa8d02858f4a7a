"""Training-step time of a GPT with and without GradientNoiseScale, per method, interleaved in one process.

    python benchmarks/gns_overhead.py                                   # CPU, tiny GPT, all single-process methods
    python benchmarks/gns_overhead.py --methods none,accumulation,per_example,ddp   # + 2-process gloo DDP (CPU)
    python benchmarks/gns_overhead.py --device cuda --precision bf16-mixed --preset gpt85m [--sync-debug]

Single-process methods are interleaved at the optimizer-step level inside one fit: the callback's hooks are
attached and detached in an A-B-B-A pattern (A = without, B = with), each optimizer step (the whole accumulation
window) is timed inside Lightning, and each ABBA block gives one ratio (B1 + B2) / (A1 + A2); the first
``--warmup`` steps are dropped. Reported: median of the block ratios, with the interquartile range. This cancels
slow drifts of a shared machine far better than alternating whole fits. ``ddp`` cannot detach its comm hook, so
it alternates whole (spawned) fits instead, ``--rounds`` times.

* ``none`` is an A/A comparison (no callback on either side): its spread is the noise level of the machine.
* ``accumulation`` runs both sides with ``--accumulate`` micro-batches per step (the cost of accumulating itself is
  not charged to the callback: it is only free if the run already accumulates).
* ``per_example`` (LayerNorm LN-proxy) and ``per_example_linear`` (LN + exact Linear norms) run with one micro-batch.
* ``ddp`` runs 2 processes (``ddp_spawn``; gloo on CPU) with one micro-batch per step.

Targets (issue 3): ddp and accumulation <= 1.02, per_example <= 1.05 on CUDA. ``--sync-debug`` (CUDA) turns on
``torch.cuda.set_sync_debug_mode("warn")`` while the callback runs, to show any host-device synchronisation.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_scaling.callbacks.gns import GradientNoiseScale

try:
    from lightning_scaling.demo.model import GPT
except ImportError:  # pragma: no cover - fallback if the demo package is missing
    GPT = None

PRESETS = {
    # name: (n_layer, d_model, n_head, block, micro_batch)
    "demo": (2, 64, 2, 64, 16),  # the demo GPT and batch (issue 13)
    "tiny": (2, 128, 4, 128, 8),
    "small": (4, 256, 4, 256, 8),
    "gpt50m": (8, 768, 12, 512, 16),  # 12·8·768² ≈ 57M non-embedding parameters
    "gpt85m": (12, 768, 12, 512, 16),  # GPT-2 small, ≈ 85M non-embedding parameters
}

METHODS = ("none", "accumulation", "per_example", "per_example_linear", "ddp")


class WindowTimer(pl.Callback):
    """Wall time of each optimizer step: first micro-batch start to the batch end that stepped (rank 0 writes)."""

    def __init__(self, out: str | None = None) -> None:
        self.times: list[float] = []
        self.out = out
        self._t0: float | None = None
        self._step = 0

    def _sync(self, pl_module) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self._t0 is None:
            self._sync(pl_module)
            self._t0 = time.perf_counter()
            self._step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step != self._step:  # an optimizer step happened in this batch
            self._sync(pl_module)
            self.times.append(time.perf_counter() - self._t0)
            self._t0 = None

    def on_train_end(self, trainer, pl_module):
        if self.out and trainer.is_global_zero:
            Path(self.out).write_text(json.dumps(self.times))


def make_model(preset: str, seed: int = 0):
    n_layer, d_model, n_head, block, _ = PRESETS[preset]
    torch.manual_seed(seed)
    if GPT is None:
        raise SystemExit("lightning_scaling.demo.model.GPT is not available")
    return GPT(n_layer=n_layer, d_model=d_model, n_head=n_head, block_size=block, max_steps=10**6, warmup_steps=0)


class ABBAToggle(pl.Callback):
    """Attaches the GNS hooks on B steps and detaches them on A steps (pattern A B B A), timing every step."""

    def __init__(self, gns: GradientNoiseScale | None) -> None:
        self.gns = gns
        self.records: list[tuple[bool, float]] = []
        self._t0: float | None = None
        self._step = 0
        self._on = False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self._t0 is not None:  # inside an accumulation window
            return
        self._step = trainer.global_step
        self._on = (self._step % 4) in (1, 2)
        gns = self.gns
        if gns is not None and gns.method_used is not None:
            if self._on and not gns._handles:
                gns._tracked = gns._install_local_hooks(pl_module)
                gns._enabled = True
            elif not self._on and gns._handles:
                gns._remove_hooks()
                gns._enabled = False
            gns._reset_window()
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize()
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step != self._step:
            if pl_module.device.type == "cuda":
                torch.cuda.synchronize()
            self.records.append((self._on, time.perf_counter() - self._t0))
            self._t0 = None


def _trainer(args, k, callbacks, tmp, **extra):
    return pl.Trainer(
        accelerator=args.device, precision=args.precision, max_steps=args.steps, accumulate_grad_batches=k,
        callbacks=callbacks, logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, limit_val_batches=0, default_root_dir=tmp, **extra,
    )


def _loader(args, k, world=1):
    _, _, _, block, micro = PRESETS[args.preset]
    n = micro * k * (args.steps + 2) * world
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 256, (n, block + 1), generator=g)
    return DataLoader(TensorDataset(tokens[:, :-1], tokens[:, 1:]), batch_size=micro, shuffle=False)


def _make_gns(method: str) -> GradientNoiseScale:
    cb_method = "per_example" if method.startswith("per_example") else method
    layers = "norm+linear" if method == "per_example_linear" else "norm"
    # every step measured: this benchmark times a measured step (the default cadence's choice rests on that cost)
    return GradientNoiseScale(cb_method, per_example_layers=layers, measure_every_n_steps=1, log_every_n_steps=50)


def run_interleaved(model, args, method: str, tmp: str) -> tuple[list[float], float]:
    """One fit with per-step ABBA toggling; returns the block ratios and the median A step time."""
    k = args.accumulate if method == "accumulation" else 1
    gns = None if method == "none" else _make_gns(method)
    toggle = ABBAToggle(gns)
    callbacks = [toggle] + ([gns] if gns is not None else [])
    sync_debug = args.sync_debug and gns is not None and args.device == "cuda"
    if sync_debug:
        torch.cuda.set_sync_debug_mode("warn")
    try:
        _trainer(args, k, callbacks, tmp, devices=1).fit(model, _loader(args, k))
    finally:
        if sync_debug:
            torch.cuda.set_sync_debug_mode(0)
    rec = toggle.records
    start = -(-args.warmup // 4) * 4  # whole ABBA blocks after warm-up
    ratios = []
    for i in range(start, len(rec) - 3, 4):
        (a1, ta1), (b1, tb1), (b2, tb2), (a2, ta2) = rec[i : i + 4]
        assert not a1 and b1 and b2 and not a2
        ratios.append((tb1 + tb2) / (ta1 + ta2))
    base = statistics.median(t for on, t in rec[start:] if not on)
    return ratios, base


def run_ddp_fit(model, args, with_cb: bool, tmp: str) -> float:
    out = os.path.join(tmp, f"times_ddp_{int(with_cb)}.json")
    callbacks: list[pl.Callback] = [WindowTimer(out)]
    if with_cb:
        callbacks.insert(0, _make_gns("ddp"))
    _trainer(args, 1, callbacks, tmp, strategy="ddp_spawn", devices=2).fit(model, _loader(args, 1, world=2))
    times = json.loads(Path(out).read_text())[args.warmup:]
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--precision", default="32-true")
    p.add_argument("--preset", default=None, choices=sorted(PRESETS), help="default: tiny on CPU, gpt85m on CUDA")
    p.add_argument("--methods", default="none,accumulation,per_example,per_example_linear")
    p.add_argument("--steps", type=int, default=88, help="optimizer steps per fit (ABBA blocks of 4)")
    p.add_argument("--warmup", type=int, default=8)
    p.add_argument("--rounds", type=int, default=4, help="ddp only: alternating whole fits")
    p.add_argument("--accumulate", type=int, default=4)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    p.add_argument("--sync-debug", action="store_true")
    args = p.parse_args()
    args.preset = args.preset or ("gpt85m" if args.device == "cuda" else "tiny")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise SystemExit(f"unknown methods {bad}; choose from {METHODS}")
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # for the spawned DDP workers
    os.environ.setdefault("PYTHONWARNINGS", "ignore")  # keep the spawned workers quiet too
    import logging
    import warnings

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")

    model = make_model(args.preset)
    n_layer, d_model, _, block, micro = PRESETS[args.preset]
    print(f"device={args.device} ({torch.cuda.get_device_name() if args.device == 'cuda' else 'cpu'}), "
          f"precision={args.precision}, preset={args.preset}: {n_layer} layers, d_model {d_model}, "
          f"N={model.n_params / 1e6:.2f}M non-embedding, context {block}, micro-batch {micro}, "
          f"accumulate {args.accumulate} (accumulation only), torch threads {torch.get_num_threads()}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for method in methods:
            if method == "ddp":
                ratios, base = [], []
                for r in range(args.rounds):
                    med = {}
                    for with_cb in ((False, True) if r % 2 == 0 else (True, False)):
                        med[with_cb] = run_ddp_fit(model, args, with_cb, tmp)
                    ratios.append(med[True] / med[False])
                    base.append(med[False])
                base_ms = statistics.median(base) * 1e3
            else:
                ratios, base = run_interleaved(model, args, method, tmp)
                base_ms = base * 1e3
            ratios.sort()
            q = statistics.quantiles(ratios, n=4) if len(ratios) >= 2 else [ratios[0]] * 3
            rows.append((method, statistics.median(ratios), q[0], q[2], base_ms, len(ratios)))
            print(f"  {method:<20} ratio {rows[-1][1]:.4f}  IQR {q[0]:.4f}-{q[2]:.4f}  "
                  f"baseline {base_ms:.1f} ms/step  blocks/rounds {len(ratios)}", flush=True)
    print("\n| method | with/without (median) | IQR | baseline ms/step | blocks |")
    print("|---|---|---|---|---|")
    for m, med, lo, hi, ms, n in rows:
        print(f"| {m} | {med:.3f} | {lo:.3f}-{hi:.3f} | {ms:.1f} | {n} |")


if __name__ == "__main__":
    sys.exit(main())
