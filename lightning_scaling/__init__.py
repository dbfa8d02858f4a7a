"""lightning-scaling: turn any PyTorch Lightning training run into scaling-law evidence.

The maths (``laws``, ``fitting``, ``forecast``, ``history``) imports no Lightning; the callbacks are loaded
lazily on first access, so ``import lightning_scaling`` stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

from lightning_scaling._version import __version__
from lightning_scaling.history import RunHistory

# Public name -> module that defines it (imported on first access).
_LAZY = {
    "LossTrajectory": "lightning_scaling.callbacks",
    "GradientNoiseScale": "lightning_scaling.callbacks",
    "ScalingForecast": "lightning_scaling.callbacks",
    "ForecastEarlyStopping": "lightning_scaling.callbacks",
    "forecast_run": "lightning_scaling.forecast",
    "Forecast": "lightning_scaling.forecast",
    "fit_critical_batch_size": "lightning_scaling.fitting",
    "fit_scaling_law": "lightning_scaling.fitting",
}

__all__ = ["RunHistory", "__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lightning_scaling' has no attribute {name!r}")
