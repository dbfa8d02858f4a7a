"""How the callbacks find each other on a trainer: one helper, by class."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

__all__ = ["find_callback"]


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
