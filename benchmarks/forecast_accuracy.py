"""Accuracy and cost of lightning_scaling.forecast on the Multi-Power-Law curves of Luo et al. 2025 (MIT).

Sections (all CPU, numpy/scipy):

1. forward: the Multi-Power Law with the published parameters on the 6 test schedules (PredE, WorstE);
2. fit: ``fit_schedule_law`` on the 3 training schedules, predicting the 6 test schedules (MPL and momentum law);
3. prefix: ``forecast_run`` from the first 10/25/50% of each curve (logged points) with its full planned schedule:
   final-loss relative error and band coverage, without and with a prior law fitted on the training schedules,
   and the schedule-blind L(S) baseline;
4. refit: cost of one ``forecast_run`` on a 10k-point noisy history (cold, warm-started from the last one, and the
   periodic full revalidation of warm calls);
5. lodo: the constants of ``forecast_run`` chosen by looking at results, each chosen leave-one-dataset-out on the
   validation suite's curves (``validate.lodo_choose``): the combination weights' floor and the reference
   collapse's slope prior. The candidate fits do not depend on either, so each replay is fitted once and every
   value is scored on the same fits.

Section 3 also holds the two ablations of the issue: the L(S) form with and without the early-transient exclusion
(``power(blind)`` vs ``power(no-transient-excl)``) and the forecast with and without a prior ``law=`` fitted on the
three training schedules of the same size (``auto+law`` vs ``auto(test only)``, both on the six test curves).

Usage::

    python benchmarks/forecast_accuracy.py                 # everything (a few minutes on 2 cores)
    python benchmarks/forecast_accuracy.py --sections forward fit --sizes 25
    python benchmarks/forecast_accuracy.py --json out.json

``--device`` is accepted for symmetry with the other benchmarks; everything here runs on the CPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from lightning_scaling import RunHistory
from lightning_scaling.forecast import fit_schedule_law, forecast_run, multi_power_law

sys.path.insert(0, str(Path(__file__).resolve().parent))
from suite_data import mpl_curve  # noqa: E402

DATA = Path(__file__).resolve().parents[1] / "tests" / "data" / "mpl"
TRAIN = ("cosine_24000", "constant_24000", "wsdcon_9")
TEST = ("constant_72000", "cosine_72000", "wsd_20000_24000", "wsdld_20000_24000", "wsdcon_3", "wsdcon_18")
PUBLISHED = {  # L0, A, alpha, B, C, beta, gamma (Luo et al. 2025)
    25: (3.04045406, 0.52468604, 0.50786857, 363.78751622, 2.06560812, 0.58279013, 0.64142257),
    100: (2.6514477, 0.60115152, 0.45295811, 437.9464276, 2.13245612, 0.59785199, 0.65523644),
    400: (2.37474466, 0.65421216, 0.42878731, 523.42464371, 2.02462735, 0.59350493, 0.63472457),
}
NAMES = ("L0", "A", "alpha", "B", "C", "beta", "gamma")
PEAK, FLOOR = 3e-4, 3e-5  # the MPL runs' peak and final LR (cosine to 10%)


def load(size: int, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(steps in lightning-scaling convention, loss, per-step LR) of one curve (loader: ``suite_data``)."""
    h = mpl_curve(size, name, data=DATA)
    return h.step, h.loss, h.planned_lr


def section_forward(sizes) -> dict:
    out = {}
    for size in sizes:
        p = dict(zip(NAMES, PUBLISHED[size]))
        pe, we = [], []
        for name in TEST:
            s, y, lr = load(size, name)
            r = np.abs(multi_power_law(lr, s, **p) / y - 1)
            pe.append(r.mean())
            we.append(r.max())
        out[size] = {"PredE": float(np.mean(pe)), "WorstE": float(np.mean(we))}
        print(f"forward {size}M: PredE {np.mean(pe):.5f} WorstE {np.mean(we):.5f} "
              f"(published 0.00110/0.00142/0.00168, 0.00409/0.00583/0.00995)")
    return out


def train_fit(size: int, form: str):
    return fit_schedule_law([load(size, n) for n in TRAIN], form=form)


def section_fit(sizes) -> dict:
    out = {}
    for size in sizes:
        for form in ("mpl", "momentum"):
            t = time.perf_counter()
            fit = train_fit(size, form)
            dt = time.perf_counter() - t
            pe, we = [], []
            for name in TEST:
                s, y, lr = load(size, name)
                r = np.abs(fit.predict(lr, s) / y - 1)
                pe.append(r.mean())
                we.append(r.max())
            out[f"{size}/{form}"] = {"PredE": float(np.mean(pe)), "WorstE": float(np.mean(we)), "fit_s": dt,
                                     "params": fit.params}
            print(f"fit {size}M {form:8s}: PredE {np.mean(pe):.5f} WorstE {np.mean(we):.5f} fit {dt:.1f}s "
                  + " ".join(f"{k}={v:.4g}" for k, v in fit.params.items()))
    return out


def prefix_forecast(size: int, name: str, frac: float, **kw):
    s, y, lr = load(size, name)
    k = max(2, int(round(frac * s.size)))
    h = RunHistory(name=name, step=s[:k], loss=y[:k], planned_lr=lr)
    f = forecast_run(h, **kw)
    fut = s > s[k - 1]
    pred = np.interp(s[fut], f.steps, f.loss)
    lo = np.interp(s[fut], f.steps, f.lower)
    hi = np.interp(s[fut], f.steps, f.upper)
    return {
        "final_err": abs(f.final_loss / y[-1] - 1),
        "final_cover": bool(f.final_lower <= y[-1] <= f.final_upper),
        "path_err": float(np.mean(np.abs(pred / y[fut] - 1))),
        "path_cover": float(np.mean((lo <= y[fut]) & (y[fut] <= hi))),
        "width": (f.final_upper - f.final_lower) / f.final_loss,
        "method": f.method,
    }


def section_prefix(sizes, fracs=(0.1, 0.25, 0.5)) -> dict:
    out = {}
    for size in sizes:
        prior = train_fit(size, "mpl")
        variants = {
            "auto": (TRAIN + TEST, {}),
            "auto+law": (TEST, {"law": prior}),
            "auto(test only)": (TEST, {}),
            "power(blind)": (TRAIN + TEST, {"method": "power"}),
            "power(no-transient-excl)": (TRAIN + TEST, {"method": "power", "exclude_transient": False}),
        }
        for vname, (names, kw) in variants.items():
            for frac in fracs:
                rows = []
                t = time.perf_counter()
                for name in names:
                    try:
                        rows.append(prefix_forecast(size, name, frac, **kw))
                    except ValueError as e:
                        rows.append({"error": str(e)})
                dt = (time.perf_counter() - t) / len(names)
                ok = [r for r in rows if "error" not in r]
                key = f"{size}/{vname}/{frac}"
                if not ok:
                    out[key] = {"refused": len(rows)}
                    print(f"prefix {size}M {vname:16s} {frac:.0%}: all {len(rows)} refused")
                    continue
                res = {
                    "n": len(ok), "refused": len(rows) - len(ok),
                    "final_err_mean": float(np.mean([r["final_err"] for r in ok])),
                    "final_err_max": float(np.max([r["final_err"] for r in ok])),
                    "final_coverage": float(np.mean([r["final_cover"] for r in ok])),
                    "path_err_mean": float(np.mean([r["path_err"] for r in ok])),
                    "path_coverage": float(np.mean([r["path_cover"] for r in ok])),
                    "band_width_rel": float(np.median([r["width"] for r in ok])),
                    "band_width_rel_mean": float(np.mean([r["width"] for r in ok])),
                    "methods": {m: sum(r["method"] == m for r in ok) for m in {r["method"] for r in ok}},
                    "sec_per_forecast": dt,
                }
                out[key] = res
                print(f"prefix {size}M {vname:16s} {frac:4.0%}: final err mean {res['final_err_mean']:.4f} "
                      f"max {res['final_err_max']:.4f} | coverage final {res['final_coverage']:.2f} "
                      f"path {res['path_coverage']:.2f} | band width mean {res['band_width_rel_mean']:.4f} | "
                      f"path err {res['path_err_mean']:.4f} | {res['methods']} | {dt:.2f}s/forecast")
    # pooled over sizes: the headline coverage / width / error table and the two ablations
    print("pooled over sizes:")
    for vname in variants:
        for frac in fracs:
            rs = [out[f"{size}/{vname}/{frac}"] for size in sizes if "n" in out.get(f"{size}/{vname}/{frac}", {})]
            if not rs:
                continue
            n = sum(r["n"] for r in rs)
            cov = sum(r["final_coverage"] * r["n"] for r in rs) / n
            wid = sum(r["band_width_rel_mean"] * r["n"] for r in rs) / n
            err = sum(r["final_err_mean"] * r["n"] for r in rs) / n
            out[f"pooled/{vname}/{frac}"] = {"n": n, "final_coverage": cov, "band_width_rel_mean": wid,
                                             "final_err_mean": err}
            print(f"  {vname:24s} {frac:4.0%}: n {n:2d} final err {err:.4f} coverage {cov:.2f} "
                  f"mean rel width {wid:.4f}")
    return out


def noisy_history(n: int = 10_000, horizon: int = 20_000, noise: float = 0.01, seed: int = 0) -> RunHistory:
    """A cosine run's per-step training losses (MPL 25M curve × lognormal noise, a few NaNs), n steps seen."""
    rng = np.random.default_rng(seed)
    lr = np.empty(horizon)
    w = 500
    lr[:w] = PEAK * (np.arange(w) + 1) / w
    j = np.arange(horizon - w)
    lr[w:] = FLOOR + 0.5 * (PEAK - FLOOR) * (1 + np.cos(np.pi * j / (horizon - w)))
    steps = np.arange(1, n + 1)
    clean = multi_power_law(lr, steps, **dict(zip(NAMES, PUBLISHED[25])))
    loss = clean * np.exp(noise * rng.standard_normal(n))
    loss[rng.choice(n, 5, replace=False)] = np.nan
    return RunHistory(name="noisy", step=steps, loss=loss, planned_lr=lr, batch_size=256, tokens_per_sample=2048)


def section_refit(repeats: int = 20) -> dict:
    """Cold call, then ``repeats`` warm calls (``init=`` the last forecast) on a growing 10k-point history.

    With the default ``revalidate_every=10`` every 10th consecutive warm call is a full (cold) revalidation; the
    history grows by 50 steps per call, so the 25%-span trigger does not fire here.
    """
    h = noisy_history()
    t = time.perf_counter()
    f = forecast_run(h.truncate(9_000))
    cold = time.perf_counter() - t
    warm, reval = [], []
    for k in range(repeats):
        hk = h.truncate(9_000 + 50 * (k + 1))
        t = time.perf_counter()
        f = forecast_run(hk, init=f)
        (warm if f.state["warm"] else reval).append(time.perf_counter() - t)
    truth = multi_power_law(h.planned_lr, [h.planned_lr.size], **dict(zip(NAMES, PUBLISHED[25])))[0]
    allc = warm + reval
    res = {"cold_ms": cold * 1e3, "warm_ms_mean": float(np.mean(warm)) * 1e3,
           "warm_ms_median": float(np.median(warm)) * 1e3,
           "revalidation_ms_mean": float(np.mean(reval)) * 1e3 if reval else float("nan"),
           "all_calls_ms_mean": float(np.mean(allc)) * 1e3, "n_warm": len(warm), "n_revalidation": len(reval),
           "method": f.method, "final_err": abs(f.final_loss / truth - 1),
           "final_cover": bool(f.final_lower <= truth <= f.final_upper)}
    print(f"refit 9-10k-point noisy cosine history: cold {res['cold_ms']:.0f} ms | warm mean "
          f"{res['warm_ms_mean']:.1f} ms (median {res['warm_ms_median']:.1f}, n {len(warm)}) | revalidation "
          f"{res['revalidation_ms_mean']:.0f} ms (n {len(reval)}) | mean over all {len(allc)} init= calls "
          f"{res['all_calls_ms_mean']:.1f} ms ({f.method}; final-loss error {res['final_err']:.4f}, "
          f"covered {res['final_cover']})")
    return res


LODO_FLOORS = (1e-4, 5e-4, 2e-3, 5e-3)
LODO_CAPS = (0.05, 0.1, 0.2, 0.5, float("inf"))
LODO_SLOPE_SDS = (0.03, 0.1, 0.3, 1.0)
LODO_PREFIXES = (0.2, 0.3, 0.5)
LODO_CREDITS = (0.03, 0.05, 0.08)


def _lodo_table(errs: dict, label: str) -> dict:
    """Mean |final error| per (value, dataset), scored relative to the dataset's best value, and the LODO choice.

    Relative scores (1.0 = the best value on that dataset) keep one hard dataset from outvoting the others.
    """
    from validate import lodo_choose

    raw = {v: {d: float(np.mean(e)) for d, e in per.items() if e} for v, per in errs.items()}
    datasets = sorted({d for per in raw.values() for d in per})
    best = {d: min(raw[v][d] for v in raw if d in raw[v]) for d in datasets}
    rel = {v: {d: raw[v][d] / max(best[d], 1e-12) for d in raw[v]} for v in raw}
    choice = lodo_choose(rel) if len(datasets) >= 2 else {}
    scored = {d: raw[choice[d]][d] for d in choice}
    for d in datasets:
        print(f"lodo {label} {d}: " + ", ".join(f"{v:g}: {raw[v][d]:.3%}" for v in raw if d in raw[v])
              + (f" | LODO value {choice[d]:g} -> {scored[d]:.3%}" if d in choice else ""), flush=True)
    return {"mean_abs_err": raw, "choice": choice, "lodo_scored": scored}


def _lodo_replay(fc, run, p, lr, horizon, opts):
    """The prepared prefix curve and its law fits (the expensive part, shared by every value)."""
    import warnings

    cut = int(round(run.step[0] + p * (horizon - run.step[0])))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        curve = fc._prepare(run.truncate(cut), horizon, lr, method="auto", law=None, min_points=8,
                            min_fraction=0.0, max_bins=96, critical_batch=None)
        fits, errs, _ = fc._fit_candidates(curve, opts, [], None, False)
    return curve, fits, errs


def _kept(fc, fits, grid, cap):
    """The candidates forecast_run combines when the gain cap is ``cap`` (ValueError: it would refuse)."""
    cap0, fc._MAX_GAIN_FRAC = fc._MAX_GAIN_FRAC, cap
    try:
        return fc._drop_at_bounds(fc._drop_wild(fits, grid))
    finally:
        fc._MAX_GAIN_FRAC = cap0


def section_lodo(datasets=("mpl", "schaipp", "gemstones", "cpu_study")) -> dict:
    """Leave-one-dataset-out choice of the weight floor, the gain cap and the reference slope prior."""
    import suite_data as sd
    from validate import _reference_for

    from lightning_scaling import forecast as fc
    from lightning_scaling.backtest import final_window, run_schedule

    opts = fc._Opts(delta=1e-3, lam=0.999, holdout=0.25, validate=True, exclude_transient=True, confidence=0.9)
    errs = {"floor": {v: {} for v in LODO_FLOORS}, "cap": {v: {} for v in LODO_CAPS},
            "slope": {v: {} for v in LODO_SLOPE_SDS}, "credit": {v: {} for v in LODO_CREDITS}}
    cap0 = fc._MAX_GAIN_FRAC
    for name in datasets:
        if name not in sd.available():
            continue
        ds = sd.LOADERS[name]()
        for table in errs.values():
            for per in table.values():
                per[ds.name] = []
        for run in ds.curves:
            lr, horizon = run_schedule(run)
            fin = run.step[final_window(run.step)]
            actual = float(np.nanmean(run.loss[final_window(run.step)]))
            ref = _reference_for(run, ds.curves)
            refs = fc._reference_curves([ref]) if ref is not None else []
            for p in LODO_PREFIXES:
                try:
                    curve, fits, terr = _lodo_replay(fc, run, p, lr, horizon, opts)
                except (ValueError, FloatingPointError, np.linalg.LinAlgError):
                    continue
                score = lambda f, w: abs(float(fc._combine(f, w, fin)[0].mean()) / actual - 1)  # noqa: E731
                grid = fc._future_grid(curve.observed_until + 1, horizon, 256)
                try:  # the candidates forecast_run keeps (wild ones and ones on a bound left out) at each cap
                    kept = {v: _kept(fc, fits, grid, v) for v in LODO_CAPS}
                except ValueError:
                    continue
                fc._MAX_GAIN_FRAC = cap0
                for v in LODO_FLOORS:
                    k0 = kept[cap0]
                    errs["floor"][v][ds.name].append(score(k0, fc._weights(k0, terr, None, False, True, floor=v)))
                for v in LODO_CAPS:
                    fc._MAX_GAIN_FRAC = v
                    errs["cap"][v][ds.name].append(score(kept[v], fc._weights(kept[v], terr, None, False, True)))
                fc._MAX_GAIN_FRAC = cap0
                credit0 = fc._ANNEAL_FRAC
                for v in LODO_CREDITS:  # the L(S) candidate's expected-anneal credit (tail errors kept at the default)
                    fc._ANNEAL_FRAC = v
                    for f in kept[cap0].values():
                        getattr(f, "_raw", {}).clear()
                    w0 = fc._weights(kept[cap0], terr, None, False, True)
                    errs["credit"][v][ds.name].append(score(kept[cap0], w0))
                fc._ANNEAL_FRAC = credit0
                for f in kept[cap0].values():
                    getattr(f, "_raw", {}).clear()
                if refs:
                    sel = curve.bs >= curve.t_first + (1 - fc._REF_WINDOW) * (curve.t_obs - curve.t_first)
                    for v in LODO_SLOPE_SDS:
                        rf = fc._RefFit(refs[0][0], refs[0][1], curve, sel, v)
                        errs["slope"][v][ds.name].append(abs(float(rf.predict(fin).mean()) / actual - 1))
    return {k: _lodo_table(e, k) for k, e in errs.items()}


LODO_ANNEAL_FRACS = (0.015, 0.03, 0.06, 0.1)


def section_lodo_prior(datasets=("mpl", "schaipp", "gemstones", "cpu_study"), prefixes=(0.3, 0.5)) -> dict:
    """Leave-one-dataset-out choice of the annealing prior's centre (share of the current loss a full anneal buys).

    Only schedule-aware fits use it, so the curves with a decaying schedule are replayed (and, for Gemstones, every
    fourth cooldown: the loss at the end of a linear decay to 0 from the constant-LR prefix), refitted per value.
    """
    import suite_data as sd

    from lightning_scaling import forecast as fc
    from lightning_scaling.backtest import final_window, run_schedule

    a0 = fc._ANNEAL_FRAC
    errs = {v: {} for v in LODO_ANNEAL_FRACS}
    for name in datasets:
        if name not in sd.available():
            continue
        ds = sd.LOADERS[name]()
        cases = []  # (prefix history, horizon, lr, final steps, actual)
        for run in ds.curves:
            if run.meta.get("schedule") not in ("cosine", "wsd"):
                continue
            lr, horizon = run_schedule(run)
            fin = final_window(run.step)
            for p in prefixes:
                cut = int(round(run.step[0] + p * (horizon - run.step[0])))
                cases.append((run.truncate(cut), horizon, lr, run.step[fin], float(np.nanmean(run.loss[fin]))))
        by_name = {c.name: c for c in ds.curves}
        for pr in ds.extra.get("cooldowns", [])[::4]:
            c = by_name.get(pr["run"])
            if c is None:
                continue
            lr = np.ones(pr["end"])
            lr[pr["start"]:] = np.linspace(1.0, 0.0, pr["end"] - pr["start"])
            cases.append((c.truncate(pr["start"]), pr["end"], lr, np.array([pr["end"]]), pr["loss_end"]))
        for v in LODO_ANNEAL_FRACS:
            fc._ANNEAL_FRAC = v
            e = []
            for prefix, horizon, lr, fin, actual in cases:
                try:
                    f = forecast_run(prefix, horizon=horizon, lr_schedule=lr)
                except (ValueError, FloatingPointError, np.linalg.LinAlgError):
                    continue
                e.append(abs(float(np.interp(fin, f.steps, f.loss).mean()) / actual - 1))
            errs[v][ds.name] = e
        fc._ANNEAL_FRAC = a0
    return _lodo_table(errs, "anneal_frac")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sections", nargs="+", default=["forward", "fit", "prefix", "refit"],
                    choices=["forward", "fit", "prefix", "refit", "lodo", "lodo_prior"])
    ap.add_argument("--sizes", nargs="+", type=int, default=[25, 100, 400], choices=[25, 100, 400])
    ap.add_argument("--device", default="cpu", help="ignored: the forecast core is numpy/scipy")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)
    out = {}
    if "forward" in args.sections:
        out["forward"] = section_forward(args.sizes)
    if "fit" in args.sections:
        out["fit"] = section_fit(args.sizes)
    if "prefix" in args.sections:
        out["prefix"] = section_prefix(args.sizes)
    if "refit" in args.sections:
        out["refit"] = section_refit()
    if "lodo" in args.sections:
        out["lodo"] = section_lodo()
    if "lodo_prior" in args.sections:
        out["lodo_prior"] = section_lodo_prior()
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1, default=float))
    return out


if __name__ == "__main__":
    main()
