"""Unit tests of the Lightning-free GNS estimators (lightning_scaling.gns)."""

from __future__ import annotations

import io
import math
import warnings

import pytest
import torch

from lightning_scaling.gns import (
    GNSEstimator,
    b_simple_linear_regression,
    unbiased_from_k_batches,
    unbiased_from_two_sizes,
)


def test_two_size_formula_exact():
    # Exact expectations: E|g_B|² = |G|² + tr(Σ)/B with |G|² = 2, tr Σ = 24.
    g2, tr = 2.0, 24.0
    small, big = g2 + tr / 4, g2 + tr / 32
    got_g, got_s = unbiased_from_two_sizes(small, big, b_small=4, b_big=32)
    assert got_g == pytest.approx(g2, rel=1e-12)
    assert got_s == pytest.approx(tr, rel=1e-12)


def test_k_batch_form_is_two_size_form_and_bessel_for_b1():
    # b = 1: tr = K/(K-1)·(mean|g_i|² − |mean g|²) = Bessel-corrected total variance.
    torch.manual_seed(0)
    g = torch.randn(5, 3, dtype=torch.float64)
    small = g.square().sum(1).mean()
    big = g.mean(0).square().sum()
    grad_sq, tr = unbiased_from_k_batches(small, big, k=5, b=1)
    assert float(tr) == pytest.approx(float(g.var(0, unbiased=True).sum()), rel=1e-12)
    # |G|² = |mean|² − tr/K (unbiased square of the mean)
    assert float(grad_sq) == pytest.approx(float(big - tr / 5), rel=1e-12)


@pytest.mark.parametrize("bad", [dict(k=1, b=2), dict(k=0, b=2), dict(k=2, b=0)])
def test_k_batch_rejects_bad_input(bad):
    with pytest.raises(ValueError, match="`k` must be an integer >= 2|`b_small` must be positive"):
        unbiased_from_k_batches(1.0, 1.0, **bad)


def test_ema_of_exact_inputs_is_exact_and_ratio_taken_on_read():
    est = GNSEstimator(ema_decay=0.9)
    # Varying exact (|G|², tr Σ) pairs: the read-out must be ratio of bias-corrected EMAs, not EMA of ratios.
    pairs = [(1.0, 10.0), (4.0, 20.0), (2.0, 50.0)]
    for g2, tr in pairs:
        est.update(torch.tensor(g2 + tr / 8), torch.tensor(g2 + tr / 32), b_small=8, b_big=32)
    w = [0.9**2 * 0.1, 0.9 * 0.1, 0.1]
    wsum = sum(w)
    eg = sum(wi * p[0] for wi, p in zip(w, pairs)) / wsum
    es = sum(wi * p[1] for wi, p in zip(w, pairs)) / wsum
    r = est.read(tokens_per_sample=128)
    assert r.grad_sq_norm == pytest.approx(eg, rel=1e-12)
    assert r.trace_sigma == pytest.approx(es, rel=1e-12)
    assert r.b_simple == pytest.approx(es / eg, rel=1e-12)
    assert r.b_simple_tokens == pytest.approx(128 * es / eg, rel=1e-12)
    ema_of_ratios = sum(wi * p[1] / p[0] for wi, p in zip(w, pairs)) / wsum
    assert abs(r.b_simple - ema_of_ratios) > 1.0  # the two differ; we must be the first
    assert r.n_steps == 3 and r.n_skipped == 0 and r.b_big == 32


def test_nonfinite_steps_are_skipped_and_counted():
    a, b = GNSEstimator(ema_decay=0.95), GNSEstimator(ema_decay=0.95)
    torch.manual_seed(1)
    vals = [(float(3 + torch.rand(1)), float(1 + torch.rand(1))) for _ in range(6)]
    for i, (s, g) in enumerate(vals):
        a.update(torch.tensor(s), torch.tensor(g), b_small=2, b_big=8)
        b.update(torch.tensor(s), torch.tensor(g), b_small=2, b_big=8)
        if i == 2:  # inject NaN / inf steps into b only
            b.update(torch.tensor(float("nan")), torch.tensor(1.0), b_small=2, b_big=8)
            b.update(torch.tensor(2.0), torch.tensor(float("inf")), b_small=2, b_big=8)
    ra, rb = a.read(), b.read()
    assert rb.n_skipped == 2 and ra.n_skipped == 0
    assert rb.n_steps == ra.n_steps == 6
    for f in ("grad_sq_norm", "trace_sigma", "b_simple", "stderr"):
        assert getattr(rb, f) == pytest.approx(getattr(ra, f), rel=1e-12)
    raw = b.raw()
    assert len(raw["step"]) == 8 and math.isnan(raw["small_sq_norm"][3])


def test_k1_gives_no_estimate_and_warns_once():
    est = GNSEstimator()
    with pytest.warns(UserWarning, match="K = 1"):
        est.update(torch.tensor(1.0), torch.tensor(1.0), b_small=8, b_big=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # second time: no warning
        est.update(torch.tensor(1.0), torch.tensor(1.0), b_small=8, b_big=8)
    r = est.read()
    assert est.n_no_estimate == 2 and r.n_steps == 0 and math.isnan(r.b_simple)


def test_nonpositive_grad_sq_reads_inf_not_error():
    est = GNSEstimator()
    # big > |G|²-consistent: |G|² estimate negative (noise-dominated step)
    est.update(torch.tensor(1.0), torch.tensor(0.5), b_small=1, b_big=1.5)  # g = (1.5*0.5 - 1)/0.5 = -0.5
    r = est.read()
    assert r.grad_sq_norm == pytest.approx(-0.5) and r.b_simple == math.inf


def test_stderr_matches_scatter_on_analytic_regression():
    """The delta-method band is calibrated: RMS error over seeds ≈ mean reported stderr (within a factor 1.6)."""
    d, s = 8, 0.5
    truth = b_simple_linear_regression(d=d, noise_std=s, delta_sq_norm=1.0)
    errs, ses = [], []
    for seed in range(12):
        g = torch.Generator().manual_seed(seed)
        delta = torch.randn(d, generator=g, dtype=torch.float64)
        delta /= delta.norm()
        est = GNSEstimator(ema_decay=0.98)
        for _ in range(150):
            x = torch.randn(32, d, generator=g, dtype=torch.float64)
            e = s * torch.randn(32, generator=g, dtype=torch.float64)
            m = (x * (x @ delta - e)[:, None]).reshape(4, 8, d).mean(1)
            est.update(m.square().sum(1).mean(), m.mean(0).square().sum(), b_small=8, b_big=32)
        r = est.read()
        errs.append(r.b_simple - truth)
        ses.append(r.stderr)
        assert r.ci_low < r.b_simple < r.ci_high
    rms = math.sqrt(sum(e * e for e in errs) / len(errs))
    mean_se = sum(ses) / len(ses)
    assert 1 / 1.6 < rms / mean_se < 1.6
    assert abs(sum(errs) / len(errs)) / truth < 0.05  # ratio of EMAs is (nearly) unbiased


def test_state_dict_roundtrip_weights_only_continues_identically():
    torch.manual_seed(3)
    seq = [(float(2 + torch.rand(1)), float(1 + 0.1 * torch.rand(1))) for _ in range(20)]
    ref = GNSEstimator(ema_decay=0.9, buffer_size=4)
    for s, g in seq:
        ref.update(torch.tensor(s), torch.tensor(g), b_small=4, b_big=16)
    first = GNSEstimator(ema_decay=0.9, buffer_size=4)
    for s, g in seq[:11]:
        first.update(torch.tensor(s), torch.tensor(g), b_small=4, b_big=16)
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    resumed = GNSEstimator(ema_decay=0.9, buffer_size=4)
    resumed.load_state_dict(sd)
    for s, g in seq[11:]:
        resumed.update(torch.tensor(s), torch.tensor(g), b_small=4, b_big=16)
    assert torch.equal(resumed.state_tensors(), ref.state_tensors())
    assert resumed.raw() == ref.raw()
    assert resumed.read(tokens_per_sample=64) == ref.read(tokens_per_sample=64)


def test_update_does_not_sync(monkeypatch):
    """update() must not call .item()/.tolist() (host syncs); read() may."""
    est = GNSEstimator(buffer_size=1000)

    def boom(*a, **k):
        raise AssertionError("host sync in update()")

    monkeypatch.setattr(torch.Tensor, "item", boom)
    monkeypatch.setattr(torch.Tensor, "tolist", boom)
    monkeypatch.setattr(torch.Tensor, "__bool__", boom)
    for _ in range(5):
        est.update(torch.tensor(3.0), torch.tensor(float("nan")), b_small=2, b_big=4)
        est.update(torch.tensor(3.0), torch.tensor(1.0), b_small=2, b_big=4)
    monkeypatch.undo()
    assert est.read().n_skipped == 5


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"`ema_decay` must be in \[0, 1\), got 1.0"):
        GNSEstimator(ema_decay=1.0)
    for bad in (None, "0.9", float("nan"), float("inf")):  # a clear ValueError, not a TypeError from the comparison
        with pytest.raises(ValueError, match="ema_decay"):
            GNSEstimator(ema_decay=bad)
    with pytest.raises(ValueError, match="`tokens_per_sample` must be positive or None"):
        GNSEstimator(tokens_per_sample=0)
    with pytest.raises(ValueError, match="Need 0 < b_small <= b_big, got b_small=4.0, b_big=2.0"):
        GNSEstimator().update(1.0, 1.0, b_small=4, b_big=2)
    with pytest.raises(ValueError, match="`delta_sq_norm` must be positive"):
        b_simple_linear_regression(d=4, noise_std=1.0, delta_sq_norm=0.0)
