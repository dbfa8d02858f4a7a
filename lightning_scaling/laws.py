"""Scaling-law formulas (Kaplan et al. 2020, Su et al. 2024, Hoffmann et al. 2022) as vectorised numpy functions.

Every function broadcasts its array arguments and takes the law's constants as keyword-only arguments, so a
fitted parameter dict can be splatted in (``loss_n_smin(n, s, **params)``). Units are whatever the caller uses,
as long as they are consistent: a batch size and a critical batch size must be in the same unit (samples or
tokens), and the compute helpers take ``tokens_per_sample`` to turn ``6 * N * B * S`` into FLOPs.

Notation: N = non-embedding parameters, S = optimizer steps, B = batch size, E = B * S data processed,
L = loss in nats/token, S_min / E_min = steps / data needed in the large / small batch limits
(McCandlish et al. 2018), B_crit(L) = E_min / S_min.

Example::

    >>> import numpy as np
    >>> from lightning_scaling.laws import KAPLAN_2020, loss_n_s_b
    >>> k = KAPLAN_2020
    >>> loss = loss_n_s_b(1e8, [1e3, 1e4, 1e5], 2**19, n_c=k.n_c, alpha_n=k.alpha_n, s_c=k.s_c,
    ...                   alpha_s=k.alpha_s, b_star=k.b_star, alpha_b=k.alpha_b)
    >>> bool(np.all(np.diff(loss) < 0))
    True
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

__all__ = [
    "KAPLAN_2020",
    "KaplanConstants",
    "compute_flops",
    "compute_optimal_allocation",
    "compute_optimal_kaplan_closed_form",
    "critical_batch",
    "e_min",
    "loss_d",
    "loss_n",
    "loss_n_d_chinchilla",
    "loss_n_d_kaplan",
    "loss_n_s_b",
    "loss_n_smin",
    "loss_steps",
    "min_samples_for_loss",
    "min_steps_for_loss",
    "s_min",
    "samples_at_batch",
    "steps_at_batch",
    "steps_for_loss",
]


def _f(x: ArrayLike) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


# ----------------------------------------------------------------------------------------------------------------
# Single-variable and two-variable laws
# ----------------------------------------------------------------------------------------------------------------
def loss_n(n: ArrayLike, *, n_c: float, alpha_n: float) -> np.ndarray:
    """Converged loss of a model with ``n`` non-embedding parameters: ``L(N) = (N_c / N)^alpha_N``.

    Example::

        >>> float(loss_n(8.8e13, n_c=8.8e13, alpha_n=0.076))
        1.0
    """
    return (n_c / _f(n)) ** alpha_n


def loss_d(d: ArrayLike, *, d_c: float, alpha_d: float) -> np.ndarray:
    """Loss of a large model early-stopped after ``d`` tokens: ``L(D) = (D_c / D)^alpha_D``.

    Example::

        >>> float(loss_d(5.4e13, d_c=5.4e13, alpha_d=0.095))
        1.0
    """
    return (d_c / _f(d)) ** alpha_d


def loss_n_d_kaplan(n: ArrayLike, d: ArrayLike, *, n_c: float, alpha_n: float, d_c: float,
                    alpha_d: float) -> np.ndarray:
    """Kaplan's size + data law ``L(N, D) = [(N_c/N)^(alpha_N/alpha_D) + D_c/D]^alpha_D`` (Table 2).

    Example::

        >>> k = KAPLAN_2020
        >>> l_inf = loss_n_d_kaplan(1e9, np.inf, n_c=k.nd_n_c, alpha_n=k.nd_alpha_n, d_c=k.nd_d_c,
        ...                         alpha_d=k.nd_alpha_d)
        >>> bool(np.isclose(l_inf, loss_n(1e9, n_c=k.nd_n_c, alpha_n=k.nd_alpha_n)))
        True
    """
    return ((n_c / _f(n)) ** (alpha_n / alpha_d) + d_c / _f(d)) ** alpha_d


def loss_n_d_chinchilla(n: ArrayLike, d: ArrayLike, *, e: float, a: float, b: float, alpha: float,
                        beta: float) -> np.ndarray:
    """Chinchilla law ``L(N, D) = E + A / N^alpha + B / D^beta`` (Hoffmann et al. 2022, Approach 3).

    Example::

        >>> round(float(loss_n_d_chinchilla(70e9, 1.4e12, e=1.82, a=482.01, b=2085.43, alpha=0.3478,
        ...                                 beta=0.3658)), 3)
        1.977
    """
    return e + a / _f(n) ** alpha + b / _f(d) ** beta


def loss_steps(s: ArrayLike, *, l_inf: float, s_c: float, alpha_s: float) -> np.ndarray:
    """One-run loss curve ``L(S) = L_inf + (S_c / S)^alpha_S`` (the L(N, S_min) law at fixed N and batch).

    ``s <= 0`` gives ``inf``.

    Example::

        >>> float(loss_steps(100.0, l_inf=2.0, s_c=100.0, alpha_s=0.5))
        3.0
    """
    s = _f(s)
    with np.errstate(divide="ignore"):
        return l_inf + np.where(s > 0, s_c / np.where(s > 0, s, 1.0), np.inf) ** alpha_s


def loss_n_smin(n: ArrayLike, s_min: ArrayLike, *, n_c: float, alpha_n: float, s_c: float, alpha_s: float,
                e: float = 0.0) -> np.ndarray:
    """Size + steps law ``L(N, S_min) = E + (N_c/N)^alpha_N + (S_c/S_min)^alpha_S`` (Kaplan Table 3).

    ``e`` is an optional irreducible loss (0 gives Kaplan's form). ``s_min <= 0`` gives ``inf``.

    Example::

        >>> float(loss_n_smin(1.0, 1.0, n_c=1.0, alpha_n=0.1, s_c=1.0, alpha_s=0.7, e=0.5))
        2.5
    """
    return e + loss_n(n, n_c=n_c, alpha_n=alpha_n) + loss_steps(s_min, l_inf=0.0, s_c=s_c, alpha_s=alpha_s)


# ----------------------------------------------------------------------------------------------------------------
# Critical batch size and the S_min / E_min conversions (McCandlish et al. 2018; Kaplan section 5)
# ----------------------------------------------------------------------------------------------------------------
def critical_batch(loss: ArrayLike, *, b_star: float, alpha_b: float, l_plateau: float = 0.0) -> np.ndarray:
    """Critical batch size at loss ``L``: ``B_crit(L) = B_* / max(L, l_plateau)^(1/alpha_B)`` (unit of ``b_star``).

    ``l_plateau`` (default 0: the pure power law) holds B_crit constant below that loss: the critical batch
    plateaus late in training (Merrill et al. 2025), and a power law fitted at a sweep's levels keeps growing
    below them, where a larger model trains.

    Example::

        >>> round(float(critical_batch(2.0, b_star=2.1e8, alpha_b=0.21)) / 1e6, 2)
        7.74
        >>> bool(critical_batch(1.5, b_star=2.1e8, alpha_b=0.21, l_plateau=2.0) == critical_batch(
        ...     2.0, b_star=2.1e8, alpha_b=0.21))
        True
    """
    return b_star / np.maximum(_f(loss), l_plateau) ** (1.0 / alpha_b)


def s_min(steps: ArrayLike, batch: ArrayLike, b_crit: ArrayLike) -> np.ndarray:
    """Steps at an infinite batch equivalent to ``steps`` at ``batch``: ``S / (1 + B_crit / B)``.

    Example::

        >>> float(s_min(200.0, 64.0, 64.0))
        100.0
    """
    return _f(steps) / (1.0 + _f(b_crit) / _f(batch))


def e_min(samples: ArrayLike, batch: ArrayLike, b_crit: ArrayLike) -> np.ndarray:
    """Data at a vanishing batch equivalent to ``samples`` at ``batch``: ``E / (1 + B / B_crit)``.

    Example::

        >>> float(e_min(200.0, 64.0, 64.0))
        100.0
    """
    return _f(samples) / (1.0 + _f(batch) / _f(b_crit))


def steps_at_batch(s_min_: ArrayLike, batch: ArrayLike, b_crit: ArrayLike) -> np.ndarray:
    """Inverse of :func:`s_min`: steps needed at ``batch``, ``S = S_min (1 + B_crit / B)``.

    Example::

        >>> float(steps_at_batch(100.0, 64.0, 64.0))
        200.0
    """
    return _f(s_min_) * (1.0 + _f(b_crit) / _f(batch))


def samples_at_batch(e_min_: ArrayLike, batch: ArrayLike, b_crit: ArrayLike) -> np.ndarray:
    """Inverse of :func:`e_min`: data needed at ``batch``, ``E = E_min (1 + B / B_crit)``.

    Example::

        >>> float(samples_at_batch(100.0, 64.0, 64.0))
        200.0
    """
    return _f(e_min_) * (1.0 + _f(batch) / _f(b_crit))


# ----------------------------------------------------------------------------------------------------------------
# Inverses: steps and data to reach a loss
# ----------------------------------------------------------------------------------------------------------------
def min_steps_for_loss(loss: ArrayLike, n: ArrayLike, *, n_c: float, alpha_n: float, s_c: float,
                       alpha_s: float, e: float = 0.0) -> np.ndarray:
    """``S_min(N, L) = S_c (L - E - (N_c/N)^alpha_N)^(-1/alpha_S)``; ``inf`` where ``L <= L(N)``.

    Example::

        >>> float(min_steps_for_loss(3.0, 1.0, n_c=1.0, alpha_n=0.1, s_c=100.0, alpha_s=1.0))
        50.0
    """
    gap = _f(loss) - e - loss_n(n, n_c=n_c, alpha_n=alpha_n)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(gap > 0, s_c * np.where(gap > 0, gap, 1.0) ** (-1.0 / alpha_s), np.inf)


def min_samples_for_loss(loss: ArrayLike, n: ArrayLike, *, n_c: float, alpha_n: float, s_c: float,
                         alpha_s: float, b_star: float, alpha_b: float, e: float = 0.0,
                         l_plateau: float = 0.0) -> np.ndarray:
    """``E_min(N, L) = B_crit(L) * S_min(N, L)`` in the unit of ``b_star``; ``inf`` where ``L <= L(N)``.

    Example::

        >>> float(min_samples_for_loss(3.0, 1.0, n_c=1.0, alpha_n=0.1, s_c=100.0, alpha_s=1.0, b_star=30.0,
        ...                            alpha_b=1.0))
        500.0
    """
    return critical_batch(loss, b_star=b_star, alpha_b=alpha_b, l_plateau=l_plateau) * min_steps_for_loss(
        loss, n, n_c=n_c, alpha_n=alpha_n, s_c=s_c, alpha_s=alpha_s, e=e)


def steps_for_loss(loss: ArrayLike, n: ArrayLike, batch: ArrayLike, *, n_c: float, alpha_n: float, s_c: float,
                   alpha_s: float, b_star: float, alpha_b: float, e: float = 0.0,
                   l_plateau: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Steps and data to reach ``loss`` at ``batch``: ``S = S_min (1 + B_crit/B)``, ``E = B * S``.

    Explicit (no root finding): the inverse of :func:`loss_n_s_b`. Returns ``(steps, samples)`` in the unit of
    ``batch``; ``inf`` where the loss is below the model's converged loss.

    Example::

        >>> s, d = steps_for_loss(3.0, 1.0, 30.0, n_c=1.0, alpha_n=0.1, s_c=100.0, alpha_s=1.0, b_star=90.0,
        ...                       alpha_b=1.0)
        >>> float(s), float(d)
        (100.0, 3000.0)
    """
    smin = min_steps_for_loss(loss, n, n_c=n_c, alpha_n=alpha_n, s_c=s_c, alpha_s=alpha_s, e=e)
    steps = steps_at_batch(smin, batch, critical_batch(loss, b_star=b_star, alpha_b=alpha_b, l_plateau=l_plateau))
    return steps, steps * _f(batch)


# ----------------------------------------------------------------------------------------------------------------
# L(N, S, B): the implicit trajectory law (Su et al. 2024, function 3)
# ----------------------------------------------------------------------------------------------------------------
def loss_n_s_b(n: ArrayLike, steps: ArrayLike, batch: ArrayLike, *, n_c: float, alpha_n: float, s_c: float,
               alpha_s: float, b_star: float, alpha_b: float, e: float = 0.0, l_plateau: float = 0.0,
               iterations: int = 64) -> np.ndarray:
    """Loss after ``steps`` at batch ``batch``: the root ``L`` of ``L = L(N, S_min(S, B, B_crit(L)))``.

    Solved per point by a vectorised safeguarded Newton iteration (bisection whenever Newton would leave the bracket)
    on ``f(L) = L - E - L_N - (S_c (1 + B_crit(L)/B) / S)^alpha_S``.

    Why the root is unique: ``B_crit(L) = B_*/max(L, l_plateau)^(1/alpha_B)`` does not rise with ``L``, so the
    last term of ``f`` does not rise and ``f`` is strictly increasing in ``L``. The bracket ``[lo, hi]`` with
    ``lo = E + L_N + (S_c/S)^alpha_S`` (``B_crit -> 0``) and ``hi = E + L_N + (S_c (1 + B_crit(E + L_N)/B)/S)^alpha_S``
    (``B_crit`` at its largest value, since any root exceeds ``E + L_N``) has ``f(lo) < 0 <= f(hi)``, so the
    bracketed iteration always converges to the root (to machine precision, typically in < 10 iterations).

    Args:
        n: non-embedding parameters.
        steps: optimizer steps (``<= 0`` gives ``inf``).
        batch: batch size, same unit as ``b_star``.
        n_c, alpha_n, s_c, alpha_s, b_star, alpha_b, e: law constants (``e`` = irreducible loss, default 0).
        l_plateau: loss below which B_crit is held constant (:func:`critical_batch`; 0: the pure power law).
        iterations: maximum Newton/bisection iterations (typically < 10 are used).

    Returns:
        The broadcast array of losses.

    Example::

        >>> k = KAPLAN_2020
        >>> loss = loss_n_s_b(1e8, 1e4, 2**19, **k.n_s_b_kwargs())
        >>> s, _ = steps_for_loss(loss, 1e8, 2**19, **k.n_s_b_kwargs())
        >>> bool(np.isclose(s, 1e4))
        True
    """
    n, steps, batch = np.broadcast_arrays(_f(n), _f(steps), _f(batch))
    l_floor = e + loss_n(n, n_c=n_c, alpha_n=alpha_n)
    pos = steps > 0
    s_safe = np.where(pos, steps, 1.0)
    inv_ab = 1.0 / alpha_b
    bc_max = critical_batch(l_floor, b_star=b_star, alpha_b=alpha_b, l_plateau=l_plateau)
    lo = l_floor + (s_c / s_safe) ** alpha_s
    hi = l_floor + (s_c * (1.0 + bc_max / batch) / s_safe) ** alpha_s
    # Iterate on u = log(L - L_floor): g(u) = u - alpha_S log(S_c (1 + rho(L)) / S), rho = B_crit(L)/B, is close to
    # linear in u in both limits (rho << 1 and rho >> 1), so Newton converges in a few steps from anywhere.
    # g' = 1 + alpha_S rho/(1+rho) (L - L_floor)/(alpha_B L) >= 1; steps leaving the bracket fall back to bisection.
    ulo, uhi = np.log(lo - l_floor), np.log(hi - l_floor)
    u = ulo.copy()
    log_sc_s = np.log(s_c / s_safe)
    last_step = np.full(u.shape, np.inf)
    for _ in range(iterations):
        d = np.exp(u)
        x = l_floor + d
        rho = b_star * np.maximum(x, l_plateau) ** -inv_ab / batch
        g = u - alpha_s * (log_sc_s + np.log1p(rho))
        up = g > 0
        uhi = np.where(up, u, uhi)
        ulo = np.where(up, ulo, u)
        slope = np.where(x > l_plateau, alpha_s * (rho / (1.0 + rho)) * inv_ab * d / x, 0.0)  # flat on the plateau
        u_new = u - g / (1.0 + slope)
        step = np.abs(u_new - u)
        tiny = step <= 1e-15 * np.maximum(1.0, np.abs(u))
        # Keep Newton where it lands strictly inside the bracket (landing on an end could cycle) and converges fast
        # (each step < 0.3x the last); elsewhere bisect, so extreme exponents cannot stall it.
        newton = ((u_new > ulo) & (u_new < uhi) & (step < 0.3 * last_step)) | tiny
        u_new = np.where(newton, u_new, 0.5 * (ulo + uhi))
        last_step = np.where(newton, step, np.inf)
        done = bool(np.all(tiny))
        u = u_new
        if done:
            break
    x = l_floor + np.exp(u)
    return np.where(pos, x, np.inf)


# ----------------------------------------------------------------------------------------------------------------
# Compute and the compute-optimal allocation (Kaplan App. B)
# ----------------------------------------------------------------------------------------------------------------
def compute_flops(n: ArrayLike, batch: ArrayLike, steps: ArrayLike, *, tokens_per_sample: float = 1.0) -> np.ndarray:
    """Training compute ``C = 6 N B S`` FLOPs, with ``B`` in samples times ``tokens_per_sample``.

    Drops the attention-context term (matters when ``n_ctx >~ 12 d_model``).

    Example::

        >>> float(compute_flops(1e6, 8, 100, tokens_per_sample=128))
        614400000000.0
    """
    return 6.0 * _f(n) * _f(batch) * tokens_per_sample * _f(steps)


def compute_optimal_kaplan_closed_form(c_min: ArrayLike, *, n_c: float, alpha_n: float, s_c: float, alpha_s: float,
                                       b_star: float, alpha_b: float) -> dict[str, np.ndarray]:
    """Kaplan App. B closed forms for the compute-efficient frontier (``e = 0``; ``b_star`` in tokens).

    ``c_min = 6 N E_min`` FLOPs (Kaplan's C_min). Returns ``n``, ``s_min``, ``loss``, ``b_crit`` (tokens),
    ``e_min`` (tokens), ``c_c`` and ``alpha_c``.

    Example::

        >>> k = KAPLAN_2020
        >>> out = compute_optimal_kaplan_closed_form(8.64e19, **k.n_s_b_kwargs())
        >>> round(float(out["alpha_c"]), 3)
        0.052
    """
    c_min = _f(c_min)
    r = alpha_n / alpha_s
    alpha_c = 1.0 / (1.0 / alpha_s + 1.0 / alpha_b + 1.0 / alpha_n)
    c_c = 6.0 * n_c * b_star * s_c * (1 + r) ** (1 / alpha_s + 1 / alpha_n) * (1 / r) ** (1 / alpha_s)
    n = n_c * (c_min / c_c) ** (alpha_c / alpha_n) * (1 + r) ** (1 / alpha_n)
    smin = c_c / (6.0 * n_c * b_star) * (1 + r) ** (-1 / alpha_n) * (c_min / c_c) ** (alpha_c / alpha_s)
    loss = (c_c / c_min) ** alpha_c
    b_crit = critical_batch(loss, b_star=b_star, alpha_b=alpha_b)
    return {"n": n, "s_min": smin, "loss": loss, "b_crit": b_crit, "e_min": b_crit * smin,
            "c_c": np.float64(c_c), "alpha_c": np.float64(alpha_c)}


def compute_optimal_allocation(c_min: ArrayLike, *, n_c: float, alpha_n: float, s_c: float, alpha_s: float,
                               b_star: float, alpha_b: float, e: float = 0.0, tokens_per_sample: float = 1.0,
                               l_plateau: float = 0.0, iterations: int = 200) -> dict[str, np.ndarray]:
    """Compute-efficient allocation for a minimal compute ``c_min = 6 N E_min`` FLOPs, any irreducible ``e``.

    At a fixed target loss ``L`` the cost ``C_min = 6 N B_crit(L) S_min(N, L)`` is minimised over ``N`` where the
    reducible size term is ``(L - e) / (1 + alpha_N/alpha_S)`` (Kaplan: stop ~``alpha_N/alpha_S`` above the converged
    loss). Along this optimum ``C_min(L)`` is strictly decreasing in ``L`` (N, B_crit and S_min all fall), so the
    loss for a budget is the unique root, found by bisection in log space (``l_plateau``: B_crit held below
    that loss, see :func:`critical_batch`; the cost still falls with ``L``). With ``e = 0`` this reproduces
    :func:`compute_optimal_kaplan_closed_form` exactly.

    Returns ``n``, ``loss``, ``s_min``, ``b_crit`` and ``e_min`` (unit of ``b_star``). Training at ``B = B_crit``
    then takes ``2 S_min`` steps, ``2 E_min`` data and ``2 C_min`` compute.

    Example::

        >>> k = KAPLAN_2020
        >>> num = compute_optimal_allocation(8.64e19, **k.n_s_b_kwargs())
        >>> ref = compute_optimal_kaplan_closed_form(8.64e19, **k.n_s_b_kwargs())
        >>> bool(np.isclose(num["n"], ref["n"], rtol=1e-6))
        True
    """
    c_min = _f(c_min)
    r = alpha_n / alpha_s

    def parts(loss: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        x = (loss - e) / (1.0 + r)  # optimal reducible size term
        n = n_c * x ** (-1.0 / alpha_n)
        smin = s_c * (loss - e - x) ** (-1.0 / alpha_s)
        return n, smin, critical_batch(loss, b_star=b_star, alpha_b=alpha_b, l_plateau=l_plateau)

    def log_cost(loss: np.ndarray) -> np.ndarray:
        n, smin, bc = parts(loss)
        return np.log(6.0 * n * bc * tokens_per_sample) + np.log(smin)

    # Bracket in log(L - e): the cost is monotone, so widen until it straddles the budget.
    target = np.log(c_min)
    lo = np.full(c_min.shape, -60.0)  # tiny reducible loss -> huge cost
    hi = np.full(c_min.shape, 12.0)  # enormous loss -> tiny cost
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        too_cheap = log_cost(e + np.exp(mid)) < target  # loss too high: budget allows a lower loss
        hi = np.where(too_cheap, mid, hi)
        lo = np.where(too_cheap, lo, mid)
    loss = e + np.exp(0.5 * (lo + hi))
    n, smin, bc = parts(loss)
    return {"n": n, "loss": loss, "s_min": smin, "b_crit": bc, "e_min": bc * smin}


# ----------------------------------------------------------------------------------------------------------------
# Published constants
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class KaplanConstants:
    """Constants of Kaplan et al. 2020 (WebText2, GPT-2 BPE, n_ctx 1024; they do not transfer to other setups).

    ``n_c``, ``alpha_n``, ``s_c``, ``alpha_s`` are the Table 3 L(N, S_min) fit; ``b_star`` (tokens) and
    ``alpha_b`` the critical batch B_crit(L); ``conv_*`` the converged L(N); ``d_c``, ``alpha_d`` the L(D) law;
    ``nd_*`` the Table 2 L(N, D) fit. ``units`` names the unit of each dimensional constant.

    Example::

        >>> KAPLAN_2020.units["b_star"]
        'tokens'
        >>> round(float(critical_batch(3.0, b_star=KAPLAN_2020.b_star, alpha_b=KAPLAN_2020.alpha_b)), -4)
        1120000.0
    """

    n_c: float = 6.5e13
    alpha_n: float = 0.077
    s_c: float = 2.1e3
    alpha_s: float = 0.76
    b_star: float = 2.1e8
    alpha_b: float = 0.21
    conv_n_c: float = 8.8e13
    conv_alpha_n: float = 0.076
    d_c: float = 5.4e13
    alpha_d: float = 0.095
    nd_n_c: float = 6.4e13
    nd_alpha_n: float = 0.076
    nd_d_c: float = 1.8e13
    nd_alpha_d: float = 0.103
    tokens_per_sample: float = 1024.0
    units: dict[str, str] = field(default_factory=lambda: {
        "n_c": "non-embedding parameters", "s_c": "optimizer steps", "b_star": "tokens",
        "conv_n_c": "non-embedding parameters", "d_c": "tokens", "nd_n_c": "non-embedding parameters",
        "nd_d_c": "tokens", "tokens_per_sample": "tokens per sequence (n_ctx)"})

    def n_s_b_kwargs(self) -> dict[str, float]:
        """Keyword arguments for :func:`loss_n_s_b` and friends (``b_star`` in tokens)."""
        return {"n_c": self.n_c, "alpha_n": self.alpha_n, "s_c": self.s_c, "alpha_s": self.alpha_s,
                "b_star": self.b_star, "alpha_b": self.alpha_b}

    def to_dict(self) -> dict[str, Any]:
        """All constants and units as a JSON-able dict."""
        return asdict(self)


KAPLAN_2020 = KaplanConstants()
