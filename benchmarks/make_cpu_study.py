"""Train the project's own validation study on CPU: a size ladder under three schedules plus a batch sweep.

The study is real training, not synthetic curves: the demo's byte-level GPT (``lightning_scaling.demo.model``) on
the Python standard library's own sources (``lightning_scaling.demo.data``), recorded by ``LossTrajectory`` exactly
as a user's run would be. It is the one dataset of the validation suite (``benchmarks/validate.py``) that no method
in this project was designed on.

- **Ladder**: 2-layer GPTs of width 32, 48, 64, 96, 128, 192 (N = 24.6k to 885k non-embedding parameters, 36x),
  batch 16 x 64 bytes, 2,000 steps, 60 warmup steps, each under three schedules: ``constant``,
  ``cosine`` (to 10% of the peak) and ``wsd`` (constant, then a linear cooldown to 0 over the last 20%).
- **LR per width**: ``3e-3 * min(1, 64 / width)``, the 1/width rule for Adam (muP's hidden-layer scaling), from
  3e-3 tuned at width 64: at width 192, 3e-3 trained visibly slower than 1e-3 or 2e-3 in a 500-step check.
- **Batch sweep** at width 64, constant LR: batch 2, 4, 8, 16, 32, 64 (32x; batch 16 is the ladder's constant run).
  The LR follows the square-root rule a practitioner would use with Adam, ``3e-3 * sqrt(B / 16)``; it is recorded
  in each history's ``meta``.

Each finished run is written to ``benchmarks/data/cpu_study/<name>.json.gz`` (a gzipped ``RunHistory`` JSON with
its settings and wall time in ``meta``), so the suite never retrains and this script resumes: runs whose file
exists are skipped. ``--jobs 2`` trains two runs at a time (one torch thread each).

Usage::

    python benchmarks/make_cpu_study.py --jobs 2          # the whole study (see the wall time it prints)
    python benchmarks/make_cpu_study.py --list            # the plan, without training
    python benchmarks/make_cpu_study.py --only d32_constant --out /tmp/study   # one run elsewhere
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import multiprocessing as mp
import platform
import time
from pathlib import Path

OUT = Path(__file__).resolve().parent / "data" / "cpu_study"
WIDTHS = (32, 48, 64, 96, 128, 192)
SCHEDULES = ("constant", "cosine", "wsd")
SWEEP_WIDTH = 64
SWEEP_BATCHES = (2, 4, 8, 16, 32, 64)
BASE = {"n_layer": 2, "n_head": 2, "block_size": 64, "lr": 3e-3, "warmup_steps": 60, "max_steps": 2000,
        "weight_decay": 0.1, "batch_size": 16}


def lr_for(width: int, batch: int) -> float:
    """Peak LR of a run: 1/width above width 64, square root of the batch (Adam) around batch 16."""
    return BASE["lr"] * min(1.0, 64 / width) * math.sqrt(batch / BASE["batch_size"])


def plan() -> list[dict]:
    """Every run of the study: name, role, model width, batch, schedule and LR."""
    runs = []
    for d in WIDTHS:
        for sched in SCHEDULES:
            runs.append({"name": f"d{d}_{sched}", "role": "ladder", "d_model": d, "schedule": sched,
                         "batch_size": BASE["batch_size"], "lr": lr_for(d, BASE["batch_size"])})
    for b in SWEEP_BATCHES:
        if b == BASE["batch_size"]:
            continue  # the ladder's constant run at the sweep width is the sweep's batch-16 point
        runs.append({"name": f"d{SWEEP_WIDTH}_constant_b{b}", "role": "sweep", "d_model": SWEEP_WIDTH,
                     "schedule": "constant", "batch_size": b, "lr": lr_for(SWEEP_WIDTH, b)})
    for r in runs:
        if r["role"] == "ladder" and r["d_model"] == SWEEP_WIDTH and r["schedule"] == "constant":
            r["role"] = "ladder+sweep"
    return runs


def train(spec: dict, out: Path) -> str:
    """Train one run with ``LossTrajectory`` attached and write its gzipped history; returns a summary line."""
    import lightning.pytorch as pl
    import torch

    from lightning_scaling.callbacks import LossTrajectory
    from lightning_scaling.demo.data import StdlibTextDataModule
    from lightning_scaling.demo.model import GPT

    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    model = GPT(n_layer=BASE["n_layer"], d_model=spec["d_model"], n_head=BASE["n_head"],
                block_size=BASE["block_size"], lr=spec["lr"], warmup_steps=BASE["warmup_steps"],
                max_steps=BASE["max_steps"], schedule=spec["schedule"],
                min_lr_ratio=0.0 if spec["schedule"] == "wsd" else 0.1, cooldown_fraction=0.2,
                weight_decay=BASE["weight_decay"])
    data = StdlibTextDataModule(block_size=BASE["block_size"], batch_size=spec["batch_size"],
                                max_bytes=16_000_000, val_bytes=100_000)
    rec = LossTrajectory(tokens_per_sample=BASE["block_size"], n_params=model.n_params, name=spec["name"],
                         log_by_tokens=False, flush_every_n_steps=100)
    trainer = pl.Trainer(max_steps=BASE["max_steps"], accelerator="cpu", devices=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=0, num_sanity_val_steps=0, callbacks=[rec],
                         default_root_dir=str(out / ".tmp" / spec["name"]))
    t0 = time.perf_counter()
    trainer.fit(model, datamodule=data)
    wall = time.perf_counter() - t0
    h = rec.history
    h.meta.update(study="cpu_study", settings={**BASE, **spec}, wall_s=round(wall, 1),
                  lr_rule="3e-3 * min(1, 64 / width) * sqrt(batch / 16): 1/width (muP, Adam) and square-root batch scaling",
                  machine=f"{platform.machine()} {mp.cpu_count()} cores, torch {torch.__version__}, 1 thread",
                  data="Python stdlib .py files, byte-level, split by file (lightning_scaling.demo.data)")
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{spec['name']}.json.gz.part"
    with gzip.open(tmp, "wt", encoding="utf-8") as fh:
        fh.write(h.to_json())
    tmp.replace(out / f"{spec['name']}.json.gz")  # atomic: a killed run leaves no half file behind
    return f"{spec['name']}: N={model.n_params} final loss {float(h.loss[-50:].mean()):.3f} in {wall:.0f} s"


def _train_star(args: tuple[dict, Path]) -> str:
    return train(*args)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--jobs", type=int, default=1, help="runs trained at once (one torch thread each)")
    ap.add_argument("--only", nargs="*", default=None, help="train only these run names")
    ap.add_argument("--list", action="store_true", help="print the plan and exit")
    args = ap.parse_args(argv)
    runs = [r for r in plan() if args.only is None or r["name"] in args.only]
    if args.list:
        for r in runs:
            print(json.dumps(r))
        return 0
    todo = [r for r in runs if not (args.out / f"{r['name']}.json.gz").exists()]
    print(f"{len(runs) - len(todo)} of {len(runs)} runs already done; training {len(todo)} with {args.jobs} job(s)")
    t0 = time.perf_counter()
    # largest first, so the long runs do not end up alone at the end
    todo.sort(key=lambda r: -(r["d_model"] ** 2) * r["batch_size"])
    if args.jobs > 1:
        with mp.get_context("spawn").Pool(args.jobs) as pool:
            for line in pool.imap_unordered(_train_star, [(r, args.out) for r in todo]):
                print(line, flush=True)
    else:
        for r in todo:
            print(train(r, args.out), flush=True)
    print(f"wall time {time.perf_counter() - t0:.0f} s for {len(todo)} runs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
