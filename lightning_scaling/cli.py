"""The ``lightning-scaling`` command line: a thin layer over the library's functions.

Sub-commands:

* ``demo``: the built-in scaling study (tiny byte-level GPTs on the Python standard library, CPU, < 5 minutes);
* ``recipe --config FILE``: the same procedure for your own LightningModule/DataModule;
* ``fit LOGDIR...``: fit B_crit(L) and L(N, S, B) to existing runs and predict a larger model;
* ``forecast LOGDIR --horizon STEPS``: forecast one run's loss curve;
* ``backtest LOGDIR...``: replay the forecast and the cross-size fit on finished runs: how far to trust them.

Bad input ends with one line on stderr and exit code 2 (usage) or 1 (data that cannot be fitted), never a traceback.

Example::

    $ lightning-scaling demo --out demo_out
    $ lightning-scaling fit demo_out/runs --predict-n 1e6 --target-loss 2.2 --json
"""

from __future__ import annotations

import argparse
import math
import re
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning_scaling._version import __version__
from lightning_scaling.warnings import FitWarning

EXIT_OK, EXIT_DATA, EXIT_USAGE = 0, 1, 2


class CLIError(ValueError):
    """A user-facing error: printed as one line, exit code ``EXIT_DATA``."""


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(float(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1 or value != float(text):
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _n_params_spec(text: str) -> tuple[str | None, float]:
    """``N`` (every run whose logs do not record N) or ``RUN=N`` (that run) for ``fit --n-params``."""
    name, sep, value = text.rpartition("=")
    if sep and not name:
        raise argparse.ArgumentTypeError(f"expected RUN=N or N, got {text!r}")
    return (name or None), _positive_float(value)


def _critical_batch(text: str) -> str | float:
    """``none`` (no batch-size effects) or a positive number of samples (a constant critical batch)."""
    if text.strip().lower() == "none":
        return "none"
    try:
        return _positive_float(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected 'none' or a positive number of samples, got {text!r}") from None


def _add_tag_options(p: argparse.ArgumentParser, *, per_run_n: bool = False) -> None:
    g = p.add_argument_group("reading logs (TensorBoard event folders or Lightning metrics.csv)")
    g.add_argument("--loss-tag", default=None, metavar="TAG",
                   help="scalar tag/column of the training loss (default: scaling/loss, written by LossTrajectory; "
                        "e.g. train_loss for a plain Lightning run)")
    g.add_argument("--lr-tag", default=None, metavar="TAG", help="tag of the learning rate (optional)")
    if per_run_n:
        g.add_argument("--n-params", type=_n_params_spec, action="append", default=None, metavar="[RUN=]N",
                       help="non-embedding parameter count: RUN=N for one run (its name as printed, or the last "
                            "part(s) of its folder path; repeatable), N for every run whose logs record none "
                            "(history.json, or an n_params-like key in Lightning's hparams.yaml)")
    else:
        g.add_argument("--n-params", type=_positive_float, default=None, metavar="N",
                       help="non-embedding parameter count of the run(s), when the logs do not record it")
    g.add_argument("--run-batch-size", type=_positive_float, default=None, metavar="B",
                   help="samples per optimizer step of the run(s), when the logs do not record it")
    g.add_argument("--tokens-per-sample", type=_positive_float, default=None, metavar="T",
                   help="tokens per sample (context length), when the logs do not record it")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``lightning-scaling`` (one sub-parser per command)."""
    parser = argparse.ArgumentParser(
        prog="lightning-scaling",
        description="Scaling-law evidence from PyTorch Lightning runs: demo, recipe, fits and forecasts.",
    )
    parser.add_argument("--version", action="version", version=f"lightning-scaling {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = sub.add_parser(
        "demo", help="train a ladder of tiny GPTs on CPU, fit the scaling laws, predict the largest model",
        description="Train tiny byte-level GPTs on the Python standard library's sources (no download, CPU): a "
                    "batch sweep for the critical batch size B_crit(L) and a size ladder for L(N, S, B); predict "
                    "the largest model's loss curve before training it, then train it and compare. Writes "
                    "TensorBoard logs, run histories, report.json and PNG plots.")
    demo.add_argument("--out", default="lightning_scaling_demo", metavar="DIR",
                      help="output folder (default: ./lightning_scaling_demo; finished runs in it are reused)")
    demo.add_argument("--quick", action="store_true",
                      help="a tiny setting (well under a minute): widths 8-32, 60 steps")
    demo.add_argument("--steps", type=_positive_int, default=None, help="optimizer steps per run (overrides)")
    demo.add_argument("--no-plots", action="store_true", help="skip the PNG figures")
    demo.add_argument("--no-progress", action="store_true",
                      help="no progress bars (they are off anyway when stdout is not a terminal)")
    demo.add_argument("--json", action="store_true", help="print report.json instead of the table")
    demo.add_argument("--readme", default=None, metavar="README.md",
                      help="after the run, rewrite the README's demo table (between its demo-table markers) and "
                           "copy report.png to docs/demo_report.png next to it: the README shows a real run")

    recipe = sub.add_parser(
        "recipe", help="the scaling recipe for your own model and data (YAML/JSON config)",
        description="Run the scaling recipe (batch sweep -> B_crit(L); size ladder -> L(N, S, B); predict the "
                    "largest size before training it) for any LightningModule/LightningDataModule given by "
                    "class_path/init_args. Resumable: finished runs are not retrained. See "
                    "lightning_scaling/study/recipe_example.yaml.")
    recipe.add_argument("--config", required=True, metavar="FILE", help="YAML or JSON recipe config")
    recipe.add_argument("--out", default=None, metavar="DIR",
                        help="output folder (default: ./scaling_<config name>)")
    recipe.add_argument("--steps", type=_positive_int, default=None, help="override max_steps")
    recipe.add_argument("--accelerator", default=None, help="override trainer.accelerator (cpu, gpu, ...)")
    recipe.add_argument("--devices", default=None, help="override trainer.devices")
    recipe.add_argument("--no-plots", action="store_true", help="skip the PNG figures")
    recipe.add_argument("--no-progress", action="store_true",
                        help="no progress bars (they are off anyway when stdout is not a terminal)")
    recipe.add_argument("--json", action="store_true", help="print report.json instead of the table")
    recipe.add_argument("--shard", default=None, metavar="I/N",
                        help="train only shard I of N of the runs (run k goes to shard k %% N; for SLURM arrays: "
                             "--shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT); the shard with the held-out "
                             "run waits for the others, fits and reports")
    recipe.add_argument("--backend", choices=("local", "ray"), default="local",
                        help="local: runs one after another in this process (default); ray: each run a Ray task "
                             "with the config's resources (pip install 'lightning-scaling[ray]')")
    recipe.add_argument("--dry-run", action="store_true",
                        help="print the planned runs, build every run's model and datamodule, check the "
                             "settings (one line each) and exit (1 if a check fails)")

    fit = sub.add_parser(
        "fit", help="fit B_crit(L) and L(N, S, B) to existing runs; predict a larger model",
        description="Read runs (this project's history.json, TensorBoard event folders or Lightning metrics.csv, "
                    "searched recursively), fit the critical batch size on runs of one size at several batch "
                    "sizes and the scaling law L(N, S, B) on runs of several sizes, and predict a model of "
                    "--predict-n parameters.")
    fit.add_argument("logdirs", nargs="+", metavar="LOGDIR", help="folders or files holding runs")
    fit.add_argument("--predict-n", type=_positive_float, default=None, metavar="N",
                     help="non-embedding size of the model to predict")
    fit.add_argument("--batch-size", type=_positive_float, default=None, metavar="B",
                     help="batch size (samples) of the prediction (default: the runs' most common)")
    fit.add_argument("--steps", type=_positive_int, default=None, help="steps of the predicted trajectory")
    fit.add_argument("--schedule-of", default=None, metavar="RUN",
                     help="predict under the LR schedule of this run (a run name as printed; default: the schedule "
                          "every run shared, else a constant LR)")
    fit.add_argument("--target-loss", type=_positive_float, default=None, metavar="L",
                     help="loss for steps/tokens-to-target predictions")
    fit.add_argument("--form", choices=("kaplan", "kaplan+irreducible", "auto"), default="kaplan",
                     help="law form (default: kaplan)")
    fit.add_argument("--bootstrap", type=int, default=50, metavar="K", help="bootstrap refits (default 50; 0: none)")
    fit.add_argument("--critical-only", action="store_true",
                     help="fit only the critical batch size (runs of one size at several batch sizes)")
    fit.add_argument("--critical-batch", type=_critical_batch, default=None, metavar="none|B",
                     help="do not fit the critical batch: 'none' (runs at one batch size: a plain L(N, S)) or a "
                          "constant critical batch B in samples")
    fit.add_argument("--out", default=None, metavar="DIR", help="write fit.json and PNG plots here")
    fit.add_argument("--json", action="store_true", help="print JSON instead of the table")
    _add_tag_options(fit, per_run_n=True)

    fc = sub.add_parser(
        "forecast", help="forecast one run's loss curve to a horizon",
        description="Fit a schedule-aware loss-curve law to one run and forecast its loss up to --horizon steps.")
    fc.add_argument("logdir", metavar="LOGDIR", help="the run: history.json, a TensorBoard event folder or metrics.csv")
    fc.add_argument("--horizon", type=_positive_int, required=True, metavar="STEPS", help="last step to forecast")
    fc.add_argument("--target-loss", type=_positive_float, default=None, metavar="L", help="loss to reach")
    fc.add_argument("--method", default="auto", help="forecast method (default: auto)")
    fc.add_argument("--out", default=None, metavar="DIR", help="write forecast.json and forecast.png here")
    fc.add_argument("--json", action="store_true", help="print JSON instead of the table")
    _add_tag_options(fc)

    bt = sub.add_parser(
        "backtest", help="how accurate the forecast and the cross-size fit would have been on your finished runs",
        description="Replay the forecast from 10-70 percent prefixes of each finished run (with the run's whole LR "
                    "schedule) and hold the largest model size out of the scaling-law fit; print the errors and "
                    "band coverage beside a power-law / plain Kaplan baseline measured on the same runs.")
    bt.add_argument("logdirs", nargs="+", metavar="LOGDIR", help="folders or files holding finished runs")
    bt.add_argument("--prefixes", type=_fraction, nargs="+", default=None, metavar="F",
                    help="fractions of each run replayed (default: 0.1 0.2 0.3 0.5 0.7)")
    bt.add_argument("--no-cross-size", action="store_true", help="skip the held-out-size check")
    bt.add_argument("--json", action="store_true", help="print JSON instead of the tables")
    _add_tag_options(bt)
    return parser


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must be a fraction in (0, 1), got {text!r}")
    return value


# ================================================================================================================
# Commands
# ================================================================================================================
def _print_json(obj: Any) -> None:
    from lightning_scaling.numerics import dumps

    print(dumps(_strip(obj), indent=1))


def _strip(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if not str(k).startswith("_")}
    return obj


def _cmd_recipe(cfg: Any, out: str, *, progress: bool, plots: bool, as_json: bool, readme: str | None = None,
                **run_args: Any) -> int:
    from lightning_scaling.study.run import RunInterrupted, _is_rank_zero, run_recipe

    start = time.perf_counter()
    echo = (lambda s: print(s, file=sys.stderr)) if as_json else print
    try:
        result = run_recipe(cfg, out, progress=progress, plots=plots, echo=echo, **run_args)
    except RunInterrupted as stop:  # one line: which run, which step, where it resumes
        if _is_rank_zero():
            print(f"lightning-scaling recipe: {stop}", file=sys.stderr)
        return 143 if stop.sigterm else 130  # 128 + the signal, as a shell reports it
    wall = time.perf_counter() - start
    if not _is_rank_zero():  # under DDP every rank runs the recipe; one report is enough
        return EXIT_OK
    if as_json:
        _print_json(result.report)
    elif "shard" in result.report:
        print(result.table)
    else:
        print()
        print(result.table)
        print(f"Output folder: {Path(out).resolve()}")
        print(f"  report.json, prediction.json (written before the held-out run), runs/<run>/scaling/history.json,"
              f" TensorBoard logs (tensorboard --logdir {out}/runs)" + (", PNG plots: " + ", ".join(
                  Path(f).name for f in result.figures) if result.figures else ""))
        print(f"Total wall time: {wall:.0f} s")
    if readme is not None:
        _write_readme(readme, result)
    return EXIT_OK


def _machine() -> str:
    """Where a run ran, as the README states it: CPU model, cores, torch version, load when it started."""
    import os
    import platform

    import torch

    model = platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            model = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), model)
    except OSError:
        pass
    load = f", load average {os.getloadavg()[0]:.1f} at the end" if hasattr(os, "getloadavg") else ""
    return f"{model}, {os.cpu_count()} cores, torch {torch.__version__}{load}"


def _write_readme(readme: str, result: Any) -> None:
    import resource
    import shutil

    from lightning_scaling.report.tables import readme_section, update_readme

    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    cpu = sum(u.ru_utime + u.ru_stime for u in usage)
    update_readme(readme, readme_section(result.report, machine=_machine(), cpu_seconds=cpu))
    picture = Path(result.out_dir) / "report.png"
    if picture.exists():
        target = Path(readme).resolve().parent / "docs" / "demo_report.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(picture, target)
    print(f"Updated the demo section of {readme}" + (" and docs/demo_report.png" if picture.exists() else ""))


def cmd_demo(args: argparse.Namespace) -> int:
    if args.readme is not None:  # before minutes of training, not after
        from lightning_scaling.report.tables import README_END, README_START

        text = Path(args.readme).read_text() if Path(args.readme).is_file() else ""
        if README_START not in text or README_END not in text:
            raise CLIError(f"--readme {args.readme}: no such file, or it lacks the demo-table markers")
    from lightning_scaling.demo.config import demo_config
    from lightning_scaling.study.config import load_config

    cfg = demo_config(quick=args.quick)
    if args.steps is not None:
        cfg = load_config(cfg.to_dict(), max_steps=args.steps,
                          val_every=None if cfg.val_every is None else max(1, args.steps // 2))
    return _cmd_recipe(cfg, args.out, progress=_progress(args), plots=not args.no_plots, as_json=args.json,
                       readme=args.readme)


def _progress(args: argparse.Namespace) -> bool:
    """Progress bars on a terminal only: piped or logged output gets the one status line per run instead."""
    from lightning_scaling.callbacks.progress import interactive

    return not args.no_progress and interactive()


def cmd_recipe(args: argparse.Namespace) -> int:
    from lightning_scaling.study.config import load_config
    from lightning_scaling.study.plan import check_config, parse_shard, plan_runs

    cfg = load_config(args.config, max_steps=args.steps)
    if args.accelerator is not None or args.devices is not None:
        trainer = dict(cfg.trainer)
        if args.accelerator is not None:
            trainer["accelerator"] = args.accelerator
        if args.devices is not None:
            trainer["devices"] = int(args.devices) if args.devices.lstrip("-").isdigit() else args.devices
        cfg = load_config({**cfg.to_dict(), "trainer": trainer})
    if args.dry_run:
        for spec in plan_runs(cfg):
            print(f"{spec.name}: {spec.role}, batch {spec.batch_size}, overrides {spec.overrides}"
                  + (f", lr {spec.lr:g}" if spec.lr is not None else ""))
        from lightning_scaling.study.run import trainer_arguments

        checks = check_config(cfg, trainer_arguments())  # builds every run's model and datamodule, trains nothing
        for check in checks:
            print(check.line())
        return EXIT_OK if all(c.ok for c in checks) else EXIT_DATA
    out = args.out or f"scaling_{Path(args.config).stem}"
    shard = parse_shard(args.shard) if args.shard is not None else None
    return _cmd_recipe(cfg, out, progress=_progress(args), plots=not args.no_plots, as_json=args.json,
                       backend=args.backend, shard=shard)


def _reader_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    kw: dict[str, Any] = {}
    if args.loss_tag is not None:
        kw["loss_tag"] = args.loss_tag
    if args.lr_tag is not None:
        kw["lr_tag"] = args.lr_tag
    for key in ("n_params", "tokens_per_sample"):
        if isinstance(getattr(args, key), float):  # fit's per-run --n-params is applied after loading
            kw[key] = getattr(args, key)
    if args.run_batch_size is not None:
        kw["batch_size"] = args.run_batch_size
    return kw


def _load_runs(paths: Sequence[str], args: argparse.Namespace) -> list[Any]:
    from lightning_scaling.history import RunHistory

    kw = _reader_kwargs(args)
    runs = RunHistory.load_many(list(paths), **kw)
    # history.json files ignore reader options; apply the size overrides to them too.
    for r in runs:
        for key in ("n_params", "batch_size", "tokens_per_sample"):
            if kw.get(key) is not None and getattr(r, key) is None:
                setattr(r, key, float(kw[key]))
    return runs


_VERSION_DIR = re.compile(r"version_\d+")
#: hparams.yaml keys that hold a parameter count (any nesting level; first match wins).
_N_KEY = re.compile(r"(n|num|number_of)_?(non_?embedding_?)?(params|parameters)", re.IGNORECASE)


def _run_folder(run: Any) -> Path | None:
    source = (getattr(run, "meta", None) or {}).get("source")
    if not source:
        return None
    path = Path(source)
    return path.parent if path.is_file() else path


def _name_from_path(run: Any, roots: Sequence[Path]) -> None:
    """Name a TensorBoard/CSV run by its folder path below the LOGDIR it was found in (not only ``version_3``)."""
    folder = _run_folder(run)
    if folder is None:
        return
    folder = folder.resolve()
    for root in roots:
        try:
            rel = folder.relative_to(root.resolve()).as_posix()
        except ValueError:
            continue
        if rel == ".":
            rel = folder.name
        if _VERSION_DIR.fullmatch(rel):
            rel = f"{folder.parent.name}/{rel}"  # lightning_logs/version_3 alone says nothing
        run.name = rel
        return


def _hparams_n_params(run: Any) -> float | None:
    """An ``n_params``-like number in the ``hparams.yaml`` Lightning's loggers write next to a run."""
    folder = _run_folder(run)
    if folder is None or not (folder / "hparams.yaml").is_file():
        return None
    import yaml

    try:
        data = yaml.safe_load((folder / "hparams.yaml").read_text())
    except (yaml.YAMLError, OSError):  # e.g. python/object tags of a logged module
        return None
    stack = [data]
    while stack:
        item = stack.pop(0)
        if isinstance(item, dict):
            for key, value in item.items():
                if _N_KEY.fullmatch(str(key)) and isinstance(value, (int, float)) and not isinstance(value, bool):
                    return float(value) if value > 0 else None
                stack.append(value)
    return None


def _assign_n_params(runs: Sequence[Any], specs: Sequence[tuple[str | None, float]] | None) -> None:
    """Per-run ``--n-params RUN=N`` first, then what the logs record, then a global ``--n-params N``."""
    specs = list(specs or [])
    default = next((n for name, n in reversed(specs) if name is None), None)
    named = set()
    for name, n in specs:
        if name is None:
            continue
        key = name.strip("/")
        hits = _runs_named(runs, key)
        if len(hits) != 1:
            raise CLIError(f"--n-params {name}=...: {'no run' if not hits else f'{len(hits)} runs'} named {key!r}; "
                           f"runs: {', '.join(r.name for r in runs)}")
        hits[0].n_params = n
        named.add(hits[0].name)
    for r in runs:
        if r.name not in named and r.n_params is None:
            r.n_params = _hparams_n_params(r) or default


def _runs_named(runs: Sequence[Any], key: str) -> list[Any]:
    """Runs called ``key``: the whole name or its last parts (``version_0``, ``w16/version_0``), else its first
    part alone (``w16`` for TensorBoard's ``w16/version_0``)."""
    hits = [r for r in runs if r.name == key or r.name.endswith("/" + key)]
    return hits or [r for r in runs if r.name.startswith(key + "/")]


def _check_paths(paths: Sequence[str]) -> None:
    missing = [p for p in paths if not Path(p).exists()]
    if missing:
        raise FileNotFoundError(f"{missing[0]} does not exist")


def _check_fit_runs(runs: Sequence[Any], *, min_points: int = 10) -> None:
    for r in runs:
        n_ok = int(r.finite_mask.sum())
        if n_ok < min_points:
            raise CLIError(f"run {r.name!r} has only {n_ok} finite loss points: too short to fit "
                           f"(need >= {min_points})")
    missing = [r.name for r in runs if r.n_params is None]
    if missing:
        raise CLIError(f"runs {missing} do not record their size N: log them with LossTrajectory or pass "
                       "--n-params RUN=N per run (or --n-params N for all)")
    missing = [r.name for r in runs if r.batch_size is None]
    if missing:
        raise CLIError(f"runs {missing} do not record their batch size: pass --run-batch-size")


def _schedule_lr(runs: Sequence[Any], name: str | None) -> Any:
    """The per-step LR of the run named by ``--schedule-of`` (``None`` without it); an unknown name or a run
    without a usable LR record is an error."""
    if name is None:
        return None
    run = next((r for r in runs if r.name == name), None)
    if run is None:
        raise CLIError(f"--schedule-of {name!r}: no such run among {sorted(r.name for r in runs)}")
    from lightning_scaling.backtest import run_schedule

    lr = run_schedule(run)[0]
    if lr is None:
        raise CLIError(f"--schedule-of {name!r}: the run records no learning rate")
    return lr


def _check_identified(law: Any) -> None:
    """A law the data do not determine is an error here: its predictions would be printed as numbers."""
    info = getattr(law, "info", None)
    if info is not None and not info.identified:
        raise CLIError(f"the runs do not determine a scaling law: {info.messages[0]}")
    for message in getattr(info, "messages", ()):  # what the fit says about an identified law (e.g. e at 0)
        print(f"note: {message}", file=sys.stderr)


def cmd_fit(args: argparse.Namespace) -> int:
    # Every check on the input runs before the fitting modules (Lightning, scipy, matplotlib) are imported.
    if args.critical_batch is not None and args.critical_only:
        raise CLIError("--critical-batch gives the critical batch, --critical-only fits it: use one")
    _check_paths(args.logdirs)
    runs = _load_runs(args.logdirs, args)
    for r in runs:
        _name_from_path(r, [Path(p) for p in args.logdirs])
    _assign_n_params(runs, args.n_params)
    _check_fit_runs(runs)
    schedule_lr = _schedule_lr(runs, args.schedule_of)
    from lightning_scaling.report.tables import format_fit_table
    from lightning_scaling.study.predict import fit_and_predict
    from lightning_scaling.fitting import fit_critical_batch_size

    sizes = sorted({r.n_params for r in runs})
    if args.critical_only:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            cb = fit_critical_batch_size(runs)
        if not (math.isfinite(cb.b_star) and cb.b_star > 0):
            raise CLIError(f"the batch sweep does not determine a critical batch size (B* = {cb.b_star:g})")
        result: dict[str, Any] = {"critical_batch": cb.to_dict(), "_critical": cb}
    else:
        if len(sizes) < 2:
            raise CLIError(f"all {len(runs)} runs have the same size N={sizes[0]:g}: a size fit needs runs of >= 2 "
                           "sizes (use --critical-only to fit the critical batch size of a batch sweep)")
        fit_kwargs: dict[str, Any] = {"form": args.form, "n_bootstrap": max(0, args.bootstrap)}
        if args.critical_batch is not None:
            fit_kwargs["critical_batch"] = args.critical_batch
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FitWarning)  # turned into the one-line error below
                result = fit_and_predict(runs, predict_n=args.predict_n, batch_size=args.batch_size,
                                         steps=args.steps, target_loss=args.target_loss, fit_kwargs=fit_kwargs,
                                         lr_schedule=schedule_lr,
                                         **({"sweep_runs": []} if args.critical_batch is not None else {}))
        except ValueError as err:
            if "critical_batch='none'" not in str(err):
                raise
            raise CLIError("no critical batch size available: the runs hold no batch sweep of one size and no "
                           "gradient noise scale. Pass --critical-batch none (fit L(N, S) at the batch size used) "
                           "or --critical-batch B (a constant critical batch in samples)") from None
        _check_identified(result.get("_law"))
        law = result.get("_law")
        if args.predict_n is not None and schedule_lr is None and law is not None and law.params["anneal"] > 0 \
                and law.schedule is None:
            print("note: the runs use several LR schedules; the prediction is at a constant LR (--schedule-of RUN "
                  "predicts under that run's schedule)", file=sys.stderr)
    if args.out:
        from lightning_scaling.history import final_loss
        from lightning_scaling.numerics import dumps
        from lightning_scaling.report.figures import write_figures

        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        histories = {r.name: r for r in runs}
        report = {"name": "lightning-scaling fit",
                  "runs": {r.name: {"role": "fit", "final_loss": final_loss(r)[0]} for r in runs}, **_strip(result)}
        (out / "fit.json").write_text(dumps(_strip(result), indent=1))
        result["figures"] = write_figures(report, histories, result.get("_law"), result.get("_critical"), out)
    if args.json:
        _print_json({"runs": [{"name": r.name, "n_params": r.n_params, "batch_size": r.batch_size,
                               "points": len(r)} for r in runs], **result})
    else:
        print(format_fit_table(result, runs))
        if args.out:
            print(f"Wrote {Path(args.out) / 'fit.json'} and plots to {Path(args.out).resolve()}")
    return EXIT_OK


def cmd_forecast(args: argparse.Namespace) -> int:
    import numpy as np

    from lightning_scaling.forecast import forecast_run
    from lightning_scaling.history import RunHistory

    kw = _reader_kwargs(args)
    path = Path(args.logdir)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    runs = RunHistory.load_many([path], **kw)
    if len(runs) != 1:
        raise CLIError(f"{path} holds {len(runs)} runs; point forecast at one run: "
                       + ", ".join(r.name for r in runs[:5]) + (" ..." if len(runs) > 5 else ""))
    run = runs[0]
    n_ok = int(run.finite_mask.sum())
    if n_ok < 10:
        raise CLIError(f"run {run.name!r} has only {n_ok} finite loss points: too short to forecast (need >= 10)")
    last = int(run.step[-1])
    if args.horizon <= last:
        raise CLIError(f"--horizon {args.horizon} must be beyond the run's last step {last}")
    fc_kwargs: dict[str, Any] = {"horizon": args.horizon}
    planned = run.planned_lr
    if planned is not None and 0 < len(planned) < args.horizon:
        # The recorded schedule stops at the run's max_steps; beyond it, assume the last LR is held.
        fc_kwargs["lr_schedule"] = np.concatenate([planned, np.full(args.horizon - len(planned), planned[-1])])
        print(f"note: the recorded LR schedule ends at step {len(planned)}; assuming its last LR "
              f"({planned[-1]:.3g}) continues to step {args.horizon}", file=sys.stderr)
    if args.target_loss is not None:
        fc_kwargs["target_loss"] = args.target_loss
    if args.method != "auto":
        fc_kwargs["method"] = args.method
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fc = forecast_run(run, **fc_kwargs)
    summary = _forecast_summary(fc, run, args.target_loss)
    if args.target_loss is not None:
        summary["steps_to_target"] = float(fc.steps_to(args.target_loss))
        # an observed step: the run's smoothed loss got there already (it may end above it again: see final_loss)
        summary["target_already_reached"] = bool(summary["steps_to_target"] <= last)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        from lightning_scaling.numerics import dumps
        from lightning_scaling.report.figures import forecast_figure

        payload = {"summary": summary, "steps": fc.steps, "loss": fc.loss, "lower": fc.lower, "upper": fc.upper}
        (out / "forecast.json").write_text(dumps(payload, indent=1))

        forecast_figure(run, fc, target_loss=args.target_loss).savefig(out / "forecast.png")
        summary["files"] = [str(out / "forecast.json"), str(out / "forecast.png")]
    if args.json:
        _print_json(summary)
    else:
        from lightning_scaling.report.tables import _rows_to_text

        rows = [[k, f"{v:.4g}" if isinstance(v, float) else str(v)] for k, v in summary.items()
                if k not in ("files", "target_already_reached")]
        if summary.get("target_already_reached"):
            rows = [[k, f"{v} (already reached: an observed step)" if k == "steps_to_target" else v] for k, v in rows]
        print(f"Forecast of {run.name} ({len(run)} points, last step {last}) to step {args.horizon}")
        print(_rows_to_text(["quantity", "value"], rows))
        if args.out:
            print(f"Wrote forecast.json and forecast.png to {Path(args.out).resolve()}")
    return EXIT_OK


def _forecast_summary(fc: Any, run: Any, target: float | None) -> dict[str, Any]:
    import numpy as np

    out: dict[str, Any] = {"run": run.name, "observed_until": int(run.step[-1])}
    for key in ("method", "horizon", "final_loss", "final_lower", "final_upper", "confidence", "steps_to_target",
                "tokens_to_target"):
        if hasattr(fc, key):
            v = getattr(fc, key)
            if isinstance(v, (np.floating, np.integer, np.ndarray)):
                v = np.asarray(v).item() if np.asarray(v).size == 1 else np.asarray(v).tolist()
            out[key] = v
    if target is not None:
        out["target_loss"] = target
    return out


def cmd_backtest(args: argparse.Namespace) -> int:
    from lightning_scaling.backtest import PREFIXES, backtest

    runs = _load_runs(args.logdirs, args)
    if not runs:
        raise CLIError(f"no runs found under {', '.join(args.logdirs)}")
    short = [r.name for r in runs if int(r.finite_mask.sum()) < 20]
    if len(short) == len(runs):
        raise CLIError(f"every run is too short to replay (< 20 finite loss points): {', '.join(short[:5])}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = backtest([r for r in runs if r.name not in short], args.prefixes or PREFIXES,
                       cross_size=not args.no_cross_size)
    res.notes += [f"{name}: fewer than 20 finite loss points, not replayed" for name in short]
    if args.json:
        _print_json(res.to_dict())
    else:
        print(f"Backtest of {len(runs)} finished run(s)")
        print(res.format())
    return EXIT_OK


COMMANDS = {"demo": cmd_demo, "recipe": cmd_recipe, "fit": cmd_fit, "forecast": cmd_forecast,
            "backtest": cmd_backtest}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lightning-scaling`` console script.

    Returns:
        0 on success, 1 when the data cannot be read or fitted, 2 on a usage error; errors are one line on stderr.

    Example::

        >>> main(["--version"])  # doctest: +SKIP
        lightning-scaling 0.1.0
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_OK
    try:
        return COMMANDS[args.command](args)
    except (CLIError, ValueError, FileNotFoundError) as err:
        msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"lightning-scaling {args.command}: error: {msg}", file=sys.stderr)
        return EXIT_DATA
    except KeyboardInterrupt:
        print(f"lightning-scaling {args.command}: interrupted (finished runs are kept and reused on restart)",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
