"""One training run's record: :class:`RunHistory`, the data model every other module reads and writes.

A history holds numpy arrays, so a 1M-step run stays compact in memory (about 40 MB for step, tokens,
samples, loss and lr as 8-byte values) and on disk (see :meth:`RunHistory.to_json`).
"""

from __future__ import annotations

import array
import base64
import binascii
import csv
import dataclasses
import json
import math
import mmap
import os
import stat
import struct
import warnings
import zlib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lightning_scaling.numerics import NONFINITE, json_float
from lightning_scaling.warnings import DataWarning

__all__ = [
    "RunHistory", "LoadReport", "merge_runs", "final_loss", "group_by_size", "live_b_simple", "HISTORY_FILENAME",
    "DEFAULT_TAGS", "FINAL_FRACTION",
]

#: File name that :class:`~lightning_scaling.callbacks.LossTrajectory` writes under ``<log_dir>/scaling/``.
HISTORY_FILENAME = "history.json"
#: Share of a run's last records averaged into its final loss (fixed before any result was seen): one noisy
#: step never decides a comparison. Also what counts as "reached" in ``Forecast.steps_to``.
FINAL_FRACTION = 0.05

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
_ARRAYS = _PER_STEP + ("planned_lr",) + _OPTIONAL_ARRAYS


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
            if isinstance(value, list) or (isinstance(value, Mapping) and "packed" in value):
                kwargs[key] = _decode_array(value, key)
            elif key in _ARRAYS and value is not None and not isinstance(value, np.ndarray):
                raise ValueError(f"`{key}` must be a list of numbers, got {type(value).__name__}")
        if not isinstance(kwargs.get("meta", {}), Mapping):
            raise ValueError(f"`meta` must be a mapping, got {type(kwargs['meta']).__name__}")
        for key in ("step", "loss"):
            if not isinstance(kwargs[key], np.ndarray):
                raise ValueError(f"`{key}` must be a list of numbers, got {type(kwargs[key]).__name__}")
        try:
            return cls(**kwargs)
        except (TypeError, OverflowError) as err:  # e.g. a string where a size belongs: not a history
            raise ValueError(f"not a valid history: {err}") from None

    def to_json(self, path: str | os.PathLike | None = None) -> str:
        """Serialise to JSON; write it atomically to ``path`` when given. Returns the JSON text.

        Non-finite numbers are written as the strings ``"NaN"``, ``"Infinity"``, ``"-Infinity"`` so the
        file stays standard JSON. Arrays of 4096 values or more are stored packed (``{"packed": ...}``:
        byte-shuffled little-endian int64/float64, zlib, base64) and read back bit-identical, so a 1M-step
        history with its planned schedule is ~18 MB instead of ~100 MB of decimal text
        (``benchmarks/long_run.py``).
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
            _check_regular(path)
            try:
                text = path.read_text()
            except UnicodeDecodeError:
                raise ValueError(f"{path}: not a text file, so not a history JSON") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"history JSON is invalid or truncated: {err}") from None
        except RecursionError:
            raise ValueError("history JSON is nested too deeply to be a history") from None
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
        _check_regular(path)
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

        All scalars are loaded (``size_guidance={"scalars": 0}``, no reservoir sub-sampling, no purging of
        re-logged steps). Sizes not given are read from this project's ``scaling/n_params``,
        ``scaling/batch_size`` and ``scaling/tokens_per_sample`` scalars when present. Nothing is dropped
        silently: repeated steps (a resumed run re-logging) keep the last logged value and are counted in
        ``meta["duplicate_steps"]``, and an event file that ends in an incomplete record (a killed writer, a
        truncated copy) is reported in ``meta["truncated_files"]``; both with a
        :class:`~lightning_scaling.warnings.DataWarning`.

        Args:
            logdir: Folder with ``events.out.tfevents.*`` files (not searched recursively).
            loss_tag: Scalar tag of the training loss, e.g. ``"train_loss"`` for a plain Lightning run.
            lr_tag, tokens_tag, val_loss_tag: Optional tags; missing ones are left unknown.
            name: Run name (default: the folder's name).
            n_params, batch_size, tokens_per_sample: Overrides for the run's sizes.

        Raises:
            ValueError: no event file, a non-regular event file, or ``loss_tag`` absent (the message lists the
                tags found).
        """
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        logdir = Path(logdir)
        files = sorted(p for p in logdir.iterdir() if p.name.startswith("events.out.tfevents")) \
            if logdir.is_dir() else []
        if not files:
            raise ValueError(f"{logdir}: no TensorBoard event files")
        truncated = {}
        for f in files:
            _check_regular(f)  # the accumulator would block forever on a FIFO
            n_records, unread = _scan_event_file(f)
            if unread:
                truncated[f.name] = {"records_read": n_records, "bytes_unread": unread}
        acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0}, purge_orphaned_data=False)
        acc.Reload()
        tags = set(acc.Tags().get("scalars", []))
        if loss_tag not in tags:
            raise ValueError(f"{logdir}: loss tag {loss_tag!r} not found; scalar tags present: {sorted(tags)}")
        reader = _SeriesReader()
        for key, tag in _wanted_tags(loss_tag, lr_tag, tokens_tag, val_loss_tag).items():
            if tag in tags:
                for e in acc.Scalars(tag):  # in file order: later events win
                    reader.add(key, int(e.step), float(e.value))
        for fname, info in truncated.items():
            _data_warning(f"{logdir / fname}: the TensorBoard event file ends in an incomplete record (killed "
                          f"writer or truncated copy): read {info['records_read']} complete records, "
                          f"{info['bytes_unread']} bytes at its end are unreadable; its last points are lost")
        history = reader.build(cls, str(logdir), loss_tag, name=name or logdir.name, n_params=n_params,
                               batch_size=batch_size, tokens_per_sample=tokens_per_sample)
        if truncated:
            history.meta["truncated_files"] = truncated
        return history

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

        The file is streamed row by row, keeping only the columns read, so memory follows the number of steps,
        not the file size. Repeated steps keep the last value and are counted (``meta["duplicate_steps"]``, a
        :class:`~lightning_scaling.warnings.DataWarning`).

        Args:
            path: The ``metrics.csv`` file.
            loss_tag: Column of the training loss, e.g. ``"train_loss_step"`` for ``self.log(..., on_step=True)``.
            lr_tag, tokens_tag, val_loss_tag: Optional columns.
            step_column: Column holding the step.
            name, n_params, batch_size, tokens_per_sample: Overrides (sizes default to this project's columns).

        Raises:
            ValueError: empty or non-regular file, missing step or loss column (the message lists the columns
                found), a non-numeric cell, or a step column that does not advance (every loss at one step).
        """
        path = Path(path)
        _check_regular(path)
        reader = _SeriesReader()
        with path.open(newline="") as fh:
            rows = csv.reader(fh)
            header = next(rows, None)
            if not header:
                raise ValueError(f"{path}: no rows")
            index = {c: i for i, c in enumerate(header)}
            for col in (step_column, loss_tag):
                if col not in index:
                    raise ValueError(f"{path}: column {col!r} not found; columns present: {sorted(index)}")
            si = index[step_column]
            cols = [(key, index[tag]) for key, tag in _wanted_tags(loss_tag, lr_tag, tokens_tag,
                                                                   val_loss_tag).items() if tag in index]
            for line, row in enumerate(rows, start=2):
                if si >= len(row) or row[si] == "":
                    continue
                try:
                    step = int(float(row[si]))
                    for key, j in cols:
                        if j < len(row) and row[j] != "":
                            reader.add(key, step, float(row[j]))
                except (TypeError, ValueError, OverflowError) as err:
                    raise ValueError(f"{path}: line {line} is not numeric (truncated file?): {err}") from None
                stalled = reader.stalled()  # stop early: memory stays bounded on a file of millions of rows
                if stalled is not None:
                    raise ValueError(f"{path}: the {step_column!r} column does not advance: the first "
                                     f"{reader.STALL_LIMIT} {loss_tag!r} values are all at step {stalled}; pass "
                                     "the right step column")
        reader.finish()
        if "loss" not in reader.series:
            raise ValueError(f"{path}: column {loss_tag!r} has no values")
        if reader.series["loss"][0].size == 1 and reader.duplicates.get("loss", 0):
            raise ValueError(f"{path}: the {step_column!r} column does not advance: all "
                             f"{1 + reader.duplicates['loss']} {loss_tag!r} values are at step "
                             f"{int(reader.series['loss'][0][0])}; pass the right step column")
        return reader.build(cls, str(path), loss_tag, name=name or path.parent.name, n_params=n_params,
                            batch_size=batch_size, tokens_per_sample=tokens_per_sample)

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
        _check_regular(path)  # before the first open: a FIFO would block it
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
    def load_many(cls, paths: str | os.PathLike | Iterable[str | os.PathLike], *, report: bool = False,
                  **kwargs: Any) -> list[RunHistory] | tuple[list[RunHistory], LoadReport]:
        """Find and load every run under the given files or folders (searched recursively); one training is one run.

        A folder that holds ``scaling/history.json`` (or ``history.json``) is read from that file, and its own
        TensorBoard/CSV logs are not read again; other folders with event files or a ``metrics.csv`` are read from
        those; runs nested in another run's folder are found too. Sub-folders named ``by_tokens``, ``forecast`` or
        ``checkpoints`` (this project's auxiliary TensorBoard runs and Lightning's checkpoints) are not searched;
        they are listed in the report.

        Pieces of one training are merged into one run (:func:`merge_runs`): a killed and resumed run (several
        version folders, or several history files of one run name) and one training logged by several loggers
        (TensorBoard and CSV). Pieces belong together when their sizes agree and their losses agree at their
        first common steps, or when a piece that starts after step 0 (a resume) continues a piece in a sibling
        folder. Every merge is reported with a :class:`~lightning_scaling.warnings.DataWarning` and in
        ``meta["merged_from"]``/``meta["duplicate_steps"]`` of the merged run.

        Args:
            paths: Files or folders.
            report: Also return a :class:`LoadReport` (what was read, skipped and merged).
            **kwargs: Reader options for :meth:`load` (tags, sizes).

        Returns:
            The runs, or ``(runs, report)`` with ``report=True``.

        Raises:
            FileNotFoundError: a path does not exist.
            ValueError: no run found, or a found run could not be read (the message names the folder).

        Example::

            >>> import tempfile
            >>> root = Path(tempfile.mkdtemp())
            >>> whole = RunHistory(name="r", step=range(10), loss=[3.0 - 0.1 * i for i in range(10)])
            >>> _ = whole.truncate(6).to_json(root / "version_0" / "history.json")  # killed at step 6
            >>> _ = whole.to_json(root / "version_1" / "history.json")  # resumed from a checkpoint
            >>> runs, rep = RunHistory.load_many(root, report=True)  # doctest: +SKIP
            >>> len(runs), len(runs[0]), rep.merged  # doctest: +SKIP
            (1, 10, {'r': [...]})
        """
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        paths = list(paths)
        found: list[Path] = []
        skipped: list[str] = []
        for root in map(Path, paths):
            if not root.exists():
                raise FileNotFoundError(f"{root} does not exist")
            if not root.is_dir():  # a file, or a FIFO/device that load() refuses with a clear message
                found.append(root)
                continue
            found.extend(_discover(root, skipped))
        if not found:
            raise ValueError(
                "no runs found under " + ", ".join(map(str, paths)) + " (looked for history.json, TensorBoard "
                "event files and metrics.csv)"
            )
        pieces = []
        for p in found:
            try:
                pieces.append((p, cls.load(p, **kwargs)))
            except ValueError as err:
                raise ValueError(f"could not read run at {p}: {err}") from None
        runs, merged = _group_pieces(pieces)
        rep = LoadReport(read=[str(p) for p in found], skipped=skipped, merged=merged)
        if merged:
            what = "; ".join(f"{name!r} <- {', '.join(srcs)}" for name, srcs in merged.items())
            _data_warning(f"load_many: {len(found)} sources are {len(runs)} trainings; merged pieces of one "
                          f"training (resumed or logged twice): {what}")
        return (runs, rep) if report else runs


# ----------------------------------------------------------------------------------------------------------------
# Summaries of runs: one definition each, shared by the study, the report, the CLI and the callbacks
# ----------------------------------------------------------------------------------------------------------------
def final_loss(history: RunHistory, *, fraction: float = FINAL_FRACTION,
               min_points: int = 10) -> tuple[float, int]:
    """The final loss of a run: the mean finite loss over its last ``fraction`` of records (at least
    ``min_points``), so one noisy last step does not decide a comparison; and the first step averaged.

    Raises:
        ValueError: the history has no finite loss, or ``fraction`` is not in (0, 1].

    Example::

        >>> h = RunHistory(step=np.arange(100), loss=np.r_[np.full(90, 3.0), np.full(10, 2.0)])
        >>> final_loss(h)
        (2.0, 90)
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"`fraction` must be in (0, 1], got {fraction!r}")
    ok = np.flatnonzero(history.finite_mask)
    if ok.size == 0:
        raise ValueError(f"run {history.name!r} has no finite loss")
    sel = ok[-max(min_points, math.ceil(fraction * ok.size)):]
    return float(np.mean(history.loss[sel])), int(history.step[sel[0]])


def live_b_simple(history: RunHistory, *, last_fraction: float = 1 / 3) -> float | None:
    """Median live ``B_simple`` (samples) over the last third of a run's GNS readings (``None`` without any).

    Example::

        >>> live_b_simple(RunHistory(step=[0, 1, 2], loss=[3, 2, 1], gns_step=[0, 1, 2], gns_b_simple=[1, 5, 7]))
        7.0
    """
    b = history.gns_b_simple
    if b is None or len(b) == 0:
        return None
    tail = b[int(len(b) * (1 - last_fraction)):]
    tail = tail[np.isfinite(tail) & (tail > 0)]
    return float(np.median(tail)) if tail.size else None


def group_by_size(runs: Iterable[RunHistory]) -> dict[float, list[RunHistory]]:
    """Runs grouped by ``n_params`` in first-seen order (runs without a size under NaN).

    Example::

        >>> runs = [RunHistory(step=[0], loss=[1], n_params=n) for n in (2e6, 1e6, 2e6)]
        >>> {n: len(g) for n, g in group_by_size(runs).items()}
        {2000000.0: 2, 1000000.0: 1}
    """
    groups: dict[float, list[RunHistory]] = {}
    for r in runs:
        groups.setdefault(float(r.n_params) if r.n_params is not None else math.nan, []).append(r)
    return groups


@dataclasses.dataclass
class LoadReport:
    """What :meth:`RunHistory.load_many` did.

    Attributes:
        read: Every source read (history file, event folder, ``metrics.csv`` folder).
        skipped: Auxiliary folders not searched (``by_tokens``, ``forecast``, ``checkpoints``).
        merged: Run name -> the sources merged into that one run.
    """

    read: list[str]
    skipped: list[str]
    merged: dict[str, list[str]]


def _source_rank(path: Path) -> int:
    """Preference among copies of one training: this project's history file, then TensorBoard, then CSV."""
    if path.suffix == ".json" or (path.is_dir() and (path / "scaling" / HISTORY_FILENAME).exists()):
        return 0
    if path.is_dir() and any(p.name.startswith("events.out.tfevents") for p in path.iterdir()):
        return 1
    return 2


def _sizes_agree(a: RunHistory, b: RunHistory) -> bool:
    for key in ("n_params", "batch_size", "tokens_per_sample"):
        x, y = getattr(a, key), getattr(b, key)
        if x is not None and y is not None and not math.isclose(x, y, rel_tol=1e-6):
            return False
    return True


def _same_training(pa: Path, a: RunHistory, pb: Path, b: RunHistory, both_files: bool) -> bool:
    if not len(a) or not len(b) or not _sizes_agree(a, b):
        return False
    if a.name != b.name and both_files:
        return False  # history files carry the run's name, which a resume keeps: other names, other runs
    common, ia, ib = np.intersect1d(a.step, b.step, assume_unique=True, return_indices=True)
    if common.size:
        # A resumed history repeats its restored prefix bit for bit; two loggers of one training agree to
        # float32 precision. Different trainings (other seed, data or model) differ from their first steps on.
        la, lb = a.loss[ia[:8]], b.loss[ib[:8]]
        if np.allclose(la, lb, rtol=1e-5, atol=0.0, equal_nan=True):
            return True
    first, later = (a, b) if a.step[0] <= b.step[0] else (b, a)
    # A resume starts after step 0 (at its checkpoint) and continues a piece of its sibling folder.
    siblings = _run_folder(pa).parent == _run_folder(pb).parent
    return siblings and later.step[0] > 0 and first.step[0] < later.step[0] <= first.step[-1] + 1


def _run_folder(path: Path) -> Path:
    folder = path if path.is_dir() else path.parent
    return folder.parent if folder.name == "scaling" else folder


def _group_pieces(pieces: list[tuple[Path, RunHistory]]) -> tuple[list[RunHistory], dict[str, list[str]]]:
    parent = list(range(len(pieces)))
    ranks = [_source_rank(p) for p, _ in pieces]

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i in range(len(pieces)):
        for j in range(i + 1, len(pieces)):
            if root(i) != root(j) and _same_training(*pieces[i], *pieces[j], ranks[i] == ranks[j] == 0):
                parent[root(j)] = root(i)
    groups: dict[int, list[int]] = {}
    for i in range(len(pieces)):
        groups.setdefault(root(i), []).append(i)
    runs, merged = [], {}
    for members in groups.values():
        if len(members) == 1:
            runs.append(pieces[members[0]][1])
            continue
        run = merge_runs([pieces[i][1] for i in members], ranks=[ranks[i] for i in members])
        run.meta["merged_from"] = [str(pieces[i][0]) for i in members]
        merged[run.name] = run.meta["merged_from"]
        runs.append(run)
    return runs, merged


def merge_runs(pieces: Sequence[RunHistory], ranks: Sequence[int] | None = None) -> RunHistory:
    """Merge pieces of one training into one history in step order.

    Where pieces share a step, the piece that reaches further wins (a resumed run recomputes the steps between
    its checkpoint and the kill; the resumed values are the ones the final model came from); between pieces
    that end at the same step (one training logged twice) the lower ``rank`` wins (0: history file, 1:
    TensorBoard, 2: CSV). Sizes and the planned schedule come from the winning piece, else any piece that has
    them. The number of repeated steps is stored in ``meta["duplicate_steps"]``.

    Args:
        pieces: Histories of one training.
        ranks: Source preference per piece (lower wins ties); default all equal.

    Example::

        >>> a = RunHistory(name="r", step=[0, 1, 2, 3], loss=[4.0, 3.0, 2.5, 2.4])
        >>> b = RunHistory(name="r", step=[2, 3, 4], loss=[2.5, 2.3, 2.2])
        >>> m = merge_runs([a, b])
        >>> m.step.tolist(), m.loss.tolist(), m.meta["duplicate_steps"]
        ([0, 1, 2, 3, 4], [4.0, 3.0, 2.5, 2.3, 2.2], 2)
    """
    ranks = list(ranks) if ranks is not None else [0] * len(pieces)
    # Weakest first, so that later (stronger) pieces overwrite shared steps.
    order = sorted(range(len(pieces)), key=lambda i: (int(pieces[i].step[-1]) if len(pieces[i]) else -1, -ranks[i]))
    ordered = [pieces[i] for i in order]
    best = ordered[-1]
    kwargs: dict[str, Any] = {"name": min(pieces, key=lambda p: int(p.step[0]) if len(p) else 0).name}
    for key in ("n_params", "batch_size", "tokens_per_sample"):
        kwargs[key] = next((getattr(p, key) for p in reversed(ordered) if getattr(p, key) is not None), None)
    kwargs["planned_lr"] = next((p.planned_lr for p in reversed(ordered) if p.planned_lr is not None), None)
    per_step = _last_wins([p.step for p in ordered], [[getattr(p, k) for k in _PER_STEP[1:]] for p in ordered])
    kwargs.update(zip(_PER_STEP, per_step))
    for step_key, value_keys in (("val_step", ("val_loss",)), ("gns_step", _GNS_VALUES)):
        have = [p for p in ordered if getattr(p, step_key) is not None]
        if have:
            cols = _last_wins([getattr(p, step_key) for p in have], [[getattr(p, k) for k in value_keys] for p in have])
            kwargs.update(zip((step_key, *value_keys), cols))
    total = sum(len(p) for p in pieces)
    kwargs["meta"] = {**best.meta, "duplicate_steps": total - len(kwargs["step"])}
    return RunHistory(**kwargs)


def _last_wins(steps: Sequence[np.ndarray], columns: Sequence[Sequence[np.ndarray]]) -> list[np.ndarray]:
    """Concatenate pieces; for each step keep the row of the last piece that has it; sort by step."""
    step = np.concatenate(steps)
    # np.unique keeps the first occurrence: reverse so that the last piece's row comes first.
    _, first = np.unique(step[::-1], return_index=True)
    keep = step.size - 1 - first
    cols = [np.concatenate([c[j] for c in columns])[keep] for j in range(len(columns[0]))]
    return [step[keep], *cols]


def _data_warning(message: str) -> None:
    warnings.warn(message, DataWarning, stacklevel=3)


def _wanted_tags(loss: str, lr: str | None, tokens: str | None, val: str | None) -> dict[str, str]:
    """Reader series key -> tag/column name, for the tags a log reader reads."""
    keys = {"loss": loss, "lr": lr, "tokens": tokens, "val": val}
    keys.update({k: DEFAULT_TAGS[k] for k in ("n_params", "batch_size", "tokens_per_sample", *_GNS_VALUES)})
    return {k: v for k, v in keys.items() if v is not None}


class _SeriesReader:
    """Collects ``(step, value)`` series from a log into compact arrays; repeats are counted, the last one kept.

    Memory is 16 bytes a value (``array``), not ~100 for a dict entry, so a 100 MB ``metrics.csv`` stays small.
    """

    #: A step column that has not advanced after this many loss values is not a step column.
    STALL_LIMIT = 10_000

    def __init__(self) -> None:
        self._steps: dict[str, array.array] = {}
        self._values: dict[str, array.array] = {}
        self.series: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # sorted unique steps, values
        self.duplicates: dict[str, int] = {}

    def add(self, key: str, step: int, value: float) -> None:
        if key not in self._steps:
            self._steps[key], self._values[key] = array.array("q"), array.array("d")
        self._steps[key].append(step)
        self._values[key].append(value)

    def stalled(self) -> int | None:
        """The one step of the first ``STALL_LIMIT`` loss values, if they all share it."""
        steps = self._steps.get("loss")
        if steps is None or len(steps) != self.STALL_LIMIT or min(steps) != max(steps):
            return None
        return steps[0]

    def finish(self) -> None:
        """Sort each series by step, keeping the last value logged for a repeated step."""
        for key, steps in self._steps.items():
            step, value = _last_wins([np.frombuffer(steps, np.int64)], [[np.frombuffer(self._values[key])]])
            self.series[key] = (step, value)
            if len(steps) > step.size:
                self.duplicates[key] = len(steps) - step.size
        self._steps, self._values = {}, {}

    def _scalar(self, key: str, given: float | None) -> float | None:
        if given is not None:
            return given
        return float(self.series[key][1][-1]) if key in self.series else None  # the value at the last step

    def _at(self, key: str, steps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The series' values at ``steps`` (NaN where it has none) and the mask of steps it has."""
        s, v = self.series.get(key, (np.zeros(0, np.int64), np.zeros(0)))
        idx = np.clip(np.searchsorted(s, steps), 0, max(s.size - 1, 0))
        have = (s[idx] == steps) if s.size else np.zeros(steps.size, bool)
        return np.where(have, v[idx] if s.size else np.nan, np.nan), have

    def build(self, cls: type[RunHistory], source: str, loss_tag: str, *, name: str, n_params: float | None,
              batch_size: float | None, tokens_per_sample: float | None) -> RunHistory:
        self.finish()
        steps, loss = self.series["loss"]
        meta: dict[str, Any] = {"source": source, "loss_tag": loss_tag}
        kwargs: dict[str, Any] = dict(
            name=name, n_params=self._scalar("n_params", n_params),
            batch_size=self._scalar("batch_size", batch_size),
            tokens_per_sample=self._scalar("tokens_per_sample", tokens_per_sample),
            step=steps, loss=loss, lr=self._at("lr", steps)[0], meta=meta,
        )
        tokens, have = self._at("tokens", steps)
        if "tokens" in self.series and have.all():
            kwargs["tokens"] = tokens
        if "val" in self.series:
            kwargs["val_step"], kwargs["val_loss"] = self.series["val"]
        if "gns_b_simple" in self.series:
            kwargs["gns_step"] = self.series["gns_b_simple"][0]
            for key in _GNS_VALUES:
                kwargs[key] = self._at(key, kwargs["gns_step"])[0]
        n_dup = self.duplicates.get("loss", 0)
        if n_dup:
            meta["duplicate_steps"] = n_dup
            _data_warning(f"{source}: {n_dup} steps of {loss_tag!r} were logged more than once (a resumed run "
                          "re-logging?); kept the last value logged for each")
        return cls(**kwargs)


def _scan_event_file(path: Path) -> tuple[int, int]:
    """(complete TFRecord records, bytes after the last complete one) of an event file, from its framing.

    A record is a little-endian uint64 length, a uint32 CRC, the payload and a uint32 CRC; a writer killed
    mid-record or a truncated copy leaves an incomplete record at the end, which the loaders skip silently.
    """
    size = path.stat().st_size
    if size == 0:
        return 0, 0
    n, pos = 0, 0
    with path.open("rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        while pos + 12 <= size:
            (length,) = struct.unpack_from("<Q", mm, pos)
            end = pos + 16 + length
            if end > size:
                break
            n, pos = n + 1, end
    return n, size - pos


_AUXILIARY = ("by_tokens", "forecast", "checkpoints")


def _discover(root: Path, skipped: list[str]) -> list[Path]:
    """Run sources under ``root``; auxiliary folders are not searched and appended to ``skipped``."""
    out: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        skipped.extend(str(here / d) for d in sorted(dirnames) if d in _AUXILIARY)
        dirnames[:] = sorted(d for d in dirnames if d not in _AUXILIARY)
        if (here / "scaling" / HISTORY_FILENAME).exists():
            out.append(here / "scaling" / HISTORY_FILENAME)  # its own history wins over its event files
        elif here.name == "scaling" and HISTORY_FILENAME in filenames:
            continue  # found from the parent
        elif HISTORY_FILENAME in filenames:
            out.append(here / HISTORY_FILENAME)
        elif any(f.startswith("events.out.tfevents") for f in filenames) or "metrics.csv" in filenames:
            out.append(here)
    return out


class AppendArray:
    """An append-only numpy column (1-D, or 2-D with a fixed row width) with amortised O(1) appends.

    Recorders of 1M-step runs keep their columns in these instead of Python lists: 8 bytes per value instead of
    ~32, and :meth:`view` gives the recorded values without copying. Values once appended never change, so a view
    stays valid (a full buffer is replaced by a larger copy, never written over).

    Example::

        >>> col = AppendArray(np.int64)
        >>> col.extend([1, 2]); col.extend([3])
        >>> col.view().tolist(), len(col)
        ([1, 2, 3], 3)
    """

    def __init__(self, dtype: Any, width: int | None = None, values: Any = None) -> None:
        self.dtype = np.dtype(dtype)
        self.width = width
        self._buf = np.empty((16,) if width is None else (16, width), self.dtype)
        self._n = 0
        if values is not None:
            self.extend(values)

    def __len__(self) -> int:
        return self._n

    def extend(self, values: Any) -> None:
        """Append values (rows for a 2-D column)."""
        arr = np.asarray(values, dtype=self.dtype)
        arr = arr.reshape((-1,) if self.width is None else (-1, self.width))
        end = self._n + arr.shape[0]
        if end > self._buf.shape[0]:
            grown = np.empty((max(end, 2 * self._buf.shape[0]),) + self._buf.shape[1:], self.dtype)
            grown[: self._n] = self._buf[: self._n]
            self._buf = grown
        self._buf[self._n:end] = arr
        self._n = end

    def view(self) -> np.ndarray:
        """The values appended so far (a read-only view, no copy)."""
        out = self._buf[: self._n]
        out.flags.writeable = False
        return out


# Arrays at least this long are stored packed in JSON (byte-shuffled float64/int64, zlib, base64): a 1M-step
# history is ~20 MB instead of ~100 MB of decimal text, and reads back bit-identical.
_PACK_MIN = 4096


def _pack(arr: np.ndarray) -> dict[str, Any]:
    kind = "int64" if arr.dtype.kind in "iu" else "float64"
    data = arr.astype("<i8" if kind == "int64" else "<f8")
    if kind == "int64":
        data = np.diff(data, prepend=np.int64(0))  # steps: constant deltas compress to almost nothing
    shuffled = data.view(np.uint8).reshape(-1, 8).T.copy()  # byte planes: smooth values compress far better
    payload = base64.b64encode(zlib.compress(shuffled.tobytes(), 6)).decode("ascii")
    return {"packed": f"{kind}-shuffle-zlib-base64", "size": int(arr.size), "data": payload}


def _unpack(obj: Mapping[str, Any]) -> np.ndarray:
    kind = str(obj.get("packed", ""))
    if kind not in ("int64-shuffle-zlib-base64", "float64-shuffle-zlib-base64"):
        raise ValueError(f"unknown packed array encoding {kind!r}")
    try:
        size = int(obj["size"])
        raw = zlib.decompressobj().decompress(base64.b64decode(obj["data"], validate=True), 8 * size + 1)
    except (KeyError, TypeError, ValueError, zlib.error, binascii.Error) as err:
        raise ValueError(f"packed array is corrupt: {err}") from None
    if len(raw) != 8 * size:
        raise ValueError(f"packed array is corrupt: {len(raw)} bytes for {size} values")
    data = np.frombuffer(raw, np.uint8).reshape(8, size).T.copy().view("<i8" if kind[:5] == "int64" else "<f8")
    data = data.ravel()
    return np.cumsum(data).astype(np.int64) if kind[:5] == "int64" else data.astype(np.float64)


def _encode_array(arr: np.ndarray) -> list[Any] | dict[str, Any]:
    if arr.ndim == 1 and arr.size >= _PACK_MIN:
        return _pack(arr)
    if arr.dtype.kind in "iu":
        return arr.tolist()
    return [json_float(v) for v in arr.tolist()]


_SPECIAL = NONFINITE


def _decode_array(values: Sequence[Any] | Mapping[str, Any], name: str = "array") -> np.ndarray:
    """A JSON list of numbers (``null``/``"NaN"``/``"Infinity"`` allowed) or a packed array, as numpy.

    Raises:
        ValueError: anything else in the list (a nested list, a dict, a bool, other strings).
    """
    if isinstance(values, Mapping):
        return _unpack(values)
    if all(type(v) is int for v in values):
        try:
            return np.asarray(values, dtype=np.int64)
        except OverflowError:
            raise ValueError(f"`{name}` holds an integer too large for int64") from None
    out = np.empty(len(values), dtype=np.float64)
    for i, v in enumerate(values):
        if v is None:
            out[i] = math.nan
        elif type(v) in (int, float):
            out[i] = v
        elif isinstance(v, str) and v in _SPECIAL:
            out[i] = _SPECIAL[v]
        else:
            raise ValueError(f"`{name}`[{i}] is {type(v).__name__} {str(v)[:40]!r}, not a number")
    return out


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


def _check_regular(path: Path) -> None:
    """Refuse FIFOs, devices and sockets before opening them: reading one can hang or never end."""
    mode = path.stat().st_mode  # follows symlinks: a link to /dev/zero is a device
    if not stat.S_ISREG(mode):
        raise ValueError(f"{path} is not a regular file (a FIFO, device or socket?); refusing to read it")


def _atomic_write(path: Path, text: str) -> None:
    # Write then rename, so a crash mid-write never leaves a truncated history behind.
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
