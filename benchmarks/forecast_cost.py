"""What one ``forecast_run`` costs, cold and warm (``init=`` the previous forecast), on real-shaped histories.

Histories: a synthetic per-step training-loss curve (the published 25M Multi-Power-Law parameters of Luo et al.
2025 under the run's schedule, times 1% lognormal noise and a few NaNs) over a horizon of twice the observed
points, for cosine, WSD (decay over the last 20%) and constant schedules (5% warmup), observed for 600, 10k and
100k points. Cold: the first call on the history. Warm: ``init=`` the last forecast as the history grows by 0.5%
per call (the callback's cadence), the median over the warm calls that did not revalidate. Usage::

    python benchmarks/forecast_cost.py                        # every shape and size
    python benchmarks/forecast_cost.py --points 10000 --schedules cosine --profile

Targets (issue 13): <= 200 ms cold and <= 20 ms warm on a 10k-point cosine history.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import time

import numpy as np

from lightning_scaling import RunHistory
from lightning_scaling.forecast import forecast_run, multi_power_law

MPL25 = dict(L0=3.04045406, A=0.52468604, alpha=0.50786857, B=363.78751622, C=2.06560812, beta=0.58279013,
             gamma=0.64142257)
PEAK, FLOOR = 3e-4, 3e-5
SCHEDULES = ("cosine", "wsd", "constant")
POINTS = (600, 10_000, 100_000)


def schedule(kind: str, horizon: int) -> np.ndarray:
    """Per-step LR: 5% linear warmup to PEAK, then cosine to FLOOR, constant, or WSD (linear decay, last 20%)."""
    w = max(1, horizon // 20)
    lr = np.full(horizon, PEAK)
    lr[:w] = PEAK * (np.arange(w) + 1) / w
    j = np.arange(horizon - w) / (horizon - w)
    if kind == "cosine":
        lr[w:] = FLOOR + 0.5 * (PEAK - FLOOR) * (1 + np.cos(np.pi * j))
    elif kind == "wsd":
        d0 = int(0.8 * horizon)
        lr[d0:] = PEAK + (FLOOR - PEAK) * np.arange(horizon - d0) / (horizon - d0)
    elif kind != "constant":
        raise ValueError(f"unknown schedule {kind!r}; choose one of {SCHEDULES}")
    return lr


def history(kind: str, n: int, seed: int = 0) -> RunHistory:
    """A run of horizon ``2n`` steps whose first ``n`` per-step losses were recorded."""
    rng = np.random.default_rng(seed)
    lr = schedule(kind, 2 * n)
    steps = np.arange(1, n + 1)
    # the 25M run's loss range over any horizon: the LR area rescaled to its 24k steps; the law evaluated on 2000
    # steps and interpolated (exact per-step values would cost more than the forecast being timed)
    scaled = lr * (24_000 / (2 * n))
    knots = np.unique(np.geomspace(1, n, 2000).round().astype(np.int64))
    clean = np.interp(steps, knots, multi_power_law(scaled, knots, **MPL25))
    loss = clean * np.exp(0.01 * rng.standard_normal(steps.size))
    loss[rng.choice(n, 5, replace=False)] = np.nan
    return RunHistory(name=f"{kind}_{n}", step=steps, loss=loss, planned_lr=lr, batch_size=256,
                      tokens_per_sample=2048)


def _timed(clock, fn, *args, **kwargs):
    t = clock()
    out = fn(*args, **kwargs)
    return out, 1e3 * (clock() - t)


def measure(kind: str, n: int, warm_calls: int = 12, clock=time.perf_counter) -> dict[str, float]:
    """Cold ms, median warm ms and the revalidation calls' mean ms on one history shape.

    ``clock``: ``time.perf_counter`` (wall) or ``time.process_time`` (this process's CPU time, which other jobs
    on a shared machine inflate far less).
    """
    full = history(kind, n)
    grow = max(1, n // 200)
    start = n - grow * warm_calls
    f, cold = _timed(clock, forecast_run, full.truncate(start), horizon=2 * n)
    warm, reval = [], []
    for k in range(1, warm_calls + 1):
        f, ms = _timed(clock, forecast_run, full.truncate(start + grow * k), horizon=2 * n, init=f)
        (warm if f.warm_state.warm else reval).append(ms)
    return {"schedule": kind, "points": n, "cold_ms": cold,
            "warm_ms": float(np.median(warm)) if warm else float("nan"),
            "revalidation_ms": float(np.mean(reval)) if reval else float("nan"), "method": f.method}


def main(argv: list[str] | None = None) -> list[dict[str, float]]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--schedules", nargs="+", default=list(SCHEDULES), choices=SCHEDULES)
    p.add_argument("--points", nargs="+", type=int, default=list(POINTS))
    p.add_argument("--profile", action="store_true", help="print the cProfile of one cold and one warm call")
    p.add_argument("--json", help="write the rows to this file")
    p.add_argument("--cpu", action="store_true", help="CPU time of this process instead of wall time")
    args = p.parse_args(argv)
    if args.profile:
        h = history(args.schedules[0], args.points[0])
        n = args.points[0]
        prof = cProfile.Profile()
        prof.enable()
        f = forecast_run(h.truncate(n - n // 200), horizon=2 * n)
        forecast_run(h.truncate(n), horizon=2 * n, init=f)
        prof.disable()
        pstats.Stats(prof).sort_stats("cumulative").print_stats(30)
    rows = []
    print(("CPU" if args.cpu else "wall") + " time per call")
    print(f"{'schedule':<9} {'points':>7} {'cold ms':>8} {'warm ms':>8} {'reval ms':>9}  method")
    for kind in args.schedules:
        for n in args.points:
            r = measure(kind, n, clock=time.process_time if args.cpu else time.perf_counter)
            rows.append(r)
            print(f"{kind:<9} {n:>7} {r['cold_ms']:>8.0f} {r['warm_ms']:>8.1f} {r['revalidation_ms']:>9.0f}  "
                  f"{r['method']}", flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(rows, fh, indent=1)
    return rows


if __name__ == "__main__":
    main()
