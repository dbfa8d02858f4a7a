"""Where :mod:`lightning_scaling.callbacks.forecast` finds the TensorBoard panels: they live in ``report/``.

The plotting and JSON half of the panels moved to :mod:`lightning_scaling.report.tensorboard` and
:mod:`lightning_scaling.report.figures`; this module only names them for the callback that imports them from
here, until that import points at ``report`` (then this file goes).
"""

from lightning_scaling.report import tensorboard as _tensorboard
from lightning_scaling.report.figures import forecast_figure, is_predictable, render_figure
from lightning_scaling.report.tensorboard import *  # noqa: F403 - the same names, one definition

__all__ = [*_tensorboard.__all__, "forecast_figure", "is_predictable", "render_figure"]
