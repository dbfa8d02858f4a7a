import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger

from helpers import RankHistoryDump, TinyLM, token_loader, trainer_kwargs
from lightning_scaling import RunHistory
from lightning_scaling.callbacks import LossTrajectory
from lightning_scaling.callbacks.loss_trajectory import count_non_embedding_params, default_batch_size


def fit(tmp_path, model, traj, loader=None, extra=(), **kw):
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, **kw), callbacks=[traj, *extra])
    trainer.fit(model, loader or token_loader())
    return trainer


def test_loss_and_tokens_under_accumulation(tmp_path):
    # lr=0 keeps the weights fixed, so every micro-batch loss can be recomputed directly.
    model = TinyLM(lr=0.0)
    traj = LossTrajectory(tokens_per_sample=6, flush_every_n_steps=2)
    loader = token_loader(n=48, batch_size=4)  # 12 micro-batches per epoch = 4 windows of 3
    fit(tmp_path, model, traj, loader, max_steps=8, accumulate_grad_batches=3)
    h = traj.history
    with torch.no_grad():
        micro = [model.training_step(b, i).item() for i, b in enumerate(loader)]
    expected = [np.mean(micro[3 * (k % 4): 3 * (k % 4) + 3]) for k in range(8)]
    np.testing.assert_array_equal(h.step, np.arange(8))
    np.testing.assert_allclose(h.loss, expected, rtol=1e-6)
    assert h.batch_size == 12
    np.testing.assert_array_equal(h.samples, np.arange(8) * 12.0)
    np.testing.assert_array_equal(h.tokens, np.arange(8) * 72.0)
    assert h.n_params == count_non_embedding_params(model) == 8 * 16 + 16


def test_bf16_mixed_precision_records_the_autocast_loss(tmp_path):
    # Under bf16 autocast the recorded loss must be the one the model computed (in fp32 at the end of the
    # cross-entropy), undone from accumulation: same check as above, recomputed under the same autocast.
    model = TinyLM(lr=0.0)
    traj = LossTrajectory(tokens_per_sample=6, flush_every_n_steps=2)
    loader = token_loader(n=48, batch_size=4)
    fit(tmp_path, model, traj, loader, max_steps=8, accumulate_grad_batches=3, precision="bf16-mixed")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        micro = [model.training_step(b, i).float().item() for i, b in enumerate(loader)]
    expected = [np.mean(micro[3 * (k % 4): 3 * (k % 4) + 3]) for k in range(8)]
    assert traj.history.loss.dtype == np.float64
    np.testing.assert_allclose(traj.history.loss, expected, rtol=1e-6)
    np.testing.assert_array_equal(traj.history.tokens, np.arange(8) * 72.0)


def test_partial_accumulation_window_counts_real_samples(tmp_path):
    traj = LossTrajectory(tokens_per_sample=6, flush_every_n_steps=3)
    fit(tmp_path, TinyLM(lr=0.0), traj, token_loader(n=40, batch_size=4), max_steps=8, accumulate_grad_batches=3)
    h = traj.history
    # 10 micro-batches per epoch: windows of 3, 3, 3 and a partial one of 1 micro-batch (4 samples).
    np.testing.assert_array_equal(np.diff(h.samples)[:4], [12, 12, 12, 4])
    assert np.isfinite(h.loss).all()


def test_planned_lr_matches_the_schedule_that_ran(tmp_path):
    traj = LossTrajectory(flush_every_n_steps=7)
    fit(tmp_path, TinyLM(schedule="cosine", max_steps=30), traj, max_steps=30)
    h = traj.history
    assert h.planned_lr is not None and h.planned_lr.size == 30
    np.testing.assert_allclose(h.planned_lr, h.lr, rtol=1e-12)
    assert h.lr[-1] < h.lr[0] / 5
    assert np.isnan(h.tokens).all()  # no tokens_per_sample: tokens unknown, not invented


def test_nan_loss_is_recorded_and_flagged(tmp_path):
    traj = LossTrajectory(flush_every_n_steps=4)
    with pytest.warns(UserWarning, match="non-finite loss"):
        fit(tmp_path, TinyLM(nan_at=3), traj, max_steps=10)
    h = traj.history
    assert len(h) == 10
    np.testing.assert_array_equal(np.flatnonzero(h.nonfinite), [3])


def test_history_file_and_tensorboard_series(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    traj = LossTrajectory(tokens_per_sample=6, flush_every_n_steps=5)
    logger = TensorBoardLogger(tmp_path, name="tb")
    fit(tmp_path, TinyLM(), traj, max_steps=12, logger=logger)
    path = traj.history_path(pl.Trainer(**trainer_kwargs(tmp_path, logger=logger)))
    saved = RunHistory.from_json(path)
    np.testing.assert_allclose(saved.loss, traj.history.loss)
    # The TensorBoard run reads back as the same history (float32 precision).
    tb = RunHistory.from_tensorboard(logger.log_dir)
    np.testing.assert_allclose(tb.loss, saved.loss, rtol=1e-6)
    assert tb.n_params == saved.n_params and tb.batch_size == 4 and tb.tokens_per_sample == 6
    acc = EventAccumulator(str(tmp_path / "tb" / "version_0" / "by_tokens"), size_guidance={"scalars": 0})
    acc.Reload()
    assert [e.step for e in acc.Scalars("scaling/loss")] == [int(t) for t in saved.tokens]


def _events(log_dir):
    from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader

    files = sorted(Path(log_dir).glob("events.out.tfevents.*"))
    return [e for f in files for e in LegacyEventFileLoader(str(f)).Load() if e.HasField("summary")]


def test_each_step_is_one_tensorboard_event_and_a_prefixed_logger_keeps_log_metrics(tmp_path):
    # One event per step holding the four scalars (one event per value cost LossTrajectory two thirds of its time).
    traj = LossTrajectory(tokens_per_sample=6, flush_every_n_steps=5)
    logger = TensorBoardLogger(tmp_path, name="tb")
    fit(tmp_path, TinyLM(), traj, max_steps=12, logger=logger)
    steps = [e for e in _events(logger.log_dir) if any(v.tag == "scaling/loss" for v in e.summary.value)]
    assert [e.step for e in steps] == list(range(12))
    assert all(sorted(v.tag for v in e.summary.value) == ["scaling/loss", "scaling/lr", "scaling/samples",
                                                          "scaling/tokens"] for e in steps)
    np.testing.assert_allclose([v.simple_value for e in steps for v in e.summary.value if v.tag == "scaling/loss"],
                               traj.history.loss, rtol=1e-6)
    # A prefix (or any logger but a plain TensorBoardLogger) goes through log_metrics: the prefix is kept.
    traj = LossTrajectory(tokens_per_sample=6, flush_every_n_steps=5)
    logger = TensorBoardLogger(tmp_path / "p", name="tb", prefix="run1")
    fit(tmp_path / "p", TinyLM(), traj, max_steps=6, logger=logger)
    tags = {v.tag for e in _events(logger.log_dir) for v in e.summary.value}
    assert {"run1-scaling/loss", "run1-scaling/tokens"} <= tags and "scaling/loss" not in tags


def test_resume_continues_one_history(tmp_path):
    # One batch per epoch (so Lightning's data-order restore cannot matter); a checkpoint at step 8 and a
    # resume to step 16 must give exactly the history of an uninterrupted 16-step run.
    def loader():
        return token_loader(n=4, batch_size=4)

    pl.seed_everything(0)
    full = LossTrajectory(tokens_per_sample=6, flush_every_n_steps=3, name="r")
    fit(tmp_path / "full", TinyLM(schedule="cosine", max_steps=16), full, loader(), max_steps=16)

    pl.seed_everything(0)
    first = LossTrajectory(tokens_per_sample=6, flush_every_n_steps=3, name="r")
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_on_train_epoch_end=True, save_last=True)
    fit(tmp_path / "a", TinyLM(schedule="cosine", max_steps=16), first, loader(), max_steps=8,
        enable_checkpointing=True, extra=[ckpt])
    second = LossTrajectory(tokens_per_sample=6, flush_every_n_steps=3, name="r")
    trainer = pl.Trainer(**trainer_kwargs(tmp_path / "b", max_steps=16), callbacks=[second])
    trainer.fit(TinyLM(schedule="cosine", max_steps=16), loader(), ckpt_path=tmp_path / "ckpt" / "last.ckpt")

    a, b = full.history, second.history
    np.testing.assert_array_equal(b.step, np.arange(16))
    np.testing.assert_allclose(b.loss, a.loss, rtol=1e-6)
    np.testing.assert_array_equal(b.tokens, a.tokens)
    np.testing.assert_allclose(b.lr, a.lr, rtol=1e-12)
    np.testing.assert_allclose(b.planned_lr, a.planned_lr, rtol=1e-12)
    # The checkpoint's state is plain Python (loads with weights_only=True).
    state = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["callbacks"]
    assert any(k.startswith("LossTrajectory") and len(v["step"]) == 8 for k, v in state.items())


def test_runs_without_a_logger_do_not_overwrite_each_other(tmp_path):
    # logger=False: every run's history goes to <default_root_dir>/scaling; a second run used to replace the first.
    first = fit(tmp_path, TinyLM(), LossTrajectory(tokens_per_sample=6), max_steps=12)
    fit(tmp_path, TinyLM(), LossTrajectory(tokens_per_sample=6), max_steps=5)
    fit(tmp_path, TinyLM(), LossTrajectory(tokens_per_sample=6), max_steps=3)
    assert first.logger is None
    paths = [tmp_path / "scaling" / "history.json", tmp_path / "scaling" / "version_1" / "history.json",
             tmp_path / "scaling" / "version_2" / "history.json"]
    assert [len(RunHistory.from_json(p)) for p in paths] == [12, 5, 3]
    # resuming continues the same file (the checkpointed history already holds the earlier steps)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    fit(tmp_path / "r", TinyLM(max_steps=8), LossTrajectory(tokens_per_sample=6), max_steps=4,
        enable_checkpointing=True, extra=[ckpt])
    trainer = pl.Trainer(**trainer_kwargs(tmp_path / "r", max_steps=8), callbacks=[LossTrajectory(tokens_per_sample=6)])
    trainer.fit(TinyLM(max_steps=8), token_loader(), ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert len(RunHistory.from_json(tmp_path / "r" / "scaling" / "history.json")) == 8
    assert not (tmp_path / "r" / "scaling" / "version_1").exists()
    # a run that went to version_1 resumes there, and leaves the earlier run's history alone
    ckpt_b = ModelCheckpoint(dirpath=tmp_path / "ckpt_b", save_last=True)
    b = LossTrajectory(tokens_per_sample=6)
    trainer = fit(tmp_path / "r", TinyLM(max_steps=10), b, max_steps=4, enable_checkpointing=True, extra=[ckpt_b])
    assert b.history_path(trainer) == tmp_path / "r" / "scaling" / "version_1" / "history.json"
    resumed = LossTrajectory(tokens_per_sample=6)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path / "r", max_steps=10), callbacks=[resumed])
    trainer.fit(TinyLM(max_steps=10), token_loader(), ckpt_path=tmp_path / "ckpt_b" / "last.ckpt")
    assert len(RunHistory.from_json(tmp_path / "r" / "scaling" / "history.json")) == 8
    assert len(RunHistory.from_json(tmp_path / "r" / "scaling" / "version_1" / "history.json")) == 10


@pytest.mark.skipif(sys.platform == "win32", reason="gloo DDP spawn")
def test_ddp_two_ranks_same_history_tokens_count_both(tmp_path):
    traj = LossTrajectory(tokens_per_sample=6, flush_every_n_steps=3)
    model = TinyLM(lr=0.0)
    trainer = pl.Trainer(
        **trainer_kwargs(tmp_path, max_steps=6, devices=2, strategy="ddp_spawn", use_distributed_sampler=True),
        callbacks=[traj, RankHistoryDump(str(tmp_path))],
    )
    loader = token_loader(n=48, batch_size=4)
    trainer.fit(model, loader)
    r0 = RunHistory.from_json(tmp_path / "rank0.json")
    r1 = RunHistory.from_json(tmp_path / "rank1.json")
    np.testing.assert_array_equal(r0.loss, r1.loss)
    np.testing.assert_array_equal(r0.tokens, r1.tokens)
    assert r0.batch_size == 8  # 4 per rank x 2 ranks
    np.testing.assert_array_equal(r0.tokens, np.arange(6) * 48.0)
    # With fixed weights, 6 steps x 2 ranks x 4 samples cover the 48-sample set exactly once, so the mean of the
    # rank-averaged step losses equals the full-data loss, whatever order the distributed sampler chose.
    with torch.no_grad():
        x, y = loader.dataset.tensors
        full = model.training_step((x, y), 0).item()
    assert np.mean(r0.loss) == pytest.approx(full, rel=1e-5)


def test_default_batch_size_and_argument_validation():
    assert default_batch_size(torch.zeros(5, 3)) == 5
    assert default_batch_size({"input_ids": torch.zeros(7, 2), "x": 1}) == 7
    assert default_batch_size((torch.zeros(3, 2), torch.zeros(3))) == 3
    with pytest.raises(ValueError, match="batch_size_fn"):
        default_batch_size({"a": "text"})
    with pytest.raises(ValueError, match="tokens_per_sample"):
        LossTrajectory(tokens_per_sample=0)
    with pytest.raises(ValueError, match="flush_every_n_steps"):
        LossTrajectory(flush_every_n_steps=0)
    with pytest.raises(ValueError, match="batch_size_fn"):
        LossTrajectory(batch_size_fn=3)


class _NotATensor:
    """A loss-like object that is no tensor: Lightning's manual optimization passes it through (it detaches it)."""

    def detach(self) -> "_NotATensor":
        return self


def test_bad_training_step_output_is_a_type_error(tmp_path):
    class Fine(TinyLM):
        def training_step(self, batch, batch_idx):
            return {"loss": super().training_step(batch, batch_idx)}

    traj = LossTrajectory(flush_every_n_steps=2)
    fit(tmp_path, Fine(), traj, max_steps=4)  # a mapping with "loss" is fine
    assert len(traj.history) == 4

    class Weird(TinyLM):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False  # Lightning's automatic loop would reject the output itself

        def training_step(self, batch, batch_idx):
            opt = self.optimizers()
            opt.zero_grad()
            self.manual_backward(super().training_step(batch, batch_idx))
            opt.step()
            return {"loss": _NotATensor()}

    with pytest.raises(TypeError, match="training_step must return a Tensor or a mapping with 'loss'"):
        fit(tmp_path / "weird", Weird(), LossTrajectory(flush_every_n_steps=2), max_steps=4)


def test_lightning_cli_config_loads(tmp_path, capsys):
    from pathlib import Path

    from lightning.pytorch.cli import LightningCLI

    cfg = Path(__file__).resolve().parents[1] / "callbacks" / "scaling.yaml"
    with pytest.raises(SystemExit, match="^0$") as exc:
        LightningCLI(TinyLM, args=["fit", "--config", str(cfg), "--print_config"], save_config_callback=None)
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "class_path: lightning_scaling.callbacks.LossTrajectory" in out
    assert "flush_every_n_steps: 50" in out
