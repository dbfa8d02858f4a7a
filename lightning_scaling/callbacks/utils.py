"""What every callback asks of the trainer, answered once: the other callbacks (by class) and the run's length."""

from __future__ import annotations

import math

from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

__all__ = ["find_callback", "run_horizon"]


def find_callback(trainer: Any, cls: type[T], where: Callable[[T], bool] | None = None) -> T | None:
    """The first callback of ``trainer`` that is a ``cls`` (and satisfies ``where``), else ``None``.

    By class, never by duck typing: a user's callback that happens to have a ``record_gns`` method is not a
    :class:`~lightning_scaling.callbacks.LossTrajectory`.

    Example::

        >>> import types
        >>> from lightning_scaling.callbacks import LossTrajectory
        >>> traj = LossTrajectory()
        >>> trainer = types.SimpleNamespace(callbacks=[object(), traj])
        >>> find_callback(trainer, LossTrajectory) is traj, find_callback(trainer, LossTrajectory, lambda c: False)
        (True, None)
    """
    return next((c for c in trainer.callbacks if isinstance(c, cls) and (where is None or where(c))), None)


def run_horizon(trainer: Any, horizon: int | None = None) -> int | None:
    """The last optimizer step of the run: ``horizon`` if given, else ``trainer.max_steps``, else
    ``trainer.estimated_stepping_batches`` when finite, else ``None`` (open-ended run).

    Example::

        >>> import types
        >>> run_horizon(types.SimpleNamespace(max_steps=-1, estimated_stepping_batches=float("inf"))) is None
        True
        >>> run_horizon(types.SimpleNamespace(max_steps=500)), run_horizon(None, horizon=7)
        (500, 7)
    """
    if horizon is not None:
        return int(horizon)
    if trainer.max_steps is not None and trainer.max_steps > 0:
        return int(trainer.max_steps)
    try:
        est = trainer.estimated_stepping_batches
    except Exception:  # no dataloader length, infinite iterable, ...
        return None
    return int(est) if est is not None and math.isfinite(est) and est > 0 else None
