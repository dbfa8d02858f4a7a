"""The end-to-end overhead benchmark compares runs of equal length only (``benchmarks/e2e_overhead.py``)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import e2e_overhead


def test_runs_of_different_lengths_are_refused():
    runs = {"none": [{"steps": 600}], "all": [{"steps": 500}]}
    with pytest.raises(RuntimeError, match=r"did not train all 600 steps: \{'all': \[500\]\}"):
        e2e_overhead.check_lengths(runs, 600)
    e2e_overhead.check_lengths({"none": [{"steps": 600}], "all": [{"steps": 600}]}, 600)


def test_early_stopping_in_the_all_configuration_never_stops_the_run():
    from lightning_scaling.callbacks import ForecastEarlyStopping

    (stop,) = [c for c in e2e_overhead._callbacks("all", 64, 100) if isinstance(c, ForecastEarlyStopping)]
    # already reached from the first step (a byte-level model starts near ln 256): checked, never out of reach
    assert stop.target_loss > math.log(256)
    assert [type(c).__name__ for c in e2e_overhead._callbacks("none-again", 64, 100)] == []
