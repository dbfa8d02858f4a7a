"""Core numerics shared by every layer: one home for each small helper (no Lightning, torch imported lazily).

The package's layers, each importing only from the ones below it: core (``history``, ``laws``, ``numerics``,
``warnings``) -> maths (``fitting``, ``forecast``, ``gns``, ``backtest``, ``stopping``) -> ``report/`` and
``study/`` -> ``callbacks/`` -> the study runner (``study.run``), ``cli`` and ``demo/``.

Example::

    >>> import json, math
    >>> json.loads(dumps({"a": math.nan, "b": np.float32(1.5), "c": np.arange(2)}))
    {'a': 'NaN', 'b': 1.5, 'c': [0, 1]}
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

__all__ = [
    "BatchSizeError",
    "count_non_embedding_params",
    "dumps",
    "first_crossing",
    "huber",
    "infer_batch_size",
    "json_float",
    "model_n_params",
    "one_blas_thread",
    "percentile_band",
    "smooth",
    "to_jsonable",
    "warmup_steps",
]

# ----------------------------------------------------------------------------------------------------------------
# JSON: one convention for history.json, report.json, prediction.json and forecast/latest.json
# ----------------------------------------------------------------------------------------------------------------
#: Non-finite floats are written as these strings (strict JSON has no NaN; JavaScript's names read back clearly).
NONFINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def json_float(v: float) -> float | str:
    """A float as strict JSON allows it: finite as is, else ``"NaN"``, ``"Infinity"`` or ``"-Infinity"``.

    Example::

        >>> json_float(1.5), json_float(float("nan")), json_float(-float("inf"))
        (1.5, 'NaN', '-Infinity')
    """
    v = float(v)
    if math.isfinite(v):
        return v
    return "NaN" if math.isnan(v) else ("Infinity" if v > 0 else "-Infinity")


def to_jsonable(obj: Any) -> Any:
    """Plain JSON values for numpy scalars and arrays, paths, tuples and non-finite floats (see :func:`json_float`).

    Mapping keys become strings; anything else unknown becomes its ``str`` (a result never fails to be written).

    Example::

        >>> from pathlib import Path
        >>> to_jsonable({1: (np.int64(2), Path("a")), "x": [np.inf]})
        {'1': [2, 'a'], 'x': ['Infinity']}
    """
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return to_jsonable(obj.item())
    if isinstance(obj, bool) or obj is None or isinstance(obj, (str, int)):
        return obj
    if isinstance(obj, float):
        return json_float(obj)
    return str(obj)


def dumps(obj: Any, **kwargs: Any) -> str:
    """``json.dumps`` of :func:`to_jsonable` ``(obj)``, strict JSON (``allow_nan=False``); kwargs go to ``json``."""
    return json.dumps(to_jsonable(obj), allow_nan=False, **kwargs)


# ----------------------------------------------------------------------------------------------------------------
# Curves
# ----------------------------------------------------------------------------------------------------------------
def smooth(y: np.ndarray, window: int) -> np.ndarray:
    """Centered running mean (edge-corrected), to show the trend under noisy per-step losses.

    Example::

        >>> smooth(np.array([0.0, 3.0, 0.0, 3.0]), 2).tolist()
        [0.0, 1.5, 1.5, 1.5]
    """
    if window <= 1 or len(y) < window:
        return y
    kernel = np.ones(window)
    return np.convolve(y, kernel, mode="same") / np.convolve(np.ones_like(y), kernel, mode="same")


def first_crossing(grid: ArrayLike, curve: ArrayLike, levels: ArrayLike, *, start: float = math.nan) -> np.ndarray:
    """First step at which a non-increasing curve reaches each level (log-linear interpolation; NaN if never).

    Args:
        grid: increasing positive steps of the curve.
        curve: the curve's values on ``grid``.
        levels: loss levels (a scalar gives a 0-d array).
        start: value for a level the curve is already at or below on its first node (``grid[0]`` to count it
            reached there; NaN: the crossing is before the data).

    Example::

        >>> s = np.arange(1.0, 1001.0)
        >>> np.round(first_crossing(s, 1.0 + 100.0 / s, [1.5, 0.5]), 6).tolist()
        [200.0, nan]
    """
    grid, curve = np.asarray(grid, dtype=float), np.asarray(curve, dtype=float)
    levels = np.asarray(levels, dtype=float)
    flat = np.atleast_1d(levels)
    out = np.full(flat.shape, np.nan)
    below = curve[None, :] <= flat[:, None]  # (levels, nodes)
    reached = below.any(axis=1)
    j = np.argmax(below, axis=1)
    out[reached & (j == 0)] = start
    for k in np.flatnonzero(reached & (j > 0)):
        i = j[k]
        y0, y1 = curve[i - 1], curve[i]
        x0, x1 = np.log(grid[i - 1]), np.log(grid[i])
        t = 0.0 if y0 == y1 else (y0 - flat[k]) / (y0 - y1)
        out[k] = math.exp(x0 + t * (x1 - x0))
    return out.reshape(levels.shape)


def warmup_steps(lr: ArrayLike, *, rtol: float = 1e-3) -> int:
    """Length of the initial warmup: the first index where the schedule reaches its peak (within ``rtol``).

    Raises:
        ValueError: the schedule is empty, not finite or negative.

    Example::

        >>> warmup_steps(np.r_[np.linspace(0, 1, 10, endpoint=False), np.ones(5)])
        10
    """
    arr = np.asarray(lr, dtype=np.float64).ravel()
    if arr.size == 0:
        raise ValueError("the learning-rate schedule is empty")
    if not np.all(np.isfinite(arr)) or np.any(arr < 0):
        raise ValueError("the learning-rate schedule must be finite and non-negative")
    peak = arr.max()
    if peak <= 0:
        return 0
    return int(np.argmax(arr >= peak * (1 - rtol)))


def huber(r: ArrayLike, delta: float) -> tuple[np.ndarray, np.ndarray]:
    """Huber loss of residuals ``r`` per element and its derivative: quadratic within ``delta``, linear beyond.

    The one robust loss of the fits (sum ``rho`` for an objective; ``psi`` is d rho / d r).

    Example::

        >>> rho, psi = huber(np.array([0.5, -3.0]), 1.0)
        >>> rho.tolist(), psi.tolist()
        ([0.125, 2.5], [0.5, -1.0])
    """
    r = np.asarray(r, dtype=np.float64)
    a = np.abs(r)
    quad = a <= delta
    rho = np.where(quad, 0.5 * r * r, delta * (a - 0.5 * delta))
    psi = np.where(quad, r, delta * np.sign(r))
    return rho, psi


def percentile_band(samples: ArrayLike, confidence: float, *, axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Central ``confidence`` band of bootstrap samples along ``axis`` (NaN samples ignored).

    Example::

        >>> lo, hi = percentile_band(np.arange(101.0)[:, None], 0.9)
        >>> round(float(lo[0]), 6), round(float(hi[0]), 6)
        (5.0, 95.0)
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"`confidence` must be in (0, 1), got {confidence!r}")
    q = (50.0 * (1.0 - confidence), 50.0 * (1.0 + confidence))
    lo, hi = np.nanpercentile(np.asarray(samples, dtype=float), q, axis=axis)
    return lo, hi


# ----------------------------------------------------------------------------------------------------------------
# Models and batches (torch imported on first use: the core stays light)
# ----------------------------------------------------------------------------------------------------------------
class BatchSizeError(ValueError, TypeError):
    """No tensor in a batch to read the batch size from (a ``ValueError`` and a ``TypeError`` for old callers)."""


def infer_batch_size(batch: Any) -> int:
    """Samples in a micro-batch: the leading dimension of the first tensor found (tensor, sequence or mapping).

    Raises:
        BatchSizeError: no tensor in the batch; pass ``batch_size_fn`` to the callback then.

    Example::

        >>> import torch
        >>> infer_batch_size({"ids": [None, torch.zeros(4, 3)]}), infer_batch_size(torch.tensor(1.0))
        (4, 1)
    """
    import torch

    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.ndim else 1
    items = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (list, tuple)) else ()
    for item in items:
        try:
            return infer_batch_size(item)
        except BatchSizeError:
            continue
    raise BatchSizeError(f"cannot infer the batch size of a {type(batch).__name__}; pass `batch_size_fn=`")


def model_n_params(model: Any) -> float | None:
    """The model's own ``n_params`` attribute when it is a positive number (its declared N), else ``None``.

    Example::

        >>> import types
        >>> model_n_params(types.SimpleNamespace(n_params=98304)), model_n_params(types.SimpleNamespace(n_params=True))
        (98304.0, None)
    """
    n = getattr(model, "n_params", None)
    return float(n) if isinstance(n, (int, float)) and not isinstance(n, bool) and n > 0 else None


def count_non_embedding_params(module: Any) -> int:
    """Trainable parameters excluding those of ``nn.Embedding`` modules (Kaplan et al.'s N); tied weights once.

    Example::

        >>> import torch
        >>> m = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 4))
        >>> count_non_embedding_params(m)
        20
    """
    import torch

    embedding = {id(p) for m in module.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    seen: set[int] = set()
    total = 0
    for p in module.parameters():
        if p.requires_grad and id(p) not in embedding and id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


# ----------------------------------------------------------------------------------------------------------------
# BLAS threads
# ----------------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def one_blas_thread() -> Iterator[None]:
    """Run the block with one BLAS thread (restored afterwards); a no-op when ``threadpoolctl`` cannot act.

    L-BFGS-B calls BLAS on 5-7 element vectors; on a busy 2-core machine OpenBLAS thread hand-offs made each call
    ~10x slower, so the fits run single-threaded. ``threadpoolctl`` finds every loaded BLAS (OpenBLAS, MKL, BLIS)
    on every platform, where a hand-written search covered OpenBLAS on Linux only.

    Example::

        >>> with one_blas_thread():
        ...     float(np.ones(3) @ np.ones(3))
        3.0
    """
    try:
        from threadpoolctl import threadpool_limits

        limiter = threadpool_limits(limits=1, user_api="blas")
    except Exception:  # noqa: BLE001 - purely a speed-up; never fail a fit over it
        limiter = None
    try:
        yield
    finally:
        if limiter is not None:
            with contextlib.suppress(Exception):
                limiter.restore_original_limits()
