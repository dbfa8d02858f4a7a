"""A real small ladder: train byte-level GPTs at several sizes and batch sizes, fit on the smaller, predict the largest.

Issue 4's real-data check of the whole recipe (Su et al. 2024): a batch sweep at one size fits B_crit(L), the size
ladder fits L(N, S_min); the largest model's trajectory is predicted *before* it is trained (``prediction.json``),
then it is trained and the errors are printed. It runs the same code as ``lightning-scaling recipe``.

Presets:

* ``cpu``  (default; ~10 min on 2 cores): 2-layer GPTs, width 16-128 (N = 6k-393k), batch sweep 4/8/16/32/64 at
  width 32, 1,500 steps, context 64.
* ``gpu``  (one GPU, ~10-20 min): 1M-60M non-embedding parameters (4x128 ... 12x640), context 256, batch sweep
  8-128 at the smallest size, 3,000 steps, bf16-mixed. The standard library's ~10 MB of text is repeated a few
  times by the largest runs (a data-limited regime the Kaplan/Su form does not model: read its errors with that
  in mind).
* ``tiny`` (~1 min, smoke test).

Usage::

    python benchmarks/ladder.py                         # CPU ladder
    python benchmarks/ladder.py --preset gpu --accelerator gpu
    python benchmarks/ladder.py --preset cpu --steps 800 --out /tmp/ladder --json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from lightning_scaling.demo import demo_config
from lightning_scaling.study import RecipeConfig, load_config, run_recipe


def preset(name: str, *, sweep_size: int | None = None) -> RecipeConfig:
    """The benchmark's configs (see the module docstring); ``sweep_size`` moves the batch sweep to another size."""
    if name == "tiny":
        return demo_config(quick=True)
    base = demo_config().to_dict()
    if name == "cpu":
        sweep_size = 2 if sweep_size is None else sweep_size
        base.update(
            sizes=[{"name": f"d{d}", "d_model": d} for d in (16, 24, 32, 48, 64, 128)],
            batch_size=16, batch_sizes=[4, 8, 32, 64], sweep_size=sweep_size, max_steps=1500, val_every=750,
            fit={"n_bootstrap": 50, "form": "auto"}, name="ladder (cpu)",
        )
        base["model"]["init_args"].update(n_head=2, lr=2e-3)
        return load_config(base)
    if name == "gpu":
        shapes = [(4, 128), (6, 256), (8, 384), (12, 512), (12, 640)]  # N = 0.79M, 4.7M, 14M, 38M, 59M
        base["model"]["init_args"].update(block_size=256, n_head=8, lr=1e-3, warmup_steps=100,
                                          schedule="constant", weight_decay=0.1)
        base["data"]["init_args"].update(block_size=256, max_bytes=None, val_bytes=500_000, num_workers=2)
        base.update(
            sizes=[{"name": f"L{l}d{d}", "n_layer": l, "d_model": d} for l, d in shapes],
            batch_size=32, batch_sizes=[8, 16, 64, 128], sweep_size=sweep_size or 0, max_steps=3000, val_every=1000,
            trainer={"accelerator": "gpu", "devices": 1, "precision": "bf16-mixed", "limit_val_batches": 20},
            torch_threads=None, fit={"n_bootstrap": 50, "form": "auto"}, name="ladder (gpu, 1M-60M)",
        )
        return load_config(base)
    raise ValueError(f"unknown preset {name!r}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=("cpu", "gpu", "tiny"), default="cpu")
    p.add_argument("--accelerator", default=None, help="override the trainer accelerator (cpu, gpu, cuda, ...)")
    p.add_argument("--device", dest="accelerator", help="alias of --accelerator (e.g. --device cuda)")
    p.add_argument("--devices", type=int, default=None)
    p.add_argument("--precision", default=None, help="override the trainer precision")
    p.add_argument("--steps", type=int, default=None, help="override max_steps")
    p.add_argument("--sweep-size", type=int, default=None,
                   help="index of the size that gets the batch sweep (cpu default 2: width 32; gpu default 0)")
    p.add_argument("--out", default=None, help="output folder (finished runs in it are reused)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--progress", action="store_true", help="show Lightning's progress bars")
    p.add_argument("--json", action="store_true", help="print the comparison as JSON")
    args = p.parse_args(argv)

    cfg = preset(args.preset, sweep_size=args.sweep_size)
    data = cfg.to_dict()
    if args.steps is not None:
        data.update(max_steps=args.steps, val_every=max(1, args.steps // 2))
    trainer = dict(data["trainer"])
    if args.accelerator is not None:
        trainer["accelerator"] = "gpu" if args.accelerator == "cuda" else args.accelerator
    if args.devices is not None:
        trainer["devices"] = args.devices
    if args.precision is not None:
        trainer["precision"] = args.precision
    data["trainer"] = trainer
    cfg = load_config(data)
    out = Path(args.out or f"ladder_{args.preset}")
    start = time.perf_counter()
    result = run_recipe(cfg, out, progress=args.progress, plots=not args.no_plots,
                        echo=(lambda s: print(s, file=sys.stderr)) if args.json else print)
    wall = time.perf_counter() - start
    comp = result.report.get("comparison", {})
    summary: dict[str, Any] = {
        "preset": args.preset, "wall_s": wall, "out": str(out.resolve()),
        "sizes": {k: v["n_params"] for k, v in result.report["runs"].items()},
        "law": result.report.get("law", {}).get("params"),
        "critical_batch": {k: result.report.get("critical_batch", {}).get(k) for k in ("b_star", "alpha_b")},
        "final_loss": comp.get("final_loss"), "steps_to_target": comp.get("steps_to_target"),
        "critical_batch_check": comp.get("critical_batch"), "live_forecast": comp.get("live_forecast"),
        "timings": result.report.get("timings"),
    }
    if args.json:
        print(json.dumps(summary, indent=1, default=str))
    else:
        print()
        print(result.table)
        fl, st = comp.get("final_loss", {}), comp.get("steps_to_target", {})
        print(f"held-out final-loss error: {100 * fl.get('rel_error', float('nan')):+.2f}%   "
              f"steps-to-target error: {100 * st.get('rel_error', float('nan')):+.1f}%   wall {wall:.0f} s   -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
