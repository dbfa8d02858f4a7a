import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_scaling import RunHistory


def make(n=5, **kw):
    base = dict(name="r", n_params=1e6, batch_size=8, tokens_per_sample=16, step=np.arange(n),
                loss=np.linspace(5, 3, n), lr=np.full(n, 1e-3))
    base.update(kw)
    return RunHistory(**base)


def test_tokens_and_samples_derived_from_step():
    h = make()
    np.testing.assert_array_equal(h.samples, np.arange(5) * 8.0)
    np.testing.assert_array_equal(h.tokens, np.arange(5) * 128.0)
    assert h.tokens_per_step == 128


def test_tokens_unknown_without_tokens_per_sample():
    h = make(tokens_per_sample=None)
    assert np.isnan(h.tokens).all() and h.tokens_per_step is None


@pytest.mark.parametrize(
    "kw, msg",
    [
        (dict(loss=[1.0, 2.0]), "`loss` has 2 values"),
        (dict(step=[0, 2, 2, 3, 4]), "strictly increasing"),
        (dict(step=[0, 3, 2, 4, 5]), "strictly increasing"),
        (dict(batch_size=-1), "batch_size"),
        (dict(n_params=0), "n_params"),
        (dict(step=[-1, 0, 1, 2, 3]), "non-negative"),
        (dict(lr=[1.0]), "`lr` has 1 values"),
        (dict(val_step=[1, 2]), "given together"),
    ],
)
def test_validation_errors(kw, msg):
    with pytest.raises(ValueError, match=msg):
        make(**kw)


def test_nonfinite_losses_kept_and_flagged():
    h = make(loss=[5, math.nan, 4, math.inf, 3])
    assert len(h) == 5
    np.testing.assert_array_equal(h.nonfinite, [False, True, False, True, False])
    back = RunHistory.from_json(h.to_json())
    np.testing.assert_array_equal(back.nonfinite, h.nonfinite)
    assert np.isinf(back.loss[3])


def full_history():
    return make(
        planned_lr=np.linspace(1e-3, 1e-4, 10), val_step=[2, 4], val_loss=[4.0, 3.5],
        gns_step=[1, 3], gns_b_simple=[10.0, 20.0], gns_grad_sq_norm=[1.0, 0.5], gns_trace_sigma=[10.0, 10.0],
        meta={"seed": 3, "schedule": "cosine"}, loss=[5, 4.5, math.nan, 3.9, 3.7],
    )


def assert_same(a: RunHistory, b: RunHistory, fields=None, rtol=0.0):
    for key in fields or ("step", "loss", "tokens", "samples", "lr"):
        np.testing.assert_allclose(getattr(a, key), getattr(b, key), rtol=rtol, err_msg=key)
    assert (a.n_params, a.batch_size, a.tokens_per_sample) == (b.n_params, b.batch_size, b.tokens_per_sample)


def test_json_round_trip(tmp_path):
    h = full_history()
    h.to_json(tmp_path / "h.json")
    back = RunHistory.from_json(tmp_path / "h.json")
    assert_same(h, back, ("step", "loss", "tokens", "samples", "lr", "planned_lr", "val_step", "val_loss",
                          "gns_step", "gns_b_simple", "gns_grad_sq_norm", "gns_trace_sigma"))
    assert back.meta == h.meta and back.name == "r"
    json.loads((tmp_path / "h.json").read_text())  # standard JSON, no bare NaN
    assert "NaN" not in (tmp_path / "h.json").read_text().replace('"NaN"', "")


def test_csv_round_trip(tmp_path):
    h = full_history()
    h.to_csv(tmp_path / "h.csv")
    back = RunHistory.from_csv(tmp_path / "h.csv")
    assert_same(h, back)
    np.testing.assert_array_equal(back.planned_lr, h.planned_lr)
    np.testing.assert_array_equal(back.gns_b_simple, h.gns_b_simple)
    assert RunHistory.load(tmp_path / "h.csv").n_params == 1e6


def test_truncated_json_is_a_clear_error(tmp_path):
    text = full_history().to_json()
    (tmp_path / "bad.json").write_text(text[: len(text) // 2])
    with pytest.raises(ValueError, match="invalid or truncated"):
        RunHistory.from_json(tmp_path / "bad.json")
    with pytest.raises(FileNotFoundError, match="missing.json"):
        RunHistory.from_json(tmp_path / "missing.json")


def test_truncate_keeps_planned_schedule():
    h = full_history()
    t = h.truncate(2)
    np.testing.assert_array_equal(t.step, [0, 1, 2])
    np.testing.assert_array_equal(t.val_step, [2])
    np.testing.assert_array_equal(t.gns_step, [1])
    assert t.planned_lr.size == 10


def test_tensorboard_round_trip(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    h = full_history()
    w = SummaryWriter(str(tmp_path))
    for i in range(len(h)):
        w.add_scalar("scaling/loss", h.loss[i], int(h.step[i]))
        w.add_scalar("scaling/lr", h.lr[i], int(h.step[i]))
        w.add_scalar("scaling/tokens", h.tokens[i], int(h.step[i]))
    for k, v in (("scaling/n_params", 1e6), ("scaling/batch_size", 8), ("scaling/tokens_per_sample", 16)):
        w.add_scalar(k, v, 0)
    for s, b in zip(h.gns_step, h.gns_b_simple):
        w.add_scalar("gns/b_simple", b, int(s))
    w.close()
    back = RunHistory.from_tensorboard(tmp_path)
    assert_same(h, back, rtol=1e-6)  # TensorBoard stores float32
    np.testing.assert_array_equal(back.gns_b_simple, h.gns_b_simple)
    assert RunHistory.load(tmp_path).n_params == 1e6
    with pytest.raises(ValueError, match="loss tag 'nope' not found; scalar tags present: .*scaling/loss"):
        RunHistory.from_tensorboard(tmp_path, loss_tag="nope")


def test_tensorboard_reads_more_than_reservoir_default(tmp_path):
    # EventAccumulator's default keeps 10,000 scalars per tag; we must read all of them.
    from torch.utils.tensorboard import SummaryWriter

    w = SummaryWriter(str(tmp_path))
    for s in range(10_500):
        w.add_scalar("train_loss", 5.0 - s * 1e-4, s)
    w.close()
    back = RunHistory.from_tensorboard(tmp_path, loss_tag="train_loss", batch_size=4)
    assert len(back) == 10_500 and back.samples[-1] == 4 * 10_499


def test_lightning_csv(tmp_path):
    rows = ["epoch,step,train_loss,val_loss,lr-SGD"]
    for s in range(6):
        rows.append(f"0,{s},{5 - s * 0.1},,{0.1}")
        if s % 3 == 2:
            rows.append(f"0,{s},,{4.5 - s * 0.1},")
    (tmp_path / "metrics.csv").write_text("\n".join(rows) + "\n")
    h = RunHistory.from_lightning_csv(tmp_path / "metrics.csv", loss_tag="train_loss", lr_tag="lr-SGD",
                                      val_loss_tag="val_loss", n_params=100, batch_size=2)
    np.testing.assert_allclose(h.loss, 5 - np.arange(6) * 0.1)
    np.testing.assert_allclose(h.lr, 0.1)
    np.testing.assert_array_equal(h.val_step, [2, 5])
    with pytest.raises(ValueError, match="column 'scaling/loss' not found"):
        RunHistory.from_lightning_csv(tmp_path / "metrics.csv")
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(ValueError, match="no rows"):
        RunHistory.from_lightning_csv(tmp_path / "empty.csv")


def test_load_many_discovers_runs(tmp_path):
    for i in range(3):
        make(name=f"r{i}").to_json(tmp_path / f"run{i}" / "scaling" / "history.json")
    (tmp_path / "run0" / "by_tokens").mkdir()
    runs = RunHistory.load_many(tmp_path)
    assert sorted(r.name for r in runs) == ["r0", "r1", "r2"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no runs found"):
        RunHistory.load_many(tmp_path / "empty")


@settings(max_examples=40, deadline=None)
@given(
    losses=st.lists(st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=64)), min_size=1, max_size=30),
    bs=st.one_of(st.none(), st.integers(1, 4096)),
)
def test_json_round_trip_property(losses, bs):
    h = RunHistory(step=np.arange(len(losses)) * 3, loss=losses, batch_size=bs)
    back = RunHistory.from_json(h.to_json())
    np.testing.assert_array_equal(back.loss, h.loss)
    np.testing.assert_array_equal(back.samples, h.samples)
