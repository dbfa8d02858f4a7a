"""The scaling recipe (Su et al. 2024) on your own LightningModule and DataModule, as a package.

``config`` (:class:`RecipeConfig`, :func:`load_config`; ``recipe_example.yaml`` next to it) -> ``plan`` (the runs,
their shards, the checks made before anything trains) -> ``predict`` (fit, predict, compare; Lightning-free) ->
``run`` (the runner: training with the callbacks, resuming, locks, the report; the one module here that imports
Lightning, on first use) with ``ray_backend``. The runner's names are loaded lazily, so ``import
lightning_scaling.study`` imports no Lightning.

Example::

    >>> from lightning_scaling.study import load_config, plan_runs
    >>> [r.role for r in plan_runs(load_config(EXAMPLE_CONFIG))][-1]
    'holdout'
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from lightning_scaling.study.config import RecipeConfig, load_config
from lightning_scaling.study.lock import RunLock
from lightning_scaling.study.plan import RunSpec, build_run, check_config, parse_shard, plan_runs, shard_runs
from lightning_scaling.study.plan import validate_config
from lightning_scaling.study.predict import compare_prediction, first_step_below, fit_and_predict

#: The example config of ``lightning-scaling recipe --config``, shipped with the package.
EXAMPLE_CONFIG = Path(__file__).with_name("recipe_example.yaml")

# The runner's public names -> loaded on first access (it builds Lightning trainers).
_LAZY = ("RecipeResult", "RunInterrupted", "run_recipe", "train_run", "try_train_run")

__all__ = [
    "EXAMPLE_CONFIG",
    "RecipeConfig",
    "RunLock",
    "RunSpec",
    "build_run",
    "check_config",
    "compare_prediction",
    "first_step_below",
    "fit_and_predict",
    "load_config",
    "parse_shard",
    "plan_runs",
    "shard_runs",
    "validate_config",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module("lightning_scaling.study.run"), name)
    raise AttributeError(f"module 'lightning_scaling.study' has no attribute {name!r}")
