"""Recipe planning: the runs (:func:`plan_runs`), their shards, and the checks made before anything trains.

Models and data are built here (on the meta device where possible) but nothing trains: no Lightning import.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import inspect
import math
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from lightning_scaling.numerics import count_non_embedding_params, model_n_params
from lightning_scaling.study.config import RecipeConfig, size_name


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
        schedule: one of ``RecipeConfig.schedules`` (``None``: the model's own LR schedule).
    """

    name: str
    size_index: int
    size: str
    overrides: dict[str, Any]
    batch_size: int
    role: str
    lr: float | None = None
    schedule: str | None = None

    def to_dict(self) -> dict[str, Any]:
        # Without "schedule" for the model's own schedule: a finished run's done.json (these settings) from before
        # schedules existed must still match, or the run would be trained again.
        out = dataclasses.asdict(self)
        if out["schedule"] is None:
            del out["schedule"]
        return out


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

    Each of ``cfg.schedules`` adds a run per ladder size (those of ``cfg.schedule_sizes`` and the held-out one),
    named ``<size>_b<batch>_<schedule>``.

    Example::

        >>> from lightning_scaling.demo import demo_config
        >>> [r.name for r in plan_runs(demo_config(quick=True))]
        ['d8_b4', 'd8_b8', 'd8_b16', 'd16_b8', 'd24_b8', 'd32_b8']
        >>> from lightning_scaling.study.config import load_config
        >>> cfg = load_config(demo_config(quick=True).to_dict(), schedules=["cosine"])
        >>> [r.name for r in plan_runs(cfg) if r.schedule]
        ['d8_b8_cosine', 'd16_b8_cosine', 'd24_b8_cosine', 'd32_b8_cosine']
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
        role = "holdout" if (cfg.holdout and i == last) else "ladder"
        if role == "ladder" and cfg.schedule_sizes is not None and i not in cfg.schedule_sizes:
            continue
        for sched in cfg.schedules:  # config validation guarantees schedule_arg is set when schedules are
            specs.append(RunSpec(name=f"{name}_b{cfg.batch_size}_{sched}", size_index=i, size=name,
                                 overrides={**overrides, str(cfg.schedule_arg): sched}, batch_size=cfg.batch_size,
                                 role=role, lr=_lr_for(cfg, cfg.batch_size), schedule=sched))
    # Stable: the held-out runs train last, the model's own schedule first (the others' predictions come with it).
    specs.sort(key=lambda s: s.role == "holdout")
    return specs


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


def _default(cls: Any, arg: str) -> Any:
    """The default value of ``cls``'s init argument ``arg`` (``None`` when it has none or cannot be read)."""
    try:
        param = inspect.signature(cls).parameters.get(arg)
    except (TypeError, ValueError):
        return None
    return None if param is None or param.default is inspect.Parameter.empty else param.default


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

        >>> from lightning_scaling.demo import demo_config
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


@dataclass(frozen=True)
class Check:
    """One line of :func:`check_config`: what was checked, whether it holds, and what was measured."""

    name: str
    ok: bool
    message: str

    def line(self) -> str:
        """``"ok   name: message"`` or ``"FAIL name: message"``."""
        return f"{'ok  ' if self.ok else 'FAIL'} {self.name}: {self.message}"


def check_config(cfg: RecipeConfig, trainer_arguments: Collection[str] | None = None) -> list[Check]:
    """Build every run's model and datamodule (no training) and check the settings that would make results wrong.

    Checked: ``batch_size_arg``/``max_steps_arg``/``lr_arg`` are init arguments of the classes; the model size N
    (measured on the built models) strictly increases along ``sizes``; ``sweep_size`` indexes a fitted size with
    >= 3 batch sizes; every batch size splits evenly over devices and is accepted by the datamodule; one batch of
    each datamodule's train loader has the per-device batch and ``tokens_per_sample`` tokens per sample; the
    ``trainer`` keys are among ``trainer_arguments`` (the ``Trainer``'s, from :func:`study.run.trainer_arguments`:
    this module imports no Lightning; ``None`` skips the check). Models are built on the meta device where they
    allow it (no memory for weights).

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
    if trainer_arguments is not None:
        checks.append(_check_trainer(cfg, trainer_arguments))
    if not all(c.ok for c in checks):
        return checks  # building with a wrong argument name would only repeat the failure
    return checks + [_check_sizes(cfg, specs), *_check_data(cfg, specs)]


def validate_config(cfg: RecipeConfig, say: Callable[[str], None] | None = None,
                    trainer_arguments: Collection[str] | None = None) -> None:
    """Run :func:`check_config`; print the failed lines and raise before anything trains.

    Raises:
        ValueError: ``"<k> config check(s) failed (see --dry-run): <first failed line>"``.

    Example::

        >>> validate_config(demo_config(quick=True))  # doctest: +SKIP
    """
    failed = [c for c in check_config(cfg, trainer_arguments) if not c.ok]
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
    if cfg.schedules:
        ok = _accepts(model_cls, str(cfg.schedule_arg))
        own = cfg.model.get("init_args", {}).get(cfg.schedule_arg, _default(model_cls, str(cfg.schedule_arg)))
        if ok and own in cfg.schedules:  # the model's default: the config alone could not tell
            ok, why = False, (f"schedules {cfg.schedules} list {own!r}, the model's own schedule (the default of "
                              f"{model_cls.__name__}({cfg.schedule_arg}=...)): the ladder already trains it")
        else:
            why = (f"{model_cls.__name__}({cfg.schedule_arg}=...) for schedules {cfg.schedules}" if ok else
                   f"{model_cls.__name__} has no init argument {cfg.schedule_arg!r} to select the schedules "
                   f"{cfg.schedules}: name the right argument")
        out.append(Check("schedule_arg", ok, why))
    if cfg.lr_scaling == "none" or cfg.lr_arg is None:
        out.append(Check("lr_arg", True, "unused (lr_scaling: none)"))
    else:
        ok = _accepts(model_cls, cfg.lr_arg)
        out.append(Check("lr_arg", ok, f"{model_cls.__name__}({cfg.lr_arg}=...) scaled {cfg.lr_scaling}" if ok else
                         f"{model_cls.__name__} has no init argument {cfg.lr_arg!r} for lr_scaling={cfg.lr_scaling}"))
    return out


# Trainer arguments the recipe owns: the run length is max_steps (its LR schedule, the finished-run check and the
# report use it), the logger and checkpoints are the recipe's (resume, the history, TensorBoard layout).
_RECIPE_OWNED = {"max_steps": "set the recipe's max_steps", "max_epochs": "runs are bounded by max_steps",
                 "max_time": "runs are bounded by max_steps", "fast_dev_run": "runs are bounded by max_steps",
                 "limit_train_batches": "a shortened run never counts as finished",
                 "logger": "the recipe logs each run to <out>/runs/<run>",
                 "enable_checkpointing": "the recipe checkpoints every run to resume it",
                 "default_root_dir": "the recipe writes under --out"}


def _check_trainer(cfg: RecipeConfig, known: Collection[str]) -> Check:
    """The ``trainer`` keys are ``Trainer`` arguments the recipe leaves to the user, with plain values (a typo, a
    ``class_path`` dict or a run-length override would fail or mislead after the first run began)."""
    unknown = sorted(k for k in cfg.trainer if k not in known)
    if unknown:
        near = {k: difflib.get_close_matches(k, list(known), n=1) for k in unknown}
        hints = ", ".join(f"{k!r}" + (f" (did you mean {m[0]!r}?)" if m else "") for k, m in near.items())
        return Check("trainer", False, f"not arguments of lightning.pytorch.Trainer: {hints}")
    owned = [f"{k!r} ({why})" for k, why in _RECIPE_OWNED.items() if k in cfg.trainer]
    if owned:
        return Check("trainer", False, f"set by the recipe itself: {', '.join(owned)}")
    built = sorted(k for k, v in cfg.trainer.items()
                   if any(isinstance(x, Mapping) and "class_path" in x for x in (v if isinstance(v, list) else [v])))
    if built:
        return Check("trainer", False, f"{', '.join(built)}: class_path values are not instantiated here; give "
                                       "plain values (strategy: ddp, precision: bf16-mixed) or call run_recipe "
                                       "from Python with a config whose trainer holds the objects")
    return Check("trainer", True, f"Trainer({', '.join(sorted(cfg.trainer))}) plus the recipe's own arguments")


def _measure_n(model: Any) -> float:
    """Non-embedding N of a built model: its ``n_params`` attribute, else a parameter count."""
    n = model_n_params(model)
    return n if n is not None else float(count_non_embedding_params(model))


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


def _tokens_per_sample(cfg: RecipeConfig, data: Any) -> Any:
    """The config's ``tokens_per_sample``, else the datamodule's attribute (resolved before ``setup``)."""
    return cfg.tokens_per_sample if cfg.tokens_per_sample is not None else getattr(data, "tokens_per_sample", None)


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
    """The runs of one shard: run ``k`` of the plan belongs to shard ``k % N`` (deterministic, balanced); the held-out
    runs (trained last, after the fit) belong to the shard of the last one.

    Example::

        >>> from lightning_scaling.demo import demo_config
        >>> [s.name for s in shard_runs(plan_runs(demo_config(quick=True)), (1, 2))]
        ['d8_b8', 'd16_b8', 'd32_b8']
    """
    if shard is None:
        return list(specs)
    index, count = shard
    # The held-out runs need the fit of every other run: all of them go to the shard of the last one, which fits.
    final = (len(specs) - 1) % count
    return [s for k, s in enumerate(specs) if (final if s.role == "holdout" else k % count) == index]


def _probe_size(cfg: RecipeConfig, spec: RunSpec) -> float:
    """Non-embedding N of a planned run, without training it (built on the meta device where possible)."""
    model_cls, model_args = _model_args(cfg, spec)
    return _measure_n(_build_model_cheaply(model_cls, model_args))
