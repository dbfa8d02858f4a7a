"""Ray backend of the scaling recipe: ``lightning-scaling recipe --backend ray``.

Install it with ``pip install 'lightning-scaling[ray]'``.

Each run of a stage is one Ray task with the resources of the config's ``resources`` (default
``{num_cpus: 1, num_gpus: 0}``), so a Ray cluster trains as many runs at once as it has resources. The tasks write
the same folder layout as the local backend (``<out>/runs/<run>/...``), so the output folder must be on a
filesystem every node sees; the driver reads the finished runs from there, fits and reports. Each task takes the
run's :class:`~lightning_scaling.study.lock.RunLock`, so Ray drivers, local processes and SLURM shards can share
one folder.

The driver joins the cluster that ``ray.init()`` finds: ``RAY_ADDRESS`` (e.g. ``ray://head:10001`` or ``auto``),
a cluster started on this node with ``ray start --head``, or else a new local instance.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["train_runs_ray"]

DEFAULT_RESOURCES = {"num_cpus": 1, "num_gpus": 0}


def train_runs_ray(cfg: Any, specs: Sequence[Any], out_dir: Path, *,
                   forecast_extra: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, bool]:
    """Train ``specs`` concurrently as Ray tasks; per run, whether it is finished (``False``: locked elsewhere).

    Args:
        cfg: the :class:`~lightning_scaling.study.config.RecipeConfig` (its ``resources`` size each task).
        specs: the runs to train (:class:`~lightning_scaling.study.plan.RunSpec`).
        out_dir: the output folder, on a filesystem shared by every node.
        forecast_extra: extra ``ScalingForecast`` arguments per run name (the held-out runs' law and references).

    Raises:
        ImportError: Ray is not installed (``pip install 'lightning-scaling[ray]'``).

    Example::

        >>> import ray  # doctest: +SKIP
        >>> ray.init(num_cpus=2)  # doctest: +SKIP
        >>> train_runs_ray(cfg, plan_runs(cfg)[:2], Path("out"))  # doctest: +SKIP
        {'d8_b4': True, 'd8_b8': True}
    """
    try:
        import ray
    except ImportError:
        raise ImportError("--backend ray needs Ray: pip install 'lightning-scaling[ray]'") from None
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=True)
    resources = {**DEFAULT_RESOURCES, **(cfg.resources or {})}
    task = ray.remote(**resources)(_train_one)
    refs = [task.remote(cfg.to_dict(), spec.to_dict(), str(Path(out_dir).resolve()),
                        (forecast_extra or {}).get(spec.name)) for spec in specs]
    try:
        return {spec.name: bool(done) for spec, done in zip(specs, ray.get(refs))}
    except KeyboardInterrupt:
        for ref in refs:  # Ctrl-C reaches each running task as KeyboardInterrupt: it checkpoints and stops
            ray.cancel(ref)
        raise


def _train_one(cfg_dict: dict[str, Any], spec_dict: dict[str, Any], out_dir: str,
               forecast_extra: Mapping[str, Any] | None) -> bool:
    """Body of one Ray task: the local backend's locked train-or-load, in a worker process."""
    import torch

    from lightning_scaling.study.config import load_config
    from lightning_scaling.study.plan import RunSpec
    from lightning_scaling.study.run import _Quiet, try_train_run

    cfg = load_config(cfg_dict)
    if cfg.torch_threads is not None:
        torch.set_num_threads(cfg.torch_threads)
    with _Quiet():
        history = try_train_run(cfg, RunSpec(**spec_dict), Path(out_dir), progress=False,
                                forecast_extra=forecast_extra)
    return history is not None
