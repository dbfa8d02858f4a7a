"""Warning classes of lightning-scaling, so users can filter or escalate them (``warnings.simplefilter``).

Example::

    >>> import warnings
    >>> from lightning_scaling.warnings import FitWarning, ScalingWarning
    >>> issubclass(FitWarning, ScalingWarning) and issubclass(ScalingWarning, UserWarning)
    True
"""

__all__ = ["ScalingWarning", "FitWarning", "DataWarning", "ForecastWarning"]


class ScalingWarning(UserWarning):
    """Base class of every warning this package issues."""


class FitWarning(ScalingWarning):
    """A fit converged to a law that is not identified by the data (at a bound, no trend, points dropped)."""


class DataWarning(ScalingWarning):
    """Input data was read incompletely or changed on the way in (truncated, duplicated, merged, skipped)."""


class ForecastWarning(ScalingWarning):
    """A forecast could not be made or was refused; the last good one is kept."""
