"""One training run's record: :class:`RunHistory`, the data model every other module reads and writes.

A history holds numpy arrays, so a 1M-step run stays compact in memory (about 40 MB for step, tokens,
samples, loss and lr as 8-byte values) and on disk (see :meth:`RunHistory.to_json`).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["RunHistory", "HISTORY_FILENAME", "DEFAULT_TAGS"]

#: File name that :class:`~lightning_scaling.callbacks.LossTrajectory` writes under ``<log_dir>/scaling/``.
HISTORY_FILENAME = "history.json"

#: The TensorBoard / CSV tags this project writes; readers take other names by argument.
DEFAULT_TAGS: dict[str, str] = {
    "loss": "scaling/loss",
    "lr": "scaling/lr",
    "tokens": "scaling/tokens",
    "samples": "scaling/samples",
    "val_loss": "scaling/val_loss",
    "n_params": "scaling/n_params",
    "batch_size": "scaling/batch_size",
    "tokens_per_sample": "scaling/tokens_per_sample",
    "gns_b_simple": "gns/b_simple",
    "gns_grad_sq_norm": "gns/grad_sq_norm",
    "gns_trace_sigma": "gns/trace_sigma",
}

_OPTIONAL_ARRAYS = ("val_step", "val_loss", "gns_step", "gns_b_simple", "gns_grad_sq_norm", "gns_trace_sigma")
_GNS_VALUES = ("gns_b_simple", "gns_grad_sq_norm", "gns_trace_sigma")
_PER_STEP = ("step", "loss", "tokens", "samples", "lr")


def _positive_or_none(name: str, value: Any) -> float | None:
    if value is None:
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"`{name}` must be a number or None, got {value!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"`{name}` must be a positive finite number or None, got {value!r}")
    return value


def _as_1d(name: str, values: Any, dtype: Any) -> np.ndarray:
    arr = np.asarray(values, dtype=dtype)
    if arr.ndim == 0:
        arr = arr.reshape(1)
    if arr.ndim != 1:
        raise ValueError(f"`{name}` must be one-dimensional, got shape {arr.shape}")
    return arr


def _as_steps(name: str, values: Any) -> np.ndarray:
    raw = np.asarray(values)
    if raw.dtype.kind == "f":
        if not np.all(np.isfinite(raw)) or np.any(raw != np.round(raw)):
            raise ValueError(f"`{name}` must hold whole finite step numbers")
    arr = _as_1d(name, raw, np.int64)
    if arr.size and np.any(arr < 0):
        raise ValueError(f"`{name}` must be non-negative, got minimum {arr.min()}")
    if arr.size > 1 and np.any(np.diff(arr) <= 0):
        bad = int(np.argmax(np.diff(arr) <= 0))
        raise ValueError(
            f"`{name}` must be strictly increasing; {name}[{bad}]={arr[bad]} is followed by {arr[bad + 1]}"
        )
    return arr


@dataclasses.dataclass(eq=False)
class RunHistory:
    """The record of one training run: loss versus steps and tokens, learning rate, and noise scale.

    Conventions: ``step[i]`` is the number of optimizer updates applied *before* ``loss[i]`` was measured
    (Lightning's ``global_step`` at that batch, so the first record is the initial model at step 0), and
    ``tokens[i]``/``samples[i]`` are the tokens/samples consumed *before* it. For a constant batch this makes
    ``tokens = step * batch_size * tokens_per_sample``, which is what scaling laws call E = B·S.

    Non-finite losses are kept and flagged (:attr:`nonfinite`), never dropped; fits exclude them explicitly.

    Args:
        name: Run name.
        n_params: Non-embedding parameter count N (Kaplan et al. 2020), or ``None`` if unknown.
        batch_size: Samples per optimizer step, global over ranks and gradient accumulation.
        tokens_per_sample: Tokens per sample (context length for packed LM data), or ``None``.
        step: Optimizer step of each record, strictly increasing.
        loss: Training loss averaged over the global batch, one per step.
        tokens: Cumulative tokens before each record; derived from ``samples`` or ``step`` when omitted.
        samples: Cumulative samples before each record; derived from ``step * batch_size`` when omitted.
        lr: Learning rate of the first parameter group at each step (NaN where unknown).
        planned_lr: The whole per-step schedule, ``planned_lr[i]`` being the LR of optimizer step ``i``, past
            and future, when it could be simulated; schedule-aware forecasts read it.
        val_step: Steps of validation evaluations.
        val_loss: Validation losses at ``val_step``.
        gns_step: Steps of gradient-noise-scale readings.
        gns_b_simple: B_simple = tr(Σ)/|G|² in samples.
        gns_grad_sq_norm: Estimated |G|².
        gns_trace_sigma: Estimated tr(Σ).
        meta: Free-form metadata (context length, schedule, seed, ...). Must be JSON-serialisable to save.

    Raises:
        ValueError: unequal lengths, non-increasing steps, negative or zero sizes, non-1-D arrays.

    Example::

        >>> h = RunHistory(name="tiny", n_params=1e6, batch_size=32, tokens_per_sample=128,
        ...                step=[0, 1, 2], loss=[5.5, 5.1, float("nan")], lr=[1e-3, 1e-3, 1e-3])
        >>> h.tokens.tolist()
        [0.0, 4096.0, 8192.0]
        >>> h.nonfinite.tolist()
        [False, False, True]
    """

    name: str = "run"
    n_params: float | None = None
    batch_size: float | None = None
    tokens_per_sample: float | None = None
    step: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int64))
    loss: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0))
    tokens: np.ndarray | None = None
    samples: np.ndarray | None = None
    lr: np.ndarray | None = None
    planned_lr: np.ndarray | None = None
    val_step: np.ndarray | None = None
    val_loss: np.ndarray | None = None
    gns_step: np.ndarray | None = None
    gns_b_simple: np.ndarray | None = None
    gns_grad_sq_norm: np.ndarray | None = None
    gns_trace_sigma: np.ndarray | None = None
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        self.name = str(self.name)
        self.n_params = _positive_or_none("n_params", self.n_params)
        self.batch_size = _positive_or_none("batch_size", self.batch_size)
        self.tokens_per_sample = _positive_or_none("tokens_per_sample", self.tokens_per_sample)
        self.step = _as_steps("step", self.step)
        n = self.step.size
        self.loss = _as_1d("loss", self.loss, np.float64)
        if self.loss.size != n:
            raise ValueError(f"`loss` has {self.loss.size} values but `step` has {n}")

        if self.samples is None:
            self.samples = (
                self.step * self.batch_size if self.batch_size is not None else np.full(n, np.nan)
            ).astype(np.float64)
        if self.tokens is None:
            self.tokens = (
                self.samples * self.tokens_per_sample
                if self.tokens_per_sample is not None
                else np.full(n, np.nan)
            )
        if self.lr is None:
            self.lr = np.full(n, np.nan)
        for key in ("tokens", "samples", "lr"):
            arr = _as_1d(key, getattr(self, key), np.float64)
            if arr.size != n:
                raise ValueError(f"`{key}` has {arr.size} values but `step` has {n}")
            setattr(self, key, arr)
        for key in ("tokens", "samples"):
            arr = getattr(self, key)
            if np.any(arr[np.isfinite(arr)] < 0):
                raise ValueError(f"`{key}` must be non-negative")
        if self.planned_lr is not None:
            self.planned_lr = _as_1d("planned_lr", self.planned_lr, np.float64)

        self._check_pair("val_step", "val_loss")
        if self.gns_step is not None or any(getattr(self, k) is not None for k in _GNS_VALUES):
            if self.gns_step is None:
                raise ValueError("gradient-noise arrays were given without `gns_step`")
            self.gns_step = _as_steps("gns_step", self.gns_step)
            for key in _GNS_VALUES:
                value = getattr(self, key)
                arr = np.full(self.gns_step.size, np.nan) if value is None else _as_1d(key, value, np.float64)
                if arr.size != self.gns_step.size:
                    raise ValueError(f"`{key}` has {arr.size} values but `gns_step` has {self.gns_step.size}")
                setattr(self, key, arr)
        self.meta = dict(self.meta or {})

    def _check_pair(self, step_key: str, value_key: str) -> None:
        steps, values = getattr(self, step_key), getattr(self, value_key)
        if steps is None and values is None:
            return
        if steps is None or values is None:
            raise ValueError(f"`{step_key}` and `{value_key}` must be given together")
        steps = _as_steps(step_key, steps)
        values = _as_1d(value_key, values, np.float64)
        if steps.size != values.size:
            raise ValueError(f"`{value_key}` has {values.size} values but `{step_key}` has {steps.size}")
        setattr(self, step_key, steps)
        setattr(self, value_key, values)

    # ------------------------------------------------------------------ views
    def __len__(self) -> int:
        return int(self.step.size)

    def __repr__(self) -> str:
        last = f", last_step={int(self.step[-1])}" if len(self) else ""
        return (
            f"RunHistory(name={self.name!r}, n_params={self.n_params}, batch_size={self.batch_size}, "
            f"tokens_per_sample={self.tokens_per_sample}, points={len(self)}{last}, "
            f"nonfinite={int(self.nonfinite.sum())})"
        )

    @property
    def nonfinite(self) -> np.ndarray:
        """Boolean mask of records whose loss is NaN or infinite (kept, never silently dropped)."""
        return ~np.isfinite(self.loss)

    @property
    def finite_mask(self) -> np.ndarray:
        """Boolean mask of records with a finite loss."""
        return np.isfinite(self.loss)

    @property
    def tokens_per_step(self) -> float | None:
        """Tokens per optimizer step, when batch size and tokens per sample are known."""
        if self.batch_size is None or self.tokens_per_sample is None:
            return None
        return self.batch_size * self.tokens_per_sample

    @property
    def gns_b_simple_tokens(self) -> np.ndarray | None:
        """B_simple in tokens (samples × tokens per sample), or ``None``."""
        if self.gns_b_simple is None or self.tokens_per_sample is None:
            return None
        return self.gns_b_simple * self.tokens_per_sample

    def copy(self) -> RunHistory:
        """A deep copy."""
        kwargs = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for key, value in kwargs.items():
            if isinstance(value, np.ndarray):
                kwargs[key] = value.copy()
        kwargs["meta"] = json.loads(json.dumps(self.meta, default=_json_default))
        return RunHistory(**kwargs)

    def truncate(self, max_step: int) -> RunHistory:
        """A copy holding only records with ``step <= max_step`` (validation and GNS records likewise).

        ``planned_lr`` is kept whole: the planned future schedule is what forecasts need.
        """
        out = self.copy()
        keep = out.step <= max_step
        for key in _PER_STEP:
            setattr(out, key, getattr(out, key)[keep])
        if out.val_step is not None:
            keep_v = out.val_step <= max_step
            out.val_step, out.val_loss = out.val_step[keep_v], out.val_loss[keep_v]
        if out.gns_step is not None:
            keep_g = out.gns_step <= max_step
            out.gns_step = out.gns_step[keep_g]
            for key in _GNS_VALUES:
                setattr(out, key, getattr(out, key)[keep_g])
        return out

    # ------------------------------------------------------------------- JSON
    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (arrays as lists; NaN/inf as ``null``/strings as JSON allows)."""
        out: dict[str, Any] = {"format": "lightning-scaling/history", "version": 1}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, np.ndarray):
                value = _encode_array(value)
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunHistory:
        """Inverse of :meth:`to_dict`."""
        if not isinstance(data, Mapping) or "step" not in data or "loss" not in data:
            raise ValueError("not a lightning-scaling history: expected a mapping with 'step' and 'loss'")
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in names}
        for key, value in list(kwargs.items()):
            if isinstance(value, list):
                kwargs[key] = _decode_array(value)
        return cls(**kwargs)

    def to_json(self, path: str | os.PathLike | None = None) -> str:
        """Serialise to JSON; write it atomically to ``path`` when given. Returns the JSON text.

        Non-finite numbers are written as the strings ``"NaN"``, ``"Infinity"``, ``"-Infinity"`` so the
        file stays standard JSON. A 1M-step history (step, tokens, samples, loss, lr) is about 60 MB as
        JSON; use :meth:`to_csv` or keep ``flush`` intervals coarse if that matters.
        """
        text = json.dumps(self.to_dict(), default=_json_default, separators=(",", ":"))
        if path is not None:
            _atomic_write(Path(path), text)
        return text

    @classmethod
    def from_json(cls, source: str | os.PathLike) -> RunHistory:
        """Read a history from a JSON file path, or from JSON text.

        Raises:
            ValueError: the text is not valid JSON or not a history (e.g. a truncated file).
            FileNotFoundError: the path does not exist.
        """
        text = str(source)
        if not text.lstrip().startswith("{"):
            path = Path(source)
            if not path.exists():
                raise FileNotFoundError(f"no history file at {path}")
            text = path.read_text()
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"history JSON is invalid or truncated: {err}") from None
        return cls.from_dict(data)

    # -------------------------------------------------------------------- CSV
    def to_csv(self, path: str | os.PathLike) -> None:
        """Write the per-step arrays as CSV; scalars, schedule, validation, GNS and meta go in a JSON header line.

        The first line is ``# {json}``; the rest is ``step,tokens,samples,loss,lr``. About 50 MB for 1M steps.
        """
        header = self.to_dict()
        for key in _PER_STEP:
            header.pop(key)
        lines = ["# " + json.dumps(header, default=_json_default, separators=(",", ":")), ",".join(_PER_STEP)]
        cols = [getattr(self, k) for k in _PER_STEP]
        for i in range(len(self)):
            lines.append(f"{cols[0][i]}," + ",".join(repr(float(c[i])) for c in cols[1:]))
        _atomic_write(Path(path), "\n".join(lines) + "\n")

    @classmethod
    def from_csv(cls, path: str | os.PathLike, **overrides: Any) -> RunHistory:
        """Read a file written by :meth:`to_csv`; keyword ``overrides`` replace header fields (e.g. ``n_params``)."""
        path = Path(path)
        with path.open() as fh:
            first = fh.readline()
            header: dict[str, Any] = {}
            if first.startswith("#"):
                try:
                    header = json.loads(first[1:])
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}: header line is not valid JSON: {err}") from None
            else:
                fh.seek(0)
            rows = list(csv.DictReader(fh))
        if not rows:
            raise ValueError(f"{path}: no data rows")
        missing = {"step", "loss"} - set(rows[0])
        if missing:
            raise ValueError(f"{path}: missing columns {sorted(missing)}")
        data = {k: v for k, v in header.items() if k not in ("format", "version")}
        for key in _PER_STEP:
            if key in rows[0]:
                try:
                    data[key] = [float(r[key]) if r[key] not in ("", None) else math.nan for r in rows]
                except (TypeError, ValueError) as err:
                    raise ValueError(f"{path}: column {key!r} is not numeric (truncated file?): {err}") from None
        for key, value in list(data.items()):
            if isinstance(value, list) and key not in _PER_STEP:
                data[key] = _decode_array(value)
        data.update(overrides)
        return cls.from_dict(data)

    # ------------------------------------------------------------- TensorBoard
    @classmethod
    def from_tensorboard(
        cls,
        logdir: str | os.PathLike,
        *,
        loss_tag: str = DEFAULT_TAGS["loss"],
        lr_tag: str | None = DEFAULT_TAGS["lr"],
        tokens_tag: str | None = DEFAULT_TAGS["tokens"],
        val_loss_tag: str | None = DEFAULT_TAGS["val_loss"],
        name: str | None = None,
        n_params: float | None = None,
        batch_size: float | None = None,
        tokens_per_sample: float | None = None,
    ) -> RunHistory:
        """Read a run from a TensorBoard event folder with tensorboard's ``EventAccumulator``.

        All scalars are loaded (``size_guidance={"scalars": 0}``, no reservoir sub-sampling). Sizes not given
        are read from this project's ``scaling/n_params``, ``scaling/batch_size`` and
        ``scaling/tokens_per_sample`` scalars when present. Repeated steps (a resumed run re-logging) keep the
        last value.

        Args:
            logdir: Folder with ``events.out.tfevents.*`` files (not searched recursively).
            loss_tag: Scalar tag of the training loss, e.g. ``"train_loss"`` for a plain Lightning run.
            lr_tag, tokens_tag, val_loss_tag: Optional tags; missing ones are left unknown.
            name: Run name (default: the folder's name).
            n_params, batch_size, tokens_per_sample: Overrides for the run's sizes.

        Raises:
            ValueError: no event file, or ``loss_tag`` absent (the message lists the tags found).
        """
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        logdir = Path(logdir)
        if not logdir.is_dir() or not any(p.name.startswith("events.out.tfevents") for p in logdir.iterdir()):
            raise ValueError(f"{logdir}: no TensorBoard event files")
        acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
        acc.Reload()
        tags = set(acc.Tags().get("scalars", []))
        if loss_tag not in tags:
            raise ValueError(f"{logdir}: loss tag {loss_tag!r} not found; scalar tags present: {sorted(tags)}")

        def series(tag: str | None) -> dict[int, float]:
            if tag is None or tag not in tags:
                return {}
            return {int(e.step): float(e.value) for e in acc.Scalars(tag)}  # later events win

        def scalar(tag: str) -> float | None:
            values = series(tag)
            return values[max(values)] if values else None

        loss = series(loss_tag)
        steps = np.array(sorted(loss), dtype=np.int64)
        lr, tok, val = series(lr_tag), series(tokens_tag), series(val_loss_tag)
        kwargs: dict[str, Any] = dict(
            name=name or logdir.name,
            n_params=n_params if n_params is not None else scalar(DEFAULT_TAGS["n_params"]),
            batch_size=batch_size if batch_size is not None else scalar(DEFAULT_TAGS["batch_size"]),
            tokens_per_sample=(
                tokens_per_sample if tokens_per_sample is not None else scalar(DEFAULT_TAGS["tokens_per_sample"])
            ),
            step=steps,
            loss=[loss[s] for s in steps],
            lr=[lr.get(int(s), math.nan) for s in steps],
            meta={"source": str(logdir), "loss_tag": loss_tag},
        )
        if tok and all(int(s) in tok for s in steps):
            kwargs["tokens"] = [tok[int(s)] for s in steps]
        if val:
            kwargs["val_step"] = sorted(val)
            kwargs["val_loss"] = [val[s] for s in kwargs["val_step"]]
        gns = {key: series(DEFAULT_TAGS[key]) for key in _GNS_VALUES}
        if gns["gns_b_simple"]:
            gsteps = sorted(gns["gns_b_simple"])
            kwargs["gns_step"] = gsteps
            for key in _GNS_VALUES:
                kwargs[key] = [gns[key].get(s, math.nan) for s in gsteps]
        return cls(**kwargs)

    # ---------------------------------------------------------- Lightning CSV
    @classmethod
    def from_lightning_csv(
        cls,
        path: str | os.PathLike,
        *,
        loss_tag: str = DEFAULT_TAGS["loss"],
        lr_tag: str | None = DEFAULT_TAGS["lr"],
        tokens_tag: str | None = DEFAULT_TAGS["tokens"],
        val_loss_tag: str | None = DEFAULT_TAGS["val_loss"],
        step_column: str = "step",
        name: str | None = None,
        n_params: float | None = None,
        batch_size: float | None = None,
        tokens_per_sample: float | None = None,
    ) -> RunHistory:
        """Read a run from a Lightning ``CSVLogger`` ``metrics.csv`` (one column per metric, sparse rows).

        Args:
            path: The ``metrics.csv`` file.
            loss_tag: Column of the training loss, e.g. ``"train_loss_step"`` for ``self.log(..., on_step=True)``.
            lr_tag, tokens_tag, val_loss_tag: Optional columns.
            step_column: Column holding the step.
            name, n_params, batch_size, tokens_per_sample: Overrides (sizes default to this project's columns).

        Raises:
            ValueError: empty file, missing step or loss column (the message lists the columns found).
        """
        path = Path(path)
        with path.open(newline="") as fh:
            rows = list(csv.DictReader(fh))
        if not rows:
            raise ValueError(f"{path}: no rows")
        columns = set(rows[0])
        for col in (step_column, loss_tag):
            if col not in columns:
                raise ValueError(f"{path}: column {col!r} not found; columns present: {sorted(columns)}")

        def series(col: str | None) -> dict[int, float]:
            out: dict[int, float] = {}
            if col is None or col not in columns:
                return out
            for r in rows:
                if r.get(col) not in (None, "") and r.get(step_column) not in (None, ""):
                    out[int(float(r[step_column]))] = float(r[col])
            return out

        def scalar(col: str) -> float | None:
            values = series(col)
            return values[max(values)] if values else None

        loss = series(loss_tag)
        if not loss:
            raise ValueError(f"{path}: column {loss_tag!r} has no values")
        steps = sorted(loss)
        lr, tok, val = series(lr_tag), series(tokens_tag), series(val_loss_tag)
        kwargs: dict[str, Any] = dict(
            name=name or path.parent.name,
            n_params=n_params if n_params is not None else scalar(DEFAULT_TAGS["n_params"]),
            batch_size=batch_size if batch_size is not None else scalar(DEFAULT_TAGS["batch_size"]),
            tokens_per_sample=(
                tokens_per_sample if tokens_per_sample is not None else scalar(DEFAULT_TAGS["tokens_per_sample"])
            ),
            step=steps,
            loss=[loss[s] for s in steps],
            lr=[lr.get(s, math.nan) for s in steps],
            meta={"source": str(path), "loss_tag": loss_tag},
        )
        if tok and all(s in tok for s in steps):
            kwargs["tokens"] = [tok[s] for s in steps]
        if val:
            kwargs["val_step"] = sorted(val)
            kwargs["val_loss"] = [val[s] for s in kwargs["val_step"]]
        return cls(**kwargs)

    # ------------------------------------------------------------- discovery
    @classmethod
    def load(cls, path: str | os.PathLike, **kwargs: Any) -> RunHistory:
        """Load one run from a ``history.json``, a ``.csv`` written by :meth:`to_csv`, a Lightning
        ``metrics.csv``, a TensorBoard event folder, or a log folder containing ``scaling/history.json``.

        ``kwargs`` go to :meth:`from_tensorboard` / :meth:`from_lightning_csv` (tags, sizes).

        Raises:
            FileNotFoundError: the path does not exist.
            ValueError: nothing readable as a run there.
        """
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist")
        if path.is_dir():
            own = path / "scaling" / HISTORY_FILENAME
            if own.exists():
                return cls.from_json(own)
            if (path / HISTORY_FILENAME).exists():
                return cls.from_json(path / HISTORY_FILENAME)
            if any(p.name.startswith("events.out.tfevents") for p in path.iterdir()):
                return cls.from_tensorboard(path, **kwargs)
            if (path / "metrics.csv").exists():
                return cls.from_lightning_csv(path / "metrics.csv", **kwargs)
            raise ValueError(f"{path}: no history.json, TensorBoard events or metrics.csv")
        if path.suffix == ".json":
            return cls.from_json(path)
        if path.suffix == ".csv":
            with path.open() as fh:
                first = fh.readline()
            if first.startswith("# "):
                return cls.from_csv(path)
            return cls.from_lightning_csv(path, **kwargs)
        if path.name.startswith("events.out.tfevents"):
            return cls.from_tensorboard(path.parent, **kwargs)
        raise ValueError(f"{path}: not a history.json, .csv or TensorBoard event file")

    @classmethod
    def load_many(cls, paths: str | os.PathLike | Iterable[str | os.PathLike], **kwargs: Any) -> list[RunHistory]:
        """Find and load every run under the given files or folders (searched recursively).

        A folder that holds ``scaling/history.json`` (or ``history.json``) is one run, read from that file, and
        its TensorBoard/CSV logs are not read again; other folders with event files or a ``metrics.csv`` are
        runs of their own. Sub-folders named ``by_tokens`` or ``forecast`` (this project's auxiliary runs) are
        skipped.

        Raises:
            ValueError: no run found, or a found run could not be read (the message names the folder).
        """
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        found: list[Path] = []
        for root in map(Path, paths):
            if not root.exists():
                raise FileNotFoundError(f"{root} does not exist")
            if root.is_file():
                found.append(root)
                continue
            found.extend(_discover(root))
        if not found:
            raise ValueError(
                "no runs found under " + ", ".join(map(str, paths)) + " (looked for history.json, TensorBoard "
                "event files and metrics.csv)"
            )
        runs = []
        for p in found:
            try:
                runs.append(cls.load(p, **kwargs))
            except ValueError as err:
                raise ValueError(f"could not read run at {p}: {err}") from None
        return runs


def _discover(root: Path) -> list[Path]:
    out: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("by_tokens", "forecast", "checkpoints"))
        here = Path(dirpath)
        if (here / "scaling" / HISTORY_FILENAME).exists():
            out.append(here / "scaling" / HISTORY_FILENAME)
            dirnames[:] = []  # one run: its own history wins over its event files
        elif here.name == "scaling" and HISTORY_FILENAME in filenames:
            continue  # found from the parent
        elif HISTORY_FILENAME in filenames:
            out.append(here / HISTORY_FILENAME)
        elif any(f.startswith("events.out.tfevents") for f in filenames) or "metrics.csv" in filenames:
            out.append(here)
    return out


def _encode_array(arr: np.ndarray) -> list[Any]:
    if arr.dtype.kind in "iu":
        return arr.tolist()
    return [v if math.isfinite(v) else ("NaN" if math.isnan(v) else ("Infinity" if v > 0 else "-Infinity"))
            for v in arr.tolist()]


def _decode_array(values: Sequence[Any]) -> np.ndarray:
    conv = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf, None: math.nan}
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return np.asarray(values, dtype=np.int64)
    return np.asarray([conv.get(v, v) if not isinstance(v, (int, float)) else v for v in values], dtype=np.float64)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return _encode_array(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable; keep RunHistory.meta to plain values")


def _atomic_write(path: Path, text: str) -> None:
    # Write then rename, so a crash mid-write never leaves a truncated history behind.
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
