"""Gradient noise scale (GNS) estimators, Lightning-free.

The gradient noise scale ``B_simple = tr(Σ) / |G|²`` (McCandlish et al. 2018, https://arxiv.org/abs/1812.06162,
App. A.1) compares the per-example gradient covariance ``Σ`` with the squared norm of the true gradient ``G``.
For a mean gradient ``g_B`` of ``B`` i.i.d. examples, ``E|g_B|² = |G|² + tr(Σ)/B``, so squared norms measured at
two batch sizes ``B_s < B_b`` give unbiased estimates of both terms:

* ``|G|² ≈ (B_b·|g_Bb|² − B_s·|g_Bs|²) / (B_b − B_s)``
* ``tr(Σ) ≈ (|g_Bs|² − |g_Bb|²) / (1/B_s − 1/B_b)``

With ``K`` equal small batches of size ``b`` whose mean is the big batch (``B_b = K·b``), "small" is the **mean of
the K squared norms** and "big" the **squared norm of their mean**.

Single-step estimates are very noisy (``|G|²`` is often negative), so :class:`GNSEstimator` keeps separate
bias-corrected exponential moving averages of ``|G|²`` and ``tr(Σ)`` and takes their ratio only when read; an
average of per-step ratios is biased. Everything stays on the device of the inputs: an update never synchronises
with the host, and non-finite steps are masked out with :func:`torch.where` rather than branched on.
"""

from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass
from typing import Any, Optional, Union

import numpy as np
import torch
from torch import Tensor

from lightning_scaling.history import AppendArray
from lightning_scaling.warnings import DataWarning

__all__ = [
    "GNSEstimator",
    "GNSReading",
    "b_simple_linear_regression",
    "unbiased_from_k_batches",
    "unbiased_from_two_sizes",
]

Number = Union[float, int, Tensor]

# Raw per-step columns kept by GNSEstimator (see GNSEstimator.raw()).
_RAW_COLUMNS = ("small_sq_norm", "big_sq_norm", "b_small", "b_big", "grad_sq_norm", "trace_sigma")


def unbiased_from_two_sizes(
    small_sq_norm: Number, big_sq_norm: Number, *, b_small: float, b_big: float
) -> tuple[Number, Number]:
    """Unbiased estimates of ``|G|²`` and ``tr(Σ)`` from squared gradient norms at two batch sizes.

    Args:
        small_sq_norm: ``|g_Bs|²``, the squared norm of a mean gradient over ``b_small`` examples (or the mean of
            several such squared norms).
        big_sq_norm: ``|g_Bb|²``, the squared norm of a mean gradient over ``b_big`` examples, at the same
            parameters.
        b_small: Examples per small batch (samples, e.g. sequences; not tokens).
        b_big: Examples in the big batch; must be larger than ``b_small``.

    Returns:
        ``(grad_sq_norm, trace_sigma)``, of the same kind (float or tensor) as the inputs.

    Raises:
        ValueError: If ``b_small <= 0`` or ``b_big <= b_small``.

    Example::

        >>> unbiased_from_two_sizes(3.0, 1.5, b_small=1, b_big=3)
        (0.75, 2.25)
    """
    b_small, b_big = float(b_small), float(b_big)
    if not b_small > 0:
        raise ValueError(f"`b_small` must be positive, got {b_small}.")
    if not b_big > b_small:
        raise ValueError(
            f"`b_big` must exceed `b_small` (got b_small={b_small}, b_big={b_big}); with one batch size the noise"
            " scale is not identifiable."
        )
    grad_sq = (b_big * big_sq_norm - b_small * small_sq_norm) / (b_big - b_small)
    trace = (small_sq_norm - big_sq_norm) * (b_small * b_big / (b_big - b_small))  # = (…)/(1/B_s − 1/B_b)
    return grad_sq, trace


def unbiased_from_k_batches(
    small_mean_sq_norm: Number, big_sq_norm: Number, *, k: int, b: float
) -> tuple[Number, Number]:
    """Unbiased ``|G|²`` and ``tr(Σ)`` from ``k`` equal small batches of ``b`` examples each.

    ``|G|² = (k·big − small)/(k − 1)`` and ``tr(Σ) = k·b·(small − big)/(k − 1)``: the two-size form with
    ``B_s = b`` and ``B_b = k·b``. With ``b = 1`` these are the Bessel-corrected per-example statistics.

    Args:
        small_mean_sq_norm: Mean over the ``k`` small batches of their squared mean-gradient norms.
        big_sq_norm: Squared norm of the mean of the ``k`` small-batch gradients.
        k: Number of small batches (``>= 2``).
        b: Examples per small batch.

    Returns:
        ``(grad_sq_norm, trace_sigma)``.

    Raises:
        ValueError: If ``k < 2`` or ``b <= 0``.

    Example::

        >>> unbiased_from_k_batches(3.0, 1.5, k=3, b=1)
        (0.75, 2.25)
    """
    if int(k) != k or k < 2:
        raise ValueError(f"`k` must be an integer >= 2 (one small batch gives 0/0), got {k}.")
    return unbiased_from_two_sizes(small_mean_sq_norm, big_sq_norm, b_small=b, b_big=k * b)


def b_simple_linear_regression(*, d: int, noise_std: float, delta_sq_norm: float) -> float:
    """Analytic ``B_simple`` of least squares ``y = x·w* + ε`` at fixed weights ``w``, ``x ~ N(0, I_d)``.

    With ``δ = w − w*`` and per-example loss ``½(x·w − y)²``: ``|G|² = |δ|²`` and
    ``tr(Σ) = (d+1)|δ|² + d·s²``, so ``B_simple = (d + 1) + d·s²/|δ|²``. Used as ground truth in tests.

    Args:
        d: Input dimension.
        noise_std: Label noise standard deviation ``s``.
        delta_sq_norm: ``|w − w*|²`` (must be positive).

    Returns:
        The analytic ``B_simple``.

    Raises:
        ValueError: If ``delta_sq_norm <= 0``.

    Example::

        >>> b_simple_linear_regression(d=16, noise_std=0.5, delta_sq_norm=1.0)
        21.0
    """
    if not delta_sq_norm > 0:
        raise ValueError(f"`delta_sq_norm` must be positive, got {delta_sq_norm}.")
    return (d + 1) + d * noise_std**2 / delta_sq_norm


@dataclass(frozen=True)
class GNSReading:
    """One read-out of a :class:`GNSEstimator` (host floats).

    Attributes:
        grad_sq_norm: Bias-corrected EMA of the ``|G|²`` estimates.
        trace_sigma: Bias-corrected EMA of the ``tr(Σ)`` estimates.
        b_simple: ``trace_sigma / grad_sq_norm`` in samples; ``nan`` until an estimate exists, ``inf`` when the
            smoothed ``|G|²`` is not positive (noise dominates: the batch is far below the noise scale).
        b_simple_tokens: ``b_simple × tokens_per_sample``; ``nan`` when tokens per sample is unknown.
        stderr: Delta-method standard error of ``b_simple`` from the EMA-weighted variances and covariance of the
            per-step estimates (assumes the per-step estimates are independent, i.e. slowly drifting weights).
        ci_low: Lower end of the ~95% band (``b_simple − 1.96·stderr``, clamped at 0).
        ci_high: Upper end of the ~95% band.
        n_steps: Finite steps that entered the EMAs.
        n_skipped: Steps skipped because a squared norm was not finite.
        n_effective: Effective number of steps behind the EMA, ``(Σw)²/Σw²``.
        b_big: Big-batch size (samples) of the most recent update; ``nan`` before the first update.
    """

    grad_sq_norm: float
    trace_sigma: float
    b_simple: float
    b_simple_tokens: float
    stderr: float
    ci_low: float
    ci_high: float
    n_steps: int
    n_skipped: int
    n_effective: float
    b_big: float


class GNSEstimator:
    """Streaming gradient-noise-scale estimator with separate bias-corrected EMAs of ``|G|²`` and ``tr(Σ)``.

    Feed it, once per optimizer step, the small- and big-batch squared gradient norms (device tensors are fine:
    :meth:`update` never synchronises with the host). Read :meth:`read` (one host sync) at log intervals only.

    * Non-finite steps (inf/NaN from an AMP overflow) are masked with :func:`torch.where` and counted.
    * The EMAs are bias corrected by ``1 − β^n`` with ``n`` the number of *finite* steps.
    * The standard error uses EMA-weighted second moments of the per-step estimates (delta method on the ratio).
    * The raw per-step statistics are buffered on the device and moved to the host in chunks, so later fits can
      re-smooth them (:meth:`raw`).
    * ``b_big == b_small`` (one small batch, ``K = 1``) gives no estimate: warned once, counted, no division.

    Args:
        ema_decay: EMA decay ``β`` per update, in ``[0, 1)``. ``0`` keeps only the last step.
        tokens_per_sample: Tokens per sample (sequence length) for ``b_simple_tokens``; ``None`` if unknown.
        z: Normal quantile for the confidence band (1.96 gives ~95%).
        buffer_size: Rows of raw statistics buffered on the device before one copy to the host.
        keep_raw: Keep the raw per-step statistics.
        max_raw: Most raw rows kept (``None``: unbounded). Past it the raw record is decimated: every other
            kept row is dropped and from then on only every ``raw_stride``-th step is kept, so a 1M-step run
            holds at most ``max_raw`` evenly spaced exact rows (~5.6 MB at the default) instead of growing
            without bound. The EMAs always use every step.

    Raises:
        ValueError: On out-of-range arguments.

    Example::

        >>> est = GNSEstimator(ema_decay=0.9)
        >>> # K = 4 micro-batches of 8 examples: mean of the 4 squared norms, squared norm of their mean
        >>> est.update(torch.tensor(3.0), torch.tensor(1.5), b_small=8, b_big=32)
        >>> r = est.read()
        >>> round(r.grad_sq_norm, 6), round(r.trace_sigma, 6), round(r.b_simple, 6)
        (1.0, 16.0, 16.0)
    """

    def __init__(
        self,
        *,
        ema_decay: float = 0.99,
        tokens_per_sample: Optional[float] = None,
        z: float = 1.96,
        buffer_size: int = 256,
        keep_raw: bool = True,
        max_raw: Optional[int] = 100_000,
    ) -> None:
        if not (isinstance(ema_decay, numbers.Real) and 0.0 <= ema_decay < 1.0):
            raise ValueError(f"`ema_decay` must be in [0, 1), got {ema_decay!r}.")
        if tokens_per_sample is not None and not tokens_per_sample > 0:
            raise ValueError(f"`tokens_per_sample` must be positive or None, got {tokens_per_sample}.")
        if not z > 0:
            raise ValueError(f"`z` must be positive, got {z}.")
        if int(buffer_size) != buffer_size or buffer_size < 1:
            raise ValueError(f"`buffer_size` must be a positive integer, got {buffer_size}.")
        if max_raw is not None and (int(max_raw) != max_raw or max_raw < 2):
            raise ValueError(f"`max_raw` must be an integer >= 2 or None, got {max_raw}.")
        self.ema_decay = float(ema_decay)
        self.tokens_per_sample = None if tokens_per_sample is None else float(tokens_per_sample)
        self.z = float(z)
        self.buffer_size = int(buffer_size)
        self.keep_raw = bool(keep_raw)
        self.max_raw = None if max_raw is None else int(max_raw)
        self.raw_stride = 1  # keep raw rows of every raw_stride-th update (grows by 2 at each decimation)
        self._raw_seen = 0  # raw rows ever flushed
        self.n_no_estimate = 0  # updates with a single batch size (K = 1): host counter, known without a sync
        self._warned_k1 = False
        self._last_b_big = float("nan")
        self._device: Optional[torch.device] = None
        self._state: Optional[Tensor] = None  # see _STATE_FIELDS
        self._buf: Optional[Tensor] = None
        self._buf_steps: list[int] = []
        self._buf_len = 0
        self._raw_host = AppendArray(np.float64, width=len(_RAW_COLUMNS))
        self._raw_steps = AppendArray(np.int64)
        self._n_updates = 0

    # Device state vector: EMA numerators (weights sum to 1 − β^n, so dividing by w_sum bias-corrects them).
    _STATE_FIELDS = ("w_sum", "w2_sum", "g", "s", "gg", "ss", "gs", "n_steps", "n_skipped")

    # ------------------------------------------------------------------ internals
    def _dtype(self, device: torch.device) -> torch.dtype:
        # float64 keeps long EMAs exact; MPS has no float64.
        return torch.float32 if device.type == "mps" else torch.float64

    def _ensure_state(self, device: torch.device) -> None:
        if self._state is not None and self._state.device == device and self._buf is not None:
            return
        dtype = self._dtype(device)
        if self._state is None:
            self._state = torch.zeros(len(self._STATE_FIELDS), dtype=dtype, device=device)
        elif self._state.device == device and self._state.dtype == dtype:
            pass
        else:  # moved between devices (e.g. restored on CPU, trained on GPU)
            self._state = self._state.to(device=device, dtype=dtype)
        if self._buf is not None and self._buf_len:
            self._flush()
        self._buf = torch.empty(self.buffer_size, len(_RAW_COLUMNS), dtype=dtype, device=device)
        self._buf_len = 0
        self._device = device

    def _update_constants(self, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        """(coef, add, skip) of the state update, built once per device: fields c·x + add, skipped: x + skip."""
        key = (dtype, device, self.ema_decay)
        cached = self.__dict__.get("_constants")
        if cached is None or cached[0] != key:
            beta, a = self.ema_decay, 1.0 - self.ema_decay
            coef = [beta, beta * beta, beta, beta, beta, beta, beta, 1.0, 1.0]
            add = [a, a * a, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0]
            skip = [0.0] * 8 + [1.0]
            # Built on the host and copied once: the only host-to-device copy, at the first update.
            cached = self._constants = (key, *(torch.tensor(v, dtype=dtype).to(device) for v in (coef, add, skip)))
        return cached[1], cached[2], cached[3]

    def _flush(self) -> None:
        if self._buf is None or self._buf_len == 0:
            return
        rows = self._buf[: self._buf_len].detach().to("cpu", torch.float64).numpy()  # one host sync per chunk
        self._append_raw(rows, np.asarray(self._buf_steps, dtype=np.int64))
        self._buf_steps = []
        self._buf_len = 0

    def _append_raw(self, rows: np.ndarray, steps: np.ndarray) -> None:
        """Keep the rows of every ``raw_stride``-th update; halve the record when it outgrows ``max_raw``."""
        keep = (self._raw_seen + np.arange(len(steps))) % self.raw_stride == 0
        self._raw_seen += len(steps)
        self._raw_host.extend(rows[keep])
        self._raw_steps.extend(steps[keep])
        while self.max_raw is not None and len(self._raw_steps) > self.max_raw:
            # Kept rows are the updates 0, k, 2k, ...: every other one leaves 0, 2k, 4k, ... (evenly spaced).
            kept_rows, kept_steps = self._raw_host.view()[::2], self._raw_steps.view()[::2]
            self._raw_host = AppendArray(np.float64, width=len(_RAW_COLUMNS), values=kept_rows)
            self._raw_steps = AppendArray(np.int64, values=kept_steps)
            self.raw_stride *= 2

    # ------------------------------------------------------------------ public API
    def update(
        self,
        small_sq_norm: Number,
        big_sq_norm: Number,
        *,
        b_small: float,
        b_big: float,
        step: Optional[int] = None,
    ) -> None:
        """Add one step's squared norms (no host synchronisation).

        Args:
            small_sq_norm: Mean squared norm of the small-batch mean gradients (mean over the small batches).
            big_sq_norm: Squared norm of the big-batch mean gradient (the mean of the small ones).
            b_small: Examples per small batch (host number).
            b_big: Examples in the big batch (host number). ``b_big == b_small`` gives no estimate (warned once).
            step: Optional step label for the raw statistics (defaults to the update count).

        Raises:
            ValueError: If ``b_small <= 0`` or ``b_big < b_small``.
        """
        b_small, b_big = float(b_small), float(b_big)
        if not b_small > 0 or b_big < b_small:
            raise ValueError(f"Need 0 < b_small <= b_big, got b_small={b_small}, b_big={b_big}.")
        step = self._n_updates if step is None else int(step)
        self._n_updates += 1
        if b_big == b_small:
            self.n_no_estimate += 1
            if not self._warned_k1:
                self._warned_k1 = True
                warnings.warn(
                    "GNS: the small and big batches have the same size (K = 1), so the gradient noise scale is not"
                    " identifiable (0/0); no estimate is made for such steps. Use accumulation >= 2, several"
                    " devices or per-example norms.",
                    DataWarning,
                    stacklevel=2,
                )
            return
        device = small_sq_norm.device if isinstance(small_sq_norm, Tensor) else torch.device("cpu")
        self._ensure_state(device)
        dtype = self._state.dtype
        small = torch.as_tensor(small_sq_norm, device=device).to(dtype)
        big = torch.as_tensor(big_sq_norm, device=device).to(dtype)
        g, s = unbiased_from_two_sizes(small, big, b_small=b_small, b_big=b_big)
        gs = torch.stack([g, s])
        ok = torch.isfinite(gs).all()
        gs = torch.where(ok, gs, 0.0)
        # Every field is c·field + add (see _STATE_FIELDS): a handful of kernels per step instead of one per field,
        # which is most of the cost on a small model. A non-finite step only counts as skipped.
        coef, add, skip = self._update_constants(dtype, device)
        moments = torch.cat([gs, gs * gs, (gs[0] * gs[1]).reshape(1)])  # g, s, g², s², g·s
        add = torch.cat([add[:2], (1.0 - self.ema_decay) * moments, add[7:]])
        self._state = torch.where(ok, torch.addcmul(add, coef, self._state), self._state + skip)
        self._last_b_big = b_big
        if self.keep_raw:
            # torch.full is a fill kernel; new_tensor(python_float) would be a host-to-device copy (a sync).
            bs = torch.full((), b_small, dtype=dtype, device=device)
            bb = torch.full((), b_big, dtype=dtype, device=device)
            torch.stack([small, big, bs, bb, g, s], out=self._buf[self._buf_len])
            self._buf_steps.append(step)
            self._buf_len += 1
            if self._buf_len == self.buffer_size:
                self._flush()

    def reset(self) -> None:
        """Forget all state (EMAs, counts and raw statistics)."""
        self.__init__(
            ema_decay=self.ema_decay,
            tokens_per_sample=self.tokens_per_sample,
            z=self.z,
            buffer_size=self.buffer_size,
            keep_raw=self.keep_raw,
            max_raw=self.max_raw,
        )

    def state_tensors(self) -> Optional[Tensor]:
        """The device state vector (fields in ``GNSEstimator._STATE_FIELDS``), or ``None`` before any update."""
        return self._state

    def read(self, *, tokens_per_sample: Optional[float] = None) -> GNSReading:
        """Bias-corrected smoothed estimates, ``B_simple`` and its confidence band (one host sync).

        Args:
            tokens_per_sample: Overrides the constructor's value for ``b_simple_tokens``.

        Returns:
            A :class:`GNSReading` of host floats.
        """
        tps = self.tokens_per_sample if tokens_per_sample is None else float(tokens_per_sample)
        nan = float("nan")
        if self._state is None:
            return GNSReading(nan, nan, nan, nan, nan, nan, nan, 0, 0, 0.0, self._last_b_big)
        w_sum, w2_sum, eg, es, egg, ess, egs, n_steps, n_skipped = self._state.tolist()
        n_steps, n_skipped = int(round(n_steps)), int(round(n_skipped))
        if n_steps == 0 or w_sum <= 0:
            return GNSReading(nan, nan, nan, nan, nan, nan, nan, 0, n_skipped, 0.0, self._last_b_big)
        g, s = eg / w_sum, es / w_sum
        n_eff = w_sum * w_sum / w2_sum
        if g > 0:
            b = s / g
        else:  # clamp only on read: noise dominates the signal
            b = math.inf if s > 0 else nan
        # Delta method on s/g with weighted (co)variances; variance of a weighted mean = var / n_eff.
        var_g = max(egg / w_sum - g * g, 0.0)
        var_s = max(ess / w_sum - s * s, 0.0)
        cov = egs / w_sum - g * s
        if n_eff > 1:  # small-sample correction of the weighted variances
            corr = n_eff / (n_eff - 1)
            var_g, var_s, cov = var_g * corr, var_s * corr, cov * corr
        if g > 0 and n_steps >= 2 and math.isfinite(b):
            var_b = (var_s - 2.0 * b * cov + b * b * var_g) / (g * g) / n_eff
            se = math.sqrt(max(var_b, 0.0))
            lo, hi = max(b - self.z * se, 0.0), b + self.z * se
        else:
            se, lo, hi = nan, nan, nan
        b_tok = b * tps if tps is not None else nan
        return GNSReading(
            grad_sq_norm=g,
            trace_sigma=s,
            b_simple=b,
            b_simple_tokens=b_tok,
            stderr=se,
            ci_low=lo,
            ci_high=hi,
            n_steps=n_steps,
            n_skipped=n_skipped,
            n_effective=n_eff,
            b_big=self._last_b_big,
        )

    def raw(self) -> dict[str, list]:
        """The raw per-step statistics (flushes the device buffer: one host sync).

        Returns:
            A dict of equal-length lists: ``step`` and the columns ``small_sq_norm``, ``big_sq_norm``, ``b_small``,
            ``b_big``, ``grad_sq_norm``, ``trace_sigma`` (the per-step unbiased estimates; non-finite steps are
            kept as they came, with inf/NaN).
        """
        self._flush()
        out: dict[str, list] = {"step": self._raw_steps.view().tolist()}
        rows = self._raw_host.view()
        for j, name in enumerate(_RAW_COLUMNS):
            out[name] = rows[:, j].tolist()
        return out

    def state_dict(self) -> dict[str, Any]:
        """Plain Python / CPU-tensor state, safe for ``torch.load(weights_only=True)``."""
        self._flush()
        state = None if self._state is None else [float(v) for v in self._state.tolist()]
        return {
            "version": 1,
            "ema_decay": self.ema_decay,
            "state": state,
            "n_no_estimate": self.n_no_estimate,
            "n_updates": self._n_updates,
            "last_b_big": self._last_b_big,
            "raw_steps": torch.from_numpy(self._raw_steps.view().copy()),
            "raw": torch.from_numpy(self._raw_host.view().copy()),
            "raw_stride": self.raw_stride,
            "raw_seen": self._raw_seen,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`; the state moves to the device of the next update."""
        if "ema_decay" in state_dict and state_dict["ema_decay"] != self.ema_decay:
            warnings.warn(
                f"GNS: restoring EMAs computed with ema_decay={state_dict['ema_decay']} into an estimator with"
                f" ema_decay={self.ema_decay}; the restored averages keep their old weights.",
                DataWarning,
                stacklevel=2,
            )
        state = state_dict.get("state")
        self._state = None if state is None else torch.tensor(state, dtype=torch.float64)
        self._device = None
        self._buf = None
        self._buf_len = 0
        self._buf_steps = []
        self.n_no_estimate = int(state_dict.get("n_no_estimate", 0))
        self._n_updates = int(state_dict.get("n_updates", 0))
        self._last_b_big = float(state_dict.get("last_b_big", float("nan")))
        raw = state_dict.get("raw")
        steps = state_dict.get("raw_steps")
        self._raw_host = AppendArray(np.float64, width=len(_RAW_COLUMNS))
        self._raw_steps = AppendArray(np.int64)
        if raw is not None and steps is not None:
            self._raw_host.extend(torch.as_tensor(raw, dtype=torch.float64).reshape(-1, len(_RAW_COLUMNS)).numpy())
            self._raw_steps.extend(torch.as_tensor(steps, dtype=torch.int64).numpy())
        self.raw_stride = int(state_dict.get("raw_stride", 1))
        self._raw_seen = int(state_dict.get("raw_seen", len(self._raw_steps)))
