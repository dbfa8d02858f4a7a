"""Tables and figures of a scaling study: the prediction table and the PNG plots of the recipe and ``fit``.

Figures use :class:`matplotlib.figure.Figure` with an Agg canvas (no ``pyplot`` global state, no display needed).
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lightning_scaling.history import RunHistory

__all__ = ["format_table", "format_fit_table", "write_figures", "fmt_n", "readme_section", "update_readme"]

#: Markers around the demo's section of the README (``lightning-scaling demo --readme README.md`` rewrites it).
README_START = "<!-- demo-table:start: written by `lightning-scaling demo --readme README.md` -->"
README_END = "<!-- demo-table:end -->"


def fmt_n(n: float | None) -> str:
    """Compact parameter count: ``98304 -> '98.3k'``.

    Example::

        >>> fmt_n(98304), fmt_n(1.5e6), fmt_n(None)
        ('98.3k', '1.5M', '?')
    """
    if n is None or not math.isfinite(n):
        return "?"
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            v = n / div
            return f"{v:.3g}{unit}" if v < 100 else f"{v:.0f}{unit}"
    return f"{n:.0f}"


def _pct(x: float | None) -> str:
    return "" if x is None or not math.isfinite(x) else f"{100 * x:+.1f}%"


def _num(x: float | None, spec: str = ".3f") -> str:
    return "-" if x is None or not (isinstance(x, (int, float)) and math.isfinite(x)) else format(x, spec)


def _as_float(x: Any) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return float("nan")


def _interval(iv: Sequence[float] | None, spec: str) -> str:
    if not iv or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in iv):
        return ""
    return f" [{format(iv[0], spec)}, {format(iv[1], spec)}]"


def _rows_to_text(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths))
    sep = "  ".join("-" * w for w in widths)
    body = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join([line, sep, *body])


def format_runs_table(runs: Mapping[str, Mapping[str, Any]]) -> str:
    """One line per run: role, N, batch, steps, final loss, live B_simple, wall time."""
    rows = []
    for name, r in runs.items():
        rows.append([name, r.get("role", ""), fmt_n(r.get("n_params")), _num(r.get("batch_size"), ".0f"),
                     str(r.get("steps", "")), _num(r.get("final_loss")), _num(r.get("live_b_simple"), ".1f"),
                     _num(r.get("wall_s"), ".1f")])
    return _rows_to_text(["run", "role", "N", "batch", "steps", "final loss", "B_simple", "wall s"], rows)


def format_table(report: Mapping[str, Any]) -> str:
    """The side-by-side prediction table of a recipe report (predicted before training vs actual).

    Example::

        >>> rep = {"runs": {}, "prediction": {"n_params": 2e5, "batch_size": 16, "min_loss": 1.5},
        ...        "comparison": {"final_loss": {"predicted": 2.0, "actual": 2.1, "rel_error": -0.048},
        ...                       "critical_batch": {"loss": 2.1, "sweep": 40.0, "live_b_simple": 30.0}}}
        >>> "final loss" in format_table(rep)
        True
    """
    out = []
    runs = report.get("runs") or {}
    if runs:
        out += ["Runs", format_runs_table(runs), ""]
    law = (report.get("law") or {}).get("params")
    cb = report.get("critical_batch") or {}
    if law:
        out.append("Fitted law  L(N, S_min) = e + (N_c/N)^a_N + (S_c/S_min)^a_S,  B_crit(L) = B*/L^(1/a_B)")
        out.append("  " + ", ".join(f"{k}={v:.4g}" for k, v in law.items()))
        if cb:
            b_star, alpha_b = _num(_as_float(cb.get("b_star")), ".4g"), _num(_as_float(cb.get("alpha_b")), ".3g")
            out.append(f"  critical batch B_crit(L) = B*/L^(1/alpha_B): B* = {b_star} samples, "
                       f"alpha_B = {alpha_b} (source: {cb.get('source', '?')})")
        out.append("")
    pred, comp = report.get("prediction"), report.get("comparison")
    if pred and comp:
        title = (f"Held-out model: N = {fmt_n(pred['n_params'])} at batch {pred['batch_size']:g}, "
                 f"predicted before it was trained")
        rows = []
        fl = comp["final_loss"]
        rows.append([f"final loss (mean from step {fl.get('from_step', '?')})",
                     _num(fl["predicted"]) + _interval(fl.get("interval"), ".3f"), _num(fl["actual"]),
                     _pct(fl.get("rel_error"))])
        st = comp.get("steps_to_target")
        if st:
            rows.append([f"steps to loss {st['target_loss']:.3f}",
                         _num(st["predicted"], ".0f") + _interval(st.get("interval"), ".0f"),
                         _num(st["actual"], ".0f"), _pct(st.get("rel_error"))])
        cbr = comp.get("critical_batch") or {}
        if cbr:
            rows.append([f"critical batch at loss {cbr['loss']:.3f} (samples)",
                         f"{_num(cbr.get('sweep'), '.1f')} (sweep fit)",
                         f"{_num(cbr.get('live_b_simple'), '.1f')} (live B_simple)", ""])
        rows.append(["min loss L(N) (infinite steps)",
                     _num(pred.get("min_loss")) + _interval(pred.get("min_loss_interval"), ".3f"), "-", ""])
        live = comp.get("live_forecast")
        if live and "final_loss" in live:
            rows.append([f"final loss forecast from its own first {live['observed_until']} steps",
                         _num(live["final_loss"]) + _interval([live.get("final_lower", float("nan")),
                                                               live.get("final_upper", float("nan"))], ".3f"),
                         _num(fl["actual"]), _pct(live["final_loss"] / fl["actual"] - 1.0)])
        out += [title, _rows_to_text(["quantity", "predicted", "actual", "error"], rows)]
    elif pred:
        out.append(format_prediction(pred))
    return "\n".join(out).rstrip() + "\n"


def readme_section(report: Mapping[str, Any], *, machine: str, cpu_seconds: float) -> str:
    """The README's demo section from a report: the held-out table, where and how long it ran, the B_crit check.

    Example::

        >>> rep = {"prediction": {"n_params": 2e5, "batch_size": 16, "min_loss": 1.5}, "timings": {"total_s": 99.6},
        ...        "comparison": {"final_loss": {"predicted": 2.0, "actual": 2.1, "rel_error": -0.048},
        ...                       "critical_batch": {"loss": 2.1, "sweep": 40.0, "live_b_simple": 30.0}}}
        >>> text = readme_section(rep, machine="x86_64, 2 cores", cpu_seconds=180.2)
        >>> "(x86_64, 2 cores: 100 s wall clock, 180 s CPU time)" in text, "differ by 33%" in text
        (True, True)
    """
    table = format_table({k: v for k, v in report.items() if k not in ("runs", "law", "critical_batch")})
    wall = _as_float((report.get("timings") or {}).get("total_s"))
    lines = [README_START,
             textwrap.fill(f"Table from one run ({machine}: {wall:.0f} s wall clock, {cpu_seconds:.0f} s CPU time):",
                           width=110), "", "```", table.rstrip(), "```", ""]
    cbr = (report.get("comparison") or {}).get("critical_batch") or {}
    sweep, live = _as_float(cbr.get("sweep")), _as_float(cbr.get("live_b_simple"))
    if math.isfinite(sweep) and math.isfinite(live) and live > 0:
        lines.append(textwrap.fill(
            f"Brackets are 90% bootstrap intervals. The critical batch from the batch sweep ({sweep:.1f}) and the "
            f"live gradient noise scale ({live:.1f}) differ by {100 * abs(sweep / live - 1):.0f}%.", width=110))
    else:
        lines.append("Brackets are 90% bootstrap intervals.")
    return "\n".join([*lines, README_END])


def update_readme(readme: str | Path, section: str) -> None:
    """Replace the text between :data:`README_START` and :data:`README_END` in ``readme`` with ``section``.

    Raises:
        ValueError: the file lacks the markers (the section is not written anywhere by surprise).
    """
    path = Path(readme)
    text = path.read_text()
    i, j = text.find(README_START), text.find(README_END)
    if i < 0 or j < i:
        raise ValueError(f"{path}: no demo section markers ({README_START!r} ... {README_END!r})")
    path.write_text(text[:i] + section + text[j + len(README_END):])


def format_prediction(pred: Mapping[str, Any]) -> str:
    """Prediction of a ``fit --predict-n`` without an actual run to compare with."""
    rows = [["min loss L(N) (infinite steps)",
             _num(pred.get("min_loss")) + _interval(pred.get("min_loss_interval"), ".3f")],
            [f"loss after {pred['steps'][-1]} steps at batch {pred['batch_size']:g}",
             _num(pred["loss"][-1]) + _interval([pred["lower"][-1], pred["upper"][-1]] if "lower" in pred else None,
                                                ".3f")]]
    if "steps_to_target" in pred:
        rows.append([f"steps to loss {pred['target_loss']:.3f}",
                     _num(pred["steps_to_target"], ".0f") + _interval(pred.get("steps_to_target_interval"), ".0f")])
        rows.append([f"tokens to loss {pred['target_loss']:.3f}", _num(pred.get("tokens_to_target"), ".4g")])
        rows.append([f"critical batch at loss {pred['target_loss']:.3f} (samples)",
                     _num(pred.get("critical_batch_at_target"), ".1f")])
    return f"Prediction for N = {fmt_n(pred['n_params'])}\n" + _rows_to_text(["quantity", "predicted"], rows)


def format_fit_table(result: Mapping[str, Any], runs: Sequence[RunHistory]) -> str:
    """Readable summary of ``lightning-scaling fit``: runs, fitted constants, predictions."""
    from lightning_scaling.demo.recipe import _live_b_simple, tail_mean

    rows = {}
    for r in runs:
        rows[r.name] = {"role": "fit", "n_params": r.n_params, "batch_size": r.batch_size,
                        "steps": int(r.step[-1]) + 1 if len(r) else 0, "final_loss": tail_mean(r)[0],
                        "live_b_simple": _live_b_simple(r), "wall_s": None}
    return format_table({"runs": rows, **{k: v for k, v in result.items() if k != "runs"}})


# ================================================================================================================
# Figures
# ================================================================================================================
def _figure(figsize: tuple[float, float]) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=110)
    FigureCanvasAgg(fig)
    return fig


def _smooth(y: np.ndarray, window: int) -> np.ndarray:
    if window <= 1 or len(y) < window:
        return y
    k = np.ones(window)
    return np.convolve(y, k, mode="same") / np.convolve(np.ones_like(y), k, mode="same")


def _colors(n: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    return [cmap(x) for x in np.linspace(0.0, 0.85, max(n, 1))]


def plot_loss_curves(ax: Any, report: Mapping[str, Any], histories: Mapping[str, RunHistory], law: Any) -> None:
    """Loss vs step: observed runs (smoothed), the fitted law per run (dashed), the prediction (band)."""
    sizes = sorted({h.n_params for h in histories.values() if h.n_params is not None})
    colors = dict(zip(sizes, _colors(len(sizes))))
    runs_info = report.get("runs") or {}
    last = max((int(h.step[-1]) for h in histories.values() if len(h)), default=1)
    start = max(1, last // 40)  # skip the first steps: the steep transient would squash the rest
    ys = []
    for name, h in histories.items():
        ok = h.finite_mask & (h.step >= start)
        if ok.sum() < 2:
            continue
        s, l = h.step[ok], h.loss[ok]
        role = runs_info.get(name, {}).get("role", "fit")
        color = colors.get(h.n_params, "gray")
        smooth = _smooth(l, max(1, len(l) // 30))
        label = f"{name} (N={fmt_n(h.n_params)})" + (" actual" if role == "holdout" else "")
        ax.plot(s, smooth, color="black" if role == "holdout" else color, lw=2.0 if role == "holdout" else 1.1,
                alpha=0.45 if role == "sweep" else 0.95, label=label)
        ys.append(smooth)
        if law is not None and role != "holdout" and h.batch_size is not None and h.n_params is not None:
            grid = np.unique(np.geomspace(s[0], s[-1], 60).astype(int))
            ax.plot(grid, law.predict_loss(h.n_params, grid, h.batch_size), color=color, lw=0.9, ls="--", alpha=0.8)
    pred = report.get("prediction")
    if pred:
        ps, pl_ = np.asarray(pred["steps"]), np.asarray(pred["loss"])
        keep = ps >= start
        if "lower" in pred:
            ax.fill_between(ps[keep], np.asarray(pred["lower"])[keep], np.asarray(pred["upper"])[keep],
                            color="tab:red", alpha=0.15, lw=0, label="90% bootstrap band")
        ax.plot(ps[keep], pl_[keep], color="tab:red", lw=2.0, ls="--",
                label=f"predicted before training (N={fmt_n(pred['n_params'])})")
        if "target_loss" in pred:
            ax.axhline(pred["target_loss"], color="tab:green", lw=0.9, ls="-.",
                       label=f"target {pred['target_loss']:.3f}")
    ax.set_xscale("log")
    if ys:
        lo = min(float(np.nanmin(y)) for y in ys)
        hi = float(np.nanmax([y[min(len(y) - 1, len(y) // 20)] for y in ys]))
        ax.set_ylim(lo - 0.05 * (hi - lo), hi + 0.02 * (hi - lo))
        ax.set_xlim(start, last * 1.05)
    from matplotlib.ticker import FixedLocator, NullFormatter, ScalarFormatter

    # A short log axis: label 1-2-5 steps, not the overlapping minor ticks.
    ticks = [m * 10**e for e in range(0, 9) for m in (1, 2, 5) if start <= m * 10**e <= last * 1.05]
    if len(ticks) >= 2:
        ax.xaxis.set_major_locator(FixedLocator(ticks))
        ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (nats)")
    ax.set_title("Loss curves: observed, fitted L(N,S,B) (dashed), held-out prediction (red)", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=6.5, loc="lower left", ncol=2)


def plot_critical_batch(ax: Any, report: Mapping[str, Any], histories: Mapping[str, RunHistory], critical: Any,
                        law: Any) -> None:
    """B_crit(L): the fitted power law, the per-level hyperbola points and the live B_simple readings."""
    losses = []
    if critical is not None and getattr(critical, "table", None):
        t = critical.table
        ok = np.isfinite(t["b_crit"]) & np.isfinite(t["loss"])
        ax.scatter(t["loss"][ok], t["b_crit"][ok], color="tab:blue", zorder=3, s=22,
                   label="batch sweep: E_min/S_min per loss level")
        losses.append(t["loss"][ok])
    live_loss, live_b = _live_b_simple_points(histories)
    if live_loss.size:
        ax.scatter(live_loss, live_b, s=5, alpha=0.3, color="tab:purple",
                   label="live B_simple (GradientNoiseScale), every run")
        centers, medians = _binned_median(live_loss, live_b)
        ax.plot(centers, medians, "D-", color="tab:purple", ms=5, lw=1.0, label="live B_simple, median per loss bin")
        losses.append(live_loss)
    allloss = np.concatenate(losses) if losses else np.empty(0)
    allloss = allloss[np.isfinite(allloss) & (allloss > 0)]
    if allloss.size:
        grid = np.linspace(allloss.min() * 0.97, allloss.max() * 1.03, 100)
        fit = critical if critical is not None else (law.critical_batch_size if law is not None else None)
        if fit is not None:
            cb = report.get("critical_batch") or {}
            ax.plot(grid, fit(grid), color="tab:red", lw=1.8,
                    label=f"fit: B*={_num(_as_float(cb.get('b_star')), '.3g')}, "
                          f"alpha_B={_num(_as_float(cb.get('alpha_b')), '.3g')}" if cb else "fit")
    ax.set_yscale("log")
    ax.set_xlabel("loss (nats)")
    ax.set_ylabel("critical batch (samples)")
    ax.set_title("Critical batch size B_crit(L)", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)


def _live_b_simple_points(histories: Mapping[str, RunHistory]) -> tuple[np.ndarray, np.ndarray]:
    """(smoothed loss, B_simple) at every live gradient-noise-scale reading past the first 5% of each run."""
    xs, ys = [], []
    for h in histories.values():
        ok = h.finite_mask
        if h.gns_step is None or h.gns_b_simple is None or not len(h.gns_step) or ok.sum() < 2:
            continue
        loss_at = np.interp(h.gns_step, h.step[ok], _smooth(h.loss[ok], max(1, ok.sum() // 40)))
        good = np.isfinite(h.gns_b_simple) & (h.gns_b_simple > 0) & (h.gns_step > h.step[-1] * 0.05)
        xs.append(loss_at[good])
        ys.append(h.gns_b_simple[good])
    return (np.concatenate(xs), np.concatenate(ys)) if xs else (np.empty(0), np.empty(0))


def _binned_median(x: np.ndarray, y: np.ndarray, bins: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Median of ``y`` in ``bins`` equal-width bins of ``x`` (bins with < 3 points dropped): the trend in a cloud.

    Example::

        >>> c, m = _binned_median(np.arange(8.0), np.arange(8.0), bins=2)
        >>> c.tolist(), m.tolist()
        ([1.75, 5.25], [1.5, 5.5])
    """
    edges = np.linspace(x.min(), x.max(), bins + 1)
    idx = np.clip(np.digitize(x, edges) - 1, 0, bins - 1)
    keep = [i for i in range(bins) if np.sum(idx == i) >= 3]
    return 0.5 * (edges[keep] + edges[np.add(keep, 1)]), np.array([np.median(y[idx == i]) for i in keep])


def plot_loss_vs_n(ax: Any, report: Mapping[str, Any], histories: Mapping[str, RunHistory], law: Any) -> None:
    """Final loss against N at the ladder batch size, with the law's curve extrapolated past the largest model."""
    runs_info = report.get("runs") or {}
    pts = [(h.n_params, runs_info.get(n, {}).get("final_loss"), runs_info.get(n, {}).get("role", "fit"), h)
           for n, h in histories.items() if h.n_params is not None]
    pred = report.get("prediction") or {}
    batch = pred.get("batch_size")
    if pred.get("steps"):
        steps = int(pred["steps"][-1])
    else:
        steps = max((int(h.step[-1]) for h in histories.values() if len(h)), default=1)
    ladder = [p for p in pts if p[2] in ("ladder", "holdout", "fit") and (batch is None or p[3].batch_size == batch)]
    fitted = [(n, f) for n, f, role, _ in ladder if f is not None and role != "holdout"]
    held = [(n, f) for n, f, role, _ in ladder if f is not None and role == "holdout"]
    if fitted:
        ax.scatter(*zip(*fitted), color="tab:blue", zorder=3, s=28, label="fitted models: observed final loss")
    if held:
        ax.scatter(*zip(*held), marker="*", s=170, color="black", zorder=5, label="held-out model: actual")
    if law is not None and ladder:
        b = batch if batch is not None else ladder[0][3].batch_size
        ns = np.array([p[0] for p in ladder], dtype=float)
        grid = np.geomspace(ns.min() / 1.5, ns.max() * 3, 80)
        curve = law.predict_loss(grid, steps, b)
        ax.plot(grid, curve, color="tab:red", lw=1.4, ls="--", label=f"fitted law L(N, S={steps}, B={b:g})")
        if fitted:  # the law at each fitted N: the residuals the eye should compare, not just the trend
            fn = np.array([n for n, _ in fitted], dtype=float)
            ax.scatter(fn, law.predict_loss(fn, steps, b), facecolors="none", edgecolors="tab:red", s=36,
                       zorder=4, label="fitted law at each fitted model")
        final = (report.get("comparison") or {}).get("final_loss") or {}
        if "n_params" in pred and final.get("predicted") is not None:  # the table's number, same tail mean
            y, iv = float(final["predicted"]), final.get("interval")
            yerr = None if not iv else [[y - float(iv[0])], [float(iv[1]) - y]]
            ax.errorbar([pred["n_params"]], [y], yerr=yerr, fmt="s", color="tab:red", ms=6, capsize=4, zorder=4,
                        label=f"held-out model: predicted before training (N={fmt_n(pred['n_params'])})")
        finals = [f for _, f, _, _ in ladder if f is not None]
        lo, hi = min(float(np.nanmin(curve)), *finals), max(float(np.nanmax(curve)), *finals)
        ax.set_ylim(lo - 0.1 * (hi - lo), hi + 0.1 * (hi - lo))
        floor = float(law.min_loss(float(ns.max())))
        ax.text(0.02, 0.03, f"L(N) with infinite steps at N={fmt_n(ns.max())}: {floor:.3f} (off this scale)"
                if floor < lo - 0.1 * (hi - lo) else "", transform=ax.transAxes, fontsize=7, color="gray")
    ax.set_xscale("log")
    ax.set_xlabel("non-embedding parameters N")
    ax.set_ylabel(f"final loss (nats), at step {steps}")
    ax.set_title("L(N): law fitted on the smaller models vs the held-out model", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="upper right")


def _figure_title(report: Mapping[str, Any]) -> str:
    """What was fitted, what was predicted and how it compares, in one line.

    Example::

        >>> final = {"predicted": 1.87, "actual": 1.817, "rel_error": 0.029}
        >>> title = _figure_title({"name": "demo", "runs": {"a": {"role": "ladder"}, "b": {"role": "holdout"}},
        ...                        "comparison": {"final_loss": final}, "prediction": {"n_params": 221184}})
        >>> for part in title.split("; "):
        ...     print(part)
        demo: laws fitted on 1 runs
        held-out model N=221k, final loss predicted 1.870 before training, actual 1.817 (+2.9%)
    """
    runs = report.get("runs") or {}
    n_fit = sum(1 for r in runs.values() if r.get("role") != "holdout")
    title = f"{report.get('name', 'scaling study')}: laws fitted on {n_fit} runs"
    final = (report.get("comparison") or {}).get("final_loss") or {}
    n = (report.get("prediction") or {}).get("n_params")
    if final.get("predicted") is not None and final.get("actual") is not None:
        title += (f"; held-out model N={fmt_n(n)}, final loss predicted {final['predicted']:.3f} before training, "
                  f"actual {final['actual']:.3f} ({_pct(final.get('rel_error'))})")
    return title


def write_figures(report: Mapping[str, Any], histories: Mapping[str, RunHistory], law: Any, critical: Any,
                  out_dir: str | Path) -> list[str]:
    """Write ``loss_curves.png``, ``critical_batch.png``, ``loss_vs_n.png`` and the combined ``report.png``.

    Returns:
        The paths written.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    panels = [("loss_curves.png", lambda ax: plot_loss_curves(ax, report, histories, law)),
              ("critical_batch.png", lambda ax: plot_critical_batch(ax, report, histories, critical, law)),
              ("loss_vs_n.png", lambda ax: plot_loss_vs_n(ax, report, histories, law))]
    for fname, draw in panels:
        fig = _figure((7.0, 4.6))
        draw(fig.add_subplot(1, 1, 1))
        fig.tight_layout()
        fig.savefig(out / fname)
        paths.append(str(out / fname))
    fig = _figure((18.0, 5.0))
    for i, (_, draw) in enumerate(panels):
        draw(fig.add_subplot(1, 3, i + 1))
    fig.suptitle(_figure_title(report), fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "report.png")
    paths.append(str(out / "report.png"))
    return paths
