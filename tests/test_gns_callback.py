"""GradientNoiseScale callback against the analytic linear-regression noise scale (science.md §6.6).

y = x·w* + ε, x ~ N(0, I_d), ε ~ N(0, s²), weights frozen at w = w* + δ:
|G|² = |δ|², tr Σ = (d+1)|δ|² + d·s², B_simple = (d+1) + d·s²/|δ|².
"""

from __future__ import annotations

import csv
import math
import sys
import time
import warnings
from datetime import timedelta
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies import DDPStrategy
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_scaling.callbacks.gns import GradientNoiseScale, _CadenceTimer
from lightning_scaling.gns import GNSEstimator, b_simple_linear_regression
from lightning_scaling.warnings import DataWarning, ScalingWarning

D, S, DELTA_SQ = 16, 0.5, 1.0
TRUTH = b_simple_linear_regression(d=D, noise_std=S, delta_sq_norm=DELTA_SQ)  # 21.0


class FrozenSGD(torch.optim.SGD):
    """Runs the closure but never moves the weights (learning rate 0 that also survives NaN gradients)."""

    def step(self, closure=None, **kwargs):
        return closure() if closure is not None else None


def regression_data(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w_star = torch.randn(D, generator=g)
    delta = torch.randn(D, generator=g)
    delta = delta / delta.norm() * math.sqrt(DELTA_SQ)
    x = torch.randn(n, D, generator=g)
    y = x @ w_star + S * torch.randn(n, generator=g)
    return x, y, w_star + delta


class LinReg(pl.LightningModule):
    def __init__(self, w: torch.Tensor, nan_at: int | None = None):
        super().__init__()
        self.lin = nn.Linear(D, 1, bias=False)
        with torch.no_grad():
            self.lin.weight.copy_(w[None])
        self.nan_at = nan_at

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = 0.5 * (self.lin(x).squeeze(-1).float() - y).square().mean()
        if self.nan_at is not None and self.global_step == self.nan_at:
            loss = loss * float("nan")  # NaN gradients, like an fp16 overflow
        return loss

    def configure_optimizers(self):
        return FrozenSGD(self.parameters(), lr=0.0)


class LNReg(pl.LightningModule):
    """Linear regression whose only weights are a LayerNorm's γ (no β), so the LN-proxy GNS is the exact GNS.

    Inputs are [z, c1, c2] with c1, c2 chosen so every row has mean 0 and variance Q/(D+2): the LayerNorm then only
    divides by the constant sqrt(Q/(D+2)), which the head multiplies back, so pred = Σ_i γ_i z_i exactly.
    """

    def __init__(self, w: torch.Tensor, q: float):
        super().__init__()
        self.norm = nn.LayerNorm(D + 2, eps=0.0, bias=False)
        with torch.no_grad():
            self.norm.weight[:D].copy_(w)
        self.rms = math.sqrt(q / (D + 2))

    def training_step(self, batch, batch_idx):
        x, y = batch
        pred = self.norm(x)[:, :D].sum(-1) * self.rms
        return 0.5 * (pred - y).square().mean()

    def configure_optimizers(self):
        return FrozenSGD(self.parameters(), lr=0.0)


def ln_inputs(z: torch.Tensor, q: float) -> torch.Tensor:
    m = -z.sum(1)
    rest = q - z.square().sum(1)
    disc = (2 * rest - m.square()).clamp_min(0).sqrt()
    return torch.cat([z, ((m + disc) / 2)[:, None], ((m - disc) / 2)[:, None]], 1)


def fit(model, cb, tmp_path, *, steps, batch, accumulate=1, logger=False, extra_callbacks=(), ckpt_path=None, **kw):
    x, y, _ = kw.pop("data")
    loader = DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=False)
    kw.setdefault("devices", 1)
    trainer = pl.Trainer(
        default_root_dir=tmp_path,
        accelerator="cpu",
        max_steps=steps,
        accumulate_grad_batches=accumulate,
        callbacks=[cb, *extra_callbacks],
        logger=logger,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        **kw,
    )
    trainer.fit(model, loader, ckpt_path=ckpt_path)
    return trainer


# ----------------------------------------------------------------------------------------------- accuracy per method
def test_accumulation_matches_analytic(tmp_path):
    steps, micro, k = 300, 16, 4
    data = regression_data(steps * micro * k)
    cb = GradientNoiseScale("auto", measure_every_n_steps=1, ema_decay=0.999, log_every_n_steps=100)
    fit(LinReg(data[2]), cb, tmp_path, steps=steps, batch=micro, accumulate=k, data=data)
    r = cb.estimator.read()
    assert cb.method_used == "accumulation"
    assert r.n_steps == steps and r.b_big == micro * k
    assert abs(r.b_simple / TRUTH - 1) < 0.10, r
    assert r.ci_low < TRUTH < r.ci_high
    raw = cb.estimator.raw()
    assert raw["b_small"][0] == micro and raw["step"][:3] == [0, 1, 2]


@pytest.mark.parametrize("k", [1, 2])
def test_per_example_layernorm_matches_analytic(tmp_path, k):
    steps, batch, q = 300, 32 // k, 400.0
    x, y, w = regression_data(steps * batch * k, seed=1)
    data = (ln_inputs(x, q), y, w)
    cb = GradientNoiseScale("auto" if k == 1 else "per_example", measure_every_n_steps=1, ema_decay=0.999,
                            log_every_n_steps=100)
    fit(LNReg(w, q), cb, tmp_path, steps=steps, batch=batch, accumulate=k, data=data)
    r = cb.estimator.read()
    assert cb.method_used == "per_example" and cb.label == "LN-proxy GNS"
    assert r.n_steps == steps and r.b_big == 32
    assert abs(r.b_simple / TRUTH - 1) < 0.10, r


@pytest.mark.parametrize("method, k", [("per_example", 1), ("accumulation", 2)])
def test_measuring_one_step_in_three_matches_analytic(tmp_path, method, k):
    steps, batch, q = 600, 32 // k, 400.0
    x, y, w = regression_data(steps * batch * k, seed=4)
    data = (ln_inputs(x, q), y, w)
    every = GradientNoiseScale(method, ema_decay=0.999, measure_every_n_steps=3, log_every_n_steps=100)
    fit(LNReg(w, q), every, tmp_path, steps=steps, batch=batch, accumulate=k, data=data)
    r = every.estimator.read()
    assert r.n_steps == steps // 3 and every.n_partial_windows == 0
    assert every.estimator.raw()["step"][:3] == [0, 3, 6]
    # each measurement stands for three steps: the same window in steps (decay 0.999 per step)
    assert every.estimator.ema_decay == pytest.approx(0.999 ** 3) and every.ema_decay == 0.999
    assert abs(r.b_simple / TRUTH - 1) < 0.15, r
    assert r.ci_low < TRUTH < r.ci_high


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, None, float("inf"), "4", "Auto"])
def test_measure_every_n_steps_must_be_a_positive_integer(bad):
    with pytest.raises(ValueError, match="measure_every_n_steps"):
        GradientNoiseScale(measure_every_n_steps=bad)


@pytest.mark.parametrize("bad", [0, 1, -0.1, None, "0.02", float("nan")])
def test_max_overhead_must_be_a_share(bad):
    with pytest.raises(ValueError, match="max_overhead"):
        GradientNoiseScale(max_overhead=bad)


class VirtualClock:
    """A clock that only :class:`StepCost` moves (picklable, for the spawned DDP ranks)."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class StepCost(pl.Callback):
    """Moves a virtual clock as if a step cost 1 s inside the measured span (forward and backward), 1 s after it,
    and ``extra`` more inside the span when the callback measures the step (``extra_rank0``: on rank 0 only)."""

    def __init__(self, gns: GradientNoiseScale, extra: float, extra_rank0: bool = False) -> None:
        self.gns, self.extra, self.extra_rank0 = gns, extra, extra_rank0
        self.gns._timer.clock = self.clock = VirtualClock()

    def on_after_backward(self, trainer, pl_module):
        charged = self.gns._in_backward_window and (trainer.global_rank == 0 or not self.extra_rank0)
        self.clock.t += 1.0 + (self.extra if charged else 0.0)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.clock.t += 1.0


class ReportCadence(pl.Callback):
    """Each rank writes the cadence its callback ended with (spawned ranks do not return callback state)."""

    def __init__(self, gns: GradientNoiseScale, folder: Path) -> None:
        self.gns, self.folder = gns, Path(folder)

    def on_train_end(self, trainer, pl_module):
        (self.folder / f"every{trainer.global_rank}.txt").write_text(str(self.gns.measure_every))


def auto_fit(tmp_path, cb, steps, extra=None, seed=11, ckpt_path=None):
    """A linear-regression fit (2 micro-batches of 8 per step); ``extra``: the step costs of :class:`StepCost`."""
    data = regression_data(steps * 16, seed=seed)
    return fit(LinReg(data[2]), cb, tmp_path, steps=steps, batch=8, accumulate=2, data=data, ckpt_path=ckpt_path,
               extra_callbacks=() if extra is None else (StepCost(cb, extra),))


# Steps 0-3 untimed, then 10 measured (even) and 10 unmeasured spans: the cadence is chosen at step 23.
CHOSEN_AT = _CadenceTimer.SKIP + 2 * _CadenceTimer.NEED - 1


@pytest.mark.parametrize("extra, every", [(0.02, 1), (0.04, 1), (0.2, 5), (1.0, 25), (10.0, 64)])
def test_auto_cadence_keeps_measurements_within_the_overhead_budget(tmp_path, extra, every):
    """Overhead = extra span time / whole unmeasured step (2 s here); one step in ceil(overhead / 0.02), <= 64."""
    cb = GradientNoiseScale("accumulation", ema_decay=0.99, log_every_n_steps=1000)
    assert cb.measure_every_n_steps == "auto" and cb.measure_every == 2  # the default, while timing
    auto_fit(tmp_path, cb, steps=160, extra=extra)
    assert cb.measured_overhead == pytest.approx(extra / 2)
    assert cb.measure_every == every and cb.estimator.ema_decay == pytest.approx(0.99 ** every)
    chosen = list(range(0, CHOSEN_AT + 1, 2)) + [s for s in range(CHOSEN_AT + 1, 160) if s % every == 0]
    assert cb.estimator.raw()["step"] == chosen


def test_auto_cadence_times_the_measurement_not_what_recurs_between_steps(tmp_path):
    """A slow read-out every second step (the callback's own log) and a slow logger land outside the span."""
    cb = GradientNoiseScale("accumulation", ema_decay=0.99, log_every_n_steps=2)
    slow_log = cb._log

    def log(trainer, step):
        cb._timer.clock.t += 5.0  # the StepCost clock, after the span: were it counted, odd steps would look slower
        slow_log(trainer, step)

    cb._log = log
    auto_fit(tmp_path, cb, steps=60, extra=0.0, seed=12)
    assert cb.measured_overhead == pytest.approx(0.0) and cb.measure_every == 1


def test_auto_cadence_on_the_real_clock_backs_off_an_expensive_measurement(tmp_path):
    cb = GradientNoiseScale("accumulation", ema_decay=0.99, log_every_n_steps=1000)
    measure = cb._measure

    def slow_measure(*args):
        time.sleep(0.02)  # far more than a step of this model
        measure(*args)

    cb._measure = slow_measure
    auto_fit(tmp_path, cb, steps=40)
    assert cb.measured_overhead > 1.0 and cb.measure_every == 64


def test_auto_cadence_is_checkpointed_and_kept_on_resume(tmp_path):
    first = GradientNoiseScale("accumulation", ema_decay=0.9, log_every_n_steps=1000)
    t1 = auto_fit(tmp_path, first, steps=40, extra=0.2)
    assert first.measure_every == 5
    ckpt = tmp_path / "auto.ckpt"
    t1.save_checkpoint(ckpt)
    resumed = GradientNoiseScale("accumulation", ema_decay=0.9, log_every_n_steps=1000)
    with warnings.catch_warnings():
        warnings.simplefilter("error", category=DataWarning)  # no "restored EMA decay differs" warning
        auto_fit(tmp_path, resumed, steps=80, extra=0.0, ckpt_path=ckpt)  # would choose 1 if it timed again
    assert resumed.measure_every == 5 and resumed.measured_overhead == pytest.approx(0.1)
    assert resumed.estimator.raw()["step"] == (list(range(0, CHOSEN_AT + 1, 2))
                                               + [s for s in range(CHOSEN_AT + 1, 80) if s % 5 == 0])
    fixed = GradientNoiseScale("accumulation", ema_decay=0.9, measure_every_n_steps=2, log_every_n_steps=1000)
    with pytest.warns(DataWarning, match="ema_decay"):  # a cadence given explicitly wins over the checkpoint's
        auto_fit(tmp_path, fixed, steps=80, ckpt_path=ckpt)
    assert fixed.measure_every == 2


def test_auto_cadence_saved_while_timing_times_again_after_the_restart(tmp_path):
    first = GradientNoiseScale("accumulation", ema_decay=0.9, log_every_n_steps=1000)
    t1 = auto_fit(tmp_path, first, steps=10, extra=0.2)
    assert first.measured_overhead is None and first.measure_every == 2
    ckpt = tmp_path / "timing.ckpt"
    t1.save_checkpoint(ckpt)
    resumed = GradientNoiseScale("accumulation", ema_decay=0.9, log_every_n_steps=1000)
    resumed._calibrated, resumed.measure_every = True, 7  # an instance that had chosen before: reset by the load
    auto_fit(tmp_path, resumed, steps=80, extra=1.0, ckpt_path=ckpt)
    assert resumed.measure_every == 25  # timed anew from the restart: 4 steps skipped, then 10 + 10
    at = 10 + CHOSEN_AT
    assert resumed.estimator.raw()["step"] == list(range(0, at + 1, 2)) + [s for s in range(at + 1, 80) if s % 25 == 0]


def test_a_checkpoint_of_0_2_keeps_its_every_step_cadence(tmp_path):
    old = GradientNoiseScale("accumulation", ema_decay=0.9, measure_every_n_steps=1, log_every_n_steps=1000)
    t1 = auto_fit(tmp_path, old, steps=10)
    ckpt = tmp_path / "old.ckpt"
    t1.save_checkpoint(ckpt)
    state = torch.load(ckpt, weights_only=True)
    for key in ("measure_every", "measured_overhead"):  # what 0.2 did not save
        del state["callbacks"][old.state_key][key]
    torch.save(state, ckpt)
    resumed = GradientNoiseScale("accumulation", ema_decay=0.9, log_every_n_steps=1000)
    with warnings.catch_warnings():
        warnings.simplefilter("error", category=DataWarning)
        auto_fit(tmp_path, resumed, steps=30, ckpt_path=ckpt)
    assert resumed.measure_every == 1 and resumed.estimator.raw()["step"] == list(range(30))


def test_bf16_autocast_accumulation_matches_analytic(tmp_path):
    steps, micro, k = 300, 16, 4
    data = regression_data(steps * micro * k, seed=2)
    cb = GradientNoiseScale("accumulation", measure_every_n_steps=1, ema_decay=0.999, log_every_n_steps=100)
    fit(LinReg(data[2]), cb, tmp_path, steps=steps, batch=micro, accumulate=k, data=data, precision="bf16-mixed")
    r = cb.estimator.read()
    assert abs(r.b_simple / TRUTH - 1) < 0.10, r


@pytest.mark.skipif(sys.platform == "win32", reason="ddp_spawn")
def test_ddp_two_ranks_gloo_all_methods_match_analytic(tmp_path):
    """One 2-rank gloo run, four callbacks side by side: the DDP comm hook (chosen by "auto"), per-micro-batch
    hooks with a cross-rank all-reduce, and per-example LayerNorm hooks. The LN-only model makes all three exact.
    2 ranks × 8 samples × 2 accumulated micro-batches (no_sync): ddp b_small = 16, accumulation b_small = 8,
    per_example b_small = 1; b_big = 32."""
    steps, micro, k, q = 300, 8, 2, 400.0
    x, y, w = regression_data(steps * micro * k * 2, seed=3)
    data = (ln_inputs(x, q), y, w)
    every_step = dict(measure_every_n_steps=1, ema_decay=0.999, log_every_n_steps=steps)
    cbs = [
        GradientNoiseScale("auto", **every_step),
        GradientNoiseScale("accumulation", **every_step, log_prefix="gns_acc/"),
        GradientNoiseScale("per_example", **every_step, log_prefix="gns_pe/"),
        # the default cadence: each rank times its own steps, rank 0's choice is broadcast (else the per-example
        # all-reduce of one rank would meet another collective, or none, on the other)
        GradientNoiseScale("per_example", ema_decay=0.999, log_every_n_steps=steps, log_prefix="gns_auto/"),
    ]
    cbs += [StepCost(cbs[-1], 0.2, extra_rank0=True), ReportCadence(cbs[-1], tmp_path)]  # rank 0 times 5, rank 1 1
    logger = CSVLogger(tmp_path, name="gns", version=0)
    loader = DataLoader(TensorDataset(*data[:2]), batch_size=micro, shuffle=False)
    ddp = DDPStrategy(start_method="spawn", timeout=timedelta(seconds=120))  # a mismatched collective fails, not hangs
    trainer = pl.Trainer(default_root_dir=tmp_path, accelerator="cpu", strategy=ddp, devices=2,
                         max_steps=steps, accumulate_grad_batches=k, callbacks=cbs, logger=logger,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(LNReg(w, q), loader)
    assert [(tmp_path / f"every{r}.txt").read_text() for r in (0, 1)] == ["5", "5"]
    rows = list(csv.DictReader(open(Path(logger.log_dir) / "metrics.csv")))
    for prefix in ("gns/", "gns_acc/", "gns_pe/", "gns_auto/"):
        last = [r for r in rows if r.get(prefix + "b_simple")][-1]
        b = float(last[prefix + "b_simple"])
        assert int(last["step"]) == steps - 1
        assert abs(b / TRUTH - 1) < (0.10 if prefix != "gns_auto/" else 0.3), (prefix, b)  # auto: fewer steps
        assert float(last[prefix + "batch_over_bsimple"]) == pytest.approx(32 / b, rel=1e-6)


class FailOnRank1:
    """A ``batch_size_fn`` that fails on rank 1 for every ``period``-th micro-batch (picklable, for spawned ranks)."""

    def __init__(self, period: int) -> None:
        self.period, self.calls = period, 0

    def __call__(self, batch):
        import torch.distributed as dist

        self.calls += 1
        if dist.get_rank() == 1 and self.calls % self.period == 0:
            raise KeyError("no batch size on this rank")
        return len(batch[0])


class ReportSkips(pl.Callback):
    """Each rank writes its estimator's skipped and used steps (spawned ranks do not return callback state)."""

    def __init__(self, gns: GradientNoiseScale, folder: Path) -> None:
        self.gns, self.folder = gns, Path(folder)

    def on_train_end(self, trainer, pl_module):
        r = self.gns.estimator.read()
        (self.folder / f"skips{trainer.global_rank}.txt").write_text(
            f"{r.n_skipped} {r.n_steps} {r.b_simple} {self.gns._warned_size} {self.gns._enabled}")


@pytest.mark.skipif(sys.platform == "win32", reason="ddp_spawn")
@pytest.mark.parametrize(("method", "period"), [("ddp", 4), ("per_example", 4), ("per_example", 1)])
def test_ddp_a_batch_size_failing_on_one_rank_skips_the_step_on_every_rank(tmp_path, method, period):
    """Rank 1 cannot size every 4th micro-batch (every 2nd step, 2 micro-batches per step). Until 0.4 that rank
    disabled itself and the other waited in the next all-reduce for ever (here: the 120 s DDP timeout). When it
    can size none (period 1), every rank gives up together at the first read-out."""
    steps, micro, k = 40, 8, 2
    x, y, w = regression_data(steps * micro * k * 2, seed=5)
    data = (ln_inputs(x, 400.0), y, w)
    cb = GradientNoiseScale(method, measure_every_n_steps=1, log_every_n_steps=steps // 2,
                            batch_size_fn=FailOnRank1(period))
    ddp = DDPStrategy(start_method="spawn", timeout=timedelta(seconds=120))
    trainer = pl.Trainer(default_root_dir=tmp_path, accelerator="cpu", strategy=ddp, devices=2, max_steps=steps,
                         accumulate_grad_batches=k, callbacks=[cb, ReportSkips(cb, tmp_path)], logger=False,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    loader = DataLoader(TensorDataset(*data[:2]), batch_size=micro, shuffle=False)
    trainer.fit(LNReg(w, 400.0), loader)
    reports = [(tmp_path / f"skips{r}.txt").read_text().split() for r in (0, 1)]
    assert [r[3] for r in reports] == ["False", "True"]  # the rank that failed warned (once)
    if period == 1:  # no step measurable: both ranks stopped at the read-out of step 19, after 20 skipped steps
        assert [r[:2] + r[4:] for r in reports] == [["20", "0", "False"], ["20", "0", "False"]]
        return
    assert [r[:2] + r[4:] for r in reports] == [["20", "20", "True"], ["20", "20", "True"]]  # the same 20 skipped
    assert float(reports[0][2]) == pytest.approx(float(reports[1][2]), rel=1e-9) and float(reports[0][2]) > 0


# ----------------------------------------------------------------------------------------------- robustness
def _accum_reading(tmp_path, data, **kw):
    cb = GradientNoiseScale("accumulation", measure_every_n_steps=1, ema_decay=0.98, log_every_n_steps=10)
    model = LinReg(data[2], nan_at=kw.pop("nan_at", None))
    fit(model, cb, tmp_path, steps=40, batch=8, accumulate=2, data=data, **kw)
    return cb


def test_clipping_does_not_change_estimate(tmp_path):
    data = regression_data(40 * 16, seed=4)
    ref = _accum_reading(tmp_path, data).estimator
    clipped = _accum_reading(tmp_path, data, gradient_clip_val=1e-4).estimator
    assert torch.allclose(ref.state_tensors(), clipped.state_tensors(), rtol=1e-12, atol=0)


def test_nan_step_is_skipped_and_counted(tmp_path):
    data = regression_data(40 * 16, seed=4)
    ref = _accum_reading(tmp_path, data).estimator
    bad = _accum_reading(tmp_path, data, nan_at=7).estimator
    rb = bad.read()
    assert rb.n_skipped == 1 and rb.n_steps == 39
    # Replaying the clean run's raw statistics without step 7 reproduces the NaN run's EMAs exactly.
    replay = GNSEstimator(ema_decay=0.98)
    raw = ref.raw()
    for i, step in enumerate(raw["step"]):
        if step != 7:
            replay.update(raw["small_sq_norm"][i], raw["big_sq_norm"][i], b_small=raw["b_small"][i],
                          b_big=raw["b_big"][i])
    # all fields but the skip counter
    assert torch.allclose(replay.state_tensors()[:-1], bad.state_tensors()[:-1], rtol=1e-10, atol=0)


class _ScaleLogger(pl.Callback):
    def __init__(self):
        self.scales = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.scales.append(float(trainer.precision_plugin.scaler.get_scale()))


@pytest.mark.parametrize("growth_interval", [1000, 1])
def test_loss_scale_constant_or_changing_does_not_change_estimate(tmp_path, growth_interval):
    """fp16 autocast with a GradScaler (constant, or doubling every step): hooks see scaled gradients; the
    callback divides the scale out, so every step's statistics match an unscaled fp32 run."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    data = regression_data(40 * 16, seed=5)
    ref = _accum_reading(tmp_path, data).estimator.raw()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=growth_interval)
    spy = _ScaleLogger()
    cb = GradientNoiseScale("accumulation", measure_every_n_steps=1, ema_decay=0.98, log_every_n_steps=10)
    model = LinReg(data[2])
    x, y, _ = data
    trainer = pl.Trainer(default_root_dir=tmp_path, accelerator="cpu", max_steps=40, accumulate_grad_batches=2,
                         callbacks=[cb, spy], logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    trainer.fit(model, DataLoader(TensorDataset(x, y), batch_size=8))
    raw = cb.estimator.raw()
    if growth_interval == 1000:
        assert set(spy.scales) == {256.0}
    else:  # doubles every step until fp16 overflows, then backs off: a changing scale and some inf steps
        assert len(set(spy.scales)) > 5
    finite = [i for i, (s, b) in enumerate(zip(raw["small_sq_norm"], raw["big_sq_norm"]))
              if math.isfinite(s) and math.isfinite(b)]
    assert cb.estimator.read().n_skipped == 40 - len(finite)
    assert len(finite) >= 20
    # fp16 forward rounding only (relative ~1e-3), not the scale² (≥ 6.5e4) factor
    for key in ("small_sq_norm", "big_sq_norm"):
        for i in finite:
            assert raw[key][i] == pytest.approx(ref[key][i], rel=2e-2)


class FrozenFusedAdam(torch.optim.Adam):
    """A fused optimizer (unscales inside step(), so Lightning skips unscale_) that never moves the weights."""

    def __init__(self, params):
        super().__init__(params, lr=0.0, fused=True)

    def step(self, closure=None, **kwargs):
        return closure() if closure is not None else None


class LinRegFused(LinReg):
    def configure_optimizers(self):
        return FrozenFusedAdam(self.parameters())


def test_fused_optimizer_under_fp16_scaler_is_unscaled(tmp_path):
    """Lightning does not unscale .grad for fused optimizers; the full-batch norm must still be divided by s²."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    data = regression_data(40 * 16, seed=5)
    ref = _accum_reading(tmp_path, data).estimator.raw()
    cb = GradientNoiseScale("accumulation", measure_every_n_steps=1, ema_decay=0.98, log_every_n_steps=10)
    x, y, w = data
    seen = []

    class GradSpy(pl.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            seen.append(float(pl_module.lin.weight.grad.norm()))

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    trainer = pl.Trainer(default_root_dir=tmp_path, accelerator="cpu", max_steps=40, accumulate_grad_batches=2,
                         callbacks=[cb, GradSpy()], logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False,
                         plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    trainer.fit(LinRegFused(w), DataLoader(TensorDataset(x, y), batch_size=8))
    raw = cb.estimator.raw()
    assert seen[0] > 100 * math.sqrt(ref["big_sq_norm"][0])  # .grad really was still scaled in the hook
    for key in ("small_sq_norm", "big_sq_norm"):
        for a, b in zip(raw[key], ref[key]):
            assert a == pytest.approx(b, rel=2e-2)


def test_real_loss_trajectory_receives_gns(tmp_path):
    from lightning_scaling.callbacks.loss_trajectory import LossTrajectory

    data = regression_data(20 * 16, seed=9)
    x, y, w = data
    traj = LossTrajectory(tokens_per_sample=4)
    cb = GradientNoiseScale("accumulation", measure_every_n_steps=1, ema_decay=0.9, log_every_n_steps=5)
    trainer = pl.Trainer(default_root_dir=tmp_path, accelerator="cpu", max_steps=20, accumulate_grad_batches=2,
                         callbacks=[traj, cb], logger=CSVLogger(tmp_path), enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(LinReg(w), DataLoader(TensorDataset(x, y), batch_size=8))
    h = traj.history
    assert list(h.gns_step) == [4, 9, 14, 19]
    assert h.gns_b_simple[-1] == pytest.approx(cb.estimator.read().b_simple)
    assert cb.last_reading.b_simple_tokens == pytest.approx(4 * cb.last_reading.b_simple)


def test_no_host_sync_between_log_steps(tmp_path, monkeypatch):
    """Between log intervals the callback never calls .item()/.tolist()/.cpu()/float()/bool() on a tensor."""
    import lightning_scaling

    pkg = str(Path(lightning_scaling.__file__).parent)
    data = regression_data(40 * 16, seed=10)
    x, y, w = data

    def guard(name):
        orig = getattr(torch.Tensor, name)

        def wrapped(self, *a, **k):
            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(pkg):
                raise AssertionError(f"host sync Tensor.{name} from {caller}")
            return orig(self, *a, **k)

        return wrapped

    class Arm(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            for name in ("item", "tolist", "cpu", "numpy", "__float__", "__bool__", "__int__"):
                monkeypatch.setattr(torch.Tensor, name, guard(name))

        def on_train_end(self, trainer, pl_module):
            monkeypatch.undo()

    steps = 40  # past the default cadence's timing (chosen at step 23): its choice happens under the guard too
    for method, k, model in (("accumulation", 2, LinReg(w)), ("per_example", 1, LNReg(w, 400.0))):
        xx = ln_inputs(x, 400.0) if method == "per_example" else x
        cb = GradientNoiseScale(method, log_every_n_steps=1000)
        trainer = pl.Trainer(default_root_dir=tmp_path, accelerator="cpu", max_steps=steps, accumulate_grad_batches=k,
                             callbacks=[Arm(), cb], logger=False, enable_progress_bar=False,
                             enable_model_summary=False, enable_checkpointing=False)
        trainer.fit(model, DataLoader(TensorDataset(xx, y), batch_size=8))
        n = cb.measure_every
        assert cb.measured_overhead is not None
        expected = sum(1 for s in range(steps) if (s % 2 == 0 if s <= CHOSEN_AT else s % n == 0))
        assert cb.estimator.read().n_steps == expected


def test_k1_gives_no_estimate_and_warns(tmp_path):
    # method="accumulation" with one micro-batch per step has nothing to compare: refused at the start (until 0.4 it
    # hooked, timed and "measured" every step, each without an estimate; test_gns.py keeps the estimator's K = 1)
    data = regression_data(20 * 8, seed=6)
    cb = GradientNoiseScale("accumulation", measure_every_n_steps=1, log_every_n_steps=5)
    with pytest.warns(ScalingWarning, match="needs accumulate_grad_batches >= 2"):
        fit(LinReg(data[2]), cb, tmp_path, steps=20, batch=8, accumulate=1, data=data)
    assert cb.estimator.read().n_steps == 0 and cb.estimator.n_no_estimate == 0 and cb._handles == []


def test_accumulation_scheduled_by_lightnings_callback_is_measured(tmp_path):
    from lightning.pytorch.callbacks import GradientAccumulationScheduler

    # The scheduler needs accumulate_grad_batches=1 on the Trainer and raises it at an epoch start: not a K = 1 run.
    data = regression_data(40 * 4 * 8, seed=6)
    cb = GradientNoiseScale("accumulation", measure_every_n_steps=1, log_every_n_steps=5)
    fit(LinReg(data[2]), cb, tmp_path, steps=40, batch=8, data=data,
        extra_callbacks=[GradientAccumulationScheduler({0: 4})])
    r = cb.estimator.read()
    assert r.n_steps == 40 and r.b_simple == pytest.approx(TRUTH, rel=0.3), r.b_simple


def test_partial_last_window_is_skipped(tmp_path):
    # 10 micro-batches per epoch with K = 4: windows of 4, 4, then a short one of 2 -> skipped each epoch.
    data = regression_data(80, seed=7)
    cb = GradientNoiseScale("accumulation", measure_every_n_steps=1, log_every_n_steps=1)
    x, y, w = data
    trainer = pl.Trainer(default_root_dir=tmp_path, accelerator="cpu", max_epochs=2, accumulate_grad_batches=4,
                         callbacks=[cb], logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False)
    trainer.fit(LinReg(w), DataLoader(TensorDataset(x, y), batch_size=8))
    assert trainer.global_step == 6
    assert cb.n_partial_windows == 2 and cb.estimator.read().n_steps == 4


def test_resume_from_checkpoint_continues_emas(tmp_path):
    data = regression_data(20 * 16, seed=8)  # one epoch = 20 optimizer steps (K = 2, micro 8)
    x, y, w = data

    def trainer(cb, epochs):
        return pl.Trainer(default_root_dir=tmp_path, accelerator="cpu", max_epochs=epochs, accumulate_grad_batches=2,
                          callbacks=[cb], logger=False, enable_progress_bar=False, enable_model_summary=False,
                          enable_checkpointing=False)

    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    straight = GradientNoiseScale("accumulation", measure_every_n_steps=1, ema_decay=0.9)
    trainer(straight, 2).fit(LinReg(w), loader)
    first = GradientNoiseScale("accumulation", measure_every_n_steps=1, ema_decay=0.9)
    t1 = trainer(first, 1)
    t1.fit(LinReg(w), loader)
    ckpt = tmp_path / "half.ckpt"
    t1.save_checkpoint(ckpt)
    assert torch.load(ckpt, weights_only=True)["callbacks"][first.state_key]["estimator"]["state"] is not None
    resumed = GradientNoiseScale("accumulation", measure_every_n_steps=1, ema_decay=0.9)
    trainer(resumed, 2).fit(LinReg(w), loader, ckpt_path=ckpt)
    assert resumed.estimator.raw()["step"] == list(range(40))
    assert torch.allclose(resumed.estimator.state_tensors(), straight.estimator.state_tensors(), rtol=1e-12, atol=0)


def test_logs_to_logger_and_loss_trajectory(tmp_path):
    from unittest.mock import MagicMock

    data = regression_data(20 * 16, seed=9)
    from lightning_scaling.callbacks import LossTrajectory

    class Traj(LossTrajectory):  # a LossTrajectory (found by class) whose record_gns is watched
        record_gns = MagicMock()

    traj = Traj(tokens_per_sample=64)
    class SpyLogger(CSVLogger):
        log_metrics = MagicMock()

    logger = SpyLogger(tmp_path)
    cb = GradientNoiseScale("accumulation", measure_every_n_steps=1, ema_decay=0.9, log_every_n_steps=10)
    x, y, w = data
    trainer = pl.Trainer(default_root_dir=tmp_path, accelerator="cpu", max_steps=20, accumulate_grad_batches=2,
                         callbacks=[cb, traj], logger=logger, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(LinReg(w), DataLoader(TensorDataset(x, y), batch_size=8))
    gns_calls = [c for c in logger.log_metrics.call_args_list if "gns/b_simple" in c.args[0]]
    assert [c.kwargs["step"] for c in gns_calls] == [9, 19]
    m = gns_calls[-1].args[0]
    r = cb.estimator.read()
    assert m["gns/b_simple"] == pytest.approx(r.b_simple)
    assert m["gns/b_simple_tokens"] == pytest.approx(64 * r.b_simple)
    assert m["gns/batch_over_bsimple"] == pytest.approx(16 / r.b_simple)
    assert traj.record_gns.call_count == 2
    step, b, g2, tr = traj.record_gns.call_args.args
    assert step == 19 and b == pytest.approx(r.b_simple) and b == pytest.approx(tr / g2)


def test_existing_comm_hook_is_detected():
    """PyTorch allows one comm hook per DDP model: "ddp" refuses clearly, "auto" falls back with a warning."""
    from types import SimpleNamespace

    import torch.distributed as dist
    from lightning.pytorch.strategies import DDPStrategy
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    if dist.is_initialized():
        pytest.skip("a process group already exists")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(nn.Linear(2, 1))
        ddp.register_comm_hook(None, allreduce_hook)  # the user's own hook
        strategy = DDPStrategy()
        strategy.model = ddp
        trainer = SimpleNamespace(strategy=strategy, world_size=2, accumulate_grad_batches=2)
        with pytest.warns(UserWarning, match="communication hook is already set"):
            assert GradientNoiseScale("auto")._resolve_method(trainer) == "accumulation"
        with pytest.raises(ValueError, match="communication hook is already set"):
            GradientNoiseScale("ddp").on_fit_start(trainer, LinReg(torch.zeros(D)))
    finally:
        dist.destroy_process_group()


def test_bad_arguments():
    with pytest.raises(ValueError, match="`method` must be one of .*got 'sketch'"):
        GradientNoiseScale("sketch")
    with pytest.raises(ValueError, match=r"`ema_decay` must be in \[0, 1\), got 1.5"):
        GradientNoiseScale(ema_decay=1.5)
    with pytest.raises(ValueError, match=r"`ema_decay` must be in \[0, 1\), got None"):
        GradientNoiseScale(ema_decay=None)
    with pytest.raises(ValueError, match="`per_example_layers` must be one of .*got 'all'"):
        GradientNoiseScale(per_example_layers="all")
    with pytest.raises(ValueError, match="`log_every_n_steps` must be a positive integer or None, got 0"):
        GradientNoiseScale(log_every_n_steps=0)


# ----------------------------------------------------------------------------------------------- per-example exactness
class _Block(nn.Module):
    def __init__(self, d_in, d_hidden, norm):
        super().__init__()
        self.inp = nn.Linear(d_in, d_hidden)
        self.norm = norm
        self.out = nn.Linear(d_hidden, 3, bias=False)

    def forward(self, x):
        return self.out(torch.tanh(self.norm(self.inp(x))))


@pytest.mark.parametrize(
    "d_in,d_hidden,t,norm",
    [
        (5, 7, 6, "ln"),  # T(in+out) > in·out: explicit per-example weight gradients
        (32, 32, 4, "ln"),  # T(in+out) < in·out: Gram ("ghost") norm
        (6, 8, 5, "rms"),
        (6, 8, 0, "ln"),  # no sequence dimension
    ],
)
def test_per_example_hooks_equal_explicit_loop(d_in, d_hidden, t, norm):
    torch.manual_seed(0)
    norm_mod = nn.LayerNorm(d_hidden) if norm == "ln" else nn.RMSNorm(d_hidden)
    with torch.no_grad():  # non-trivial affine parameters
        for p in norm_mod.parameters():
            p.add_(0.3 * torch.randn_like(p))
    model = _Block(d_in, d_hidden, norm_mod)
    b = 5
    x = torch.randn(b, t, d_in) if t else torch.randn(b, d_in)
    target = torch.randn(b, t, 3) if t else torch.randn(b, 3)

    def per_example_loss(xb, yb):
        return (model(xb) - yb).square().sum()  # sum over tokens; mean over the batch below

    for layers in ("norm", "norm+linear"):
        cb = GradientNoiseScale("per_example", per_example_layers=layers)
        params = cb._install_module_hooks(model)
        cb._in_backward_window = True
        model.zero_grad()
        (model(x) - target).square().flatten(1).sum(1).mean().backward()  # one batched, mean-reduced backward
        cb._enabled = True
        cb.on_after_backward(None, None)  # folds the micro-batch's norm-layer rows into one squared sum
        got = torch.stack(cb._pe_sq).sum()
        cb._remove_hooks()
        cb._in_backward_window = False
        expected = 0.0
        for i in range(b):
            grads = torch.autograd.grad(per_example_loss(x[i : i + 1], target[i : i + 1]), params)
            expected += sum(float(g.square().sum()) for g in grads)
        assert float(got) == pytest.approx(expected, rel=1e-4)
        n_norm = 1 if norm == "rms" else 2
        assert len(params) == (n_norm if layers == "norm" else n_norm + 3)


# ----------------------------------------------------------------------------------------------- LightningCLI config
def test_lightning_cli_config(tmp_path, capsys):
    from lightning.pytorch.cli import LightningCLI
    from lightning.pytorch.demos.boring_classes import BoringModel

    cfg = Path(__file__).resolve().parents[1] / "callbacks" / "gns.yaml"
    with pytest.raises(SystemExit) as exc:
        LightningCLI(BoringModel, args=["fit", "--config", str(cfg), "--print_config"], save_config_callback=None)
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "GradientNoiseScale" in out and "ema_decay: 0.99" in out
    cli = LightningCLI(BoringModel, args=["--config", str(cfg), "--trainer.default_root_dir", str(tmp_path)],
                       run=False, save_config_callback=None)
    gns = [c for c in cli.trainer.callbacks if isinstance(c, GradientNoiseScale)]
    assert len(gns) == 1 and gns[0].method == "auto" and gns[0].per_example_layers == "norm"
    assert gns[0].measure_every_n_steps == "auto" and gns[0].max_overhead == 0.02


def test_layer_norm_rows_from_saved_stats_equal_a_recomputed_norm():
    from lightning_scaling.callbacks.gns import _layer_norm_stats

    torch.manual_seed(0)
    ln = nn.LayerNorm(8)
    with torch.no_grad():
        ln.weight.add_(0.3 * torch.randn(8))
    x = torch.randn(4, 5, 8, requires_grad=True)
    out = ln(x)
    stats = _layer_norm_stats(out)
    assert stats is not None and tuple(stats[0].shape) == (4, 5, 1)
    assert _layer_norm_stats(out * 2.0) is None  # any other autograd node: recompute
    cb = GradientNoiseScale("per_example")
    g = torch.randn(4, 5, 8)
    fast, slow = cb._norm_rows("ln", ln, x, g, stats), cb._norm_rows("ln", ln, x, g, None)
    assert len(fast) == 2 and all(torch.allclose(a, b, atol=1e-6) for a, b in zip(fast, slow))


# ------------------------------------------------------------------------------------------ setups that cannot measure
def test_a_model_without_norm_layers_is_told_what_measures_it(tmp_path):
    w = torch.randn(D)
    cb = GradientNoiseScale()  # auto: one process, K = 1 -> per-example LayerNorm proxy, and LinReg has none
    with pytest.warns(ScalingWarning, match="norm\\+linear.*accumulate_grad_batches >= 2"):
        fit(LinReg(w), cb, tmp_path, steps=4, batch=8, data=regression_data(64))
    assert not cb._enabled and cb.last_reading is None and cb._handles == []
    linear = GradientNoiseScale(per_example_layers="norm+linear")  # the suggested fix measures it
    fit(LinReg(w), linear, tmp_path, steps=4, batch=8, data=regression_data(64))
    assert linear.last_reading is not None and linear.last_reading.n_steps > 0
