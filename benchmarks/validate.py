"""The validation suite: every prediction of lightning-scaling measured out of sample on real runs, in one command.

Writes ``docs/validation.md`` (the protocol and one table per task, datasets as rows, the project beside a simple
baseline measured in the same run), ``benchmarks/results/validation.json`` (every row) and the summary table of the
README's "How well it works" (between the ``validation:begin``/``validation:end`` markers). The protocol is in the
generated document itself (``PROTOCOL`` below).

Usage::

    python benchmarks/validate.py                 # everything (about 10 minutes on 2 cores)
    python benchmarks/validate.py --quick         # a subset in under 2 minutes (the test suite's regression check)
    python benchmarks/validate.py --datasets cpu_study mpl --tasks forecast

``--quick`` writes ``benchmarks/results/validation_quick.json`` only (no docs); ``--check`` compares it with the
committed one and fails when a number got worse than the tolerance (:func:`regressions`).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import suite_data as sd  # noqa: E402

from lightning_scaling import RunHistory  # noqa: E402
from lightning_scaling.backtest import (  # noqa: E402
    PREFIXES,
    KaplanBaseline,
    _warmup_end,
    final_window,
    holdout_cross_size,
    keep_gap_baseline,
    power_law_baseline,
    replay_forecast,
    run_schedule,
    score_law,
    summarize,
)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
TASKS = ("forecast", "reference", "stop", "cooldown", "cross_size", "schedule", "intervals", "batch", "bcrit",
         "nqs", "porian")
# Candidates for fitting.MODEL_ERROR_FLOOR (task intervals).
MODEL_ERROR_FLOORS = (0.0, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03)
QUICK_PREFIXES = (0.3, 0.5)
QUICK_CURVES = 3  # per dataset and schedule in --quick


# ================================================================================================================
# Leave one dataset out
# ================================================================================================================
def lodo_choose(scores: dict[Any, dict[str, float]]) -> dict[str, Any]:
    """For each dataset, the candidate value whose score (lower is better) is best on the *other* datasets.

    ``scores[value][dataset]`` is the score of a constant's candidate ``value`` on one dataset. A dataset's own
    score never picks the value it is evaluated with: the value for ``d`` minimises the mean score over the
    datasets other than ``d`` (ties: the first value in ``scores``). Missing or non-finite scores are skipped.

    Raises:
        ValueError: fewer than two datasets or no candidate values.

    Example::

        >>> lodo_choose({0.1: {"A": 1.0, "B": 3.0, "C": 3.0}, 0.3: {"A": 9.0, "B": 2.0, "C": 2.0}})
        {'A': 0.3, 'B': 0.1, 'C': 0.1}
    """
    datasets = sorted({d for per in scores.values() for d in per})
    if not scores or len(datasets) < 2:
        raise ValueError(f"leave-one-dataset-out needs candidate values and >= 2 datasets, got {len(scores)} "
                         f"values and {len(datasets)} datasets")
    out = {}
    for d in datasets:
        def others(value: Any) -> float:
            vals = [v for k, v in scores[value].items() if k != d and v is not None and math.isfinite(v)]
            return float(np.mean(vals)) if vals else math.inf
        out[d] = min(scores, key=others)
    return out


# ================================================================================================================
# Tasks: each returns {"rows": [...], "table": {dataset: {...}}}
# ================================================================================================================
def _pick(curves: Sequence[RunHistory], quick: bool, per: int = QUICK_CURVES) -> list[RunHistory]:
    """All curves, or in --quick ``per`` curves per schedule spread over the sizes."""
    if not quick:
        return list(curves)
    out = []
    for sched in ("constant", "cosine", "wsd"):
        cs = [c for c in curves if c.meta.get("schedule") == sched]
        idx = np.unique(np.linspace(0, len(cs) - 1, min(per, len(cs))).round().astype(int)) if cs else []
        out += [cs[i] for i in idx]
    return out


def task_forecast(datasets: Sequence[sd.Dataset], quick: bool) -> dict:
    """Default ``forecast_run`` from prefixes of every curve with its whole schedule; power-law baseline."""
    prefixes = QUICK_PREFIXES if quick else PREFIXES
    rows, table = [], {}
    for ds in datasets:
        if not ds.curves:
            continue
        rs = []
        for c in _pick(ds.curves, quick):
            for p in prefixes:
                r = replay_forecast(c, p)
                r.update(dataset=ds.name, schedule=c.meta.get("schedule"))
                rs.append(r)
        rows += rs
        table[ds.name] = {"all": summarize(rs)}
        for sched in ("constant", "cosine", "wsd"):
            sub = [r for r in rs if r["schedule"] == sched]
            if sub:
                table[ds.name][sched] = summarize(sub)
        print(f"[forecast] {ds.name}: {len(rs)} replays; " + ", ".join(
            f"{p:.0%} median {s['median']:.2%} worst {s['worst']:.2%} cover {s['coverage']:.0%} "
            f"(power {s['baseline_median']:.2%}/{s['baseline_worst']:.2%})"
            for p, s in table[ds.name]["all"].items()), flush=True)
    return {"rows": rows, "table": table}


def _reference_for(c: RunHistory, curves: Sequence[RunHistory]) -> RunHistory | None:
    """The finished run of the same setup (family) with the nearest smaller model, if any."""
    same = [r for r in curves if r.meta.get("family") == c.meta.get("family") and r.n_params < c.n_params]
    return max(same, key=lambda r: r.n_params) if same else None


def task_reference(datasets: Sequence[sd.Dataset], quick: bool) -> dict:
    """Forecast given finished smaller runs of the same setup; baseline: keep the loss gap to that run."""
    prefixes = QUICK_PREFIXES if quick else PREFIXES
    rows, table = [], {}
    for ds in datasets:
        pairs = [(c, _reference_for(c, ds.curves)) for c in _pick(ds.curves, quick)]
        pairs = [(c, r) for c, r in pairs if r is not None]
        if not pairs:
            continue
        rs = []
        for c, ref in pairs:
            actual = float(np.nanmean(c.loss[final_window(c.step)]))
            for p in prefixes:
                row = replay_forecast(c, p, reference=[ref])
                gap = keep_gap_baseline(c, ref, p)
                row.update(dataset=ds.name, reference=ref.name, baseline_predicted=gap,
                           baseline_err=gap / actual - 1)
                rs.append(row)
        rows += rs
        table[ds.name] = {"all": summarize(rs)}
        print(f"[reference] {ds.name}: {len(rs)} replays; " + ", ".join(
            f"{p:.0%} project {s['median']:.2%}/{s['worst']:.2%} keep-gap {s['baseline_median']:.2%}/"
            f"{s['baseline_worst']:.2%}" for p, s in table[ds.name]["all"].items()), flush=True)
    return {"rows": rows, "table": table}


# Early stopping replays (task stop): the callback's protocol (patience 3, min_fraction 0.2, warm-started refits)
# at every 10% of each run, for a target the run reaches (its final loss + 1%) and one it misses (- 3%).
STOP_CHECKS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
QUICK_STOP_CHECKS = (0.2, 0.3, 0.4, 0.5)  # --quick: one curve per schedule, the earliest stop (40%) still possible
STOP_TARGETS = {"reachable": 1.01, "out_of_reach": 0.97}


def _baseline_final(prefix: RunHistory, lr: Any, horizon: int) -> float:
    """The simple rule's forecast: the power law's final loss (no band); NaN (never a stop) if it cannot be fitted."""
    try:
        return float(power_law_baseline(prefix.step, prefix.loss, start=_warmup_end(lr))(np.array([float(horizon)]))[0])
    except (ValueError, RuntimeError):
        return math.nan


def replay_stop(run: RunHistory, checks: Sequence[float] = STOP_CHECKS) -> dict[str, Any]:
    """Replay ForecastEarlyStopping's rule over one finished run: the fraction of the run at which each target's
    rule stopped (``None``: never), for the project and for the power-law rule."""
    from lightning_scaling.stopping import ForecastStopRule, current_loss
    from lightning_scaling.forecast import forecast_run

    lr, horizon = run_schedule(run)
    actual = float(np.nanmean(run.loss[final_window(run.step)]))
    targets = {k: actual * m for k, m in STOP_TARGETS.items()}
    rules = {k: ForecastStopRule(horizon=horizon, target_loss=t, max_steps=horizon) for k, t in targets.items()}
    base_wait = dict.fromkeys(targets, 0)
    row: dict[str, Any] = {"run": run.name, "actual": actual, "refused": 0}
    row.update({f"{k}_stop": None for k in targets}, **{f"{k}_baseline_stop": None for k in targets})
    prev = None
    for p in checks:
        cut = int(round(run.step[0] + p * (horizon - run.step[0])))
        prefix = run.truncate(cut)
        try:
            prev = forecast_run(prefix, horizon=horizon, lr_schedule=lr, init=prev)
        except (ValueError, FloatingPointError, np.linalg.LinAlgError):
            row["refused"] += 1  # no forecast, no verdict: the callback counts nothing either
            continue
        current = current_loss(prev)
        # The power-law rule beside ours: one fit per check serves both targets; it stops when the law's final loss
        # misses a target not yet reached (lowest recent loss) at `patience` checks in a row.
        base_final = _baseline_final(prefix, lr, horizon)
        recent_min = float(np.nanmin(prefix.loss[-max(3, prefix.loss.size // 50):]))
        for k, rule in rules.items():
            if row[f"{k}_stop"] is None and rule.update(prev, current_step=cut, current_loss=current):
                row[f"{k}_stop"] = p
            misses = not recent_min <= targets[k] and base_final > targets[k]  # NaN recent loss: not reached
            base_wait[k] = base_wait[k] + 1 if misses else 0
            if row[f"{k}_baseline_stop"] is None and base_wait[k] >= rule.patience:
                row[f"{k}_baseline_stop"] = p
    return row


def _stop_summary(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """False stops (a reachable target stopped), and when out-of-reach targets were stopped, ours and baseline."""
    out: dict[str, Any] = {"curves": len(rows)}
    for who, suffix in (("project", "_stop"), ("baseline", "_baseline_stop")):
        miss = [r["out_of_reach" + suffix] for r in rows]
        stopped = [m for m in miss if m is not None]
        out[who] = {"false_stops": sum(r["reachable" + suffix] is not None for r in rows),
                    "out_of_reach_stopped": len(stopped) / max(len(rows), 1),
                    "median_stop_fraction": float(np.median(stopped)) if stopped else None}
    return out


def task_stop(datasets: Sequence[sd.Dataset], quick: bool) -> dict:
    """ForecastEarlyStopping's rule replayed on every curve: no stop for a reachable target (final loss + 1%),
    and the fraction of the run at which an out-of-reach one (final loss - 3%) is stopped; power-law rule beside."""
    rows, table = [], {}
    for ds in datasets:
        if not ds.curves:
            continue
        checks = QUICK_STOP_CHECKS if quick else STOP_CHECKS
        rs = [dict(replay_stop(c, checks), dataset=ds.name, schedule=c.meta.get("schedule"))
              for c in _pick(ds.curves, quick, per=1)]
        rows += rs
        table[ds.name] = _stop_summary(rs)
        t = table[ds.name]
        print(f"[stop] {ds.name}: {len(rs)} curves; false stops {t['project']['false_stops']} "
              f"(power {t['baseline']['false_stops']}), out of reach stopped {t['project']['out_of_reach_stopped']:.0%}"
              f" (power {t['baseline']['out_of_reach_stopped']:.0%}) at median "
              f"{t['project']['median_stop_fraction']} (power {t['baseline']['median_stop_fraction']})", flush=True)
    return {"rows": rows, "table": table}


def task_cooldown(datasets: Sequence[sd.Dataset], quick: bool) -> dict:
    """Gemstones cooldowns: forecast the loss at the end of a linear decay to 0 from the constant-LR prefix.

    The real check of what a schedule-aware forecast assumes a decay will buy. Baseline: the power law on the
    same prefix (it cannot see the decay, so it predicts no gain).
    """
    from lightning_scaling.forecast import forecast_run

    ds = next((d for d in datasets if d.name == "Gemstones"), None)
    if ds is None:
        return {"rows": [], "table": {}}
    by_name = {c.name: c for c in ds.curves}
    pairs = ds.extra["cooldowns"]
    if quick:
        pairs = pairs[::12]
    rows = []
    for pr in pairs:
        c = by_name.get(pr["run"])
        if c is None:
            continue
        prefix = c.truncate(pr["start"])
        lr = np.ones(pr["end"])
        lr[pr["start"]:] = np.linspace(1.0, 0.0, pr["end"] - pr["start"])
        row = {"run": pr["run"], "start": pr["start"], "end": pr["end"], "actual": pr["loss_end"],
               "actual_gain": pr["loss_start"] - pr["loss_end"], "dataset": ds.name, "fraction": 1.0}
        try:
            base = float(power_law_baseline(prefix.step, prefix.loss)(np.array([pr["end"]]))[0])
            row.update(baseline_predicted=base, baseline_err=base / pr["loss_end"] - 1)
        except (ValueError, RuntimeError) as exc:
            row["baseline_error"] = str(exc)
        try:
            f = forecast_run(prefix, horizon=pr["end"], lr_schedule=lr)
            row.update(predicted=f.final_loss, final_err=f.final_loss / pr["loss_end"] - 1,
                       covered=bool(f.final_lower <= pr["loss_end"] <= f.final_upper), curve_err=float("nan"),
                       predicted_gain=float(np.interp(pr["start"], f.observed_steps, f.observed_loss)) - f.final_loss,
                       method=f.method, error=None)
        except (ValueError, FloatingPointError, np.linalg.LinAlgError) as exc:
            row.update(error=str(exc), final_err=float("nan"), covered=None, curve_err=float("nan"))
        rows.append(row)
    table = {ds.name: {"all": summarize(rows)}} if rows else {}
    ok = [r for r in rows if not r.get("error")]
    if ok:
        table[ds.name]["gain"] = {"actual_mean": float(np.mean([r["actual_gain"] for r in ok])),
                                  "predicted_mean": float(np.mean([r["predicted_gain"] for r in ok]))}
        s = table[ds.name]["all"][1.0]
        print(f"[cooldown] {len(rows)} cooldowns ({s['refused']} refused): median {s['median']:.2%} worst "
              f"{s['worst']:.2%} cover {s['coverage']:.0%} (power {s['baseline_median']:.2%}); gain actual "
              f"{table[ds.name]['gain']['actual_mean']:.3f} predicted {table[ds.name]['gain']['predicted_mean']:.3f}",
              flush=True)
    return {"rows": rows, "table": table}


def _cross_cases(datasets: Sequence[sd.Dataset]) -> list[tuple[str, str, list[RunHistory], list[RunHistory]]]:
    """(dataset, case, train, test): the smaller two thirds of the sizes fit, the rest are predicted."""
    cases = []
    for ds in datasets:
        if ds.name == "MPL":
            for sched in ("constant_72000", "cosine_72000", "wsd_20000_24000"):
                cs = [c for c in ds.curves if c.name.endswith(sched)]
                cases.append((ds.name, sched, cs[:2], cs[2:]))
        elif ds.name == "Gemstones":
            cases.append((ds.name, "48M-550M -> 1B, 2B", [c for c in ds.curves if c.n_params < 6e8],
                          [c for c in ds.curves if c.n_params >= 6e8]))
        elif ds.name == "Schaipp":
            cs = sorted([c for c in ds.curves if c.meta["schedule"] == "constant"
                         and c.meta["family"].startswith("schaipp_slimpajama")], key=lambda c: c.n_params)
            sizes = sorted({c.n_params for c in cs})
            k = max(2, int(round(len(sizes) * 2 / 3)))
            cases.append((ds.name, "constant, slimpajama", [c for c in cs if c.n_params in sizes[:k]],
                          [c for c in cs if c.n_params in sizes[k:]]))
        elif ds.name == "CPU study":
            for sched in ("constant", "cosine", "wsd"):
                ladder = [c for c in ds.curves if c.meta.get("schedule") == sched and c.batch_size == 16]
                sizes = sorted({c.n_params for c in ladder})
                if len(sizes) < 3:
                    continue
                k = int(round(len(sizes) * 2 / 3))
                train = [c for c in ladder if c.n_params in sizes[:k]]
                if sched == "constant":  # the sweep is part of the study's fit data
                    train += [c for c in ds.curves if c.meta.get("role") == "sweep"]
                cases.append((ds.name, sched, train, [c for c in ladder if c.n_params in sizes[k:]]))
    return [c for c in cases if c[2] and c[3]]


def task_cross_size(datasets: Sequence[sd.Dataset], quick: bool) -> dict:
    """Default ``fit_scaling_law`` on the smaller sizes, whole curves of the held-out sizes; Kaplan baseline."""
    rows, table = [], defaultdict(dict)
    for name, case, train, test in _cross_cases(datasets):
        if quick and name == "MPL" and case != "constant_72000":
            continue
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rs = holdout_cross_size(train, test, fit_kwargs={"n_bootstrap": 20} if quick else None)
        for r in rs:
            r.update(dataset=name, case=case, fit_s=time.perf_counter() - t0)
        rows += rs
        table[name][case] = {
            **_heldout_summary(rs),
            "note": next((r.get("note") for r in rs if r.get("note")), None),
            "error": next((r.get("error") for r in rs if r.get("error")), None),
        }
        t = table[name][case]
        print(f"[cross-size] {name} {case}: final worst {t['final_worst']:.2%} curve worst {t['curve_worst']:.2%} "
              f"cover {t['coverage']:.0%} (Kaplan {t['baseline_final_worst']:.2%}/{t['baseline_curve_worst']:.2%})"
              + (f" error: {t['error']}" if t["error"] else ""), flush=True)
    return {"rows": rows, "table": dict(table)}


def _schedule_cases(datasets: Sequence[sd.Dataset]) -> list[tuple[str, str, list[RunHistory], list[RunHistory]]]:
    """(dataset, case, train, test): smaller sizes under any mix of schedules, held-out sizes under a decay."""
    cases = []
    for ds in datasets:
        if ds.name == "MPL":  # Luo et al.'s fit schedules of the two smaller models -> the 400M test decays
            train = [c for c in ds.curves if c.meta["size"] != 400
                     and c.name.split("_", 1)[1] in ("cosine_24000", "constant_24000", "wsdcon_9")]
            test = [c for c in ds.curves if c.meta["size"] == 400
                    and c.name.split("_", 1)[1] in ("cosine_72000", "wsd_20000_24000", "wsdld_20000_24000")]
            cases.append((ds.name, "25M+100M (cosine, constant, two-stage) -> 400M decays", train, test))
        elif ds.name == "CPU study":
            ladder = [c for c in ds.curves if c.batch_size == 16 and c.meta.get("role") != "sweep"]
            sizes = sorted({c.n_params for c in ladder})
            if len(sizes) < 3:
                continue
            k = int(round(len(sizes) * 2 / 3))
            train = [c for c in ladder if c.n_params in sizes[:k]]
            train += [c for c in ds.curves if c.meta.get("role") == "sweep"]
            test = [c for c in ladder if c.n_params in sizes[k:] and c.meta.get("schedule") in ("cosine", "wsd")]
            cases.append((ds.name, "all schedules -> held-out sizes, cosine and WSD", train, test))
    return [c for c in cases if c[2] and c[3]]


def _score_schedule(law: Any, run: RunHistory) -> dict[str, Any]:
    """The held-out run's whole curve predicted under its own LR schedule (``lr_schedule=``)."""
    return score_law(law, run, lr_schedule=run_schedule(run)[0]) | {"schedule": run.meta.get("schedule"),
                                                                     "error": None}


def _heldout_summary(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Worst final and curve errors of held-out runs (and of the baseline), the largest run's, the coverage."""
    ok = [r for r in rows if not r.get("error")]
    cov = [r["covered"] for r in ok if r.get("covered") is not None]
    nan = float("nan")
    return {
        "n": len(rows), "refused": len(rows) - len(ok),
        "final_worst": max((abs(r["final_err"]) for r in ok), default=nan),
        "final_largest": abs(max(ok, key=lambda r: r["n_params"])["final_err"]) if ok else nan,
        "curve_worst": max((r["curve_err"] for r in ok), default=nan),
        "coverage": float(np.mean(cov)) if cov else nan,
        "baseline_final_worst": max((abs(r.get("baseline_err", nan)) for r in ok), default=nan),
        "baseline_curve_worst": max((r.get("baseline_curve_err", nan) for r in ok), default=nan),
    }


def task_schedule(datasets: Sequence[sd.Dataset], quick: bool) -> dict:
    """Held-out sizes under a decayed schedule: ``predict_loss(..., lr_schedule=)`` of the default fit."""
    from lightning_scaling.fitting import fit_scaling_law

    rows, table = [], {}
    for name, case, train, test in _schedule_cases(datasets):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                law = fit_scaling_law(train, n_bootstrap=20 if quick else 100)
            except ValueError:  # one batch size: the batch effect is not modelled (as backtest._fit does)
                law = fit_scaling_law(train, critical_batch="none", n_bootstrap=20 if quick else 100)
            rs = [_score_schedule(law, t) | {"dataset": name, "case": case} for t in test]
            base = KaplanBaseline(train)  # schedule-blind and batch-blind, fitted on the same runs
            for r, t in zip(rs, test):
                b = score_law(base, t)
                r.update(baseline_err=b["final_err"], baseline_curve_err=b["curve_err"])
        rows += rs
        table[name] = {case: {**_heldout_summary(rs),
                              "per_run": {r["run"]: (r["final_err"], r["curve_err"]) for r in rs}}}
        t = table[name][case]
        print(f"[schedule] {name} {case}: final worst {t['final_worst']:.2%} curve worst {t['curve_worst']:.2%} "
              f"cover {t['coverage']:.0%}; " + ", ".join(f"{k} {v[0]:+.2%}/{v[1]:.2%}"
                                                         for k, v in t["per_run"].items()), flush=True)
    return {"rows": rows, "table": table}


def _interval_holds(law: Any, run: RunHistory, lr: Any, floor: float) -> bool:
    """Whether the 90% interval of the final-window loss holds the actual one with the model-error floor ``floor``."""
    from lightning_scaling import fitting

    s = run.step.astype(np.float64)
    fin = final_window(run.step) & np.isfinite(run.loss)
    saved, fitting.MODEL_ERROR_FLOOR = fitting.MODEL_ERROR_FLOOR, floor
    try:
        lo, hi = law.interval("predict_loss", run.n_params, s[fin], run.batch_size, lr_schedule=lr, level=0.9)
    finally:
        fitting.MODEL_ERROR_FLOOR = saved
    return bool(np.mean(lo) <= run.loss[fin].mean() <= np.mean(hi))


def task_intervals(datasets: Sequence[sd.Dataset], quick: bool) -> dict:
    """Coverage of the 90% intervals of held-out final losses (cross-size and schedule cases) per model-error floor.

    The floor is the one constant of the intervals; each dataset is scored at the floor :func:`lodo_choose` picks
    on the *other* datasets (score ``|coverage - 0.9|``), and the pooled coverage is over those rows.
    """
    from lightning_scaling.backtest import _fit

    cov: dict[float, dict[str, list[bool]]] = {f: defaultdict(list) for f in MODEL_ERROR_FLOORS}
    cases = [] if quick else [(n, c, tr, te, False) for n, c, tr, te in _cross_cases(datasets)]  # --quick: < 2 min
    cases += [(n, c, tr, te, True) for n, c, tr, te in _schedule_cases(datasets)]
    for name, case, train, test, scheduled in cases:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                law, _ = _fit(train, n_bootstrap=20 if quick else 100)
            except (ValueError, RuntimeError):
                continue
            for t in test:
                lr = run_schedule(t)[0] if scheduled else None
                for f in MODEL_ERROR_FLOORS:
                    cov[f][name].append(_interval_holds(law, t, lr, f))
    per = {f: {d: float(np.mean(v)) for d, v in by.items()} for f, by in cov.items()}
    choice = lodo_choose({f: {d: abs(c - 0.9) for d, c in by.items()} for f, by in per.items()})
    pooled = [x for d, f in choice.items() for x in cov[f][d]]
    overall = {f: float(np.mean([abs(c - 0.9) for c in by.values()])) for f, by in per.items()}
    table = {"by_floor": per, "lodo_floor": choice, "lodo_coverage": {d: per[f][d] for d, f in choice.items()},
             "default_floor": min(overall, key=overall.get),  # all datasets: the value fitting.py ships
             "pooled_coverage": float(np.mean(pooled)) if pooled else float("nan"), "n": len(pooled)}
    print(f"[intervals] LODO floors {choice} (all datasets: {table['default_floor']}); coverage " + ", ".join(
        f"{d} {c:.0%}" for d, c in table["lodo_coverage"].items()) + f"; pooled {table['pooled_coverage']:.0%} "
        f"of {len(pooled)}", flush=True)
    return {"rows": [], "table": {"all": table}}


def task_batch(datasets: Sequence[sd.Dataset], quick: bool) -> dict:
    """CPU study: one sweep batch size held out of the fit (ladder + rest of the sweep), its curve predicted."""
    ds = next((d for d in datasets if d.name == "CPU study"), None)
    rows, table = [], {}
    if ds is None:
        return {"rows": rows, "table": table}
    sweep = [c for c in ds.curves if c.meta.get("role") in ("sweep", "ladder+sweep")]
    ladder = [c for c in ds.curves if c.meta.get("schedule") == "constant" and c.meta.get("role") == "ladder"]
    held = sorted(sweep, key=lambda c: c.batch_size)
    if quick:
        held = [held[0], held[-1]] if held else []
    for h in held:
        train = ladder + [c for c in sweep if c is not h]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rs = holdout_cross_size(train, [h], fit_kwargs={"n_bootstrap": 20} if quick else None)
        for r in rs:
            r.update(dataset=ds.name, case=f"batch {h.batch_size:g}")
        rows += rs
    if rows:
        table[ds.name] = {**_heldout_summary(rows),
                          "per_batch": {r["case"]: (r.get("final_err"), r.get("baseline_err")) for r in rows}}
        print("[batch] CPU study: " + ", ".join(f"{k} {v[0]:+.2%} (Kaplan {v[1]:+.2%})" for k, v in
                                                 table[ds.name]["per_batch"].items() if v[0] is not None), flush=True)
    return {"rows": rows, "table": table}


def task_bcrit(datasets: Sequence[sd.Dataset], quick: bool) -> dict:
    """The B_crit(L) law of the default fit against the per-level hyperbola values at the lowest three levels."""
    from lightning_scaling.fitting import fit_critical_batch_size

    ds = next((d for d in datasets if d.name == "CPU study"), None)
    if ds is None:
        return {"rows": [], "table": {}}
    sweep = [c for c in ds.curves if c.meta.get("role") in ("sweep", "ladder+sweep")]
    if len(sweep) < 3:
        return {"rows": [], "table": {}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = fit_critical_batch_size(sweep)
    t = fit.table
    ok = np.isfinite(t["b_crit"]) & (t["b_crit"] > 0)
    loss, bc = t["loss"][ok], t["b_crit"][ok]
    order = np.argsort(loss)
    low = order[:3]
    law = fit(loss[low])
    geo = float(np.exp(np.mean(np.log(bc))))  # baseline: one constant B_crit (geometric mean of all levels)
    rows = [{"loss": float(loss[i]), "hyperbola": float(bc[i]), "law": float(v), "err": float(v / bc[i] - 1),
             "baseline_err": geo / float(bc[i]) - 1} for i, v in zip(low, law)]
    table = {ds.name: {"alpha_b": fit.alpha_b, "b_star": fit.b_star, "levels": int(ok.sum()),
                       "worst": max(abs(r["err"]) for r in rows),
                       "baseline_worst": max(abs(r["baseline_err"]) for r in rows), "lowest": rows}}
    print(f"[bcrit] CPU study: alpha_B {fit.alpha_b:.3f}, lowest three levels " + ", ".join(
        f"L={r['loss']:.3f}: law {r['law']:.1f} vs {r['hyperbola']:.1f} ({r['err']:+.0%})" for r in rows), flush=True)
    return {"rows": rows, "table": table}


def task_nqs(datasets: Sequence[sd.Dataset], quick: bool) -> dict:
    """NQS: ``fit_loss_n_s_b`` on the paper's train split, IsoFLOP and IsoToken tests; Chinchilla L(N, D) baseline."""
    from scipy.optimize import curve_fit

    from lightning_scaling.fitting import fit_loss_n_s_b

    ds = next((d for d in datasets if d.name == "NQS"), None)
    if ds is None:
        return {"rows": [], "table": {}}
    rows = ds.extra["rows"]
    cols = lambda rs: [np.array([float(r[k]) for r in rs]) for k in ("N", "K", "B", "loss")]  # noqa: E731
    train = [r for r in rows if r["split"] == "train"]
    tests = {t: [r for r in rows if r["split"] == "test" and r["type"] == t] for t in ("isoflop", "isotoken")}
    law = fit_loss_n_s_b(*cols(train), tokens_per_sample=128)
    n, k, b, y = cols(train)

    def chin(x: np.ndarray, e: float, a: float, alpha: float, bb: float, beta: float) -> np.ndarray:
        return np.log(e + np.exp(a) * x[0] ** -alpha + np.exp(bb) * x[1] ** -beta)

    p, _ = curve_fit(chin, np.vstack([n, k * b * 128]), np.log(y), p0=(1.5, 6.0, 0.3, 6.0, 0.3),
                     bounds=([0, -20, 0, -20, 0], [5, 40, 2, 40, 2]), maxfev=20000)
    table = {"NQS": {}}
    for t, rs in tests.items():
        nt, kt, bt, yt = cols(rs)
        e = float(np.mean(np.abs(law.predict_loss(nt, kt, bt) / yt - 1)))
        eb = float(np.mean(np.abs(np.exp(chin(np.vstack([nt, kt * bt * 128]), *p)) / yt - 1)))
        table["NQS"][t] = {"mean_abs_err": e, "baseline_mean_abs_err": eb, "paper": {"isoflop": 0.022,
                                                                                     "isotoken": 0.051}[t]}
    print(f"[nqs] IsoFLOP {table['NQS']['isoflop']['mean_abs_err']:.2%} (Chinchilla "
          f"{table['NQS']['isoflop']['baseline_mean_abs_err']:.2%}, paper 2.2%), IsoToken "
          f"{table['NQS']['isotoken']['mean_abs_err']:.2%} (Chinchilla "
          f"{table['NQS']['isotoken']['baseline_mean_abs_err']:.2%}, paper 5.1%)", flush=True)
    return {"rows": [], "table": table}


def task_porian(datasets: Sequence[sd.Dataset], quick: bool) -> dict:
    """Porian: compute-optimal exponent from the raw isoFLOP points against the published one, per config."""
    from lightning_scaling.fitting import fit_power_law, isoflop_optima

    ds = next((d for d in datasets if d.name == "Porian"), None)
    if ds is None:
        return {"rows": [], "table": {}}
    pts = defaultdict(list)
    for r in ds.extra["points"]:
        pts[(r["source"], r["row"])].append(r)
    rows = []
    for e in ds.extra["exponents"]:
        rs = pts[(e["source"], e["row"])]
        c, n, loss = (np.array([float(r[k]) if r[k] else np.nan for r in rs]) for k in ("flops", "N", "loss"))
        opt = isoflop_optima(c, n, loss, window=3)
        a = fit_power_law(opt["flops"], opt["n_opt"]).exponent
        rows.append({"config": "/".join(e[x] for x in ("dataset", "hparams", "warmup", "decay")),
                     "published": float(e["n_exponent"]), "fitted": float(a)})
    worst = max(abs(r["fitted"] - r["published"]) for r in rows)
    print(f"[porian] {len(rows)} configs: worst |a - published| {worst:.3f}", flush=True)
    return {"rows": rows, "table": {"Porian": {"worst_abs_diff": worst, "n": len(rows)}}}


TASK_FNS: dict[str, Callable[[Sequence[sd.Dataset], bool], dict]] = {
    "forecast": task_forecast, "reference": task_reference, "stop": task_stop, "cooldown": task_cooldown,
    "cross_size": task_cross_size, "schedule": task_schedule, "intervals": task_intervals, "batch": task_batch,
    "bcrit": task_bcrit, "nqs": task_nqs, "porian": task_porian}


# ================================================================================================================
# Regression check (--quick) and output
# ================================================================================================================
def _flatten(obj: Any, prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}/{k}" if prefix else str(k)))
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool) and obj is not None:
        out[prefix] = float(obj)
    return out


# Error-like metrics (lower is better) and coverage (closer to the level is better) are checked.
_WORSE_IF_UP = ("median", "worst", "curve", "final_worst", "final_largest", "curve_worst", "mean_abs_err",
                "false_stops")


def regressions(new: dict, old: dict, *, abs_tol: float = 0.003, rel_tol: float = 0.15) -> list[str]:
    """Metrics of ``new`` that are worse than ``old`` by more than ``abs_tol + rel_tol * old``.

    Only error metrics of the project (not the baselines) are compared; a metric present in ``old`` and missing
    (or NaN) in ``new`` is a regression too. Coverage may not fall by more than 20 points.

    Example::

        >>> old = {"forecast": {"A": {"all": {"0.5": {"median": 0.01}}}}}
        >>> regressions({"forecast": {"A": {"all": {"0.5": {"median": 0.02}}}}}, old)
        ['forecast/A/all/0.5/median: 0.0100 -> 0.0200']
    """
    fo, fn = _flatten(old), _flatten(new)
    bad = []
    for key, v_old in fo.items():
        leaf = key.rsplit("/", 1)[-1]
        if not math.isfinite(v_old) or "baseline" in key:
            continue
        v_new = fn.get(key, float("nan"))
        if leaf in _WORSE_IF_UP and not (v_new <= v_old + abs_tol + rel_tol * abs(v_old)):
            bad.append(f"{key}: {v_old:.4f} -> {v_new:.4f}")
        elif leaf == "coverage" and not (v_new >= v_old - 0.2):
            bad.append(f"{key}: {v_old:.4f} -> {v_new:.4f}")
    return bad


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def _clean(obj: Any) -> Any:
    """NaN/inf -> None, keys -> str (one JSON convention: non-finite numbers are null)."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def run(datasets: Sequence[str], tasks: Sequence[str], quick: bool) -> dict:
    t0 = time.perf_counter()
    loaded = []
    for name in datasets:
        ds = sd.LOADERS[name]()
        loaded.append(ds)
        print(f"[data] {ds.name}: {len(ds.curves)} curves" + ("" if not ds.extra else
                                                              f", {', '.join(f'{len(v)} {k}' for k, v in ds.extra.items())}"))
    import validation_report

    out: dict[str, Any] = {"quick": quick, "commit": validation_report._git(), "datasets": {d.name: {"curves": len(d.curves), "tuned_on": d.tuned_on}
                                                         for d in loaded}, "tables": {}, "rows": {}, "seconds": {}}
    for task in tasks:
        t = time.perf_counter()
        res = TASK_FNS[task](loaded, quick)
        out["tables"][task], out["rows"][task] = res["table"], res["rows"]
        out["seconds"][task] = round(time.perf_counter() - t, 1)
    out["seconds"]["total"] = round(time.perf_counter() - t0, 1)
    print(f"[validate] done in {out['seconds']['total']:.0f} s")
    return _clean(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a subset in under 2 minutes")
    ap.add_argument("--datasets", nargs="*", default=None, choices=list(sd.LOADERS))
    ap.add_argument("--tasks", nargs="*", default=list(TASKS), choices=list(TASKS))
    ap.add_argument("--check", action="store_true", help="with --quick: fail if worse than the committed numbers")
    ap.add_argument("--json", type=Path, default=None, help="where to write the results (default: results/)")
    ap.add_argument("--no-docs", action="store_true", help="do not write docs/validation.md and the README table")
    args = ap.parse_args(argv)
    datasets = args.datasets if args.datasets is not None else sd.available()
    res = run(datasets, args.tasks, args.quick)
    target = args.json or RESULTS / ("validation_quick.json" if args.quick else "validation.json")
    if args.check:
        old = json.loads((RESULTS / "validation_quick.json").read_text())
        bad = regressions(res["tables"], old["tables"])
        for b in bad:
            print(f"REGRESSION {b}")
        return 1 if bad else 0
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(res, indent=1, default=_json_default))
    print(f"wrote {target}")
    if not args.quick and not args.no_docs:
        import validation_report

        validation_report.write(res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
