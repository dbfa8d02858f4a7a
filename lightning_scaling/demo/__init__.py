"""Built-in demo pieces: byte-level data from the Python standard library and a small GPT.

Example::

    >>> from lightning_scaling.demo import GPT, StdlibTextDataModule
    >>> GPT(n_layer=2, d_model=64).n_params
    98304
"""

from lightning_scaling.demo.data import StdlibTextDataModule, StdlibTextDataset, load_stdlib_bytes
from lightning_scaling.demo.model import GPT, LRSchedule, kaplan_n_params
from lightning_scaling.demo.recipe import RecipeConfig, demo_config, load_config, run_recipe

__all__ = [
    "GPT",
    "LRSchedule",
    "RecipeConfig",
    "StdlibTextDataModule",
    "StdlibTextDataset",
    "demo_config",
    "kaplan_n_params",
    "load_config",
    "load_stdlib_bytes",
    "run_recipe",
]
