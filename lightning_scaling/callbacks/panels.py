"""TensorBoard panels for live forecasts: custom-scalars layout, forecast runs and the forecast figure.

Everything here is plain I/O around a :class:`~lightning_scaling.history.RunHistory` and a
:class:`~lightning_scaling.forecast.Forecast`; the callbacks decide *when* to call it (rank 0 only).

TensorBoard cannot show a curve that is rewritten on every refit (re-logging a tag at the same steps leaves
duplicate points), so each refit's full forecast curve goes to its **own run directory**
``<log_dir>/forecast/step_XXXXXX`` under the **same tag** as the observed loss (``scaling/loss``); TensorBoard then
overlays the observed run and every forecast run in one chart. The summaries (predicted final loss and its band,
steps/tokens to a target) are ordinary scalars of the main run, shown as a margin chart by the layout below.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from lightning_scaling.forecast import Forecast
    from lightning_scaling.history import RunHistory

#: Tag of the observed training loss written by ``LossTrajectory``; forecast runs reuse it so the two overlay.
LOSS_TAG = "scaling/loss"
#: Tags of the band written next to the forecast curve in each forecast run.
LOWER_TAG = "forecast/loss_lower"
UPPER_TAG = "forecast/loss_upper"
#: Sub-directory of the logger's ``log_dir`` that holds one run per refit.
FORECAST_DIR = "forecast"
#: Name of the JSON file (inside ``<log_dir>/forecast``) holding the latest forecast and its fitted parameters.
FORECAST_JSON = "latest.json"

__all__ = [
    "FORECAST_DIR",
    "FORECAST_JSON",
    "LOSS_TAG",
    "LOWER_TAG",
    "UPPER_TAG",
    "custom_scalars_layout",
    "forecast_figure",
    "forecast_run_dir",
    "render_figure",
    "write_custom_scalars",
    "write_forecast_json",
    "write_forecast_run",
]


def custom_scalars_layout() -> dict[str, dict[str, list[Any]]]:
    """The custom-scalars layout of lightning-scaling's TensorBoard tags.

    Categories: ``"Loss vs forecast"`` (observed ``scaling/loss`` overlaid with every forecast run, and a margin
    chart of the predicted final loss with its lower/upper bound), ``"Gradient noise scale vs batch size"``
    (``gns/b_simple`` with ``gns/batch_over_bsimple``) and ``"Tokens"`` (``scaling/tokens``). Multiline entries are
    regexes anchored at the start of the tag; margin entries are exact tags ``[value, lower, upper]``.

    Returns:
        ``{category: {chart title: ["Multiline" | "Margin", [tags...]]}}``, the shape ``add_custom_scalars`` takes.

    Example::

        >>> layout = custom_scalars_layout()
        >>> layout["Loss vs forecast"]["predicted final loss"]
        ['Margin', ['forecast/final_loss', 'forecast/final_loss_lower', 'forecast/final_loss_upper']]
    """
    return {
        "Loss vs forecast": {
            "loss and forecast curves": ["Multiline", [r"scaling/loss$", r"forecast/loss_(lower|upper)$"]],
            "predicted final loss": [
                "Margin",
                ["forecast/final_loss", "forecast/final_loss_lower", "forecast/final_loss_upper"],
            ],
            "steps and tokens to target": ["Multiline", [r"forecast/(steps|tokens)_to_target$"]],
            "time to target": ["Multiline", [r"forecast/(eta|remaining)_seconds$"]],
        },
        "Gradient noise scale vs batch size": {
            "B_simple and batch/B_simple": ["Multiline", [r"gns/b_simple$", r"gns/batch_over_bsimple$"]],
            "critical batch (forecast)": ["Multiline", [r"forecast/critical_batch$"]],
        },
        "Tokens": {
            "tokens seen": ["Multiline", [r"scaling/tokens$"]],
        },
    }


def write_custom_scalars(experiment: Any, layout: Mapping[str, Any] | None = None) -> bool:
    """Write the custom-scalars layout once per ``SummaryWriter``.

    ``add_custom_scalars`` may only be called once per writer; the writer is marked so that several callbacks (or a
    resumed fit with the same logger) do not write it twice. Call it on rank 0 only.

    Args:
        experiment: a ``torch.utils.tensorboard.SummaryWriter`` (``TensorBoardLogger.experiment``) or a tensorboardX
            writer; anything without ``add_custom_scalars`` is ignored.
        layout: the layout; :func:`custom_scalars_layout` by default.

    Returns:
        ``True`` when the layout was written now, ``False`` when it was already written or unsupported.

    Example::

        >>> import tempfile
        >>> from torch.utils.tensorboard import SummaryWriter
        >>> with tempfile.TemporaryDirectory() as d:
        ...     writer = SummaryWriter(d)
        ...     first, second = write_custom_scalars(writer), write_custom_scalars(writer)
        ...     writer.close()
        >>> first, second
        (True, False)
    """
    if not hasattr(experiment, "add_custom_scalars") or getattr(experiment, "_lightning_scaling_layout", False):
        return False
    experiment.add_custom_scalars(dict(layout) if layout is not None else custom_scalars_layout())
    experiment._lightning_scaling_layout = True
    return True


def forecast_run_dir(log_dir: str | os.PathLike, at_step: int) -> str:
    """Directory of the forecast run made at optimizer step ``at_step``: ``<log_dir>/forecast/step_XXXXXX``.

    Example::

        >>> forecast_run_dir("logs/version_0", 1200).replace(os.sep, "/")
        'logs/version_0/forecast/step_001200'
    """
    if at_step < 0:
        raise ValueError(f"`at_step` must be >= 0, got {at_step}")
    return os.path.join(os.fspath(log_dir), FORECAST_DIR, f"step_{int(at_step):06d}")


def _subsample(n: int, max_points: int) -> np.ndarray:
    """Evenly spaced indices into ``range(n)``, always keeping the first and last point."""
    if n <= max_points:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, max_points).round().astype(np.int64))


def write_forecast_run(
    log_dir: str | os.PathLike,
    forecast: Forecast,
    *,
    at_step: int,
    tag: str = LOSS_TAG,
    max_points: int = 1000,
    by_tokens: bool = True,
) -> str:
    """Write one refit's full forecast curve as its own TensorBoard run.

    The mean curve goes under ``tag`` (the observed loss tag, so TensorBoard overlays the two) and the band under
    :data:`LOWER_TAG` / :data:`UPPER_TAG`, with the optimizer step as the step axis. When the forecast knows its
    tokens per step and ``by_tokens`` is set, the same curve is also written with tokens as the step to
    ``<log_dir>/by_tokens/forecast/step_XXXXXX`` (next to ``LossTrajectory``'s ``by_tokens`` run). A separate
    ``SummaryWriter`` is opened and closed here, so the main run's event file never gets future steps.

    Args:
        log_dir: the logger's run directory (``TensorBoardLogger.log_dir``).
        forecast: the forecast to write.
        at_step: the optimizer step the forecast was made at (names the run).
        tag: tag of the mean curve.
        max_points: at most this many points per tag (evenly subsampled; TensorBoard keeps 1000 by default).
        by_tokens: also write the tokens-axis run when tokens per step are known.

    Returns:
        The run directory written.

    Raises:
        ValueError: if ``max_points < 2`` or ``at_step < 0``.

    Example::

        >>> import tempfile, types
        >>> f = types.SimpleNamespace(steps=np.arange(0, 100, 10), loss=np.linspace(4, 3, 10),
        ...                           lower=np.linspace(4, 2.9, 10), upper=np.linspace(4, 3.1, 10),
        ...                           tokens_per_step=None)
        >>> with tempfile.TemporaryDirectory() as d:
        ...     os.path.basename(write_forecast_run(d, f, at_step=50))
        'step_000050'
    """
    from torch.utils.tensorboard import SummaryWriter

    if max_points < 2:
        raise ValueError(f"`max_points` must be >= 2, got {max_points}")
    steps = np.asarray(forecast.steps, dtype=np.float64)
    curves = {
        tag: np.asarray(forecast.loss, dtype=np.float64),
        LOWER_TAG: np.asarray(forecast.lower, dtype=np.float64),
        UPPER_TAG: np.asarray(forecast.upper, dtype=np.float64),
    }
    idx = _subsample(len(steps), max_points)
    run_dir = forecast_run_dir(log_dir, at_step)
    axes = [(run_dir, steps)]
    tps = getattr(forecast, "tokens_per_step", None)
    if by_tokens and tps is not None and np.isfinite(tps) and tps > 0:
        axes.append((os.path.join(os.fspath(log_dir), "by_tokens", FORECAST_DIR, os.path.basename(run_dir)), steps * tps))
    for directory, x in axes:
        writer = SummaryWriter(directory)
        try:
            for name, y in curves.items():
                for i in idx:
                    if np.isfinite(y[i]):
                        writer.add_scalar(name, float(y[i]), global_step=int(round(x[i])))
        finally:
            writer.close()
    return run_dir


def _jsonable(obj: Any) -> Any:
    """Convert numpy scalars/arrays (and non-finite floats) to JSON-safe Python values."""
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return _jsonable(obj.item())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return repr(obj)


def write_forecast_json(log_dir: str | os.PathLike, forecast: Forecast, *, extra: Mapping[str, Any] | None = None) -> str:
    """Save the latest forecast (``Forecast.to_dict()``: curve, band, fitted parameters) as JSON.

    Written atomically to ``<log_dir>/forecast/latest.json`` so a reader (the CLI, a notebook) never sees a
    half-written file.

    Args:
        log_dir: the logger's run directory.
        forecast: the forecast.
        extra: more keys merged into the top level (e.g. the step it was made at, the refit cost).

    Returns:
        The path written.

    Example::

        >>> import tempfile, types
        >>> f = types.SimpleNamespace(to_dict=lambda: {"final_loss": np.float64(3.0), "params": {"a": 1.0}})
        >>> with tempfile.TemporaryDirectory() as d:
        ...     json.load(open(write_forecast_json(d, f, extra={"at_step": 7})))["at_step"]
        7
    """
    payload = dict(forecast.to_dict())
    if extra:
        payload.update(extra)
    directory = os.path.join(os.fspath(log_dir), FORECAST_DIR)
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, FORECAST_JSON)
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(_jsonable(payload), fh)
    os.replace(tmp, path)
    return path


def _observed(history: RunHistory) -> tuple[np.ndarray, np.ndarray]:
    step = np.asarray(history.step, dtype=np.float64)
    loss = np.asarray(history.loss, dtype=np.float64)
    ok = np.isfinite(loss)
    return step[ok], loss[ok]


def _smooth(y: np.ndarray, window: int) -> np.ndarray:
    """Centered running mean (edge-corrected) to show the trend under noisy per-step losses."""
    if window <= 1 or len(y) < window:
        return y
    kernel = np.ones(window)
    return np.convolve(y, kernel, mode="same") / np.convolve(np.ones_like(y), kernel, mode="same")


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
        ax.plot(step, _smooth(loss, window), color="tab:blue", lw=1.6, label="observed")
    if forecast is not None:
        fs = np.asarray(forecast.steps, dtype=np.float64)
        fl, lo, hi = (np.asarray(a, dtype=np.float64) for a in (forecast.loss, forecast.lower, forecast.upper))
        conf = getattr(forecast, "confidence", None)
        band_label = f"{100 * float(conf):g}% band" if isinstance(conf, (int, float)) and 0 < conf < 1 else "band"
        ax.fill_between(fs, lo, hi, color="tab:orange", alpha=0.25, lw=0, label=band_label)
        ax.plot(fs, fl, color="tab:orange", lw=1.6, ls="--", label=f"forecast ({getattr(forecast, 'method', '?')})")
        observed_until = getattr(forecast, "observed_until", None)
        if observed_until is not None:
            ax.axvline(float(observed_until), color="gray", lw=0.8, ls=":")
        ys += [lo[np.isfinite(lo)], hi[np.isfinite(hi)]]
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
            title += (
                f": final {float(forecast.final_loss):.4f}"
                f" [{float(forecast.final_lower):.4f}, {float(forecast.final_upper):.4f}]"
            )
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
