"""Recipe configuration: :class:`RecipeConfig` and :func:`load_config` (a YAML/JSON file or a mapping)."""

from __future__ import annotations

import copy
import dataclasses
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any




DONE_FILENAME = "done.json"


PREDICTION_FILENAME = "prediction.json"


REPORT_FILENAME = "report.json"


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
        schedules: other LR schedules to train and predict (e.g. ``["cosine", "wsd"]``): each value, given to the
            model's ``schedule_arg`` init argument, adds one run per ladder size (the held-out size included) at
            ``batch_size``. They are fitted together with the ladder (``fit_scaling_law`` takes any mix of
            schedules) and the held-out model is predicted under each before it trains. Empty: the model's own
            schedule only.
        schedule_arg: model ``init_args`` key that selects the LR schedule (for ``schedules``).
        schedule_sizes: indices in ``sizes`` of the fitted sizes also trained under each of ``schedules`` (the
            held-out size always is); ``None``: every size. Each costs one more run per schedule.
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
    schedules: list[str] = field(default_factory=list)
    schedule_arg: str | None = "schedule"
    schedule_sizes: list[int] | None = None
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
        if not isinstance(self.schedules, list) or not all(isinstance(v, str) and re.fullmatch(r"[A-Za-z0-9._-]+", v)
                                                           for v in self.schedules) \
                or len(set(self.schedules)) != len(self.schedules):
            # the name is part of each run's folder and lock file: letters, digits, '.', '_' and '-' only
            raise ValueError(f"config 'schedules' must be a list of distinct schedule names (letters, digits, "
                             f"'.', '_', '-'), got {self.schedules!r}")
        if self.schedules and not self.schedule_arg:
            raise ValueError("config 'schedules' needs 'schedule_arg': the model init argument that selects them")
        own = self.model.get("init_args", {}).get(self.schedule_arg) if self.schedule_arg else None
        if own is not None and own in self.schedules:
            raise ValueError(f"config 'schedules' lists {own!r}, the model's own schedule (model.init_args."
                             f"{self.schedule_arg}): the ladder already trains it")
        if self.schedule_sizes is not None:
            n_fit = len(self.sizes) - (1 if self.holdout else 0)
            ok = isinstance(self.schedule_sizes, list) and all(isinstance(i, int) and 0 <= i < n_fit
                                                               for i in self.schedule_sizes)
            if not ok or len(set(self.schedule_sizes)) != len(self.schedule_sizes) or not self.schedule_sizes:
                raise ValueError(f"config 'schedule_sizes' must be distinct indices of fitted sizes (0..{n_fit - 1}), "
                                 f"or null for all, got {self.schedule_sizes!r}")
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

        >>> from lightning_scaling.demo import demo_config
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
