"""Accuracy and cost of lightning_scaling.fitting on real public data and on synthetic curves with known constants.

Sections (all CPU, numpy/scipy):

1. nqs: fit the implicit Kaplan/Su law L(N, S, B) (``fit_loss_n_s_b``) to the 64 unfiltered train runs of the NQS
   Pythia data set (Li & Maddison 2026, MIT) and report mean |relative error| on the IsoFLOP and IsoToken test
   splits (the NQS paper's own model: 2.2% and 5.1%);
2. porian: compute-optimal exponents a in N_opt ∝ C^a of Porian et al. 2024 (MIT), from the published optima and
   from the raw isoFLOP points with a per-budget parabola in log N;
3. synthetic: 10 runs x 5000 steps drawn from known constants with 0.5% loss noise (6 sizes at one batch + a
   4-batch sweep at one size): recovered constants, held-out 4x larger model error, compute-optimal plan, auto form;
4. speed: a full fit with 100 bootstrap refits on those 10 x 5000 points, and a 1e5-point prediction;
5. real: acceptance-style checks on real full training curves (``tests/data/fitreal``, MIT): fit ``L(N, S)`` on the
   smaller models' constant-LR validation curves (Schaipp et al. 2025: 14M-114M non-embedding; Luo et al. 2025:
   25M + 100M) and predict the largest model's whole trajectory, final loss, min_loss and steps_to_loss.

Usage::

    python benchmarks/fit_accuracy.py                  # everything (~10 s on 2 cores)
    python benchmarks/fit_accuracy.py --sections nqs porian --json out.json
    python benchmarks/fit_accuracy.py --sections real

``--data`` defaults to ``tests/data``. ``--device`` is accepted for symmetry with the other benchmarks; everything
here runs on the CPU.
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from lightning_scaling import RunHistory, laws
from lightning_scaling.fitting import (
    ScalingLaw,
    fit_loss_n_s_b,
    fit_power_law,
    fit_scaling_law,
    isoflop_optima,
)

TRUE = dict(n_c=1e10, alpha_n=0.08, s_c=300.0, alpha_s=0.7, b_star=5e4, alpha_b=0.3)
TPS = 256


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def nqs(data: Path) -> dict:
    rows = _rows(data / "nqs" / "nqs_pythia_nbk_dataset.csv")

    def cols(rs):
        return [np.array([float(r[k]) for r in rs]) for k in ("N", "K", "B", "loss")]

    train = [r for r in rows if r["split"] == "train" and r["filtered"] != "True"]
    out: dict = {"n_train": len(train), "paper_nqs": {"isoflop": 0.022, "isotoken": 0.051}}
    for form in ("kaplan", "kaplan+irreducible"):
        t0 = time.perf_counter()
        law = fit_loss_n_s_b(*cols(train), form=form, tokens_per_sample=128)
        res = {"fit_s": time.perf_counter() - t0, "params": law.params, "success": law.info.success}
        for name, rs in (("train", train),
                         ("isoflop", [r for r in rows if r["split"] == "test" and r["type"] == "isoflop"]),
                         ("isotoken", [r for r in rows if r["split"] == "test" and r["type"] == "isotoken"])):
            n, k, b, loss = cols(rs)
            err = np.abs(law.predict_loss(n, k, b) / loss - 1)
            res[name] = {"mean_abs_rel_err": float(err.mean()), "max_abs_rel_err": float(err.max()), "n": len(rs)}
            if name == "isoflop":
                worst = np.argsort(-err)[:3]
                res["isoflop_worst"] = [{"N": n[i], "B": b[i], "K": k[i], "loss": loss[i], "err": err[i]}
                                        for i in worst]
        out[form] = res
        print(f"[nqs] {form:<20} IsoFLOP {res['isoflop']['mean_abs_rel_err']:.2%} (max "
              f"{res['isoflop']['max_abs_rel_err']:.1%})  IsoToken {res['isotoken']['mean_abs_rel_err']:.2%} (max "
              f"{res['isotoken']['max_abs_rel_err']:.1%})  train {res['train']['mean_abs_rel_err']:.2%}  "
              f"fit {res['fit_s']:.2f}s   [NQS paper: 2.2% / 5.1%]")
    return out


def porian(data: Path) -> dict:
    d = data / "porian"
    key = lambda r: (r["source"], r["row"])  # noqa: E731
    num = lambda rs, k: np.array([float(r[k]) if r[k] else np.nan for r in rs])  # noqa: E731
    expected = {key(r): r for r in _rows(d / "porian2024_fitted_exponents.csv")}
    optima, points = defaultdict(list), defaultdict(list)
    for r in _rows(d / "porian2024_isoflop_optima.csv"):
        optima[key(r)].append(r)
    for r in _rows(d / "porian2024_isoflop_points.csv"):
        points[key(r)].append(r)
    table = []
    for k, row in expected.items():
        c, n_opt = num(optima[k], "flops"), num(optima[k], "N_opt")
        ok = np.isfinite(n_opt)
        exact = fit_power_law(c[ok], n_opt[ok]).exponent
        pc, pn, pl = num(points[k], "flops"), num(points[k], "N"), num(points[k], "loss")
        keep = np.isin(pc, c[ok])
        opt = isoflop_optima(pc[keep], pn[keep], pl[keep], window=3)  # same budgets as the published optima
        raw = fit_power_law(opt["flops"], opt["n_opt"]).exponent
        ref = float(row["n_exponent"])
        cfg = "/".join(row[x] for x in ("dataset", "hparams", "warmup", "decay", "param_count", "loss_kind"))
        table.append({"config": cfg, "published": ref, "from_optima": exact, "from_raw": raw})
        print(f"[porian] {cfg:<40} published {ref:.4f}  optima {exact:.4f}  raw {raw:.4f} ({raw - ref:+.3f})")
    d_opt = max(abs(t["from_optima"] - t["published"]) for t in table)
    d_raw = max(abs(t["from_raw"] - t["published"]) for t in table)
    print(f"[porian] max |diff| from optima {d_opt:.2e}, from raw points {d_raw:.3f} (target <= 0.05)")
    return {"configs": table, "max_abs_diff_optima": d_opt, "max_abs_diff_raw": d_raw}


def _run(n, batch, *, steps=5000, noise=0.005, seed=0, e=0.0):
    rng = np.random.default_rng(seed)
    s = np.arange(steps)
    clean = np.minimum(laws.loss_n_s_b(n, s, batch, e=e, **TRUE), 10.0)
    return RunHistory(name=f"n{n:g}_b{batch}", n_params=n, batch_size=batch, tokens_per_sample=TPS, step=s,
                      loss=clean * np.exp(rng.normal(0, noise, s.size)), lr=1e-3 * np.minimum(1, (s + 1) / 100))


def _ladder(e=0.0):
    return ([_run(n, 64, seed=i, e=e) for i, n in enumerate([1e6, 2e6, 4e6, 8e6, 16e6, 32e6])]
            + [_run(4e6, b, seed=10 + i, e=e) for i, b in enumerate([16, 256, 1024, 4096])])


def synthetic() -> dict:
    runs = _ladder()
    law = fit_scaling_law(runs, n_bootstrap=100, seed=0)
    p = law.params
    rec = {k: {"true": TRUE[k], "fit": p[k], "ci90": law.param_intervals()[k]} for k in TRUE}
    for k, v in rec.items():
        print(f"[synthetic] {k:<8} true {v['true']:<10.4g} fit {v['fit']:<10.4g} 90% CI "
              f"({v['ci90'][0]:.4g}, {v['ci90'][1]:.4g})")
    steps = np.arange(100, 20001, 50)
    held = {}
    for batch in (64, 512):
        truth = laws.loss_n_s_b(128e6, steps, batch, **TRUE)
        held[batch] = float(np.mean(np.abs(law.predict_loss(128e6, steps, batch) / truth - 1)))
    print(f"[synthetic] held-out N=128M (4x largest) trajectory, 20k steps: mean |rel err| B=64 {held[64]:.3%}, "
          f"B=512 {held[512]:.3%}")
    target = np.array([3.0, 3.5])
    s, _ = law.steps_to_loss(target, 64e6, 512)
    inv = float(np.max(np.abs(law.predict_loss(64e6, s, 512) / target - 1)))
    plan = law.compute_optimal(1e19)
    truth = ScalingLaw(TRUE, tokens_per_sample=TPS).compute_optimal(1e19)
    print(f"[synthetic] steps_to_loss -> predict_loss round trip max rel err {inv:.1e}")
    print(f"[synthetic] compute_optimal(1e19 FLOP): N {plan.n_params:.3g} (true {truth.n_params:.3g}, 90% "
          f"{plan.intervals['n_params'][0]:.3g}-{plan.intervals['n_params'][1]:.3g}), B {plan.batch_size:.0f} "
          f"(true {truth.batch_size:.0f}), S {plan.steps:.0f} (true {truth.steps:.0f}), loss {plan.loss:.4f} "
          f"(true {truth.loss:.4f})")
    auto = fit_scaling_law(_ladder(e=1.5), form="auto", n_bootstrap=0)
    print(f"[synthetic] auto form with true e=1.5: chose {auto.form} (validation {auto.info.validation}), "
          f"e={auto.params['e']:.3f}")
    return {"params": rec, "held_out_128M": held, "inverse_max_rel_err": inv,
            "compute_optimal": {"fit": plan.to_dict(), "true": truth.to_dict()},
            "auto": {"form": auto.form, "validation": auto.info.validation, "e": auto.params["e"]}}


def speed() -> dict:
    runs = _ladder()
    fit_scaling_law(runs, n_bootstrap=2)  # warm imports
    t0 = time.perf_counter()
    law = fit_scaling_law(runs, n_bootstrap=100, seed=1)
    fit_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    n, s = rng.uniform(1e6, 1e9, 100_000), rng.uniform(1, 1e5, 100_000)
    t0 = time.perf_counter()
    law.predict_loss(n, s, 256)
    pred_s = time.perf_counter() - t0
    print(f"[speed] fit 10 runs x 5000 points + 100 bootstrap refits: {fit_s:.2f} s (target < 10 s); "
          f"1e5-point predict_loss: {pred_s:.3f} s (target < 1 s)")
    return {"fit_with_bootstrap_s": fit_s, "predict_1e5_s": pred_s}


def _schaipp(data: Path) -> list[RunHistory]:
    meta = {int(r["run_idx"]): r for r in _rows(data / "fitreal" / "schaipp_constant_runs.csv")}
    curves: dict[int, dict[int, dict[str, str]]] = defaultdict(dict)
    for r in _rows(data / "fitreal" / "schaipp_constant_val_curves.csv"):
        curves[int(r["run_idx"])][int(r["iter"])] = r  # de-duplicated on iter (last record wins)
    runs = []
    for idx, m in meta.items():
        it = np.array(sorted(curves[idx]))
        runs.append(RunHistory(
            name=f"schaipp{idx}", n_params=float(m["parameters"]) - 50304 * float(m["n_embd"]),  # tied embedding
            batch_size=int(m["batch_size"]) * int(m["acc_steps"]) * int(m["world_size"]), tokens_per_sample=512,
            step=it, loss=[float(curves[idx][i]["val_loss"]) for i in it],
            lr=[float(curves[idx][i]["lr"] or "nan") for i in it]))
    return sorted(runs, key=lambda r: r.n_params)


def _mpl(data: Path) -> list[RunHistory]:
    runs = []
    for n in (25, 100, 400):
        d = np.loadtxt(data / "fitreal" / f"mpl_{n}M_constant_72000.csv", delimiter=",", skiprows=1)
        runs.append(RunHistory(name=f"mpl{n}M", n_params=n * 1e6, batch_size=512, tokens_per_sample=1024,
                               step=d[:, 0].astype(int) + 1, loss=d[:, 2], lr=d[:, 1]))
    return runs


def _accept(law: ScalingLaw, run: RunHistory) -> dict:
    """Errors of the law on a held-out run: trajectory, final loss, min_loss, steps_to_loss."""
    s, l = run.step[run.step > 0].astype(float), run.loss[run.step > 0]
    pred = law.predict_loss(run.n_params, s, run.batch_size)
    err = np.abs(pred / l - 1)
    late = s >= 0.1 * s[-1]
    target = l[-1] * 1.01  # the loss reached ~when the curve is within 1% of its end
    true_steps = float(s[np.argmax(l <= target)])
    steps, _ = law.steps_to_loss(target, run.n_params, run.batch_size)
    out = {"trajectory": float(err.mean()), "trajectory_after_10pct": float(err[late].mean()),
           "trajectory_max": float(err.max()), "final": float(err[-1]), "final_pred": float(pred[-1]),
           "final_true": float(l[-1]), "min_loss": float(law.min_loss(run.n_params)),
           "steps_to_1.01x_final": {"pred": float(steps), "true": true_steps,
                                    "rel_err": float(steps) / true_steps - 1}}
    if len(law.bootstrap):
        lo, hi = law.interval("predict_loss", run.n_params, s[-1], run.batch_size)
        out["final_interval90"] = (float(lo), float(hi))
    return out


def real(data: Path) -> dict:
    out = {}
    sch, mpl = _schaipp(data), _mpl(data)
    cases = [("schaipp 14M-114M -> 170M (N non-emb, B=200)", sch[:6], sch[6], "none"),
             ("schaipp 14M-170M -> 302M at B=400 (fitted at B=200), critical_batch='none'", sch[:7], sch[7], "none"),
             ("schaipp 14M-170M -> 302M at B=400, constant B_crit=1e6 samples (loss ~ tokens)", sch[:7], sch[7],
              1e6),
             ("mpl 25M+100M -> 400M (B=512)", mpl[:2], mpl[2], "none")]
    for label, train, test, cb in cases:
        for form in ("kaplan", "kaplan+irreducible"):
            t0 = time.perf_counter()
            law = fit_scaling_law(train, critical_batch=cb, form=form, n_bootstrap=50 if len(train) >= 4 else 30,
                                  seed=0)
            res = _accept(law, test)
            res["fit_s"] = time.perf_counter() - t0
            res["params"] = law.params
            out[f"{label} [{form}]"] = res
            st = res["steps_to_1.01x_final"]
            ci = res.get("final_interval90")
            print(f"[real] {label} [{form}]: trajectory {res['trajectory']:.2%} (after 10%: "
                  f"{res['trajectory_after_10pct']:.2%}, max {res['trajectory_max']:.1%}), final {res['final']:.2%} "
                  f"({res['final_pred']:.4f} vs {res['final_true']:.4f}"
                  + (f", 90% CI {ci[0]:.4f}-{ci[1]:.4f}" if ci else "") + f"), min_loss {res['min_loss']:.3f}, "
                  f"steps to 1.01x final {st['pred']:.0f} vs {st['true']:.0f} ({st['rel_err']:+.0%})")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sections", nargs="+", default=["nqs", "porian", "synthetic", "speed", "real"],
                        choices=["nqs", "porian", "synthetic", "speed", "real"])
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[1] / "tests" / "data")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--device", default="cpu", help="ignored: everything here runs on the CPU")
    args = parser.parse_args()
    results = {}
    for sec in args.sections:
        results[sec] = nqs(args.data) if sec == "nqs" else porian(args.data) if sec == "porian" else (
            synthetic() if sec == "synthetic" else speed() if sec == "speed" else real(args.data))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=float))


if __name__ == "__main__":
    main()
