"""The built-in demo's recipe config: byte-level GPTs on the Python standard library, on CPU."""

from __future__ import annotations

from lightning_scaling.study.config import RecipeConfig

# A fixed cadence: the default ("auto") picks it from wall-clock step times, so a rerun of the seeded demo could
# measure other steps and log another live B_simple. One step in four keeps the cost on these tiny models near
# what "auto" picks (one in 5-7 on the 600-step demo GPT of benchmarks/e2e_overhead.py).
_GNS = {"measure_every_n_steps": 4}


def demo_config(*, quick: bool = False) -> RecipeConfig:
    """The built-in demo: byte-level GPTs on the Python standard library's sources, on CPU.

    Default: 6 sizes (2 layers, width 16 to 96: N = 6.1k to 221k non-embedding parameters, the largest held
    out) at batch 16 and a batch sweep over 4, 8, 16, 32 at width 32, 800 steps each, one CPU thread, constant
    LR after a short warmup (the L(S) power law of Kaplan/Su describes constant-LR runs), and widths 16, 32, 64
    and the held-out 96 once more under a cosine schedule (to 10% of the peak): the law fitted on both schedules
    predicts the held-out model under each. 13 runs, so 39 TensorBoard runs with their ``by_tokens`` and
    ``forecast`` runs: TensorBoard shows at most 40 runs selected when it opens. ``quick=True`` is a tiny setting
    for tests.

    Example::

        >>> cfg = demo_config()
        >>> len(cfg.sizes), cfg.batch_sizes, cfg.max_steps, cfg.schedules, cfg.schedule_sizes
        (6, [4, 8, 32], 800, ['cosine'], [0, 2, 4])
    """
    model = {
        "class_path": "lightning_scaling.demo.model.GPT",
        "init_args": {"n_layer": 2, "n_head": 2, "block_size": 64, "lr": 3e-3, "warmup_steps": 20,
                      "schedule": "constant", "weight_decay": 0.0},
    }
    data = {
        "class_path": "lightning_scaling.demo.data.StdlibTextDataModule",
        "init_args": {"block_size": 64, "max_bytes": 4_000_000, "val_bytes": 200_000},
    }
    if quick:
        model["init_args"].update(block_size=32, warmup_steps=5)
        data["init_args"].update(block_size=32, max_bytes=400_000, val_bytes=20_000)
        return RecipeConfig(
            model=model, data=data,
            sizes=[{"name": f"d{d}", "d_model": d} for d in (8, 16, 24, 32)],
            batch_size=8, batch_sizes=[4, 16], sweep_size=0, max_steps=60, val_every=None, torch_threads=1,
            trainer={"accelerator": "cpu", "devices": 1, "limit_val_batches": 0},
            gns={"log_every_n_steps": 5, **_GNS}, forecast={"every_n_steps": 30},
            fit={"n_bootstrap": 8, "form": "kaplan"},
            name="demo (quick)",
        )
    return RecipeConfig(
        model=model, data=data,
        sizes=[{"name": f"d{d}", "d_model": d} for d in (16, 24, 32, 48, 64, 96)],
        batch_size=16, batch_sizes=[4, 8, 32], sweep_size=2, max_steps=800, val_every=400, torch_threads=1,
        schedules=["cosine"], schedule_sizes=[0, 2, 4],
        trainer={"accelerator": "cpu", "devices": 1, "limit_val_batches": 8},
        gns=dict(_GNS), forecast={}, fit={"n_bootstrap": 40, "form": "auto"},
        name="demo",
    )
