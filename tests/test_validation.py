"""The validation suite (``benchmarks/validate.py``): its loaders on the real data and the --quick regression check."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import suite_data  # noqa: E402
import validate  # noqa: E402

needs_shared = pytest.mark.skipif(not suite_data.SHARED.exists(), reason="../shared/data is not beside the checkout")
needs_study = pytest.mark.skipif(not any(suite_data.CPU_STUDY.glob("*.json.gz")), reason="CPU study not generated")


@needs_shared
def test_loaders_read_every_public_set_in_project_conventions() -> None:
    m = suite_data.mpl()
    assert len(m.curves) == 27 and m.tuned_on
    c = next(h for h in m.curves if h.name == "mpl25M_cosine_24000")
    assert c.planned_lr.size == c.step[-1] and c.planned_lr.max() == pytest.approx(3e-4)
    assert c.planned_lr[-1] == pytest.approx(3e-5, rel=1e-3)  # cosine to 3e-5 at 24000
    g = suite_data.gemstones()
    assert len(g.curves) == 22 and not g.tuned_on
    assert min(h.n_params for h in g.curves) == 48377600 and max(h.n_params for h in g.curves) > 2e9
    pairs = g.extra["cooldowns"]
    assert len(pairs) > 150 and all(p["end"] > p["start"] for p in pairs)
    gains = [p["loss_start"] - p["loss_end"] for p in pairs]
    assert 0.03 < float(np.median(gains)) < 0.2  # the README's ~0.08 nats decay gain
    s = suite_data.schaipp()
    assert {h.meta["schedule"] for h in s.curves} == {"constant", "cosine", "wsd"}
    for h in s.curves:  # joined WSD branches start at step 0 and cover their horizon
        assert h.step[0] == 0 and h.step[-1] >= 0.95 * h.meta["horizon"] and np.all(np.diff(h.step) > 0)
    assert len(suite_data.nqs().extra["rows"]) == 128


@needs_study
def test_cpu_study_is_a_real_ladder_with_three_schedules_and_a_sweep() -> None:
    d = suite_data.cpu_study()
    ladder = [h for h in d.curves if h.batch_size == 16]
    sizes = sorted({h.n_params for h in ladder})
    assert len(sizes) >= 5 and sizes[-1] / sizes[0] >= 30
    assert {h.meta["schedule"] for h in ladder} == {"constant", "cosine", "wsd"}
    sweep = sorted({h.batch_size for h in d.curves if h.meta.get("role") in ("sweep", "ladder+sweep")})
    assert len(sweep) >= 6 and sweep[-1] / sweep[0] >= 32
    for h in d.curves:  # every run falls well below its post-warmup level
        s, l = h.step, h.loss
        assert np.mean(l[-50:]) < 0.75 * np.mean(l[(s > 60) & (s < 110)])
        assert "lr_rule" in h.meta and h.meta["settings"]["lr"] > 0


@needs_shared
@needs_study
def test_quick_suite_does_not_regress(tmp_path: Path) -> None:
    committed = json.loads((BENCH / "results" / "validation_quick.json").read_text())
    res = validate.run(suite_data.available(), validate.TASKS, quick=True)
    bad = validate.regressions(res["tables"], committed["tables"])
    assert not bad, "validation numbers got worse:\n" + "\n".join(bad)


def test_regressions_flags_missing_and_worse_numbers_only() -> None:
    old = {"forecast": {"A": {"all": {"0.5": {"median": 0.01, "coverage": 0.9, "baseline_median": 0.05}}}}}
    same = json.loads(json.dumps(old))
    assert validate.regressions(same, old) == []
    worse = {"forecast": {"A": {"all": {"0.5": {"median": 0.02, "coverage": 0.5, "baseline_median": 0.5}}}}}
    bad = validate.regressions(worse, old)
    assert len(bad) == 2 and any("coverage" in b for b in bad)  # baselines are not the project's to keep
    assert validate.regressions({}, old) == ["forecast/A/all/0.5/median: 0.0100 -> nan",
                                             "forecast/A/all/0.5/coverage: 0.9000 -> nan"]  # missing = worse


def test_stop_summary_counts_false_stops_and_when_misses_are_stopped() -> None:
    rows = [{"reachable_stop": None, "out_of_reach_stop": 0.4, "reachable_baseline_stop": 0.3,
             "out_of_reach_baseline_stop": 0.3},
            {"reachable_stop": 0.6, "out_of_reach_stop": 0.6, "reachable_baseline_stop": None,
             "out_of_reach_baseline_stop": None}]
    s = validate._stop_summary(rows)
    assert s["curves"] == 2
    assert s["project"] == {"false_stops": 1, "out_of_reach_stopped": 1.0, "median_stop_fraction": 0.5}
    assert s["baseline"] == {"false_stops": 1, "out_of_reach_stopped": 0.5, "median_stop_fraction": 0.3}
    assert validate.regressions({"stop": {"A": s}}, {"stop": {"A": {"project": {"false_stops": 0}}}}) == [
        "stop/A/project/false_stops: 0.0000 -> 1.0000"]
