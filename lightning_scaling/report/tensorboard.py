"""TensorBoard panels for live forecasts: the custom-scalars layout, the forecast run and its ``latest.json``.

Everything here is plain I/O around a :class:`~lightning_scaling.history.RunHistory` and a
:class:`~lightning_scaling.forecast.Forecast` (the figure is :func:`lightning_scaling.report.figures.forecast_figure`);
the callbacks decide *when* to call it (rank 0 only).

A training shows up in TensorBoard as a handful of runs: the logger's run (``<log_dir>``: observed loss, forecast
summaries, gradient noise scale), ``LossTrajectory``'s ``<log_dir>/by_tokens`` and one **forecast run**
``<log_dir>/forecast``. The forecast run holds the *latest* forecast only, on the optimizer-step axis:
``forecast/loss`` with its band ``forecast/loss_lower``/``forecast/loss_upper`` up to the horizon, and the
smoothed observed loss ``forecast/observed_loss`` it was fitted to, so the "Forecast" chart of Custom Scalars
shows the real loss under the latest forecast with nothing from the tokens axis mixed in. Each refit writes a new
event file that starts again at step 0 and deletes the previous one; TensorBoard replaces a series whose steps
restart (the data server preempts the later records; the Python loader purges at the ``SessionLog.START`` written
first), so the chart never accumulates one curve per refit.
"""

from __future__ import annotations

import glob
import math
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from lightning_scaling.numerics import dumps, smooth
from lightning_scaling.report.figures import _observed

if TYPE_CHECKING:
    from lightning_scaling.forecast import Forecast
    from lightning_scaling.history import RunHistory

#: Tag of the observed training loss written by ``LossTrajectory`` (in the logger's run and its ``by_tokens`` run).
LOSS_TAG = "scaling/loss"
#: Tags of the forecast run: the latest forecast's mean and band, and the smoothed observed loss it was fitted to.
FORECAST_TAG = "forecast/loss"
LOWER_TAG = "forecast/loss_lower"
UPPER_TAG = "forecast/loss_upper"
OBSERVED_TAG = "forecast/observed_loss"
#: Sub-directory of the logger's ``log_dir`` that is the forecast run (and holds ``latest.json``).
FORECAST_DIR = "forecast"
#: Name of the JSON file (inside ``<log_dir>/forecast``) holding the latest forecast and its fitted parameters.
FORECAST_JSON = "latest.json"
# Prefix of an event file being moved into the forecast run (TensorBoard reads only names holding "tfevents").
_STAGING = ".incoming-"

__all__ = [
    "FORECAST_DIR",
    "FORECAST_JSON",
    "FORECAST_TAG",
    "LOSS_TAG",
    "LOWER_TAG",
    "OBSERVED_TAG",
    "UPPER_TAG",
    "custom_scalars_layout",
    "forecast_run_dir",
    "scalars_summary",
    "write_custom_scalars",
    "write_forecast_json",
    "write_forecast_run",
]


def _chart(*tags: str) -> list[Any]:
    """A multiline chart of exactly these tags (anchored regex: ``gns/b_simple`` must not match ``..._tokens``)."""
    return ["Multiline", [f"^({'|'.join(tags)})$"]]


def custom_scalars_layout() -> dict[str, dict[str, list[Any]]]:
    """The custom-scalars layout of lightning-scaling's TensorBoard tags: one unit per chart.

    Categories: ``"Forecast"`` (the forecast run's latest curve and band over the smoothed observed loss, on the
    step axis; the predicted final loss with its band at each refit as a margin chart; steps, tokens and seconds
    to the target each on their own chart), ``"Gradient noise scale"`` (B_simple in samples with the forecast's
    critical batch, and batch/B_simple alone) and ``"Tokens"`` (``scaling/tokens``).

    Returns:
        ``{category: {chart title: ["Multiline" | "Margin", [tags...]]}}``, the shape ``add_custom_scalars`` takes.

    Example::

        >>> layout = custom_scalars_layout()
        >>> layout["Forecast"]["predicted final loss (band) at each refit"]
        ['Margin', ['forecast/final_loss', 'forecast/final_loss_lower', 'forecast/final_loss_upper']]
        >>> layout["Gradient noise scale"]["batch / B_simple (1: at the critical batch)"]
        ['Multiline', ['^(gns/batch_over_bsimple)$']]
    """
    return {
        "Forecast": {
            "loss by step: observed (smoothed) and latest forecast with band": _chart(
                OBSERVED_TAG, FORECAST_TAG, LOWER_TAG, UPPER_TAG),
            "predicted final loss (band) at each refit": [
                "Margin", ["forecast/final_loss", "forecast/final_loss_lower", "forecast/final_loss_upper"]],
            "steps to target": _chart("forecast/steps_to_target"),
            "tokens to target": _chart("forecast/tokens_to_target"),
            "seconds to target and to the end": _chart("forecast/eta_seconds", "forecast/remaining_seconds"),
        },
        "Gradient noise scale": {
            "B_simple (samples)": _chart("gns/b_simple", "forecast/critical_batch"),
            "batch / B_simple (1: at the critical batch)": _chart("gns/batch_over_bsimple"),
        },
        "Tokens": {
            "tokens seen": _chart("scaling/tokens"),
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


def forecast_run_dir(log_dir: str | os.PathLike) -> str:
    """Directory of the forecast run: ``<log_dir>/forecast``.

    Example::

        >>> forecast_run_dir("logs/version_0").replace(os.sep, "/")
        'logs/version_0/forecast'
    """
    return os.path.join(os.fspath(log_dir), FORECAST_DIR)


def _subsample(n: int, max_points: int) -> np.ndarray:
    """Evenly spaced indices into ``range(n)``, always keeping the first and last point."""
    if n <= max_points:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, max_points).round().astype(np.int64))


def _curves(forecast: Forecast, history: RunHistory | None, max_points: int) -> dict[str, tuple[np.ndarray, ...]]:
    """Tag -> (steps, values) of the forecast run, each subsampled to ``max_points``."""
    steps = np.asarray(forecast.steps, dtype=np.float64)
    idx = _subsample(len(steps), max_points)
    out = {tag: (steps[idx], np.asarray(getattr(forecast, attr), dtype=np.float64)[idx])
           for tag, attr in ((FORECAST_TAG, "loss"), (LOWER_TAG, "lower"), (UPPER_TAG, "upper"))}
    if history is not None:
        step, loss = _observed(history)
        if len(loss):
            trend = smooth(loss, max(1, len(loss) // 50))
            keep = _subsample(len(step), max_points)
            out[OBSERVED_TAG] = (step[keep], trend[keep])
    return out


def write_forecast_run(
    log_dir: str | os.PathLike,
    forecast: Forecast,
    *,
    history: RunHistory | None = None,
    max_points: int = 500,
) -> str:
    """Replace the forecast run ``<log_dir>/forecast`` with this forecast (and the observed loss it was fitted to).

    Writes a new event file holding ``SessionLog.START`` at step 0, then the mean curve (:data:`FORECAST_TAG`),
    its band (:data:`LOWER_TAG`, :data:`UPPER_TAG`) and, when ``history`` is given, the smoothed observed loss
    (:data:`OBSERVED_TAG`), all with the optimizer step as the step axis; then deletes the run's older event files.
    A separate event writer is opened and closed here, so the logger's own event file never gets future steps.

    Args:
        log_dir: the logger's run directory (``TensorBoardLogger.log_dir``).
        forecast: the forecast to write.
        history: the observed run the forecast was fitted to (drawn smoothed under the forecast).
        max_points: at most this many points per tag (evenly subsampled, endpoints kept).

    Returns:
        The run directory written.

    Raises:
        ValueError: if ``max_points < 2``.

    Example::

        >>> import json, tempfile, types
        >>> f = types.SimpleNamespace(steps=np.arange(0, 100, 10), loss=np.linspace(4, 3, 10),
        ...                           lower=np.linspace(4, 2.9, 10), upper=np.linspace(4, 3.1, 10))
        >>> with tempfile.TemporaryDirectory() as d:
        ...     os.path.basename(write_forecast_run(d, f))
        'forecast'
    """
    from tensorboard.compat.proto.event_pb2 import Event, SessionLog
    from tensorboard.summary.writer.event_file_writer import EventFileWriter

    if max_points < 2:
        raise ValueError(f"`max_points` must be >= 2, got {max_points}")
    run_dir = forecast_run_dir(log_dir)
    older = set(glob.glob(os.path.join(run_dir, "events.out.tfevents.*")) +
                glob.glob(os.path.join(run_dir, _STAGING + "*")))
    by_step: dict[int, dict[str, float]] = {}
    for tag, (x, y) in _curves(forecast, history, max_points).items():
        for xi, yi in zip(x.tolist(), y.tolist()):
            if math.isfinite(yi):
                by_step.setdefault(int(round(xi)), {})[tag] = yi
    # Written whole elsewhere, then renamed into the run: a writer stopped half-way (the refit worker is killed
    # when a run ends during a refit) leaves no partial curve for TensorBoard to show beside the last one.
    with tempfile.TemporaryDirectory(prefix="lightning-scaling-forecast-") as tmp:
        # TensorBoard's own event writer: no torch (the refit worker process writes this run off the training thread)
        writer = EventFileWriter(tmp, max_queue_size=len(by_step) + 2)
        try:
            now = time.time()
            writer.add_event(Event(step=0, wall_time=now, session_log=SessionLog(status=SessionLog.START)))
            for step in sorted(by_step):  # one event per step (the curve and its band): a third of the events
                writer.add_event(Event(step=step, wall_time=now, summary=scalars_summary(by_step[step])))
        finally:
            writer.close()
        (name,) = os.listdir(tmp)
        os.makedirs(run_dir, exist_ok=True)
        staging = os.path.join(run_dir, f"{_STAGING}{os.getpid()}")  # no "tfevents" in it: TensorBoard skips it
        shutil.copyfile(os.path.join(tmp, name), staging)
        os.replace(staging, os.path.join(run_dir, name))
    for path in older:  # the new file holds the whole latest forecast; older ones only hold stale curves
        try:
            os.remove(path)
        except OSError:
            pass
    return run_dir


def scalars_summary(values: Mapping[str, float]) -> Any:
    """One TensorBoard ``Summary`` holding every scalar of ``values`` (the records ``add_scalar`` writes one event
    each for).

    Written as one event per step, several series cost one event's Python work (protobuf, TensorBoard's
    pure-Python record checksums: about 40 us on the writing thread's GIL) instead of one each.

    Example::

        >>> [(v.tag, v.simple_value) for v in scalars_summary({"a": 1.0, "b": 2.5}).value]
        [('a', 1.0), ('b', 2.5)]
    """
    from tensorboard.compat.proto.summary_pb2 import Summary

    return Summary(value=[Summary.Value(tag=k, simple_value=float(v)) for k, v in values.items()])


def write_forecast_json(log_dir: str | os.PathLike, forecast: Forecast, *,
                        extra: Mapping[str, Any] | None = None) -> str:
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

        >>> import json, tempfile, types
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
        fh.write(dumps(payload))
    os.replace(tmp, path)
    return path
