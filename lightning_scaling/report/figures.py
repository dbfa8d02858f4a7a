"""Figures of a study and of a live forecast: the recipe's and ``fit``'s PNG plots and the forecast figure.

Figures use :class:`matplotlib.figure.Figure` with an Agg canvas (no ``pyplot`` global state, no display needed).
They take plain result objects (report dicts, :class:`~lightning_scaling.history.RunHistory`, a fitted law, a
:class:`~lightning_scaling.forecast.Forecast`) and import no Lightning.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lightning_scaling.backtest import largest_run_schedule, run_schedule
from lightning_scaling.history import RunHistory
from lightning_scaling.numerics import smooth
from lightning_scaling.report.tables import _as_float, _num, _pct, fmt_n

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from lightning_scaling.forecast import Forecast

__all__ = ["forecast_figure", "is_predictable", "render_figure", "write_figures", "plot_loss_curves",
           "plot_critical_batch", "plot_loss_vs_n"]


# The recipe's other LR schedules (the model's own is red on blue).
_SCHEDULE_COLORS = ("tab:purple", "tab:orange", "tab:brown", "tab:pink", "tab:olive")


def _figure(figsize: tuple[float, float]) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=110)
    FigureCanvasAgg(fig)
    return fig


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
    by_size, labelled = len(histories) > 10, set()  # many runs: one legend entry per size (its colour)
    for name, h in histories.items():
        ok = h.finite_mask & (h.step >= start)
        if ok.sum() < 2:
            continue
        s, l = h.step[ok], h.loss[ok]
        role = runs_info.get(name, {}).get("role", "fit")
        color = colors.get(h.n_params, "gray")
        trend = smooth(l, max(1, len(l) // 30))
        label = f"{name} (N={fmt_n(h.n_params)})" + (" actual" if role == "holdout" else "")
        if by_size and role != "holdout":
            label = None if h.n_params in labelled else f"N={fmt_n(h.n_params)}"
            labelled.add(h.n_params)
        held_color = "black" if runs_info.get(name, {}).get("schedule") is None else "dimgray"
        ax.plot(s, trend, color=held_color if role == "holdout" else color, lw=2.0 if role == "holdout" else 1.1,
                alpha=0.45 if role == "sweep" else 0.95, label=label)
        ys.append(trend)
        if law is not None and role != "holdout" and h.batch_size is not None and h.n_params is not None:
            grid = np.unique(np.geomspace(s[0], s[-1], 60).astype(int))
            ax.plot(grid, law.predict_loss(h.n_params, grid, h.batch_size, run_schedule(h)[0]), color=color, lw=0.9,
                    ls="--", alpha=0.8)
    pred = report.get("prediction")
    # The held-out model under the recipe's other schedules, each predicted before training like the main one.
    others = [(f", {name}", p, c) for (name, p), c in zip((report.get("schedule_predictions") or {}).items(),
                                                          itertools.cycle(_SCHEDULE_COLORS))]
    for tag, p, c in ([("", pred, "tab:red")] if pred else []) + others:
        ps, pl_ = np.asarray(p["steps"]), np.asarray(p["loss"])
        keep = ps >= start
        if "lower" in p:
            ax.fill_between(ps[keep], np.asarray(p["lower"])[keep], np.asarray(p["upper"])[keep],
                            color=c, alpha=0.15, lw=0, label=f"90% band{tag}")
        ax.plot(ps[keep], pl_[keep], color=c, lw=2.0, ls="--",
                label=f"predicted before training (N={fmt_n(p['n_params'])}{tag})")
    if pred and "target_loss" in pred:
        ax.axhline(pred["target_loss"], color="tab:green", lw=0.9, ls="-.", label=f"target {pred['target_loss']:.3f}")
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
    held_out = any(info.get("role") == "holdout" for info in runs_info.values())
    shown = ", held-out prediction (red)" if held_out else (", prediction (red)" if pred else "")
    ax.set_title(f"Loss curves: observed, fitted L(N,S,B) (dashed){shown}", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=6.5, loc="upper right" if by_size else "lower left", ncol=2)


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
        loss_at = np.interp(h.gns_step, h.step[ok], smooth(h.loss[ok], max(1, ok.sum() // 40)))
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
    """Final loss against N at the ladder batch size, with the law's curve extrapolated past the largest model.

    One series per LR schedule of the recipe: the model's own (blue points, red law) and each of the others.
    """
    runs_info = report.get("runs") or {}
    pred = report.get("prediction") or {}
    if pred.get("steps"):
        steps = int(pred["steps"][-1])
    else:
        steps = max((int(h.step[-1]) for h in histories.values() if len(h)), default=1)
    # one series per schedule of the runs: the model's own first, then the recipe's others in plan order
    names = list(dict.fromkeys(r.get("schedule") for r in runs_info.values() if r.get("schedule")))
    series = [(None, pred, (report.get("comparison") or {}), "tab:blue", "tab:red")]
    for name, color in zip(names, itertools.cycle(_SCHEDULE_COLORS)):
        series.append((name, (report.get("schedule_predictions") or {}).get(name) or {},
                       (report.get("schedule_comparisons") or {}).get(name) or {}, color, color))
    bounds: list[float] = []
    for schedule, spred, comp, dot, line in series:
        pts = [(h.n_params, runs_info.get(n, {}).get("final_loss"), runs_info.get(n, {}).get("role", "fit"), h)
               for n, h in histories.items() if h.n_params is not None
               and runs_info.get(n, {}).get("schedule") == schedule]
        bounds += _loss_vs_n_series(ax, pts, spred, comp, law, steps, schedule, dot, line)
    if bounds:
        lo, hi = min(bounds), max(bounds)
        ax.set_ylim(lo - 0.1 * (hi - lo), hi + 0.1 * (hi - lo))
        if law is not None:
            n_max = max(h.n_params for h in histories.values() if h.n_params is not None)
            floor = float(law.min_loss(n_max))
            ax.text(0.02, 0.03, f"L(N) with infinite steps at N={fmt_n(n_max)}: {floor:.3f} (off this scale)"
                    if floor < lo - 0.1 * (hi - lo) else "", transform=ax.transAxes, fontsize=7, color="gray")
    ax.set_xscale("log")
    ax.set_xlabel("non-embedding parameters N")
    ax.set_ylabel(f"final loss (nats), at step {steps}")
    held_out = any(info.get("role") == "holdout" for info in runs_info.values())
    ax.set_title("L(N): law fitted on the smaller models vs the held-out model" if held_out
                 else "L(N): law fitted on these models", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=6.5 if len(series) > 1 else 7, loc="upper right")


def _loss_vs_n_series(ax: Any, pts: list[Any], pred: Mapping[str, Any], comp: Mapping[str, Any], law: Any,
                      steps: int, schedule: str | None, dot: Any, line: Any) -> list[float]:
    """One schedule's ladder on the L(N) panel; returns the losses drawn (for the axis range)."""
    batch = pred.get("batch_size")
    ladder = [p for p in pts if p[2] in ("ladder", "holdout", "fit") and (batch is None or p[3].batch_size == batch)]
    tag = "" if schedule is None else f" ({schedule})"
    fitted = [(n, f) for n, f, role, _ in ladder if f is not None and role != "holdout"]
    held = [(n, f) for n, f, role, _ in ladder if f is not None and role == "holdout"]
    if fitted:
        ax.scatter(*zip(*fitted), color=dot, zorder=3, s=28, marker="o" if schedule is None else "^",
                   label=f"fitted models: observed final loss{tag}")
    if held:
        ax.scatter(*zip(*held), marker="*", s=170, color="black" if schedule is None else "dimgray", zorder=5,
                   label=f"held-out model: actual{tag}")
    if law is None or not ladder:
        return [f for _, f, _, _ in ladder if f is not None]
    b = batch if batch is not None else ladder[0][3].batch_size
    lr = largest_run_schedule([h for _, _, role, h in ladder if role != "holdout"] or [ladder[0][3]])
    ns = np.array([p[0] for p in ladder], dtype=float)
    grid = np.geomspace(ns.min() / 1.5, ns.max() * 3, 80)
    curve = law.predict_loss(grid, steps, b, lr)
    ax.plot(grid, curve, color=line, lw=1.4, ls="--", label=f"fitted law L(N, S={steps}, B={b:g}){tag}")
    if fitted:  # the law at each fitted N: the residuals the eye should compare, not just the trend
        fn = np.array([n for n, _ in fitted], dtype=float)
        ax.scatter(fn, law.predict_loss(fn, steps, b, lr), facecolors="none", edgecolors=line, s=36, zorder=4,
                   label=f"fitted law at each fitted model{tag}")
    final = comp.get("final_loss") or {}
    if "n_params" in pred and final.get("predicted") is not None:  # the table's number, same tail mean
        y, iv = float(final["predicted"]), final.get("interval")
        yerr = None if not iv else [[y - float(iv[0])], [float(iv[1]) - y]]
        x = pred["n_params"] * (1.0 if schedule is None else 1.07)  # side by side with the main prediction's bar
        ax.errorbar([x], [y], yerr=yerr, fmt="s", color=line, ms=6, capsize=4, zorder=4,
                    label=f"held-out model: predicted before training (N={fmt_n(pred['n_params'])}){tag}")
    return [float(np.nanmin(curve)), float(np.nanmax(curve))] + [f for _, f, _, _ in ladder if f is not None]


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
    for name, comp in (report.get("schedule_comparisons") or {}).items():
        other = comp.get("final_loss") or {}
        if other.get("predicted") is not None and other.get("actual") is not None:
            title += (f"; {name}: predicted {other['predicted']:.3f}, actual {other['actual']:.3f} "
                      f"({_pct(other.get('rel_error'))})")
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


def is_predictable(loss: Any, lower: Any, upper: Any) -> bool:
    """Whether a predicted loss is worth reading as a number: its band is finite and narrower than the loss itself.

    Early in a run the band can span [0.09, 35.8] nats around a loss of 3; such a forecast is shown as
    "not yet predictable" rather than as numbers.

    Example::

        >>> is_predictable(3.0, 2.9, 3.2), is_predictable(3.0, 0.09, 35.8), is_predictable(3.0, float("nan"), 3.1)
        (True, False, False)
    """
    try:
        loss, lower, upper = float(loss), float(lower), float(upper)
    except (TypeError, ValueError):
        return False
    return all(map(math.isfinite, (loss, lower, upper))) and upper - lower <= abs(loss)


def _observed(history: RunHistory) -> tuple[np.ndarray, np.ndarray]:
    step = np.asarray(history.step, dtype=np.float64)
    loss = np.asarray(history.loss, dtype=np.float64)
    ok = np.isfinite(loss)
    return step[ok], loss[ok]


def forecast_figure(
    history: RunHistory,
    forecast: Forecast | None = None,
    *,
    target_loss: float | None = None,
    title: str | None = None,
    figsize: tuple[float, float] = (7.0, 4.2),
) -> Figure:
    """Matplotlib figure of the observed loss curve, the forecast and its band.

    Built on :class:`matplotlib.figure.Figure` with an Agg canvas (no ``pyplot`` state, safe off the main
    thread). The raw per-step loss is drawn faintly with a running mean on top, the forecast as a dashed line with
    its band shaded, the last observed step as a vertical line and ``target_loss`` as a horizontal one. The y range
    skips the steep early transient so the region the forecast is about stays readable.

    Args:
        history: the observed run.
        forecast: the forecast to overlay; ``None`` draws the observed curve only.
        target_loss: optional target loss to mark.
        title: figure title; defaults to the run name and the predicted final loss.
        figsize: figure size in inches.

    Returns:
        The figure (save it with ``fig.savefig(path)`` or log it with ``SummaryWriter.add_figure``).

    Raises:
        ImportError: if matplotlib is not installed.

    Example::

        >>> import types
        >>> h = types.SimpleNamespace(step=np.arange(100), loss=3 + 1 / np.sqrt(1 + np.arange(100)), name="demo")
        >>> fig = forecast_figure(h)
        >>> len(fig.axes)
        1
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    step, loss = _observed(history)
    ys = [loss[len(loss) // 10 :]] if len(loss) else []
    if len(loss):
        window = max(1, len(loss) // 50)
        if window > 1:
            ax.plot(step, loss, color="tab:blue", alpha=0.25, lw=0.8, label="observed (raw)")
        ax.plot(step, smooth(loss, window), color="tab:blue", lw=1.6, label="observed")
    ok = forecast is not None and is_predictable(forecast.final_loss, forecast.final_lower, forecast.final_upper)
    if forecast is not None:
        fs = np.asarray(forecast.steps, dtype=np.float64)
        fl, lo, hi = (np.asarray(a, dtype=np.float64) for a in (forecast.loss, forecast.lower, forecast.upper))
        conf = getattr(forecast, "confidence", None)
        band_label = f"{100 * float(conf):g}% band" if isinstance(conf, (int, float)) and 0 < conf < 1 else "band"
        ax.fill_between(fs, lo, hi, color="tab:orange", alpha=0.25, lw=0, label=band_label)
        ax.plot(fs, fl, color="tab:orange", lw=1.6, ls="--", label=f"forecast ({getattr(forecast, 'method', '?')})")
        observed_until = getattr(forecast, "observed_until", None)
        if observed_until is not None:
            ax.axvline(float(observed_until), color="gray", lw=0.8, ls=":", label="last observed step")
        # A band wider than the loss would squash the observed curve into a line: scale to it only when narrow.
        ys += [lo[np.isfinite(lo)], hi[np.isfinite(hi)]] if ok else [fl[np.isfinite(fl)]]
    if target_loss is not None:
        ax.axhline(float(target_loss), color="tab:green", lw=1.0, ls="-.", label=f"target {target_loss:g}")
        ys.append(np.array([float(target_loss)]))
    finite = np.concatenate([y[np.isfinite(y)] for y in ys]) if ys else np.empty(0)
    if finite.size:
        lo_y, hi_y = float(np.min(finite)), float(np.percentile(finite, 99.5))
        pad = 0.05 * max(hi_y - lo_y, 1e-6)
        ax.set_ylim(lo_y - pad, hi_y + pad)
    if title is None:
        title = str(getattr(history, "name", "") or "run")
        if forecast is not None:
            band = f"[{float(forecast.final_lower):.4g}, {float(forecast.final_upper):.4g}]"
            title += (f": final loss {float(forecast.final_loss):.4f} {band}" if ok
                      else f": final loss not yet predictable (band {band})")
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    return fig


def render_figure(fig: Figure) -> np.ndarray:
    """Render a figure to an ``uint8`` RGB array of shape ``(H, W, 3)`` (for ``add_image(..., dataformats="HWC")``).

    Rendering is the expensive part of ``add_figure``; doing it here lets the callback render off the training
    thread and only hand the pixels to the writer.

    Example::

        >>> import types
        >>> h = types.SimpleNamespace(step=np.arange(10), loss=np.linspace(4, 3, 10), name="demo")
        >>> render_figure(forecast_figure(h, figsize=(2, 1))).shape
        (100, 200, 3)
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[:, :, :3].copy()
