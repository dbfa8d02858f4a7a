"""Warning classes of lightning-scaling: filter them by class (``warnings.filterwarnings("ignore", category=...)``)."""

from __future__ import annotations

__all__ = ["DataWarning", "FitWarning", "ForecastWarning", "ScalingWarning"]


class ScalingWarning(UserWarning):
    """Base class of every warning lightning-scaling issues."""


class FitWarning(ScalingWarning):
    """A fit converged poorly, fell back to another method, or its result should be read with care."""


class DataWarning(ScalingWarning):
    """Recorded or declared data looks inconsistent (e.g. tokens per sample against the batch's shape)."""


class ForecastWarning(ScalingWarning):
    """A forecast could not be made or is unreliable."""
