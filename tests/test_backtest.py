"""Backtests on finished runs (``lightning_scaling.backtest`` and ``lightning-scaling backtest``)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from lightning_scaling import RunHistory
from lightning_scaling.backtest import (
    backtest,
    curve_error,
    final_window,
    holdout_cross_size,
    keep_gap_baseline,
    power_law_baseline,
    replay_forecast,
    run_schedule,
    summarize,
)
from lightning_scaling.cli import main
from lightning_scaling.laws import loss_n_s_b

DATA = Path(__file__).parent / "data"
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
TRUTH = dict(n_c=1e10, alpha_n=0.08, s_c=200.0, alpha_s=0.7, b_star=2e4, alpha_b=0.3)


def _power_run(a: float = 3.0, name: str = "r", n: int = 3001) -> RunHistory:
    s = np.arange(0, n, 10)
    return RunHistory(name=name, step=s, loss=2.0 + a * np.maximum(s, 1) ** -0.4, lr=np.full(s.size, 1e-3))


def test_final_window_and_curve_error_closed_forms() -> None:
    s = np.arange(0, 1001)
    assert final_window(s).sum() == 51  # steps 950..1000: the last 5% of the span
    assert final_window(np.array([0, 10, 20, 30])).tolist() == [False, True, True, True]
    actual = np.full(64, 2.0)
    assert curve_error(actual * 1.01, actual) == pytest.approx(0.01)
    # alternating noise averages out within windows; a bias does not
    noisy = actual + np.tile([0.1, -0.1], 32)
    assert curve_error(actual, noisy) == pytest.approx(0.0, abs=1e-12)


def test_power_law_baseline_recovers_its_own_form() -> None:
    s = np.arange(10, 3001, 10)
    f = power_law_baseline(s, 1.5 + 2.0 * s ** -0.3)
    assert f(np.array([20000]))[0] == pytest.approx(1.5 + 2.0 * 20000 ** -0.3, rel=1e-4)
    with pytest.raises(ValueError, match=">= 4 records"):
        power_law_baseline(s[:3], np.ones(3))


def test_run_schedule_prefers_planned_then_recorded_lr() -> None:
    h = _power_run()
    lr, horizon = run_schedule(h)
    assert horizon == 3000 and lr.shape == (3000,) and np.allclose(lr, 1e-3)
    h.planned_lr = np.linspace(1e-3, 1e-4, 3000)
    assert np.array_equal(run_schedule(h)[0], h.planned_lr)
    h.planned_lr, h.lr = None, None
    assert run_schedule(h)[0] is None


def test_replay_on_a_known_power_law_is_exact_and_covered() -> None:
    row = replay_forecast(_power_run(), 0.3)
    assert abs(row["final_err"]) < 0.002 and row["covered"] is True
    assert row["method"] == "power" and row["observed_until"] == 900
    assert abs(row["baseline_err"]) < 0.002  # the baseline's own form: it is exact too
    assert row["error"] is None


def test_replay_counts_a_refusal_instead_of_dropping_it() -> None:
    row = replay_forecast(_power_run(n=200), 0.1)  # 2 records after warmup: too little seen
    assert row["error"] and "too little" in row["error"]
    assert np.isnan(row["final_err"])
    s = summarize([row | {"fraction": 0.1}])
    assert s[0.1]["refused"] == 1 and s[0.1]["n"] == 1


def test_replay_on_real_mpl_cosine_beats_the_schedule_blind_baseline() -> None:
    import suite_data

    h = suite_data.mpl_curve(25, "cosine_24000", data=DATA / "mpl")
    row = replay_forecast(h, 0.5)
    assert abs(row["final_err"]) < 0.015 and row["covered"]
    assert abs(row["final_err"]) < abs(row["baseline_err"])  # the blind power law misses the cosine's decay


def test_keep_gap_baseline_is_exact_for_parallel_curves() -> None:
    ref = _power_run(name="small")
    run = RunHistory(name="big", step=ref.step, loss=ref.loss - 0.3)
    expected = float(np.mean(ref.loss[final_window(ref.step)])) - 0.3
    assert keep_gap_baseline(run, ref, 0.4) == pytest.approx(expected, abs=1e-3)


def test_cross_size_recovers_a_known_ladder_and_beats_nothing_silently() -> None:
    steps = np.arange(0, 3001, 10)
    mk = lambda n, b: RunHistory(name=f"n{n:g}_b{b}", n_params=n, batch_size=b, tokens_per_sample=128,  # noqa: E731
                                 step=steps, loss=np.minimum(loss_n_s_b(n, np.maximum(steps, 1), b, **TRUTH), 10))
    train = [mk(n, 64) for n in (1e6, 3e6, 1e7)] + [mk(1e6, b) for b in (16, 256, 1024)]
    rows = holdout_cross_size(train, [mk(3e7, 64)], fit_kwargs={"n_bootstrap": 10})
    assert len(rows) == 1 and rows[0]["error"] is None
    assert abs(rows[0]["final_err"]) < 0.01 and rows[0]["curve_err"] < 0.01
    assert np.isfinite(rows[0]["baseline_err"])


def test_backtest_validates_and_summarises() -> None:
    with pytest.raises(ValueError, match="at least one"):
        backtest([])
    with pytest.raises(ValueError, match=r"in \(0, 1\)"):
        backtest([_power_run()], prefixes=(1.5,))
    res = backtest([_power_run(a, f"r{a}") for a in (2.0, 3.0)], prefixes=(0.3, 0.5))
    assert set(res.summary()) == {0.3, 0.5}
    assert res.summary()[0.5]["worst"] < 0.005
    assert "cross-size check skipped" in res.notes[0]
    d = json.loads(json.dumps(res.to_dict()))  # JSON-able, NaN as null
    assert len(d["forecast"]) == 4
    assert "90% band holds" in res.format()


def _plain_tensorboard_logs(root: Path) -> None:
    """Two runs as a plain Lightning TensorBoardLogger writes them (version folders, train_loss and lr tags)."""
    from torch.utils.tensorboard import SummaryWriter

    steps = np.arange(0, 2001, 5)
    for v, a in enumerate((2.0, 3.0)):
        with SummaryWriter(str(root / "lightning_logs" / f"version_{v}")) as w:
            for s in steps:
                w.add_scalar("train_loss", 2.0 + a * max(s, 1) ** -0.4, int(s))
                w.add_scalar("lr-AdamW", 1e-3, int(s))


def test_cli_backtest_on_plain_tensorboard_logs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _plain_tensorboard_logs(tmp_path)
    rc = main(["backtest", str(tmp_path / "lightning_logs"), "--loss-tag", "train_loss", "--lr-tag", "lr-AdamW",
               "--prefixes", "0.3", "0.5", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert {r["fraction"] for r in out["forecast"]} == {0.3, 0.5} and len(out["forecast"]) == 4
    assert max(abs(r["final_err"]) for r in out["forecast"]) < 0.01
    assert main(["backtest", str(tmp_path / "lightning_logs"), "--loss-tag", "train_loss"]) == 0
    assert "Forecast replayed" in capsys.readouterr().out


def test_cli_backtest_bad_input_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    assert main(["backtest", str(tmp_path / "empty")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err and "backtest: error" in err
    RunHistory(name="short", step=np.arange(5), loss=np.ones(5)).to_json(tmp_path / "s" / "history.json")
    assert main(["backtest", str(tmp_path / "s")]) == 1
    assert "too short" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["backtest", str(tmp_path / "s"), "--prefixes", "2"])
    assert "fraction" in capsys.readouterr().err


@pytest.mark.parametrize("fraction", [0.5, 0.7])
def test_two_stage_schedule_after_its_drop_is_forecast_not_refused(fraction: float) -> None:
    # After a step drop the loss keeps falling toward its new level: a gain the past drop supports. The wild-fit
    # check once counted only the drop still to come and refused every two-stage MPL curve after its drop.
    import suite_data

    row = replay_forecast(suite_data.mpl_curve(25, "wsdcon_3", data=DATA / "mpl"), fraction)
    assert row["error"] is None
    assert abs(row["final_err"]) < 0.025 and row["covered"]
