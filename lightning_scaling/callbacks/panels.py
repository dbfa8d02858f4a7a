"""Where :mod:`lightning_scaling.callbacks.forecast` finds the TensorBoard panels: they live in ``report/``.

The plotting and JSON half of the panels moved to :mod:`lightning_scaling.report.tensorboard` and
:mod:`lightning_scaling.report.figures`; this module only names them for the callback that imports them from
here, until that import points at ``report`` (then this file goes).
"""

from lightning_scaling.report.figures import forecast_figure, is_predictable, render_figure
from lightning_scaling.report.tensorboard import (
    FORECAST_DIR,
    FORECAST_JSON,
    FORECAST_TAG,
    LOSS_TAG,
    LOWER_TAG,
    OBSERVED_TAG,
    UPPER_TAG,
    custom_scalars_layout,
    forecast_run_dir,
    write_custom_scalars,
    write_forecast_json,
    write_forecast_run,
)

__all__ = [
    "FORECAST_DIR",
    "FORECAST_JSON",
    "FORECAST_TAG",
    "LOSS_TAG",
    "LOWER_TAG",
    "OBSERVED_TAG",
    "UPPER_TAG",
    "custom_scalars_layout",
    "forecast_figure",
    "forecast_run_dir",
    "is_predictable",
    "render_figure",
    "write_custom_scalars",
    "write_forecast_json",
    "write_forecast_run",
]
