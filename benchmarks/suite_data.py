"""Loaders of the validation suite's real data: one function per dataset, each returning a :class:`Dataset`.

Every curve becomes a :class:`~lightning_scaling.RunHistory` in this project's conventions (``step`` = optimizer
updates applied before the loss was measured, ``batch_size`` in samples, ``planned_lr`` the whole per-step
schedule) with ``meta["schedule"]`` (``constant``, ``cosine``, ``wsd`` or ``other``) and ``meta["family"]`` (runs
of one setup that may serve as references for each other). Sources and licences are in
``../shared/data/README.md`` (all MIT); the CPU study is this project's own (``benchmarks/make_cpu_study.py``).

- ``mpl``: Luo et al. 2025, 25M/100M/400M x 9 schedules (validation loss every 128 steps);
- ``schaipp``: Schaipp et al. 2025, 33M-166M cosine, constant and WSD runs (validation loss every 200 steps; WSD
  cooldown branches joined to the constant run they branch off);
- ``gemstones``: McLeish et al. 2025, 22 models 48M-2B at constant LR, 100B tokens (training loss every 477
  steps; N includes embeddings, as published), and the cooldown start/end pairs;
- ``nqs``: Li & Maddison 2026, final losses over (N, B, K) with the paper's train/test split;
- ``porian``: Porian et al. 2024, isoFLOP points and the published exponents;
- ``cpu_study``: this project's GPT ladder (6 sizes x constant/cosine/WSD) and batch sweep, trained on CPU.
"""

from __future__ import annotations

import csv
import gzip
import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lightning_scaling import RunHistory

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
CPU_STUDY = ROOT / "benchmarks" / "data" / "cpu_study"


@dataclass
class Dataset:
    """One dataset of the suite.

    Attributes:
        name: short name used in the tables.
        curves: whole training curves (may be empty for final-loss-only data).
        tuned_on: True when a default of this project was chosen while looking at this dataset (its rows are then
            in-sample, and the tables say so).
        extra: dataset-specific tables (NQS rows, Porian points, Gemstones cooldown pairs, ...).
    """

    name: str
    curves: list[RunHistory] = field(default_factory=list)
    tuned_on: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


# ------------------------------------------------------------------------------------------------------- MPL
MPL_PEAK, MPL_FLOOR, MPL_WARMUP = 3e-4, 3e-5, 2160
MPL_SCHEDULES = ("constant_24000", "constant_72000", "cosine_24000", "cosine_72000", "wsd_20000_24000",
                 "wsdld_20000_24000", "wsdcon_3", "wsdcon_9", "wsdcon_18")


def mpl_schedule(name: str, n: int) -> np.ndarray:
    """Per-step LR of Luo et al.'s runs (``lr[i]`` used by update ``i``), length ``n``."""
    i = np.arange(n, dtype=np.float64)
    lr = np.full(n, MPL_PEAK)
    lr[:MPL_WARMUP] = MPL_PEAK * i[:MPL_WARMUP] / MPL_WARMUP
    kind, _, rest = name.partition("_")
    if kind == "cosine":
        T, j = int(rest), i[MPL_WARMUP:]
        lr[MPL_WARMUP:] = MPL_FLOOR + 0.5 * (MPL_PEAK - MPL_FLOOR) * (
            1 + np.cos(np.pi * np.minimum(j - MPL_WARMUP, T - MPL_WARMUP) / (T - MPL_WARMUP)))
    elif kind == "wsdcon":
        lr[8000:16000] = int(rest) * 1e-5
    elif kind == "wsdld":
        lr[20000:24000] = MPL_PEAK + (MPL_FLOOR - MPL_PEAK) * (i[20000:24000] - 20000) / 4000
    elif kind == "wsd":
        lr[20000:24000] = MPL_PEAK * (MPL_FLOOR / MPL_PEAK) ** ((i[20000:24000] - 20000) / 4000)
    return lr


def mpl_curve(size: int, name: str, data: Path = SHARED / "mpl_luo2025") -> RunHistory:
    """One MPL curve as a RunHistory (steps + 1: the loss logged after update t follows t + 1 updates)."""
    a = np.loadtxt(data / f"csv_{size}" / f"{name}.csv", delimiter=",", skiprows=1)
    if a[-1, 0] == 24000:
        a = a[a[:, 0] < 24000]
    steps = a[:, 0].astype(np.int64) + 1
    kind = name.split("_")[0]
    sched = {"constant": "constant", "cosine": "cosine", "wsd": "wsd", "wsdld": "wsd"}.get(kind, "other")
    return RunHistory(name=f"mpl{size}M_{name}", n_params=size * 1e6, batch_size=512, tokens_per_sample=1024,
                      step=steps, loss=a[:, 2], lr=a[:, 1], planned_lr=mpl_schedule(name, int(steps[-1])),
                      meta={"schedule": sched, "family": f"mpl_{name}", "size": size})


def mpl() -> Dataset:
    """Luo et al. 2025: 3 sizes x 9 schedules. The forecast's MPL form and priors were developed on it."""
    return Dataset("MPL", [mpl_curve(s, n) for s in (25, 100, 400) for n in MPL_SCHEDULES], tuned_on=True)


# --------------------------------------------------------------------------------------------------- Schaipp
SCHAIPP_VOCAB = 50304


def _schaipp_kind(r: dict[str, str]) -> str:
    if r["scheduler"] == "cos":
        return "cosine"
    if r["scheduler"] == "wsd":
        return "constant" if float(r["wsd_fract_decay"] or 0) == 0 else "wsd"
    return "other"


def schaipp(max_per_group: int = 2, data: Path = SHARED / "schaipp2025_lr_scheduling") -> Dataset:
    """Schaipp et al. 2025: cosine, constant and WSD runs, 33M-166M (non-embedding N).

    WSD cooldown branches (``ann*`` runs) begin at the cooldown; they are joined to the earlier part of the constant
    run they branch off (same data, shape and LR). Per (data set, size, schedule) at most ``max_per_group`` runs
    are kept, those nearest to LR 1e-3 and longest, so no single size dominates the tables.
    """
    runs = _rows(data / "runs.csv")
    curves: dict[int, dict[int, dict[str, str]]] = defaultdict(dict)
    for r in _rows(data / "val_curves.csv"):
        curves[int(r["run_idx"])][int(r["iter"])] = r  # de-duplicated on iter: resumed runs log twice
    const = {}
    for r in runs:
        if _schaipp_kind(r) == "constant" and not r["run_id"].startswith("ann"):
            const.setdefault((r["dataset"], r["n_layer"], r["n_embd"], r["lr"]), []).append(r)
    groups: dict[tuple, list[tuple]] = defaultdict(list)
    for r in runs:
        kind = _schaipp_kind(r)
        if kind == "other" or r["batch_size"] != "50":
            continue
        idx, pts = int(r["run_idx"]), curves[int(r["run_idx"])]
        if r["run_id"].startswith("ann"):
            if kind != "wsd":
                continue
            base = [c for c in const.get((r["dataset"], r["n_layer"], r["n_embd"], r["lr"]), [])
                    if int(c["iterations"]) >= min(pts)]
            if not base:
                continue
            pts = {**{k: v for k, v in curves[int(base[0]["run_idx"])].items() if k < min(pts)}, **pts}
        it = np.array(sorted(pts))
        if it.size < 10 or it[0] != 0:
            continue
        loss = np.array([float(pts[i]["val_loss"]) for i in it])
        peak, horizon = float(r["lr"]), int(r["iterations"])
        if it[-1] < 0.95 * horizon:
            continue
        logged = np.array([float(pts[i]["lr"] or "nan") for i in it])
        ok = np.isfinite(logged) & (it > 300)
        knots = np.concatenate([[0, 300], it[ok]])
        vals = np.concatenate([[0.0, peak], logged[ok]])
        planned = np.interp(np.arange(max(horizon, int(it[-1]) + 1)), knots, vals)
        n = float(r["parameters"]) - SCHAIPP_VOCAB * float(r["n_embd"])  # tied embedding
        h = RunHistory(name=f"schaipp{idx}_{r['dataset'][:3]}_{int(n / 1e6)}M_{kind}_{horizon}_lr{r['lr']}",
                       n_params=n, batch_size=int(r["batch_size"]) * int(r["acc_steps"]) * int(r["world_size"]),
                       tokens_per_sample=int(r["sequence_length"]), step=np.maximum(it, 0), loss=loss,
                       lr=np.interp(it, np.arange(planned.size), planned), planned_lr=planned,
                       meta={"schedule": kind, "family": f"schaipp_{r['dataset']}_{kind}_lr{r['lr']}",
                             "size": n, "horizon": horizon})
        groups[(r["dataset"], r["n_layer"], r["n_embd"], kind)].append((abs(np.log(peak / 1e-3)), -horizon, h))
    out = []
    for key in sorted(groups):
        out += [h for _, _, h in sorted(groups[key], key=lambda t: t[:2])[:max_per_group]]
    return Dataset("Schaipp", out, tuned_on=True)


# ------------------------------------------------------------------------------------------------- Gemstones
GEM_TOKENS_PER_STEP = 4_194_304


def _jsonl(path: Path) -> list[dict[str, Any]]:
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def gemstones(data: Path = SHARED / "gemstones2025") -> Dataset:
    """McLeish et al. 2025: 22 constant-LR runs (48M-2B, 23,850 steps of 4M tokens) and cooldown pairs.

    The LR is constant after a warmup whose length is not in the files, so ``planned_lr`` is a constant 1
    (relative units). ``extra["cooldowns"]`` holds ``(run, start_step, end_step, loss_start, loss_end)``: the LR
    decays linearly to 0 over 10% of the steps trained so far.
    """
    by_run: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in _jsonl(data / "hot_477.jsonl"):
        by_run[r["run_name"]].append(r)
    curves = []
    for name, rs in by_run.items():
        rs.sort(key=lambda r: r["step"])
        steps = np.array([r["step"] for r in rs], dtype=np.int64)
        n = float(rs[0]["params_active_precise"])
        curves.append(RunHistory(name=f"gem_{name.split('-')[1].split('_')[0]}", n_params=n, batch_size=2048,
                                 tokens_per_sample=2048, step=steps, loss=[r["final_loss"] for r in rs],
                                 planned_lr=np.ones(int(steps[-1])), lr=np.ones(steps.size),
                                 meta={"schedule": "constant", "family": "gemstones", "size": n, "run": name}))
    curves.sort(key=lambda h: h.n_params)
    begin = {(r["run_name"], r["tokens"]): r for r in _jsonl(data / "cool_begin.jsonl")}
    pairs = []
    for e in _jsonl(data / "cool_end.jsonl"):
        # the end of a cooldown from T tokens sits at 1.1 T; find the matching start
        start = min((b for (run, _), b in begin.items() if run == e["run_name"]),
                    key=lambda b: abs(1.1 * b["tokens"] - e["tokens"]), default=None)
        if start is not None and abs(1.1 * start["tokens"] / e["tokens"] - 1) < 0.02:
            pairs.append({"run": f"gem_{e['run_name'].split('-')[1].split('_')[0]}", "start": int(start["step"]),
                          "end": int(e["step"]), "loss_start": float(start["final_loss"]),
                          "loss_end": float(e["final_loss"])})
    return Dataset("Gemstones", curves, extra={"cooldowns": pairs})


# ------------------------------------------------------------------------------------------------ NQS, Porian
def nqs(data: Path = SHARED) -> Dataset:
    """Li & Maddison 2026: final losses over (N, B, K); ``extra["rows"]`` keeps the unfiltered rows."""
    rows = [r for r in _rows(data / "nqs_pythia_nbk_dataset.csv") if r["filtered"] != "True"]
    return Dataset("NQS", extra={"rows": rows}, tuned_on=True)


def porian(data: Path = SHARED) -> Dataset:
    """Porian et al. 2024: isoFLOP points and the published exponents per configuration."""
    return Dataset("Porian", extra={"points": _rows(data / "porian2024_isoflop_points.csv"),
                                    "exponents": _rows(data / "porian2024_fitted_exponents.csv")})


# ------------------------------------------------------------------------------------------------- CPU study
def cpu_study(path: Path = CPU_STUDY) -> Dataset:
    """This project's own study (``benchmarks/make_cpu_study.py``): never seen by any default's choice."""
    curves = []
    for f in sorted(path.glob("*.json.gz")):
        with gzip.open(f, "rt", encoding="utf-8") as fh:
            h = RunHistory.from_json(fh.read())
        s = h.meta.get("settings", {})
        h.meta.update(schedule=s.get("schedule", "other"), family=f"cpu_{s.get('schedule')}_b{s.get('batch_size')}",
                      size=h.n_params, role=s.get("role"))
        curves.append(h)
    curves.sort(key=lambda h: (h.n_params, h.batch_size, h.name))
    return Dataset("CPU study", curves)


LOADERS = {"mpl": mpl, "schaipp": schaipp, "gemstones": gemstones, "nqs": nqs, "porian": porian,
           "cpu_study": cpu_study}


def available() -> list[str]:
    """Datasets whose files are present (the shared sets live beside the checkout)."""
    names = [k for k in ("mpl", "schaipp", "gemstones", "nqs", "porian") if SHARED.exists()]
    return names + (["cpu_study"] if any(CPU_STUDY.glob("*.json.gz")) else [])
