"""The built-in demo: byte-level data from the Python standard library, a small GPT and the demo's recipe config.

The recipe itself is :mod:`lightning_scaling.study`; ``lightning-scaling demo`` runs it with :func:`demo_config`.

Example::

    >>> from lightning_scaling.demo import GPT, StdlibTextDataModule
    >>> GPT(n_layer=2, d_model=64).n_params
    98304
"""

from lightning_scaling.demo.data import StdlibTextDataModule, StdlibTextDataset, load_stdlib_bytes
from lightning_scaling.demo.model import GPT, LRSchedule, kaplan_n_params
from lightning_scaling.demo.config import demo_config

__all__ = [
    "GPT",
    "LRSchedule",
    "StdlibTextDataModule",
    "StdlibTextDataset",
    "demo_config",
    "kaplan_n_params",
    "load_stdlib_bytes",
]
