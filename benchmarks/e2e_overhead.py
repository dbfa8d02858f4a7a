"""End-to-end cost of the callbacks as a user sees it: whole training runs, each in its own process, paired.

    python benchmarks/e2e_overhead.py                 # demo size and a larger CPU size, 3 rounds (~10 min idle)
    python benchmarks/e2e_overhead.py --quick         # demo size, 2 rounds, shorter runs (~2 min idle)
    python benchmarks/e2e_overhead.py --size demo --rounds 5 --steps 600 --every 100   # the issue's setting

Each run trains the demo GPT (``lightning_scaling.demo``) on one CPU thread with a TensorBoard logger and the
demo's warmup + cosine schedule, in a fresh ``python`` process, with one of the configurations:

* ``none``: no callback;
* ``none-again``: no callback either, an A/A pair with ``none``: its ratio and range are the machine's noise floor
  under the same protocol, what a configuration's ratio must exceed to mean anything;
* ``traj``: ``LossTrajectory``;
* ``traj+gns``: ``LossTrajectory`` + ``GradientNoiseScale()`` (per-example LN proxy without accumulation; its
  default cadence times steps 4-23 and then measures one step in as many as keep the measurements within 2%);
* ``traj+gns/1``: the same, measuring every optimizer step (``measure_every_n_steps=1``, the default until 0.3);
* ``traj+forecast``: ``LossTrajectory`` + ``ScalingForecast(every_n_steps=...)`` with its defaults (figure and
  forecast run on);
* ``all``: the README's drop-in list (``LossTrajectory``, ``GradientNoiseScale``, ``ScalingForecast``,
  ``ForecastEarlyStopping``).

A round runs every configuration once, in an order rotated from round to round (A B C ..., then B C ... A), so
each configuration's run sits beside a baseline run under nearly the same machine load. The ratio of a round is
``fit seconds with / fit seconds of none`` (``trainer.fit`` wall time, measured in the child; process wall time,
which adds the fixed ~5-10 s of imports and data loading, is reported too). Reported per configuration: the median
ratio over rounds and its range, the refit steps and their cost. A profile of one refit of the last history
(forecast fit, figure, TensorBoard forecast run, JSON, image write) closes the report. Results go to
``benchmarks/results/e2e_overhead.json`` (``--json``) with the machine, torch version and thread count.

Every configuration must train all its steps (``ForecastEarlyStopping`` is given a target the run has already
reached, so it checks at every refit and never stops): runs of different lengths are refused, not compared.

Targets (issue 13): ``all`` <= 1.03, ``traj+forecast`` <= 1.02, ``traj+gns`` <= 1.03 at the demo size.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIGS = ("none", "none-again", "traj", "traj+gns", "traj+gns/1", "traj+forecast", "all")
#: name: (n_layer, d_model, n_head, block, batch). ``demo`` is the issue's 2 x 64 GPT at batch 16 x 64.
SIZES = {"demo": (2, 64, 2, 64, 16), "large": (4, 128, 4, 128, 16)}
DEFAULT_STEPS = {"demo": 600, "large": 100}
QUICK_STEPS = {"demo": 200, "large": 60}
RESULTS = Path(__file__).parent / "results" / "e2e_overhead.json"


# ----------------------------------------------------------------------------------------------- child process
def _callbacks(config: str, tokens_per_sample: int, every: int, background: str = "auto") -> list:
    from lightning_scaling.callbacks import ForecastEarlyStopping, GradientNoiseScale, LossTrajectory, ScalingForecast

    cbs: list = []
    if config not in ("none", "none-again"):
        cbs.append(LossTrajectory(tokens_per_sample=tokens_per_sample))
    if config in ("traj+gns", "all"):
        cbs.append(GradientNoiseScale())
    if config == "traj+gns/1":
        cbs.append(GradientNoiseScale(measure_every_n_steps=1))
    if config in ("traj+forecast", "all"):
        bg = {"auto": "auto", "thread": "thread", "false": False}[background]
        cbs.append(ScalingForecast(every_n_steps=every, target_loss=2.0, background=bg))
    if config == "all":
        # a target already reached: the rule checks every refit and never stops the run (an out-of-reach target,
        # as this benchmark had until 0.2, stopped "all" at 500 of 600 steps and made it look free)
        cbs.append(ForecastEarlyStopping(target_loss=10.0))
    return cbs


def child(config: str, size: str, steps: int, every: int, out: str, background: str = "auto") -> dict:
    """Train one run in this process; returns its timings (printed as one JSON line)."""
    import torch

    torch.set_num_threads(1)
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import TensorBoardLogger

    from lightning_scaling.demo.data import StdlibTextDataModule
    from lightning_scaling.demo.model import GPT

    n_layer, width, heads, block, batch = SIZES[size]
    pl.seed_everything(0, verbose=False)
    data = StdlibTextDataModule(block_size=block, batch_size=batch)
    model = GPT(n_layer=n_layer, d_model=width, n_head=heads, block_size=block, max_steps=steps)
    cbs = _callbacks(config, data.tokens_per_sample, every, background)
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=TensorBoardLogger(out, name=config),
                         callbacks=cbs, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, limit_val_batches=0, log_every_n_steps=50)
    t0 = time.perf_counter()
    trainer.fit(model, datamodule=data)
    row = {"fit_seconds": time.perf_counter() - t0, "steps": trainer.global_step}
    sf = next((c for c in cbs if type(c).__name__ == "ScalingForecast"), None)
    if sf is not None:
        row.update(refit_steps=[s for s, _ in sf.refit_log], refit_seconds=[t for _, t in sf.refit_log],
                   max_stall_seconds=sf.max_stall_seconds, n_refits=sf.n_refits, n_failures=sf.n_failures)
    gns = next((c for c in cbs if type(c).__name__ == "GradientNoiseScale"), None)
    if gns is not None:
        row.update(gns_measure_every=gns.measure_every, gns_measured_overhead=gns.measured_overhead)
    traj = next((c for c in cbs if type(c).__name__ == "LossTrajectory"), None)
    if traj is not None:
        row["history"] = os.path.join(out, f"history_{size}_{config}.json")
        traj.history.to_json(row["history"])
    return row


# ----------------------------------------------------------------------------------------------- refit profile
def profile_refit(history_path: str, steps: int, log_dir: str) -> dict:
    """Time each part of one refit on a recorded history: cold and warm fit, figure, TensorBoard run, JSON."""
    from torch.utils.tensorboard import SummaryWriter

    from lightning_scaling.report.figures import forecast_figure, render_figure
    from lightning_scaling.report.tensorboard import write_forecast_json, write_forecast_run
    from lightning_scaling.forecast import forecast_run
    from lightning_scaling.history import RunHistory

    h = RunHistory.from_json(history_path)
    part: dict[str, float] = {}

    def timed(name, fn):
        t0 = time.perf_counter()
        value = fn()
        part[name] = time.perf_counter() - t0
        return value

    cold = timed("fit_cold", lambda: forecast_run(h, steps))
    timed("fit_warm", lambda: forecast_run(h, steps, init=cold))
    fig = timed("figure_build", lambda: forecast_figure(h, cold, target_loss=2.0))
    image = timed("figure_render", lambda: render_figure(fig))
    timed("tensorboard_forecast_run", lambda: write_forecast_run(log_dir, cold, history=h))
    timed("json", lambda: write_forecast_json(log_dir, cold, extra={"at_step": steps}))
    writer = SummaryWriter(log_dir)
    timed("tensorboard_image", lambda: (writer.add_image("forecast/curve", image, 0, dataformats="HWC"),
                                        writer.flush()))
    writer.close()
    timed("history_copy", lambda: RunHistory.from_dict(h.to_dict()) if hasattr(RunHistory, "from_dict") else None)
    return {"points": len(h), **part}


# ----------------------------------------------------------------------------------------------- parent
def _cpu_children() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)  # waited-for descendants: the run and its refit worker
    return r.ru_utime + r.ru_stime


def _run_child(args: list[str]) -> dict:
    t0, cpu0 = time.perf_counter(), _cpu_children()
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=_child_env())
    wall, cpu = time.perf_counter() - t0, _cpu_children() - cpu0
    if proc.returncode != 0:
        raise RuntimeError(f"child {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    row["process_seconds"], row["cpu_seconds"] = wall, cpu
    return row


def _child_env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def machine() -> dict:
    import torch

    try:
        load = os.getloadavg()
    except OSError:  # pragma: no cover - not on every platform
        load = None
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__, "threads_per_run": 1,
            "load_average_at_start": load,
            "platform": platform.platform()}


def check_lengths(runs: dict[str, list[dict]], steps: int) -> None:
    """Refuse runs that did not train all ``steps``: a ratio of runs of different lengths says nothing about cost
    (until 0.3 the ``all`` runs were stopped early at 500 of 600 steps, and looked free)."""
    short = {c: [r["steps"] for r in rs] for c, rs in runs.items() if any(r["steps"] != steps for r in rs)}
    if short:
        raise RuntimeError(f"runs did not train all {steps} steps: {short}")


def bench_size(size: str, steps: int, rounds: int, every: int, configs: tuple[str, ...], out: str,
               background: str = "auto") -> dict:
    runs: dict[str, list[dict]] = {c: [] for c in configs}
    for r in range(rounds):
        order = configs[r % len(configs):] + configs[:r % len(configs)]
        for config in order:
            row = _run_child(["--child", config, "--size", size, "--steps", str(steps), "--every", str(every),
                              "--out", out, "--forecast-background", background])
            runs[config].append(row)
            print(f"  {size} round {r + 1}/{rounds} {config:<14} fit {row['fit_seconds']:6.2f} s", flush=True)
    check_lengths(runs, steps)
    summary = {}
    for config in configs:
        ratios = [a["fit_seconds"] / b["fit_seconds"] for a, b in zip(runs[config], runs["none"])]
        proc = [a["process_seconds"] / b["process_seconds"] for a, b in zip(runs[config], runs["none"])]
        cpu = [a["cpu_seconds"] / b["cpu_seconds"] for a, b in zip(runs[config], runs["none"])]
        summary[config] = {"ratio_median": statistics.median(ratios), "ratio_min": min(ratios),
                           "ratio_max": max(ratios), "process_ratio_median": statistics.median(proc),
                           "cpu_ratio_median": statistics.median(cpu),
                           "fit_seconds": [x["fit_seconds"] for x in runs[config]], "runs": runs[config]}
    return {"size": dict(zip(("n_layer", "d_model", "n_head", "block", "batch"), SIZES[size])), "steps": steps,
            "every_n_steps": every, "rounds": rounds, "forecast_background": background, "configs": summary}


def table(results: dict) -> str:
    lines = ["| size | callbacks | fit time vs none, median (range) | process time | CPU time (run + worker) | "
             "refits at steps (last round) | refit s, median | worst stall s | GNS measures 1 step in (timed cost) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for size, res in results["sizes"].items():
        for config, s in res["configs"].items():
            if config == "none":
                continue
            refit = [x for r in s["runs"] for x in r.get("refit_seconds", [])]
            steps = ", ".join(str(x) for x in s["runs"][-1].get("refit_steps", [])) or "-"
            med = f"{statistics.median(refit):.3f}" if refit else "-"
            stall = f"{max(r.get('max_stall_seconds', 0.0) for r in s['runs']):.3f}" if refit else "-"
            gns = ", ".join(f"{r['gns_measure_every']}" + (f" ({r['gns_measured_overhead']:+.0%})"
                                                            if r.get("gns_measured_overhead") is not None else "")
                            for r in s["runs"] if "gns_measure_every" in r) or "-"
            lines.append(f"| {size} | {config} | {s['ratio_median']:.3f} ({s['ratio_min']:.3f}-{s['ratio_max']:.3f})"
                         f" | {s['process_ratio_median']:.3f} | {s['cpu_ratio_median']:.3f} | {steps} | {med} | "
                         f"{stall} | {gns} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=(*SIZES, "both"), default=None, help="default: both (demo with --quick)")
    p.add_argument("--steps", type=int, default=None, help="steps per run (default per size)")
    p.add_argument("--rounds", type=int, default=None, help="rounds of all configurations (default 3, quick 2)")
    p.add_argument("--every", type=int, default=None, help="ScalingForecast every_n_steps (default: steps // 6)")
    p.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated subset; 'none' is always run")
    p.add_argument("--quick", action="store_true", help="demo size, 2 rounds, 200 steps (~2 min)")
    p.add_argument("--forecast-background", choices=("auto", "thread", "false"), default="auto",
                   help="ScalingForecast(background=...): worker process (auto), thread, or training thread")
    p.add_argument("--json", default=str(RESULTS), help="where to write the results ('' for nowhere)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--profile", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.child, args.size, args.steps, args.every, args.out, args.forecast_background)))
        return
    if args.profile is not None:
        print(json.dumps(profile_refit(args.profile, args.steps, args.out)))
        return
    size = args.size or ("demo" if args.quick else "both")
    sizes = list(SIZES) if size == "both" else [size]
    rounds = args.rounds or (2 if args.quick else 3)
    configs = tuple(dict.fromkeys(["none", *[c for c in args.configs.split(",") if c]]))
    unknown = set(configs) - set(CONFIGS)
    if unknown:
        raise SystemExit(f"unknown configs {sorted(unknown)}; choose from {CONFIGS}")
    results = {"machine": machine(), "sizes": {}, "command": " ".join(sys.argv)}
    print(f"machine: {results['machine']}", flush=True)
    with tempfile.TemporaryDirectory(prefix="ls_e2e_") as out:
        for s in sizes:
            steps = args.steps or (QUICK_STEPS if args.quick else DEFAULT_STEPS)[s]
            every = args.every or max(steps // 6, 1)
            results["sizes"][s] = bench_size(s, steps, rounds, every, configs, out, args.forecast_background)
        last = next((r for r in results["sizes"][sizes[0]]["configs"].get("all", {}).get("runs", [])[::-1]), None)
        if last is not None and "history" in last:
            results["refit_profile"] = _run_child(["--profile", last["history"], "--steps",
                                                   str(results["sizes"][sizes[0]]["steps"]), "--out",
                                                   os.path.join(out, "profile")])
            for r in (x for res in results["sizes"].values() for c in res["configs"].values() for x in c["runs"]):
                r.pop("history", None)
    print()
    print(table(results))
    if "refit_profile" in results:
        prof = results["refit_profile"]
        print(f"\none refit of the last 'all' history ({prof.pop('points')} points), seconds: "
              + ", ".join(f"{k} {v:.3f}" for k, v in prof.items() if k != "process_seconds"))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=1))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
