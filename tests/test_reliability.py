"""Issue 12, "nothing lost, nothing silent": resume, readers, fits and forecasts under hostile input."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lightning_scaling import RunHistory, laws
from lightning_scaling.fitting import fit_critical_batch_size, fit_scaling_law
from lightning_scaling.forecast import forecast_run

TRUE = dict(n_c=1e10, alpha_n=0.08, s_c=300.0, alpha_s=0.7, b_star=5e4, alpha_b=0.3)


def law_run(n: float, batch: float, *, steps: int = 2000, seed: int = 0, name: str | None = None) -> RunHistory:
    rng = np.random.default_rng(seed)
    s = np.arange(steps)
    clean = np.minimum(laws.loss_n_s_b(n, np.maximum(s, 1), batch, **TRUE), 10.0)
    return RunHistory(name=name or f"n{n:g}_b{batch:g}", n_params=n, batch_size=batch, tokens_per_sample=64,
                      step=s, loss=clean * np.exp(rng.normal(0.0, 0.003, s.size)), lr=np.full(s.size, 1e-3))


@pytest.fixture(scope="module")
def sweep() -> list[RunHistory]:
    return [law_run(4e6, b, seed=i) for i, b in enumerate((16, 256, 1024, 4096))]


# ----------------------------------------------------------------------------------------- 2. levels=
def test_levels_argument_of_both_entry_points(sweep):
    cb = fit_critical_batch_size(sweep)
    lo, hi = float(cb.table["loss"].min()), float(cb.table["loss"].max())
    levels = np.geomspace(lo, hi, 6).tolist()  # ascending on purpose: the order must not matter
    given = fit_critical_batch_size(sweep, levels=levels)
    np.testing.assert_allclose(np.sort(given.table["loss"]), np.sort(levels))
    assert given.b_star == pytest.approx(cb.b_star, rel=0.5)
    sizes = [law_run(n, 256, seed=9 + i) for i, n in enumerate((1e6, 16e6))]
    law = fit_scaling_law(sizes + sweep, level_kwargs={"levels": levels}, n_bootstrap=0)
    assert law.params["b_star"] == pytest.approx(given.b_star, rel=1e-9)
    with pytest.raises(ValueError, match="levels"):
        fit_critical_batch_size(sweep, levels=[2.0, float("nan")])


# ------------------------------------------------------------------------------ 3 and 9. forecast_run
def test_forecast_is_positive_and_inside_its_band_or_refused():
    # A linearly falling prefix under a cosine schedule (issue: -3.54, band (-0.012, -1035)) and pure noise
    # (issue: -6.25): every returned forecast is a positive loss inside an ordered band, or the call refuses.
    horizon = 2000
    cosine = 1e-3 * 0.5 * (1 + np.cos(np.pi * np.arange(horizon) / horizon))
    s = np.arange(600)
    linear = RunHistory(step=s, loss=4.0 - 0.004 * s, planned_lr=cosine)
    rng = np.random.default_rng(0)
    noise = RunHistory(step=np.arange(500), loss=np.clip(3.0 + rng.normal(0.0, 0.5, 500), 0.2, None))
    outcomes = []
    for history, kw in ((linear, {}), (linear, {"method": "momentum"}), (noise, {"horizon": 5000})):
        try:
            fc = forecast_run(history, **kw)
        except ValueError as err:
            assert "unusable forecast" in str(err)
            outcomes.append("refused")
            continue
        assert np.all(fc.loss > 0) and np.all(fc.lower > 0)
        assert np.all(fc.lower <= fc.loss) and np.all(fc.loss <= fc.upper)
        assert 0 < fc.final_lower <= fc.final_loss <= fc.final_upper
        outcomes.append("ok")
    with pytest.raises(ValueError, match="unusable forecast"):
        forecast_run(linear, method="mpl")  # the case from the issue: refused, not negative
    assert outcomes[0] == "refused"


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"critical_batch": math.nan}, "critical_batch"),
    ({"critical_batch": -1}, "critical_batch"),
    ({"critical_batch": "64"}, "critical_batch"),
    ({"confidence": math.nan}, "confidence"),
    ({"horizon": 10.5}, "horizon"),
    ({"horizon": math.inf}, "horizon"),
    ({"target_loss": -2.0}, "target_loss"),
    ({"min_fraction": 2.0}, "min_fraction"),
    ({"max_bins": 0}, "max_bins"),
    ({"grid_points": math.nan}, "grid_points"),
    ({"delta": 0.0}, "delta"),
    ({"lam": 1.0}, "lam"),
    ({"min_points": True}, "min_points"),
])
def test_forecast_run_validates_every_number_up_front(kwargs, match, capfd):
    h = RunHistory(step=np.arange(300), loss=2.0 + 1.0 / np.sqrt(1.0 + np.arange(300)))
    kwargs = {"horizon": 1000, **kwargs}
    with pytest.raises(ValueError, match=match):
        forecast_run(h, **kwargs)
    assert "DLASCL" not in capfd.readouterr().err
