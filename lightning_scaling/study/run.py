"""The scaling recipe (Su et al. 2024, step by step) for any LightningModule and DataModule.

1. **Batch sweep**: one model size at several batch sizes -> the critical batch ``B_crit(L)``
   (:func:`~lightning_scaling.fitting.fit_critical_batch_size`).
2. **Size ladder**: every size but the largest at one batch size -> ``L(N, S_min)`` and so ``L(N, S, B)``
   (:func:`~lightning_scaling.fitting.fit_scaling_law`).
3. **Prediction before training**: the largest model's whole trajectory, its steps to a target loss and its
   critical batch are predicted and written to ``prediction.json`` *before* that model is trained.
4. **Check**: the largest model is trained and compared with the prediction.

Models and data are given by ``class_path``/``init_args`` (LightningCLI style), sizes as lists of ``init_args``
overrides. Every run logs to TensorBoard under ``<out>/runs/<run name>`` with :class:`LossTrajectory`,
:class:`GradientNoiseScale` and :class:`ScalingForecast` attached. The recipe is resumable at the run level: a run
whose folder holds a complete ``scaling/history.json`` and a ``scaling/done.json`` with the same settings is loaded,
not retrained. ``lightning-scaling demo`` is this recipe with the built-in config of :func:`demo_config`.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import inspect
import json
import logging
import math
import os
import shutil
import signal
import socket
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lightning_scaling.history import RunHistory

__all__ = [
    "RecipeConfig",
    "RunSpec",
    "RecipeResult",
    "demo_config",
    "load_config",
    "plan_runs",
    "check_config",
    "validate_config",
    "run_recipe",
    "train_run",
    "try_train_run",
    "RunInterrupted",
    "RunLock",
    "parse_shard",
    "shard_runs",
    "fit_and_predict",
    "compare_prediction",
]

DONE_FILENAME = "done.json"
PREDICTION_FILENAME = "prediction.json"
REPORT_FILENAME = "report.json"


# ================================================================================================================
# Configuration
# ================================================================================================================
@dataclass
class RecipeConfig:
    """Settings of a scaling recipe (what ``lightning-scaling recipe --config FILE`` reads).

    Attributes:
        model: ``{"class_path": "pkg.Module", "init_args": {...}}`` of the LightningModule.
        data: the same for the LightningDataModule.
        sizes: one ``init_args`` override dict per model size, smallest first; an optional ``"name"`` key names
            the size. With ``holdout`` the last (largest) size is predicted, not fitted.
        batch_size: global batch (samples per optimizer step) of the size ladder.
        batch_sizes: global batch sizes of the batch sweep (``batch_size`` is added if missing).
        sweep_size: index in ``sizes`` of the model size used for the batch sweep.
        max_steps: optimizer steps of every run.
        tokens_per_sample: tokens per sample (default: the datamodule's ``tokens_per_sample`` attribute).
        batch_size_arg: ``init_args`` key of the datamodule that takes the per-device batch size.
        max_steps_arg: model ``init_args`` key given ``max_steps`` when the model accepts it (LR schedules).
        lr_arg: model ``init_args`` key of the learning rate (for ``lr_scaling``).
        lr_scaling: ``"none"``, ``"sqrt"`` or ``"linear"``: LR of the sweep runs relative to ``batch_size``.
        trainer: extra ``lightning.pytorch.Trainer`` arguments (``accelerator``, ``devices``, ``precision``...).
        gns: ``GradientNoiseScale`` init args, or ``None`` to leave it out.
        forecast: ``ScalingForecast`` init args, or ``None`` to leave it out.
        fit: extra arguments of ``fit_scaling_law`` (``form``, ``n_bootstrap``...).
        target_loss: loss for the steps-to-target comparison (default: the final loss of the largest fitted
            model, which the held-out model should reach sooner).
        holdout: hold the largest size out of the fit and predict it.
        val_every: validation interval in steps (``None``: Lightning's default).
        checkpoint_every: steps between the ``last.ckpt`` saves of each run (``None``: a tenth of ``max_steps``);
            an interrupted or killed run resumes from its last checkpoint.
        resources: Ray resources of each run's task with ``--backend ray`` (``None``: ``{num_cpus: 1,
            num_gpus: 0}``); any ``ray.remote`` resource option (``num_gpus: 1``, ``memory``, ``resources``).
        torch_threads: ``torch.set_num_threads`` during the recipe (``None``: unchanged). One thread is the
            robust choice for tiny CPU models: several threads per op cost more in synchronisation than they save,
            and collapse when other processes share the cores.
        seed: seed of every run (same initialisation per size and same data order).
        name: name of the study (report titles).
    """

    model: dict[str, Any]
    data: dict[str, Any]
    sizes: list[dict[str, Any]]
    batch_size: int = 16
    batch_sizes: list[int] = field(default_factory=list)
    sweep_size: int = 0
    max_steps: int = 500
    tokens_per_sample: float | None = None
    batch_size_arg: str = "batch_size"
    max_steps_arg: str | None = "max_steps"
    lr_arg: str | None = "lr"
    lr_scaling: str = "none"
    trainer: dict[str, Any] = field(default_factory=dict)
    gns: dict[str, Any] | None = field(default_factory=dict)
    forecast: dict[str, Any] | None = field(default_factory=dict)
    fit: dict[str, Any] = field(default_factory=dict)
    target_loss: float | None = None
    holdout: bool = True
    val_every: int | None = None
    checkpoint_every: int | None = None
    resources: dict[str, Any] | None = None
    torch_threads: int | None = None
    seed: int = 0
    name: str = "recipe"

    def __post_init__(self) -> None:
        for key in ("model", "data"):
            spec = getattr(self, key)
            if not isinstance(spec, Mapping) or not isinstance(spec.get("class_path"), str):
                raise ValueError(f"config '{key}' needs a 'class_path' string (and optional 'init_args'), got {spec!r}")
            if not isinstance(spec.get("init_args", {}), Mapping):
                raise ValueError(f"config '{key}.init_args' must be a mapping")
        if not isinstance(self.sizes, list) or not self.sizes or not all(isinstance(s, Mapping) for s in self.sizes):
            raise ValueError("config 'sizes' must be a non-empty list of init_args override mappings")
        min_sizes = 3 if self.holdout else 2
        if len(self.sizes) < min_sizes:
            raise ValueError(f"config 'sizes' needs >= {min_sizes} model sizes (>= 2 fitted"
                             f"{' + 1 held out' if self.holdout else ''}), got {len(self.sizes)}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"config 'batch_size' must be a positive int, got {self.batch_size!r}")
        if not all(isinstance(b, int) and b >= 1 for b in self.batch_sizes):
            raise ValueError(f"config 'batch_sizes' must be positive ints, got {self.batch_sizes!r}")
        if self.batch_sizes and len(set(self.batch_sizes) | {self.batch_size}) < 3:
            raise ValueError("the batch sweep needs >= 3 distinct batch sizes (including 'batch_size') "
                             "to fit B_crit(L)")
        n_fit = len(self.sizes) - (1 if self.holdout else 0)
        if not 0 <= self.sweep_size < n_fit:
            raise ValueError(f"config 'sweep_size' must index a fitted size (0..{n_fit - 1}), got {self.sweep_size}")
        if not isinstance(self.max_steps, int) or self.max_steps < 10:
            raise ValueError(f"config 'max_steps' must be an int >= 10, got {self.max_steps!r}")
        if self.lr_scaling not in ("none", "sqrt", "linear"):
            raise ValueError(f"config 'lr_scaling' must be 'none', 'sqrt' or 'linear', got {self.lr_scaling!r}")
        if self.tokens_per_sample is not None and not self.tokens_per_sample > 0:
            raise ValueError(f"config 'tokens_per_sample' must be positive, got {self.tokens_per_sample!r}")
        if self.target_loss is not None and not self.target_loss > 0:
            raise ValueError(f"config 'target_loss' must be positive, got {self.target_loss!r}")
        if self.checkpoint_every is not None and not (isinstance(self.checkpoint_every, int)
                                                      and self.checkpoint_every >= 1):
            raise ValueError(f"config 'checkpoint_every' must be a positive int or null, got {self.checkpoint_every!r}")
        if self.resources is not None and not isinstance(self.resources, Mapping):
            raise ValueError(f"config 'resources' must be a mapping like {{num_cpus: 1, num_gpus: 0}}, "
                             f"got {self.resources!r}")
        if self.torch_threads is not None and not (isinstance(self.torch_threads, int) and self.torch_threads >= 1):
            raise ValueError(f"config 'torch_threads' must be a positive int or null, got {self.torch_threads!r}")
        if not isinstance(self.trainer, Mapping):
            raise ValueError("config 'trainer' must be a mapping of Trainer arguments")
        names = [size_name(i, s) for i, s in enumerate(self.sizes)]
        if len(set(names)) != len(names):
            raise ValueError(f"size names must be unique, got {names}")

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON/YAML-able)."""
        return copy.deepcopy(dataclasses.asdict(self))


def size_name(index: int, overrides: Mapping[str, Any]) -> str:
    """Name of a size: its ``"name"`` key, else ``s<index>``."""
    return str(overrides.get("name", f"s{index}"))


def load_config(source: str | os.PathLike[str] | Mapping[str, Any], **overrides: Any) -> RecipeConfig:
    """Read a recipe config from a YAML or JSON file (or a mapping).

    Args:
        source: path of a ``.yaml``/``.yml``/``.json`` file, or a mapping.
        **overrides: top-level keys replacing the file's values (``None`` values are ignored).

    Returns:
        The validated :class:`RecipeConfig`.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: unreadable file, unknown keys or invalid values.

    Example::

        >>> cfg = load_config(demo_config().to_dict(), max_steps=50)
        >>> cfg.max_steps
        50
    """
    if isinstance(source, Mapping):
        data = dict(source)
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        import yaml  # YAML is a superset of JSON: one reader for both

        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise ValueError(f"{path}: not valid YAML/JSON ({err})") from None
        if not isinstance(data, Mapping):
            raise ValueError(f"{path}: the config must be a mapping at the top level")
        data = dict(data)
    data.update({k: v for k, v in overrides.items() if v is not None})
    known = {f.name for f in dataclasses.fields(RecipeConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown config keys {unknown}; known keys: {sorted(known)}")
    missing = [k for k in ("model", "data", "sizes") if k not in data]
    if missing:
        raise ValueError(f"config misses required keys {missing}")
    return RecipeConfig(**data)


def demo_config(*, quick: bool = False) -> RecipeConfig:
    """The built-in demo: byte-level GPTs on the Python standard library's sources, on CPU.

    Default: 6 sizes (2 layers, width 16 to 96: N = 6.1k to 221k non-embedding parameters, the largest held
    out) at batch 16 and a batch sweep over 4, 8, 16, 32 at width 32, 800 steps each, one CPU thread, constant
    LR after a short warmup (the L(S) power law of Kaplan/Su describes constant-LR runs). ``quick=True`` is a
    tiny setting for tests.

    Example::

        >>> cfg = demo_config()
        >>> len(cfg.sizes), cfg.batch_sizes, cfg.max_steps
        (6, [4, 8, 32], 800)
    """
    model = {
        "class_path": "lightning_scaling.demo.model.GPT",
        "init_args": {"n_layer": 2, "n_head": 2, "block_size": 64, "lr": 3e-3, "warmup_steps": 20,
                      "schedule": "constant", "weight_decay": 0.0},
    }
    data = {
        "class_path": "lightning_scaling.demo.data.StdlibTextDataModule",
        "init_args": {"block_size": 64, "max_bytes": 4_000_000, "val_bytes": 200_000},
    }
    if quick:
        model["init_args"].update(block_size=32, warmup_steps=5)
        data["init_args"].update(block_size=32, max_bytes=400_000, val_bytes=20_000)
        return RecipeConfig(
            model=model, data=data,
            sizes=[{"name": f"d{d}", "d_model": d} for d in (8, 16, 24, 32)],
            batch_size=8, batch_sizes=[4, 16], sweep_size=0, max_steps=60, val_every=None, torch_threads=1,
            trainer={"accelerator": "cpu", "devices": 1, "limit_val_batches": 0},
            gns={"log_every_n_steps": 5}, forecast={"every_n_steps": 30}, fit={"n_bootstrap": 8, "form": "kaplan"},
            name="demo (quick)",
        )
    return RecipeConfig(
        model=model, data=data,
        sizes=[{"name": f"d{d}", "d_model": d} for d in (16, 24, 32, 48, 64, 96)],
        batch_size=16, batch_sizes=[4, 8, 32], sweep_size=2, max_steps=800, val_every=400, torch_threads=1,
        trainer={"accelerator": "cpu", "devices": 1, "limit_val_batches": 8},
        gns={}, forecast={}, fit={"n_bootstrap": 40, "form": "auto"},
        name="demo",
    )


# ================================================================================================================
# Planning
# ================================================================================================================
@dataclass(frozen=True)
class RunSpec:
    """One planned training run of the recipe.

    Attributes:
        name: run folder name (``<size>_b<batch>``).
        size_index: index in ``RecipeConfig.sizes``.
        size: the size's name.
        overrides: model ``init_args`` overrides of the size (without ``"name"``).
        batch_size: global batch size (samples per optimizer step).
        role: ``"ladder"`` (fitted, at ``batch_size``), ``"sweep"`` (fitted, batch sweep only) or ``"holdout"``.
        lr: learning rate override (``None``: the model's own).
    """

    name: str
    size_index: int
    size: str
    overrides: dict[str, Any]
    batch_size: int
    role: str
    lr: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _lr_for(cfg: RecipeConfig, batch: int) -> float | None:
    if cfg.lr_scaling == "none" or cfg.lr_arg is None:
        return None
    base = cfg.model.get("init_args", {}).get(cfg.lr_arg)
    if base is None:
        raise ValueError(f"lr_scaling={cfg.lr_scaling!r} needs model.init_args.{cfg.lr_arg} (the LR at batch_size)")
    ratio = batch / cfg.batch_size
    return float(base) * (math.sqrt(ratio) if cfg.lr_scaling == "sqrt" else ratio)


def plan_runs(cfg: RecipeConfig) -> list[RunSpec]:
    """The runs of the recipe in training order: sweep and ladder (smallest first), then the held-out size.

    Example::

        >>> [r.name for r in plan_runs(demo_config(quick=True))]
        ['d8_b4', 'd8_b8', 'd8_b16', 'd16_b8', 'd24_b8', 'd32_b8']
    """
    specs: list[RunSpec] = []
    last = len(cfg.sizes) - 1
    sweep = sorted(set(cfg.batch_sizes) | {cfg.batch_size}) if cfg.batch_sizes else [cfg.batch_size]
    for i, size in enumerate(cfg.sizes):
        name = size_name(i, size)
        overrides = {k: v for k, v in size.items() if k != "name"}
        batches = sweep if i == cfg.sweep_size else [cfg.batch_size]
        for b in batches:
            role = "holdout" if (cfg.holdout and i == last) else ("ladder" if b == cfg.batch_size else "sweep")
            specs.append(RunSpec(name=f"{name}_b{b}", size_index=i, size=name, overrides=overrides, batch_size=b,
                                 role=role, lr=_lr_for(cfg, b)))
    specs.sort(key=lambda s: s.role == "holdout")  # stable: the held-out model trains last
    return specs


# ================================================================================================================
# Training
# ================================================================================================================
def _import(class_path: str) -> Any:
    module, _, name = class_path.rpartition(".")
    if not module:
        raise ValueError(f"class_path must be a dotted path like 'package.module.Class', got {class_path!r}")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"cannot import {class_path!r}: {err}") from None


def _accepts(cls: Any, arg: str) -> bool:
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        return False
    return arg in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _world_size(trainer_args: Mapping[str, Any]) -> int:
    devices = trainer_args.get("devices", 1)
    nodes = int(trainer_args.get("num_nodes", 1))
    if isinstance(devices, int) and devices > 0:
        return devices * nodes
    if isinstance(devices, (list, tuple)):
        return len(devices) * nodes
    return nodes  # "auto"/-1: unknown here; the per-device batch is checked by LossTrajectory's measured batch


def _model_args(cfg: RecipeConfig, spec: RunSpec) -> tuple[Any, dict[str, Any]]:
    """Class and ``init_args`` of one run's model (what :func:`build_run` instantiates)."""
    model_args = {**cfg.model.get("init_args", {}), **spec.overrides}
    if cfg.max_steps_arg:  # check_config() rejects a max_steps_arg the model lacks (never silently dropped)
        model_args[cfg.max_steps_arg] = cfg.max_steps
    if spec.lr is not None and cfg.lr_arg:
        model_args[cfg.lr_arg] = spec.lr
    return _import(cfg.model["class_path"]), model_args


def _data_args(cfg: RecipeConfig, spec: RunSpec) -> tuple[Any, dict[str, Any]]:
    """Class and ``init_args`` of one run's datamodule (the per-device batch under ``batch_size_arg``)."""
    data_args = {**cfg.data.get("init_args", {}), cfg.batch_size_arg: _per_device_batch(cfg, spec.batch_size)}
    return _import(cfg.data["class_path"]), data_args


def _per_device_batch(cfg: RecipeConfig, batch_size: int) -> int:
    split = _world_size(cfg.trainer) * int(cfg.trainer.get("accumulate_grad_batches", 1))
    per_device, rem = divmod(batch_size, split)
    if rem or per_device < 1:
        raise ValueError(f"batch size {batch_size} does not divide over devices x accumulate_grad_batches = {split}")
    return per_device


def build_run(cfg: RecipeConfig, spec: RunSpec) -> tuple[Any, Any]:
    """Instantiate the LightningModule and LightningDataModule of one run.

    Example::

        >>> cfg = demo_config(quick=True)
        >>> model, data = build_run(cfg, plan_runs(cfg)[0])
        >>> model.n_params, data.batch_size
        (1536, 4)

    Raises:
        ValueError: an import fails or the batch size does not divide over devices and accumulation.
    """
    (model_cls, model_args), (data_cls, data_args) = _model_args(cfg, spec), _data_args(cfg, spec)
    try:
        return model_cls(**model_args), data_cls(**data_args)
    except TypeError as err:
        raise ValueError(f"cannot build run {spec.name}: {err}") from None


# ================================================================================================================
# Config checks (``--dry-run`` and the start of every real run)
# ================================================================================================================
@dataclass(frozen=True)
class Check:
    """One line of :func:`check_config`: what was checked, whether it holds, and what was measured."""

    name: str
    ok: bool
    message: str

    def line(self) -> str:
        """``"ok   name: message"`` or ``"FAIL name: message"``."""
        return f"{'ok  ' if self.ok else 'FAIL'} {self.name}: {self.message}"


def check_config(cfg: RecipeConfig) -> list[Check]:
    """Build every run's model and datamodule (no training) and check the settings that would make results wrong.

    Checked: ``batch_size_arg``/``max_steps_arg``/``lr_arg`` are init arguments of the classes; the model size N
    (measured on the built models) strictly increases along ``sizes``; ``sweep_size`` indexes a fitted size with
    >= 3 batch sizes; every batch size splits evenly over devices and is accepted by the datamodule; one batch of
    each datamodule's train loader has the per-device batch and ``tokens_per_sample`` tokens per sample. Models
    are built on the meta device where they allow it (no memory for weights).

    Returns:
        One :class:`Check` per rule (``check.line()`` prints it).

    Example::

        >>> checks = check_config(demo_config(quick=True))  # doctest: +SKIP
        >>> all(c.ok for c in checks)  # doctest: +SKIP
        True
    """
    specs = plan_runs(cfg)
    try:
        model_cls, data_cls = _import(cfg.model["class_path"]), _import(cfg.data["class_path"])
    except ValueError as err:
        return [Check("import", False, str(err))]
    checks = [_check_sweep(cfg, specs), *_check_args(cfg, model_cls, data_cls)]
    if not all(c.ok for c in checks):
        return checks  # building with a wrong argument name would only repeat the failure
    return checks + [_check_sizes(cfg, specs), *_check_data(cfg, specs)]


def validate_config(cfg: RecipeConfig, say: Callable[[str], None] | None = None) -> None:
    """Run :func:`check_config`; print the failed lines and raise before anything trains.

    Raises:
        ValueError: ``"<k> config check(s) failed (see --dry-run): <first failed line>"``.

    Example::

        >>> validate_config(demo_config(quick=True))  # doctest: +SKIP
    """
    failed = [c for c in check_config(cfg) if not c.ok]
    for c in failed:
        (say or (lambda s: None))(c.line())
    if failed:
        raise ValueError(f"{len(failed)} config check(s) failed (see --dry-run): {failed[0].line()}")


def _check_sweep(cfg: RecipeConfig, specs: Sequence[RunSpec]) -> Check:
    batches = sorted({s.batch_size for s in specs if s.size_index == cfg.sweep_size})
    where = f"sizes[sweep_size={cfg.sweep_size}] = {size_name(cfg.sweep_size, cfg.sizes[cfg.sweep_size])}"
    if len(batches) < 3:
        return Check("batch sweep", False, f"{where} runs at batch sizes {batches}; B_crit(L) needs >= 3 "
                                           "(set batch_sizes, e.g. [batch_size / 4, batch_size * 4])")
    return Check("batch sweep", True, f"{where} at batch sizes {batches}")


def _check_args(cfg: RecipeConfig, model_cls: Any, data_cls: Any) -> list[Check]:
    ok = _accepts(data_cls, cfg.batch_size_arg)
    out = [Check("batch_size_arg", ok, f"{data_cls.__name__}({cfg.batch_size_arg}=...) takes the per-device batch"
                 if ok else f"{data_cls.__name__} has no init argument {cfg.batch_size_arg!r}: set batch_size_arg "
                 "to the name of its batch-size argument")]
    if cfg.max_steps_arg is None:
        out.append(Check("max_steps_arg", True, "null: the model's own LR schedule length is used"))
    else:
        ok = _accepts(model_cls, cfg.max_steps_arg)
        out.append(Check("max_steps_arg", ok, f"{model_cls.__name__}({cfg.max_steps_arg}={cfg.max_steps})" if ok else
                         f"{model_cls.__name__} has no init argument {cfg.max_steps_arg!r}, so its LR schedule "
                         "would ignore max_steps: name the right argument or set max_steps_arg: null"))
    if cfg.lr_scaling == "none" or cfg.lr_arg is None:
        out.append(Check("lr_arg", True, "unused (lr_scaling: none)"))
    else:
        ok = _accepts(model_cls, cfg.lr_arg)
        out.append(Check("lr_arg", ok, f"{model_cls.__name__}({cfg.lr_arg}=...) scaled {cfg.lr_scaling}" if ok else
                         f"{model_cls.__name__} has no init argument {cfg.lr_arg!r} for lr_scaling={cfg.lr_scaling}"))
    return out


def _measure_n(model: Any) -> float:
    """Non-embedding N of a built model: its ``n_params`` attribute, else a parameter count."""
    from lightning_scaling.callbacks.loss_trajectory import count_non_embedding_params

    n = getattr(model, "n_params", None)
    if not (isinstance(n, (int, float)) and not isinstance(n, bool) and n > 0):
        n = count_non_embedding_params(model)
    return float(n)


def _build_model_cheaply(model_cls: Any, model_args: Mapping[str, Any]) -> Any:
    import torch

    try:  # the meta device allocates no memory for weights: a 1B-parameter check costs nothing
        with torch.device("meta"):
            return model_cls(**model_args)
    except Exception:  # a model that computes on real tensors in __init__: build it for real
        return model_cls(**model_args)


def _check_sizes(cfg: RecipeConfig, specs: Sequence[RunSpec]) -> Check:
    n_by_size: dict[int, float] = {}
    for spec in specs:  # every run's model (sizes x learning rates), N measured per size
        try:
            n_by_size[spec.size_index] = _probe_size(cfg, spec)
        except Exception as err:
            return Check("sizes", False, f"cannot build the model of run {spec.name}: {type(err).__name__}: {err}")
    ns = [n_by_size[i] for i in sorted(n_by_size)]
    shown = ", ".join(f"{size_name(i, cfg.sizes[i])}={n:,.0f}" for i, n in zip(sorted(n_by_size), ns))
    if any(b <= a for a, b in zip(ns, ns[1:])):
        return Check("sizes", False, f"N must strictly increase along 'sizes' (smallest first; the last is "
                                     f"held out): measured {shown}")
    return Check("sizes", True, f"N strictly increasing: {shown}")


def _check_data(cfg: RecipeConfig, specs: Sequence[RunSpec]) -> list[Check]:
    checks: list[Check] = []
    tokens: Check | None = None
    for batch in sorted({s.batch_size for s in specs}):
        spec = next(s for s in specs if s.batch_size == batch)
        try:
            data_cls, data_args = _data_args(cfg, spec)
        except ValueError as err:
            checks.append(Check(f"batch {batch}", False, str(err)))
            continue
        check, tps_check = _check_one_datamodule(cfg, data_cls, data_args, batch)
        checks.append(check)
        tokens = tokens or tps_check
    return checks + ([tokens] if tokens is not None else [])


def _check_one_datamodule(cfg: RecipeConfig, data_cls: Any, data_args: Mapping[str, Any],
                          batch: int) -> tuple[Check, Check | None]:
    per_device = data_args[cfg.batch_size_arg]
    label = f"{data_cls.__name__}({cfg.batch_size_arg}={per_device})"
    try:
        data = data_cls(**data_args)
        # Resolved before setup(), exactly as the training run resolves it for LossTrajectory.
        tps = _tokens_per_sample(cfg, data)
        data.prepare_data()
        data.setup("fit")
        first = _first_tensor(next(iter(data.train_dataloader())))
    except Exception as err:
        return Check(f"batch {batch}", False, f"{label} failed: {type(err).__name__}: {err}"), None
    if first is None:
        return Check(f"batch {batch}", False, f"{label}: the train loader's batch holds no tensor"), None
    shape = tuple(first.shape)
    if not shape or shape[0] != per_device:
        return Check(f"batch {batch}", False, f"{label} yields batches of shape {shape}, expected {per_device} "
                                              f"samples: is batch_size_arg={cfg.batch_size_arg!r} right?"), None
    return Check(f"batch {batch}", True, f"{label}: one batch of shape {shape}"), _check_tokens(cfg, data_cls, tps,
                                                                                                   shape)


def _check_tokens(cfg: RecipeConfig, data_cls: Any, tps: Any, shape: tuple[int, ...]) -> Check:
    source = "config" if cfg.tokens_per_sample is not None else f"{data_cls.__name__}.tokens_per_sample"
    if not (isinstance(tps, (int, float)) and not isinstance(tps, bool) and tps > 0):
        return Check("tokens_per_sample", False, f"null in the config and {data_cls.__name__} has no positive "
                     f"tokens_per_sample attribute (got {tps!r}): tokens would be NaN; set tokens_per_sample")
    # A sample of a (B, T, ...) batch holds T tokens (sequence models) or all its elements; a (B,) batch 1.
    allowed = {1} if len(shape) == 1 else {shape[1], math.prod(shape[1:])}
    if tps not in allowed:
        return Check("tokens_per_sample", False, f"{tps:g} (from {source}) does not match a batch of shape {shape} "
                                                 f"(expected one of {sorted(allowed)})")
    return Check("tokens_per_sample", True, f"{tps:g} (from {source}) matches batch shape {shape}")


def _first_tensor(batch: Any) -> Any:
    import torch

    if isinstance(batch, torch.Tensor):
        return batch
    items = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (list, tuple)) else ()
    for item in items:
        found = _first_tensor(item)
        if found is not None:
            return found
    return None


def _done_record(cfg: RecipeConfig, spec: RunSpec) -> dict[str, Any]:
    # What must match for a finished run to be reused, in its JSON form (as read back from done.json).
    return json.loads(json.dumps({"spec": spec.to_dict(), "model": cfg.model, "data": cfg.data,
                                  "max_steps": cfg.max_steps, "seed": cfg.seed}, default=str))


def _load_finished(run_dir: Path, cfg: RecipeConfig, spec: RunSpec) -> RunHistory | None:
    done, hist = run_dir / "scaling" / DONE_FILENAME, run_dir / "scaling" / "history.json"
    if not (done.exists() and hist.exists()):
        return None
    try:
        record = json.loads(done.read_text())
        history = RunHistory.from_json(hist)
    except (ValueError, OSError):
        return None
    same = _done_record(cfg, spec) == record.get("settings")
    if not same or len(history) == 0 or int(history.step[-1]) < cfg.max_steps - 1:
        return None
    return history


def _tokens_per_sample(cfg: RecipeConfig, data: Any) -> Any:
    """The config's ``tokens_per_sample``, else the datamodule's attribute (resolved before ``setup``)."""
    return cfg.tokens_per_sample if cfg.tokens_per_sample is not None else getattr(data, "tokens_per_sample", None)


def _callbacks(cfg: RecipeConfig, model: Any, data: Any, spec: RunSpec,
               forecast_extra: Mapping[str, Any] | None = None) -> list[Any]:
    from lightning_scaling.callbacks.loss_trajectory import LossTrajectory

    tps = _tokens_per_sample(cfg, data)
    n = getattr(model, "n_params", None)
    n = n if isinstance(n, (int, float)) and not isinstance(n, bool) and n > 0 else None
    cbs: list[Any] = [LossTrajectory(tokens_per_sample=tps, n_params=n, name=spec.name,
                                     flush_every_n_steps=min(50, max(1, cfg.max_steps // 10)))]
    if cfg.gns is not None:
        from lightning_scaling.callbacks.gns import GradientNoiseScale

        cbs.append(GradientNoiseScale(**cfg.gns))
    if cfg.forecast is not None:
        from lightning_scaling.callbacks.forecast import ScalingForecast

        args = {**cfg.forecast, **(forecast_extra or {})}
        cbs.append(ScalingForecast(**args))
    return cbs


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during a run: says which run stopped at which step and that it resumes from its checkpoint."""

    def __init__(self, run: str, step: int, checkpoint_step: int | None) -> None:
        self.run, self.step, self.checkpoint_step = run, step, checkpoint_step
        resume = ("rerun the same command to resume it from its checkpoint at step "
                  f"{checkpoint_step}" if checkpoint_step is not None else "it restarts from step 0 on rerun")
        super().__init__(f"run {run} interrupted at step {step}; {resume} (finished runs are kept)")


class _RunProgress:
    """Where a run started (its resume step) and stopped, and a ``last.ckpt`` save on Ctrl-C.

    The save on Ctrl-C (single-process runs) makes the resumed run lose no step.
    """

    def __init__(self, path: Path, every: int) -> None:
        self.path, self.every = path, every
        self.start: int | None = None
        self.step: int | None = None
        self.saved_step: int | None = None

    def checkpoint_step(self) -> int | None:
        """The step the run will resume from after an interrupt."""
        if self.saved_step is not None:
            return self.saved_step
        periodic = (self.step or 0) // self.every * self.every  # ModelCheckpoint saves at multiples of `every`
        return max(periodic, self.start or 0) or None

    def callback(self) -> Any:
        from lightning.pytorch.callbacks import Callback

        outer = self

        class _Hook(Callback):
            def on_train_start(self, trainer: Any, pl_module: Any) -> None:
                outer.start = int(trainer.global_step)  # after the checkpoint was restored

            def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
                if not isinstance(exception, KeyboardInterrupt):
                    return
                outer.step = int(trainer.global_step)
                if trainer.world_size == 1:  # under DDP a save is a collective the other ranks may never join
                    try:
                        trainer.save_checkpoint(outer.path)
                        outer.saved_step = outer.step
                    except Exception:
                        pass  # the periodic checkpoint stays the resume point
        return _Hook()


def _checkpoint_every(cfg: RecipeConfig) -> int:
    # A tenth of the run by default: a preempted run loses at most 10% of its steps, and the save costs little.
    return cfg.checkpoint_every if cfg.checkpoint_every is not None else max(1, cfg.max_steps // 10)


def _resume_point(run_dir: Path, cfg: RecipeConfig, spec: RunSpec) -> Path | None:
    """``last.ckpt`` of a partial run with the same settings, or ``None`` (the folder is then cleared)."""
    ckpt, settings = run_dir / "checkpoints" / "last.ckpt", run_dir / "checkpoints" / "settings.json"
    try:
        same = json.loads(settings.read_text()) == _done_record(cfg, spec)
    except (OSError, ValueError):
        return None
    return ckpt if same and ckpt.is_file() else None


def train_run(cfg: RecipeConfig, spec: RunSpec, out_dir: Path, *, progress: bool = True,
              forecast_extra: Mapping[str, Any] | None = None) -> RunHistory:
    """Train one run (or load it if already finished with the same settings) and return its history.

    The run saves ``<run>/checkpoints/last.ckpt`` every ``checkpoint_every`` steps (and on Ctrl-C); a partial run
    with the same settings resumes from it, its :class:`LossTrajectory` history restored from the checkpoint.
    ``forecast_extra`` adds ``ScalingForecast`` arguments (the recipe gives the held-out run the fitted law as a
    prior and the target loss).

    Raises:
        RunInterrupted: Ctrl-C stopped the run (a ``KeyboardInterrupt``; its message says where it resumes).

    Example::

        >>> cfg = demo_config(quick=True)
        >>> history = train_run(cfg, plan_runs(cfg)[0], Path("demo_out"))  # doctest: +SKIP
    """
    import lightning.pytorch as pl

    run_dir = out_dir / "runs" / spec.name
    finished = _load_finished(run_dir, cfg, spec)
    if finished is not None:
        return finished
    resume = _resume_point(run_dir, cfg, spec)
    if resume is None and run_dir.exists() and _is_rank_zero():
        shutil.rmtree(run_dir)  # an outdated or checkpoint-less partial run starts over: one history per folder
    if _is_rank_zero():
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        (run_dir / "checkpoints" / "settings.json").write_text(json.dumps(_done_record(cfg, spec)))
    pl.seed_everything(cfg.seed, verbose=False)
    model, data = build_run(cfg, spec)
    callbacks = _callbacks(cfg, model, data, spec, forecast_extra)
    run = _RunProgress(run_dir / "checkpoints" / "last.ckpt", _checkpoint_every(cfg))
    trainer = pl.Trainer(**_trainer_args(cfg, spec, out_dir, progress, [*callbacks, run.callback()]))
    started, start = time.time(), time.perf_counter()
    try:
        trainer.fit(model, datamodule=data, ckpt_path=str(resume) if resume is not None else None)
    except SystemExit:  # Lightning turns Ctrl-C into sys.exit(1) after its graceful shutdown
        if run.step is None:
            raise
        signal.signal(signal.SIGINT, signal.default_int_handler)  # Lightning ignores further Ctrl-C from here on
        raise RunInterrupted(spec.name, run.step, run.checkpoint_step()) from None
    wall = time.perf_counter() - start
    resumed_from = run.start if resume is not None else None
    history = callbacks[0].history
    if history.batch_size is not None and abs(history.batch_size - spec.batch_size) > 1e-9:
        raise ValueError(f"run {spec.name}: measured batch size {history.batch_size} != planned {spec.batch_size}; "
                         f"check batch_size_arg={cfg.batch_size_arg!r}")
    history.meta.update(size=spec.size, role=spec.role, wall_s=wall, started_at=started, finished_at=time.time(),
                        resumed_from_step=resumed_from)
    if trainer.is_global_zero:
        history.to_json(run_dir / "scaling" / "history.json")
        record = {"settings": _done_record(cfg, spec), "wall_s": wall, "resumed_from_step": resumed_from}
        (run_dir / "scaling" / DONE_FILENAME).write_text(json.dumps(record, indent=1))
    return history


def _trainer_args(cfg: RecipeConfig, spec: RunSpec, out_dir: Path, progress: bool,
                  callbacks: Sequence[Any]) -> dict[str, Any]:
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import TensorBoardLogger

    # save_top_k=0 + save_last: one rolling last.ckpt per run, nothing ranked by a metric.
    ckpt = ModelCheckpoint(dirpath=out_dir / "runs" / spec.name / "checkpoints", save_top_k=0, save_last=True,
                           every_n_train_steps=_checkpoint_every(cfg), save_on_train_epoch_end=False)
    args: dict[str, Any] = {
        "max_steps": cfg.max_steps,
        "logger": TensorBoardLogger(save_dir=str(out_dir / "runs"), name=spec.name, version="",
                                    default_hp_metric=False),
        "enable_checkpointing": True,
        "enable_model_summary": False,
        "enable_progress_bar": progress,
        "num_sanity_val_steps": 0,
        "log_every_n_steps": max(1, min(50, cfg.max_steps // 20)),
    }
    if cfg.val_every is not None:
        args.update(val_check_interval=cfg.val_every, check_val_every_n_epoch=None)
    args.update(cfg.trainer)
    args["callbacks"] = [*callbacks, ckpt, *args.get("callbacks", [])]
    if args["enable_progress_bar"]:
        from lightning_scaling.callbacks.progress import progress_bar

        args["callbacks"].append(progress_bar())  # step-bounded runs: no "Epoch 0/-2"
    return args


# ================================================================================================================
# Fitting, prediction and comparison (Lightning-free: also used by ``lightning-scaling fit``)
# ================================================================================================================
def tail_mean(history: RunHistory, *, fraction: float = 0.05, min_points: int = 10) -> tuple[float, int]:
    """Mean finite loss over the last ``fraction`` of a run (at least ``min_points`` records) and its first step.

    Example::

        >>> h = RunHistory(step=np.arange(100), loss=np.r_[np.full(90, 3.0), np.full(10, 2.0)])
        >>> tail_mean(h)
        (2.0, 90)
    """
    ok = np.flatnonzero(history.finite_mask)
    if ok.size == 0:
        raise ValueError(f"run {history.name!r} has no finite loss")
    k = max(min_points, int(round(fraction * ok.size)))
    sel = ok[-k:]
    return float(np.mean(history.loss[sel])), int(history.step[sel[0]])


def first_step_below(history: RunHistory, level: float) -> float:
    """First step at which the smoothed, monotone loss curve reaches ``level`` (NaN if never).

    Example::

        >>> s = np.arange(1, 1001)
        >>> round(first_step_below(RunHistory(step=s, loss=1.0 + 100.0 / s), 1.5))
        200
    """
    from lightning_scaling.fitting import smooth_monotone

    grid, curve = smooth_monotone(history.step, history.loss)
    below = np.flatnonzero(curve <= level)
    if below.size == 0:
        return float("nan")
    i = int(below[0])
    if i == 0:
        return float(grid[0])
    # Log-linear interpolation between the two grid nodes around the crossing.
    y0, y1 = curve[i - 1], curve[i]
    t = 0.0 if y0 == y1 else (y0 - level) / (y0 - y1)
    return float(np.exp(np.log(grid[i - 1]) + t * (np.log(grid[i]) - np.log(grid[i - 1]))))


def fit_and_predict(
    fit_runs: Sequence[RunHistory],
    *,
    sweep_runs: Sequence[RunHistory] | None = None,
    predict_n: float | None = None,
    batch_size: float | None = None,
    steps: int | None = None,
    target_loss: float | None = None,
    fit_kwargs: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Fit ``B_crit(L)`` and ``L(N, S, B)`` and predict a model of ``predict_n`` parameters.

    Args:
        fit_runs: runs of >= 2 sizes (with ``n_params`` and ``batch_size``).
        sweep_runs: runs of one size at >= 2 batch sizes for ``fit_critical_batch_size`` (default: found among
            ``fit_runs``; without any, ``fit_scaling_law`` falls back to the recorded GNS).
        predict_n: non-embedding size to predict (optional).
        batch_size: batch size of the prediction (default: the most common among ``fit_runs``).
        steps: last step of the predicted trajectory (``1..steps``; default: the last step of the longest run).
        target_loss: loss for steps/tokens-to-target predictions (optional).
        fit_kwargs: extra ``fit_scaling_law`` arguments.

    Returns:
        A JSON-able dict with ``critical_batch``, ``law``, and when ``predict_n`` is given ``prediction``
        (``steps``, ``loss``, ``lower``, ``upper``, ``final_loss``, ``min_loss``, ``steps_to_target``...); the fitted
        objects are under the keys ``_law`` and ``_critical`` (not JSON-able; drop them before writing).

    Raises:
        ValueError: the runs cannot be fitted (the message says why).

    Example::

        >>> from lightning_scaling.laws import loss_n_s_b
        >>> k = dict(n_c=1e10, alpha_n=0.08, s_c=200.0, alpha_s=0.7, b_star=2e4, alpha_b=0.3)
        >>> s = np.arange(1, 3001, 10)
        >>> runs = [RunHistory(name=f"{n:g}_{b}", n_params=n, batch_size=b, step=s, loss=loss_n_s_b(n, s, b, **k))
        ...         for n, b in [(1e6, 64), (1e7, 64), (3e7, 64), (1e6, 16), (1e6, 256), (1e6, 1024)]]
        >>> out = fit_and_predict(runs, predict_n=1e8, batch_size=64, fit_kwargs={"n_bootstrap": 0})
        >>> bool(abs(out["prediction"]["min_loss"] / (1e10 / 1e8) ** 0.08 - 1) < 0.02)
        True
    """
    from lightning_scaling.fitting import fit_critical_batch_size, fit_scaling_law

    fit_runs = list(fit_runs)
    if not fit_runs:
        raise ValueError("no runs to fit")
    sizes = sorted({r.n_params for r in fit_runs if r.n_params is not None})
    if len(sizes) < 2:
        raise ValueError(f"a size fit needs runs of >= 2 model sizes; got N={[f'{s:g}' for s in sizes]} "
                         f"({len(fit_runs)} runs); train another size or fit the critical batch only")
    out: dict[str, Any] = {}
    critical = None
    if sweep_runs is None:
        by_size: dict[float, list[RunHistory]] = {}
        for r in fit_runs:
            if r.n_params is not None and r.batch_size is not None:
                by_size.setdefault(r.n_params, []).append(r)
        groups = [g for g in by_size.values() if len({r.batch_size for r in g}) >= 2]
        sweep_runs = [r for g in groups for r in g]
    if sweep_runs:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            try:
                critical = fit_critical_batch_size(list(sweep_runs))
            except ValueError as err:
                out["critical_batch_error"] = str(err)
    kwargs = dict(fit_kwargs or {})
    law = fit_scaling_law(fit_runs, critical_batch=kwargs.pop("critical_batch", critical), **kwargs)
    if critical is None:
        critical_dict = {"b_star": law.params["b_star"], "alpha_b": law.params["alpha_b"], "source": "gns/law"}
    else:
        critical_dict = critical.to_dict()
    out.update(critical_batch=critical_dict, law=law.to_dict(), _law=law, _critical=critical)
    if predict_n is None:
        return out
    if batch_size is None:
        values, counts = np.unique([r.batch_size for r in fit_runs], return_counts=True)
        batch_size = float(values[np.argmax(counts)])
    if steps is None:
        steps = int(max(r.step[-1] for r in fit_runs))  # the last recorded step of the longest run
    grid = np.arange(1, int(steps) + 1)
    pred: dict[str, Any] = {"n_params": float(predict_n), "batch_size": float(batch_size),
                            "steps": grid.tolist(), "loss": law.predict_loss(predict_n, grid, batch_size).tolist(),
                            "min_loss": float(law.min_loss(predict_n))}
    if len(law.bootstrap):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            lo, hi = law.interval("predict_loss", predict_n, grid, batch_size)
            mlo, mhi = law.interval("min_loss", predict_n)
        pred.update(lower=np.asarray(lo).tolist(), upper=np.asarray(hi).tolist(),
                    min_loss_interval=[float(mlo), float(mhi)])
    if target_loss is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            s, tok = law.steps_to_loss(target_loss, predict_n, batch_size)
        pred.update(target_loss=float(target_loss), steps_to_target=float(s), tokens_to_target=float(tok),
                    critical_batch_at_target=float(law.critical_batch_size(target_loss)))
        if len(law.bootstrap):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                (slo, shi), _ = law.interval("steps_to_loss", target_loss, predict_n, batch_size)
            pred["steps_to_target_interval"] = [float(slo), float(shi)]
    out["prediction"] = pred
    return out


def _live_b_simple(history: RunHistory, *, last_fraction: float = 1 / 3) -> float | None:
    """Median live ``B_simple`` (samples) over the last third of a run's GNS readings."""
    b = history.gns_b_simple
    if b is None or len(b) == 0:
        return None
    tail = b[int(len(b) * (1 - last_fraction)):]
    tail = tail[np.isfinite(tail) & (tail > 0)]
    return float(np.median(tail)) if tail.size else None


def compare_prediction(prediction: Mapping[str, Any], actual: RunHistory, *,
                       critical: Any = None, law: Any = None) -> dict[str, Any]:
    """Compare a prediction from :func:`fit_and_predict` with the run it predicted.

    Returns:
        A dict of ``predicted``/``actual``/``rel_error`` entries for the final loss, steps to the target loss and
        the critical batch (from the sweep fit vs the live ``B_simple`` of the run).

    Example::

        >>> h = RunHistory(step=np.arange(100), loss=np.full(100, 2.0))
        >>> rows = compare_prediction({"steps": list(range(1, 100)), "loss": [2.2] * 99}, h)
        >>> round(rows["final_loss"]["rel_error"], 3)
        0.1
    """
    final, from_step = tail_mean(actual)
    steps = np.asarray(prediction["steps"])
    loss = np.asarray(prediction["loss"])
    sel = (steps >= max(from_step, 1)) & (steps <= int(actual.step[-1]))  # the steps the actual tail averages
    pred_final = float(np.mean(loss[sel])) if sel.any() else float(loss[-1])
    rows: dict[str, Any] = {
        "final_loss": {"predicted": pred_final, "actual": final, "from_step": from_step,
                       "rel_error": pred_final / final - 1.0},
    }
    if "lower" in prediction:
        lo, hi = np.asarray(prediction["lower"]), np.asarray(prediction["upper"])
        rows["final_loss"]["interval"] = [float(np.mean(lo[sel])), float(np.mean(hi[sel]))]
    if "target_loss" in prediction:
        actual_steps = first_step_below(actual, prediction["target_loss"])
        rows["steps_to_target"] = {"target_loss": prediction["target_loss"],
                                   "predicted": prediction["steps_to_target"], "actual": actual_steps,
                                   "rel_error": prediction["steps_to_target"] / actual_steps - 1.0
                                   if math.isfinite(actual_steps) and actual_steps > 0 else float("nan")}
        if "steps_to_target_interval" in prediction:
            rows["steps_to_target"]["interval"] = prediction["steps_to_target_interval"]
    live = _live_b_simple(actual)
    b_crit = {"loss": final, "live_b_simple": live}
    if critical is not None:
        b_crit["sweep"] = float(critical(final))
    if law is not None:
        b_crit["law"] = float(law.critical_batch_size(final))
    rows["critical_batch"] = b_crit
    return rows


# ================================================================================================================
# The whole recipe
# ================================================================================================================
@dataclass
class RecipeResult:
    """What :func:`run_recipe` returns (and writes to ``report.json``).

    Attributes:
        out_dir: the output folder.
        report: the JSON-able report.
        histories: run name -> history.
        table: the printed comparison table.
        figures: paths of the PNG plots.
    """

    out_dir: Path
    report: dict[str, Any]
    histories: dict[str, RunHistory]
    table: str
    figures: list[str] = field(default_factory=list)


# ================================================================================================================
# Several processes on one folder: run locks, shards, backends
# ================================================================================================================
class RunLock:
    """An exclusive lock on one run folder, shared through the filesystem (``<out>/runs/<run>.lock``).

    The lock file is created atomically (``O_CREAT | O_EXCL``) and records the holder's pid and host; while held,
    a daemon thread touches it every ``heartbeat_s``. A lock is stale (and is taken over) when its holder is a dead
    process on this host, or when its heartbeat is older than ``stale_after_s`` (a holder on another node that
    died, or a recycled pid). Works on any shared filesystem with atomic exclusive create (local disks, NFSv3+,
    Lustre, GPFS).

    Args:
        path: the lock file.
        stale_after_s: heartbeat age after which a lock held from another host counts as abandoned.
        heartbeat_s: seconds between the holder's touches of the lock file.

    Example::

        >>> import tempfile
        >>> lock = RunLock(Path(tempfile.mkdtemp()) / "run.lock")
        >>> lock.acquire(), RunLock(lock.path).acquire()
        (True, False)
        >>> lock.release()
    """

    def __init__(self, path: str | os.PathLike[str], *, stale_after_s: float = 600.0,
                 heartbeat_s: float = 30.0) -> None:
        if not (stale_after_s > heartbeat_s > 0):
            raise ValueError(f"need stale_after_s > heartbeat_s > 0, got {stale_after_s}, {heartbeat_s}")
        self.path = Path(path)
        self.stale_after_s, self.heartbeat_s = float(stale_after_s), float(heartbeat_s)
        self._stop: Any = None
        self._me = {"pid": os.getpid(), "host": socket.gethostname()}

    def holder(self) -> dict[str, Any] | None:
        """The holder's record (``pid``, ``host``, ``time``), or ``None`` when the run is not locked."""
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # being written right now: held

    def held_elsewhere(self) -> bool:
        """Whether another live process holds the lock now."""
        info = self.holder()
        return info is not None and not (info and self.is_stale(info)) and \
            (info.get("pid"), info.get("host")) != (self._me["pid"], self._me["host"])

    def is_stale(self, info: Mapping[str, Any]) -> bool:
        """Whether the lock recorded as ``info`` was abandoned by its holder."""
        if info.get("host") == self._me["host"] and isinstance(info.get("pid"), int) and not _pid_alive(info["pid"]):
            return True
        try:  # also on this host: a recycled pid looks alive, but its new owner does not touch our lock
            return time.time() - self.path.stat().st_mtime > self.stale_after_s
        except FileNotFoundError:
            return True

    def acquire(self) -> bool:
        """Take the lock; ``False`` when another live process holds it (a stale lock is taken over)."""
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                info = self.holder()
                if info is None:
                    continue  # released between our two calls
                if not (info and self.is_stale(info)):
                    return False
                self._remove_if(info)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump({**self._me, "time": time.time()}, f)
            self._start_heartbeat()
            return True
        return False

    def release(self) -> None:
        """Drop the lock (only if this process holds it)."""
        if self._stop is not None:
            self._stop.set()
            self._stop = None
        self._remove_if(self._me)

    def _remove_if(self, info: Mapping[str, Any]) -> None:
        # Remove only the lock we looked at: two processes taking over one stale lock must not delete each other's.
        current = self.holder()
        if current is not None and all(current.get(k) == info.get(k) for k in ("pid", "host")):
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass

    def _start_heartbeat(self) -> None:
        import threading

        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(self.heartbeat_s):
                try:
                    os.utime(self.path)
                except OSError:
                    return

        threading.Thread(target=beat, daemon=True, name=f"lock-{self.path.name}").start()
        self._stop = stop


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, owned by another user
    return True


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` -> ``(I, N)`` with ``0 <= I < N`` (``--shard``; a SLURM array passes ``$SLURM_ARRAY_TASK_ID``).

    Example::

        >>> parse_shard("1/4")
        (1, 4)
    """
    index, sep, count = text.partition("/")
    if not (sep and index.strip().isdigit() and count.strip().isdigit()) or not 0 <= int(index) < int(count):
        raise ValueError(f"shard must be I/N with 0 <= I < N, got {text!r}")
    return int(index), int(count)


def shard_runs(specs: Sequence[RunSpec], shard: tuple[int, int] | None) -> list[RunSpec]:
    """The runs of one shard: run ``k`` of the plan belongs to shard ``k % N`` (deterministic, balanced).

    Example::

        >>> [s.name for s in shard_runs(plan_runs(demo_config(quick=True)), (1, 2))]
        ['d8_b8', 'd16_b8', 'd32_b8']
    """
    if shard is None:
        return list(specs)
    index, count = shard
    return [s for k, s in enumerate(specs) if k % count == index]


def _locking(cfg: RecipeConfig) -> bool:
    # Under DDP every rank runs the recipe and must train the same runs in the same order; a rank skipping a run
    # another process locked would hang the collectives, so multi-device recipes rely on --shard instead.
    return _world_size(cfg.trainer) == 1 and int(os.environ.get("WORLD_SIZE", "1") or 1) == 1


def try_train_run(cfg: RecipeConfig, spec: RunSpec, out_dir: Path, *, progress: bool = False,
                  forecast_extra: Mapping[str, Any] | None = None) -> RunHistory | None:
    """Train (or load) one run under its :class:`RunLock`; ``None`` when another process holds the lock.

    Without locks (a multi-device trainer, see :func:`_locking`) this is :func:`train_run`.

    Example::

        >>> cfg = demo_config(quick=True)
        >>> history = try_train_run(cfg, plan_runs(cfg)[0], Path("demo_out"))  # doctest: +SKIP
    """
    finished = _load_finished(out_dir / "runs" / spec.name, cfg, spec)
    if finished is not None:
        return finished
    if not _locking(cfg):
        return train_run(cfg, spec, out_dir, progress=progress, forecast_extra=forecast_extra)
    (out_dir / "runs").mkdir(parents=True, exist_ok=True)
    lock = RunLock(out_dir / "runs" / f"{spec.name}.lock")
    if not lock.acquire():
        return None
    try:  # train_run re-reads done.json: the previous holder may have finished it since the check above
        return train_run(cfg, spec, out_dir, progress=progress, forecast_extra=forecast_extra)
    finally:
        lock.release()


class _Runner:
    """Trains runs of the plan with a backend, skipping or waiting for the runs other processes hold."""

    def __init__(self, cfg: RecipeConfig, out: Path, say: Callable[[str], None], progress: bool,
                 backend: str = "local", poll_s: float = 5.0) -> None:
        if backend not in ("local", "ray"):
            raise ValueError(f"backend must be 'local' or 'ray', got {backend!r}")
        if backend == "ray":
            try:  # fail before the first run, not after the local stages
                import ray  # noqa: F401
            except ImportError:
                raise ValueError("--backend ray needs Ray: pip install 'lightning-scaling[ray]'") from None
        self.cfg, self.out, self.say, self.progress, self.backend = cfg, out, say, progress, backend
        self.poll_s = poll_s
        self.histories: dict[str, RunHistory] = {}
        self.trained: list[str] = []
        self.n_total = len(plan_runs(cfg))
        self.t0, self.started = time.perf_counter(), time.time()

    def train(self, specs: Sequence[RunSpec], *, wait: bool, extra: Mapping[str, Any] | None = None,
              take_over: bool = True) -> None:
        """Train or load ``specs``; runs locked by another process are skipped, or with ``wait`` waited for.

        ``take_over=False`` (other shards' runs when locks are off under DDP) only waits for them to finish.
        """
        pending = [s for s in specs if s.name not in self.histories]
        if not take_over and not _locking(self.cfg):
            self._wait_finished(pending)
            pending = []
        while pending:
            self._train_once(pending, extra)
            pending = [s for s in pending if s.name not in self.histories]
            if not pending:
                return
            holders = {s.name: RunLock(self.out / "runs" / f"{s.name}.lock").holder() or {} for s in pending}
            self.say(f"{', '.join(holders)}: locked by another process ("
                     + ", ".join(f"pid {h.get('pid')} on {h.get('host')}" for h in holders.values())
                     + (f"); waiting for it (polling every {self.poll_s:g} s)" if wait else "); left to it"))
            if not wait:
                return
            self._wait(pending)

    def _train_once(self, specs: Sequence[RunSpec], extra: Mapping[str, Any] | None) -> None:
        if self.backend == "ray":
            from lightning_scaling.demo.ray_backend import train_runs_ray

            for spec in specs:
                self._announce(spec, " (submitted to Ray)")
            done = train_runs_ray(self.cfg, specs, self.out, forecast_extra=extra)
            for spec in specs:
                history = _load_finished(self.out / "runs" / spec.name, self.cfg, spec) if done[spec.name] else None
                self._record(spec, history, trained=True)
            return
        for spec in specs:
            reused = _load_finished(self.out / "runs" / spec.name, self.cfg, spec) is not None
            self._announce(spec, " (finished earlier: loaded)" if reused else "")
            history = try_train_run(self.cfg, spec, self.out, progress=self.progress and not reused,
                                    forecast_extra=extra)
            self._record(spec, history, trained=not reused)

    def _announce(self, spec: RunSpec, note: str) -> None:
        k = next(i for i, s in enumerate(plan_runs(self.cfg), 1) if s.name == spec.name)
        self.say(f"[{k}/{self.n_total}] {spec.name}: {spec.role}, batch {spec.batch_size}, {self.cfg.max_steps} "
                 f"steps{note}  [{time.perf_counter() - self.t0:.0f} s elapsed]")
        sys.stdout.flush()

    def _record(self, spec: RunSpec, history: RunHistory | None, *, trained: bool) -> None:
        if history is not None:
            self.histories[spec.name] = history
            if trained and (history.meta.get("started_at") or 0.0) >= self.started:  # not another process's
                self.trained.append(spec.name)

    def _wait_finished(self, specs: Sequence[RunSpec]) -> None:
        for spec in specs:
            if _load_finished(self.out / "runs" / spec.name, self.cfg, spec) is None:
                self.say(f"{spec.name}: another shard's run; waiting for it to finish (polling every "
                         f"{self.poll_s:g} s)")
            while (history := _load_finished(self.out / "runs" / spec.name, self.cfg, spec)) is None:
                time.sleep(self.poll_s)
            self._announce(spec, " (finished by another shard: loaded)")
            self._record(spec, history, trained=False)

    def _wait(self, pending: Sequence[RunSpec]) -> None:
        # Until one of them is finished or its lock is gone (holder done, or died: then we take it over).
        while True:
            for spec in pending:
                lock = RunLock(self.out / "runs" / f"{spec.name}.lock")
                info = lock.holder()
                if _load_finished(self.out / "runs" / spec.name, self.cfg, spec) is not None or info is None \
                        or (info and lock.is_stale(info)):
                    return
            time.sleep(self.poll_s)


class _Quiet:
    """Silence Lightning's per-run banners (GPU/TPU availability, tips) but keep the progress bars."""

    def __enter__(self) -> _Quiet:
        self._loggers = [logging.getLogger(n) for n in ("lightning.pytorch", "lightning.fabric", "lightning")]
        self._levels = [lg.level for lg in self._loggers]
        for lg in self._loggers:
            lg.setLevel(logging.WARNING)
        self._warn = warnings.catch_warnings()
        self._warn.__enter__()
        for pattern in (".*does not have many workers.*", ".*is a very small number.*", ".*LeafSpec.*",
                        ".*TreeSpec.*", ".*litlogger.*", ".*predicted.*", ".*GradientNoiseScale.*",
                        ".*ScalingForecast.*", ".*critical batch from the gradient noise.*"):
            warnings.filterwarnings("ignore", message=pattern)
        if not _is_rank_zero():  # under DDP every rank fits the same runs: rank 0's warnings are enough
            warnings.simplefilter("ignore")
        return self

    def __exit__(self, *exc: Any) -> None:
        self._warn.__exit__(*exc)
        for lg, level in zip(self._loggers, self._levels):
            lg.setLevel(level)


def run_recipe(cfg: RecipeConfig, out_dir: str | os.PathLike[str], *, progress: bool = True, plots: bool = True,
               echo: Callable[[str], None] | None = print, backend: str = "local",
               shard: tuple[int, int] | None = None) -> RecipeResult:
    """Run the whole recipe: train the sweep and the ladder, fit, predict the held-out size, train it, compare.

    Several processes may share ``out_dir`` (each run is trained once, under its :class:`RunLock`): a process
    skips the runs another one holds and waits for them before the fit. With ``shard=(I, N)`` a process trains
    only its share of the runs (:func:`shard_runs`); the shard that owns the last run (the held-out one) also
    takes over unstarted runs of the others, waits for the running ones, fits, predicts and writes the report.

    Args:
        cfg: the :class:`RecipeConfig`.
        out_dir: output folder (created; finished runs in it are reused, partial ones resumed).
        progress: show Lightning's progress bar per run and an overall counter line.
        plots: write the PNG figures.
        echo: where status lines go (``None``: silent); only rank 0 prints under DDP.
        backend: ``"local"`` (runs one after another in this process) or ``"ray"`` (each run a Ray task with
            ``cfg.resources``; see :mod:`lightning_scaling.demo.ray_backend`).
        shard: ``(I, N)``: train only shard ``I`` of ``N``.

    Returns:
        A :class:`RecipeResult` (for a shard without the held-out run: its runs and a one-paragraph table).

    Raises:
        ValueError: a check of :func:`check_config` fails (before any training) or a fit fails.
        RunInterrupted: Ctrl-C stopped a run.

    Example::

        >>> result = run_recipe(demo_config(quick=True), "demo_out", progress=False)  # doctest: +SKIP
        >>> print(result.table)  # doctest: +SKIP
    """
    say = echo if echo is not None and _is_rank_zero() else (lambda s: None)
    validate_config(cfg, say)  # a config that would make the result meaningless fails before any training
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if _is_rank_zero():
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1, default=str))
    specs = plan_runs(cfg)
    runner = _Runner(cfg, out, say, progress, backend)
    report: dict[str, Any] = {"name": cfg.name, "config": cfg.to_dict(), "runs": {}, "timings": {}}
    import torch

    threads = torch.get_num_threads()
    if cfg.torch_threads is not None:
        torch.set_num_threads(cfg.torch_threads)
    try:
        with _Quiet():
            final = _run_all(cfg, specs, out, report, say, runner, shard)
    finally:
        torch.set_num_threads(threads)
    if not final:
        return _shard_result(cfg, specs, out, report, runner, shard)
    return _finish_report(out, report, runner, plots)


def _finish_report(out: Path, report: dict[str, Any], runner: _Runner, plots: bool) -> RecipeResult:
    from lightning_scaling.demo.report import format_table, write_figures

    fitted = report.pop("_fitted")
    table = format_table(report)
    figures = []
    if plots and _is_rank_zero():
        t_plot = time.perf_counter()
        with _Quiet():
            figures = write_figures(report, runner.histories, fitted.get("_law"), fitted.get("_critical"), out)
        report["timings"]["plots_s"] = time.perf_counter() - t_plot
    report["timings"]["total_s"] = time.perf_counter() - runner.t0
    report["figures"] = figures
    report["trained_here"] = runner.trained
    if _is_rank_zero():
        _write_atomic(out / REPORT_FILENAME, json.dumps(report, indent=1, default=_json_default))
    return RecipeResult(out_dir=out, report=report, histories=runner.histories, table=table, figures=figures)


def _shard_result(cfg: RecipeConfig, specs: Sequence[RunSpec], out: Path, report: dict[str, Any], runner: _Runner,
                  shard: tuple[int, int] | None) -> RecipeResult:
    index, count = shard or (0, 1)
    mine = [s.name for s in shard_runs(specs, shard)]
    report.update(shard=f"{index}/{count}", shard_runs=mine, trained_here=runner.trained)
    for spec in specs:
        if spec.name in runner.histories:
            report["runs"][spec.name] = _run_row(spec, runner.histories[spec.name], out)
    table = (f"shard {index}/{count}: runs {', '.join(mine)}; trained here: {', '.join(runner.trained) or 'none'}.\n"
             f"The fit, the prediction and the report come from the shard with the held-out run {specs[-1].name} "
             f"(shard {(len(specs) - 1) % count}/{count}), or from rerunning without --shard once all runs are "
             "finished.")
    return RecipeResult(out_dir=out, report=report, histories=runner.histories, table=table)


def _run_row(spec: RunSpec, h: RunHistory, out: Path) -> dict[str, Any]:
    return {
        "size": spec.size, "role": spec.role, "n_params": h.n_params, "batch_size": h.batch_size,
        "tokens_per_sample": h.tokens_per_sample, "steps": int(h.step[-1]) + 1 if len(h) else 0,
        "final_loss": tail_mean(h)[0] if len(h) else None, "live_b_simple": _live_b_simple(h),
        "wall_s": h.meta.get("wall_s"), "path": str(out / "runs" / spec.name),
    }


def _run_all(cfg: RecipeConfig, specs: Sequence[RunSpec], out: Path, report: dict[str, Any],
             say: Callable[[str], None], runner: _Runner, shard: tuple[int, int] | None) -> bool:
    """Train, fit, predict, train the held-out run, compare; ``False`` for a shard that stops after its runs."""
    mine = shard_runs(specs, shard)
    fit_specs = [s for s in specs if s.role != "holdout"]
    runner.train([s for s in fit_specs if s in mine], wait=False)
    if specs[-1] not in mine:
        return False
    # Other shards' or processes' runs: loaded, taken over when unstarted, or waited for.
    runner.train(fit_specs, wait=True, take_over=shard is None)
    histories = runner.histories
    fitted = _fit_before_holdout(cfg, specs, histories, out, say)
    report.update({k: v for k, v in fitted.items() if not k.startswith("_")})
    report["timings"]["fit_s"] = fitted.pop("_fit_s")
    holdout = next((s for s in specs if s.role == "holdout"), None)
    if holdout is not None:
        refs = _references(fit_specs, histories, holdout)
        extra: dict[str, Any] = {"law": fitted.get("_law"), "reference": refs}
        if (fitted.get("prediction") or {}).get("target_loss") is not None:
            extra["target_loss"] = fitted["prediction"]["target_loss"]
        runner.train([holdout], wait=True, extra=extra)
    for spec in specs:
        report["runs"][spec.name] = _run_row(spec, histories[spec.name], out)
    if holdout is not None and "prediction" in fitted:
        report["comparison"] = compare_prediction(fitted["prediction"], histories[holdout.name],
                                                  critical=fitted.get("_critical"), law=fitted.get("_law"))
        report["comparison"]["live_forecast"] = _half_run_forecast(
            histories[holdout.name], cfg.max_steps, law=fitted.get("_law"), reference=refs)
    report["timings"]["train_s"] = sum((r.get("wall_s") or 0.0) for r in report["runs"].values())
    report["_fitted"] = fitted
    return True


def _write_atomic(path: Path, text: str) -> None:
    # Two processes finishing one study may both write the report: a reader never sees half a file.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _is_rank_zero() -> bool:
    # Under a multi-device launcher every rank runs the recipe (same runs, same order); only rank 0 writes files.
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) or 0) == 0


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    return str(obj)


def _fit_before_holdout(cfg: RecipeConfig, specs: Sequence[RunSpec], histories: Mapping[str, RunHistory],
                        out: Path, say: Callable[[str], None]) -> dict[str, Any]:
    """Fit on every finished non-holdout run and write ``prediction.json`` before the held-out run trains."""
    t = time.perf_counter()
    fit_specs = [s for s in specs if s.role != "holdout"]
    fit_runs = [histories[s.name] for s in fit_specs]
    sweep = [histories[s.name] for s in fit_specs if s.size_index == cfg.sweep_size]
    holdout = next((s for s in specs if s.role == "holdout"), None)
    target = cfg.target_loss
    if target is None and holdout is not None:
        # The largest fitted model's final loss: the held-out model should get there sooner.
        largest = max((s for s in fit_specs if s.role == "ladder"), key=lambda s: s.size_index)
        target = round(tail_mean(histories[largest.name])[0], 3)
    predict_n = None
    if holdout is not None:
        predict_n = _probe_size(cfg, holdout)
    say("fitting B_crit(L) on the batch sweep and L(N, S, B) on the ladder"
        + (f"; predicting {holdout.name} (N={predict_n:,.0f}) before training it" if holdout else ""))
    fitted = fit_and_predict(fit_runs, sweep_runs=sweep, predict_n=predict_n,
                             batch_size=holdout.batch_size if holdout else None, steps=cfg.max_steps - 1,
                             target_loss=target, fit_kwargs=cfg.fit)
    fitted["_fit_s"] = time.perf_counter() - t
    path = out / PREDICTION_FILENAME
    holdout_done = holdout is not None and _load_finished(out / "runs" / holdout.name, cfg, holdout) is not None
    # Another process training the held-out run wrote the file before it started: keep that one.
    held = holdout is not None and _locking(cfg) and RunLock(out / "runs" / f"{holdout.name}.lock").held_elsewhere()
    if "prediction" in fitted and not (holdout_done and path.exists()) and not held and _is_rank_zero():
        # A resumed study keeps the file written before the held-out run was trained (same fit, same runs).
        record = {"written_before_training": holdout.name if holdout else None, "time": time.time(),
                  **{k: v for k, v in fitted.items() if not k.startswith("_")}}
        _write_atomic(path, json.dumps(record, indent=1, default=_json_default))
    return fitted


def _probe_size(cfg: RecipeConfig, spec: RunSpec) -> float:
    """Non-embedding N of a planned run, without training it (built on the meta device where possible)."""
    model_cls, model_args = _model_args(cfg, spec)
    return _measure_n(_build_model_cheaply(model_cls, model_args))


def _references(fit_specs: Sequence[RunSpec], histories: Mapping[str, RunHistory],
                holdout: RunSpec) -> list[RunHistory] | None:
    """The finished ladder runs at the held-out run's batch size: same setup and schedule, smaller models."""
    refs = [histories[s.name] for s in fit_specs
            if s.role == "ladder" and s.batch_size == holdout.batch_size and s.name in histories]
    return refs or None


def _half_run_forecast(history: RunHistory, max_steps: int, *, law: Any = None,
                       reference: Sequence[RunHistory] | None = None) -> dict[str, Any] | None:
    """Forecast the run's final loss from its first half (what ScalingForecast shows live mid-run), given the
    finished ladder as reference runs."""
    try:
        from lightning_scaling.forecast import forecast_run
    except ImportError:
        return None
    half = history.truncate(max_steps // 2)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fc = forecast_run(half, horizon=max_steps, law=law, reference=reference)
    except (ValueError, TypeError) as err:
        return {"error": str(err)}
    final = float(np.asarray(fc.final_loss))
    out = {"observed_until": int(half.step[-1]), "final_loss": final, "method": getattr(fc, "method", None)}
    for key in ("final_lower", "final_upper"):
        if hasattr(fc, key):
            out[key] = float(np.asarray(getattr(fc, key)))
    return out
