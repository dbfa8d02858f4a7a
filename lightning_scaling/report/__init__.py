"""Reports of a scaling study: text tables, figures and the TensorBoard layout, from plain result objects.

``tables`` (the recipe's prediction table, ``fit``'s summary, the README section), ``figures`` (the study's PNG
plots and the live forecast figure) and ``tensorboard`` (the custom-scalars layout, the forecast run and its
``latest.json``). Nothing here imports Lightning; the callbacks call it on rank 0.

Example::

    >>> from lightning_scaling.report import fmt_n
    >>> fmt_n(1.5e6)
    '1.5M'
"""

from lightning_scaling.report.figures import forecast_figure, is_predictable, render_figure, write_figures
from lightning_scaling.report.tables import format_fit_table, format_prediction, format_table, fmt_n
from lightning_scaling.report.tables import readme_section, update_readme
from lightning_scaling.report.tensorboard import custom_scalars_layout, write_custom_scalars, write_forecast_json
from lightning_scaling.report.tensorboard import write_forecast_run

__all__ = [
    "custom_scalars_layout",
    "fmt_n",
    "forecast_figure",
    "format_fit_table",
    "format_prediction",
    "format_table",
    "is_predictable",
    "readme_section",
    "render_figure",
    "update_readme",
    "write_custom_scalars",
    "write_figures",
    "write_forecast_json",
    "write_forecast_run",
]
