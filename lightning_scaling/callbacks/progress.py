"""Console progress for step-bounded runs: Lightning's own bars without their epoch-counting quirks."""

from __future__ import annotations

import sys
from typing import Any

from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
from lightning.pytorch.utilities.imports import _RICH_AVAILABLE

__all__ = ["StepRichProgressBar", "interactive", "progress_bar"]


class StepRichProgressBar(RichProgressBar):
    """``RichProgressBar`` that reads ``Epoch 0`` rather than ``Epoch 0/-2`` when the run is bounded by ``max_steps``.

    Lightning sets ``max_epochs=-1`` when only ``max_steps`` is given, and the rich bar prints ``max_epochs - 1``.

    Example::

        >>> import types
        >>> bar = StepRichProgressBar.__new__(StepRichProgressBar)  # no rich needed to show the description
        >>> bar._trainer = types.SimpleNamespace(max_epochs=-1)
        >>> StepRichProgressBar._get_train_description(bar, 0)
        'Epoch 0   '
    """

    def _get_train_description(self, current_epoch: int) -> str:
        max_epochs = self.trainer.max_epochs
        if max_epochs is not None and max_epochs > 0:
            return super()._get_train_description(current_epoch)
        description = f"Epoch {current_epoch}"
        return f"{description:{len(self.validation_description)}}"  # padded like Lightning's: no flicker


def interactive(stream: Any = None) -> bool:
    """Whether ``stream`` (default ``sys.stdout``) is a terminal: progress bars redraw there, piped output gets lines.

    Example::

        >>> import io
        >>> interactive(io.StringIO())
        False
    """
    stream = sys.stdout if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # closed or exotic streams
        return False


def progress_bar() -> RichProgressBar | TQDMProgressBar:
    """Lightning's default progress bar (rich when installed, else tqdm), for runs bounded by ``max_steps``.

    Example::

        >>> type(progress_bar()).__name__ in {"StepRichProgressBar", "TQDMProgressBar"}
        True
    """
    return StepRichProgressBar() if _RICH_AVAILABLE else TQDMProgressBar()
