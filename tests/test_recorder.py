"""The Lightning-free pieces behind the callbacks: the loss recorder and the core numerics helpers."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from lightning_scaling.history import RunHistory, final_loss, group_by_size
from lightning_scaling.numerics import (
    BatchSizeError,
    dumps,
    first_crossing,
    infer_batch_size,
    one_blas_thread,
    to_jsonable,
)
from lightning_scaling.recorder import LossRecorder


def _window(rec: LossRecorder, step: int, losses: list[float], samples: float = 4.0) -> bool:
    """One optimizer step made of ``len(losses)`` micro-batches (the optimizer steps in the last one)."""
    for i, loss in enumerate(losses):
        rec.micro_batch(step, samples=samples, tokens=samples * 8)
        if i == len(losses) - 1:
            rec.optimizer_step([0.1, 0.01])
        rec.add_loss(torch.tensor(loss))
        closed = rec.end_micro_batch(step, device="cpu")
    return closed


def test_recorder_averages_micro_batches_and_counts_before_each_step() -> None:
    rec = LossRecorder(counts_tokens=True)
    assert _window(rec, 0, [3.0, 1.0]) and _window(rec, 1, [2.0, 2.0])
    assert rec.n_pending == 2 and len(rec.step) == 0  # nothing copied to the host before the flush
    assert rec.flush() == 0 and rec.n_pending == 0
    h = rec.history(name="r", n_params=10.0)
    assert h.loss.tolist() == [2.0, 2.0] and h.samples.tolist() == [0.0, 8.0] and h.tokens.tolist() == [0.0, 64.0]
    assert rec.batch_size == 8.0 and h.meta["lr_groups"] == [[0.1, 0.01], [0.1, 0.01]]


def test_recorder_flush_applies_the_reduction_and_counts_non_finite() -> None:
    rec = LossRecorder(counts_tokens=False)
    _window(rec, 0, [math.nan])
    _window(rec, 1, [2.0])
    calls = []

    def reduce(losses: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(losses.shape)
        return losses * 0.5, counts * 2  # as if another rank held other values: mean of losses, sum of counts

    assert rec.flush(reduce) == 1 and calls == [torch.Size([2])]  # one reduction for the whole chunk
    assert np.isnan(rec.loss.view()[0]) and rec.loss.view()[1] == 1.0 and rec.batch_size == 8.0
    h = rec.history(name="r")
    assert h.samples.tolist() == [0.0, 8.0] and np.isnan(h.tokens).all()  # tokens not counted: NaN


def test_recorder_state_round_trips_and_skips_repeated_readings() -> None:
    rec = LossRecorder(counts_tokens=True)
    _window(rec, 0, [3.0])
    rec.flush()
    rec.record_gns(0, 5.0, 1.0, 2.0)
    rec.record_gns(0, 9.0, 1.0, 2.0)  # a resumed run re-logs the step: kept once
    rec.record_val(0, 2.5)
    back = LossRecorder(counts_tokens=True)
    back.load_state_dict(rec.state_dict())
    h = back.history(name="r")
    assert h.loss.tolist() == [3.0] and h.gns_b_simple.tolist() == [5.0] and h.val_loss.tolist() == [2.5]


def test_the_recorder_imports_no_lightning() -> None:
    code = "import sys, lightning_scaling.recorder, lightning_scaling.study; print('lightning' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


# ---------------------------------------------------------------------------------------------- core numerics
def test_one_json_convention_for_non_finite_numbers() -> None:
    text = dumps({"a": [math.nan, math.inf, -math.inf], "b": np.float32(2.0), "c": (np.int64(3),)})
    assert json.loads(text) == {"a": ["NaN", "Infinity", "-Infinity"], "b": 2.0, "c": [3]}
    # The same strings as history.json, which reads them back as numbers.
    h = RunHistory(step=[0, 1], loss=[math.nan, 1.0])
    assert json.loads(h.to_json())["loss"] == to_jsonable([math.nan, 1.0])


def test_first_crossing_counts_a_level_reached_at_the_start_only_when_asked() -> None:
    grid, curve = np.array([1.0, 10.0, 100.0]), np.array([2.0, 1.0, 0.5])
    assert np.isnan(first_crossing(grid, curve, 3.0))
    assert float(first_crossing(grid, curve, 3.0, start=1.0)) == 1.0
    assert float(first_crossing(grid, curve, 1.0)) == pytest.approx(10.0)
    assert float(first_crossing(grid, curve, 0.75)) == pytest.approx(math.sqrt(10.0) * 10.0)  # log-linear


def test_infer_batch_size_error_is_a_value_and_type_error() -> None:
    assert infer_batch_size([{"x": "text"}, (torch.zeros(6, 2),)]) == 6
    with pytest.raises(BatchSizeError, match="batch_size_fn"):
        infer_batch_size({"a": "text"})
    assert issubclass(BatchSizeError, ValueError) and issubclass(BatchSizeError, TypeError)


def test_one_blas_thread_limits_and_restores() -> None:
    from threadpoolctl import threadpool_info

    before = [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"]
    with one_blas_thread():
        assert all(p["num_threads"] == 1 for p in threadpool_info() if p["user_api"] == "blas")
    assert [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"] == before


def test_final_loss_and_group_by_size() -> None:
    h = RunHistory(step=np.arange(300), loss=np.r_[np.full(297, 3.0), [2.0, 2.5, 3.0]])
    assert final_loss(h, fraction=0.01, min_points=1) == (pytest.approx(2.5), 297)  # last ceil(1% of 300) = 3
    with pytest.raises(ValueError, match="fraction"):
        final_loss(h, fraction=0.0)
    runs = [RunHistory(step=[0], loss=[1.0], n_params=n) for n in (1.0, None, 1.0, None)]
    assert [len(g) for g in group_by_size(runs).values()] == [2, 2]  # the sizeless runs share one group
