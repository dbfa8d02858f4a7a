"""The recipe at scale: config checks (``--dry-run``), checkpoint/resume, locks, shards, the Ray backend, rank 0."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lightning_scaling.cli import main
from lightning_scaling.demo.data import StdlibTextDataModule
from lightning_scaling.demo.model import GPT
from lightning_scaling.study import RunLock, check_config, load_config, parse_shard, plan_runs
from lightning_scaling.study.run import run_recipe, train_run
from lightning_scaling.history import RunHistory

HERE = __name__  # class paths of the test classes below


class NoTokensData(StdlibTextDataModule):
    """A datamodule without a usable ``tokens_per_sample``."""

    tokens_per_sample = None  # type: ignore[assignment]


class SmallBatchData(StdlibTextDataModule):
    """A datamodule that rejects batches above 8 (a memory limit, say)."""

    def __init__(self, batch_size: int = 4, **kwargs: Any) -> None:
        if batch_size > 8:
            raise ValueError(f"batch_size {batch_size} > 8 does not fit")
        super().__init__(batch_size=batch_size, **kwargs)


class FixedLengthGPT(GPT):
    """A model whose schedule length is not an init argument."""

    def __init__(self, d_model: int = 8, n_layer: int = 1, n_head: int = 2, block_size: int = 16,
                 lr: float = 3e-3) -> None:
        super().__init__(d_model=d_model, n_layer=n_layer, n_head=n_head, block_size=block_size, lr=lr)


def tiny(**overrides: Any) -> dict[str, Any]:
    """A 5-run recipe of tiny GPTs (3 sizes, sweep 2/4/8 at the smallest, the largest held out), 30 steps."""
    cfg: dict[str, Any] = {
        "model": {"class_path": "lightning_scaling.demo.model.GPT",
                  "init_args": {"n_layer": 1, "n_head": 2, "block_size": 16, "lr": 3e-3, "warmup_steps": 3,
                                "schedule": "constant", "weight_decay": 0.0}},
        "data": {"class_path": "lightning_scaling.demo.data.StdlibTextDataModule",
                 "init_args": {"block_size": 16, "max_bytes": 200_000, "val_bytes": 8_192}},
        "sizes": [{"name": "d8", "d_model": 8}, {"name": "d12", "d_model": 12}, {"name": "d16", "d_model": 16}],
        "batch_size": 4, "batch_sizes": [2, 8], "sweep_size": 0, "max_steps": 30, "torch_threads": 1,
        "trainer": {"accelerator": "cpu", "devices": 1, "limit_val_batches": 0},
        "gns": None, "forecast": None, "fit": {"n_bootstrap": 0, "form": "kaplan"}, "name": "tiny",
    }
    cfg.update(overrides)
    return cfg


def write_cfg(path: Path, cfg: dict[str, Any]) -> Path:
    path.write_text(json.dumps(cfg))
    return path


# ---------------------------------------------------------------------------------------------- 1. config checks
def test_checks_pass_on_a_good_config() -> None:
    checks = check_config(load_config(tiny()))
    assert all(c.ok for c in checks), [c.line() for c in checks if not c.ok]
    names = {c.name for c in checks}
    assert {"batch sweep", "batch_size_arg", "max_steps_arg", "sizes", "tokens_per_sample", "batch 8"} <= names
    sizes = next(c for c in checks if c.name == "sizes")
    assert "d8=768" in sizes.message and "d16=3,072" in sizes.message  # 12 * n_layer * d^2, measured


@pytest.mark.parametrize(("overrides", "name", "needle"), [
    ({"sizes": [{"name": "d16", "d_model": 16}, {"name": "d12", "d_model": 12}, {"name": "d8", "d_model": 8}]},
     "sizes", "N must strictly increase"),
    ({"data": {"class_path": f"{HERE}.NoTokensData", "init_args": {"block_size": 16, "max_bytes": 200_000}}},
     "tokens_per_sample", "tokens would be NaN"),
    ({"tokens_per_sample": 7}, "tokens_per_sample", "does not match a batch of shape (2, 16)"),
    ({"model": {"class_path": f"{HERE}.FixedLengthGPT", "init_args": {"n_layer": 1}}},
     "max_steps_arg", "has no init argument 'max_steps'"),
    ({"batch_size_arg": "batch"}, "batch_size_arg", "has no init argument 'batch'"),
    ({"lr_scaling": "sqrt", "lr_arg": "learning_rate",
      "model": {"class_path": "lightning_scaling.demo.model.GPT", "init_args": {"n_layer": 1, "learning_rate": 1e-3}}},
     "lr_arg", "no init argument 'learning_rate'"),
    ({"data": {"class_path": f"{HERE}.SmallBatchData", "init_args": {"block_size": 16, "max_bytes": 200_000}},
      "batch_sizes": [2, 16]}, "batch 16", "batch_size 16 > 8 does not fit"),
    ({"trainer": {"accelerator": "cpu", "devices": 1, "limit_val_batches": 0, "accumulate_grad_batches": 4}},
     "batch 2", "does not divide over devices x accumulate_grad_batches = 4"),
    ({"batch_sizes": []}, "batch sweep", "B_crit(L) needs >= 3"),
    ({"schedules": ["cosine"], "schedule_arg": "sched"}, "schedule_arg", "has no init argument 'sched'"),
    ({"schedules": ["cosine"], "model": {"class_path": "lightning_scaling.demo.model.GPT",  # GPT's default: cosine
                                         "init_args": {"n_layer": 1, "n_head": 2, "block_size": 16}}},
     "schedule_arg", "list 'cosine', the model's own schedule (the default of GPT(schedule=...))"),
])
def test_dry_run_fails_with_one_line_per_silent_setting(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                        overrides: dict[str, Any], name: str, needle: str) -> None:
    path = write_cfg(tmp_path / "cfg.json", tiny(**overrides))
    assert main(["recipe", "--config", str(path), "--dry-run"]) == 1
    failed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("FAIL")]
    assert len(failed) == 1 and failed[0].startswith(f"FAIL {name}: ") and needle in failed[0], failed


def test_a_trainer_argument_typo_fails_the_dry_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tiny(trainer={"accelerator": "cpu", "devices": 1, "limit_val_batch": 2})
    from lightning_scaling.study.run import trainer_arguments

    checks = check_config(load_config(bad), trainer_arguments())
    (trainer,) = [c for c in checks if c.name == "trainer"]
    assert not trainer.ok and "'limit_val_batch' (did you mean 'limit_val_batches'?)" in trainer.message
    assert [c.ok for c in check_config(load_config(tiny()), trainer_arguments()) if c.name == "trainer"] == [True]
    assert not [c for c in check_config(load_config(bad)) if c.name == "trainer"]  # plan.py alone: not checked
    for extra, needle in (({"max_steps": 5}, "'max_steps' (set the recipe's max_steps)"),
                          ({"enable_checkpointing": False}, "'enable_checkpointing'"),
                          ({"strategy": {"class_path": "lightning.pytorch.strategies.DDPStrategy"}},
                           "strategy: class_path values are not instantiated")):
        cfg = load_config(tiny(trainer={"accelerator": "cpu", "devices": 1, **extra}))
        (check,) = [c for c in check_config(cfg, trainer_arguments()) if c.name == "trainer"]
        assert not check.ok and needle in check.message, check.message
    path = write_cfg(tmp_path / "bad.json", bad)
    assert main(["recipe", "--config", str(path), "--dry-run"]) == 1  # the CLI's dry run checks it
    assert "FAIL trainer: not arguments of lightning.pytorch.Trainer: 'limit_val_batch'" in capsys.readouterr().out
    with pytest.raises(ValueError, match="limit_val_batch"):  # and so does a real run, before it trains
        run_recipe(load_config(bad), tmp_path / "out", progress=False, plots=False, echo=None)
    assert not (tmp_path / "out" / "runs").exists()


def test_a_real_run_checks_before_training(tmp_path: Path) -> None:
    cfg = load_config(tiny(tokens_per_sample=7))
    with pytest.raises(ValueError, match=r"1 config check\(s\) failed .*FAIL tokens_per_sample"):
        run_recipe(cfg, tmp_path / "out", progress=False, plots=False, echo=None)
    assert not (tmp_path / "out" / "runs").exists()  # nothing trained


@pytest.mark.parametrize(("overrides", "needle"), [
    ({"schedules": "cosine"}, "'schedules' must be a list of distinct schedule names"),
    ({"schedules": ["cosine", "cosine"]}, "'schedules' must be a list of distinct schedule names"),
    ({"schedules": ["../cosine"]}, "'schedules' must be a list of distinct schedule names"),
    ({"schedules": ["cosine"], "schedule_arg": None}, "needs 'schedule_arg'"),
    ({"schedules": ["constant", "cosine"]}, "lists 'constant', the model's own schedule"),
    ({"schedules": ["cosine"], "schedule_sizes": [2]},
     r"'schedule_sizes' must be distinct indices of fitted sizes \(0..1\)"),
    ({"schedules": ["cosine"], "schedule_sizes": [0, 0]}, "'schedule_sizes' must be distinct indices"),
])
def test_bad_schedules_fail_with_a_clear_message(overrides: dict[str, Any], needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        load_config(tiny(**overrides))


def test_sweep_size_is_an_index_into_sizes() -> None:
    with pytest.raises(ValueError, match=r"'sweep_size' must index a fitted size \(0..1\), got 2"):
        load_config(tiny(sweep_size=2))


# ------------------------------------------------------------------------------------------ 2. checkpoint, resume
class Stop:
    """Callback factory: raise ``exc`` after ``at`` optimizer steps of the first run it is attached to."""

    def __init__(self, at: int, exc: type[BaseException]) -> None:
        self.at, self.exc, self.used = at, exc, False

    def patch(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from lightning.pytorch.callbacks import Callback

        from lightning_scaling.study import run as recipe

        outer, original = self, recipe._callbacks

        class _Raise(Callback):
            def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
                if trainer.global_step == outer.at:
                    raise outer.exc("stopped by the test")

        def callbacks(*args: Any, **kwargs: Any) -> list[Any]:
            extra = [] if outer.used else [_Raise()]
            outer.used = True
            return original(*args, **kwargs) + extra

        monkeypatch.setattr(recipe, "_callbacks", callbacks)


def assert_complete(history: RunHistory, max_steps: int) -> None:
    assert history.step.tolist() == list(range(max_steps))  # one record per step, none lost or repeated
    assert (history.samples[1:] > history.samples[:-1]).all()


def test_ctrl_c_says_where_and_the_run_resumes_from_its_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    path = write_cfg(tmp_path / "cfg.json", tiny(checkpoint_every=10))
    out = tmp_path / "out"
    Stop(25, KeyboardInterrupt).patch(monkeypatch)
    assert main(["recipe", "--config", str(path), "--out", str(out), "--no-progress", "--no-plots"]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == ("lightning-scaling recipe: run d8_b2 interrupted at step 25; rerun the same command to resume "
                       "it from its checkpoint at step 25 (finished runs are kept)")
    cfg = load_config(path)
    spec = plan_runs(cfg)[0]
    history = train_run(cfg, spec, out, progress=False)
    assert history.meta["resumed_from_step"] == 25
    assert_complete(history, cfg.max_steps)
    done = json.loads((out / "runs" / spec.name / "scaling" / "done.json").read_text())
    assert done["resumed_from_step"] == 25


def test_sigterm_that_also_killed_the_loader_workers_is_still_an_interrupt(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning.pytorch.callbacks import Callback

    from lightning_scaling.study import run as recipe

    # SLURM signals the whole job: the DataLoader workers die first and torch raises a RuntimeError mid-step.
    original = recipe._callbacks

    class _GroupKill(Callback):
        def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
            if trainer.global_step == 25:
                trainer._signal_connector.received_sigterm = True
                raise RuntimeError("DataLoader worker (pid 4242) is killed by signal: Terminated.")

    monkeypatch.setattr(recipe, "_callbacks", lambda *a, **k: original(*a, **k) + [_GroupKill()])
    cfg = load_config(tiny(checkpoint_every=10))
    with pytest.raises(recipe.RunInterrupted, match=r"interrupted \(SIGTERM\) at step 25") as stop:
        train_run(cfg, plan_runs(cfg)[0], tmp_path, progress=False)
    assert stop.value.sigterm and stop.value.checkpoint_step == 25
    monkeypatch.setattr(recipe, "_callbacks", original)
    assert train_run(cfg, plan_runs(cfg)[0], tmp_path, progress=False).meta["resumed_from_step"] == 25


@pytest.mark.parametrize(("start", "step", "saved", "expected"), [
    (None, 25, None, 20), (None, 5, None, None), (20, 23, None, 20), (None, 25, 25, 25)])
def test_the_interrupt_message_names_the_checkpoint_it_resumes_from(start: int | None, step: int,
                                                                    saved: int | None, expected: int | None) -> None:
    from lightning_scaling.study.run import _RunProgress

    run = _RunProgress(Path("last.ckpt"), every=10)
    run.start, run.step, run.saved_step = start, step, saved  # DDP Ctrl-C: no save, the periodic one stays
    assert run.checkpoint_step() == expected


def test_a_crashed_run_resumes_from_its_last_periodic_checkpoint(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = load_config(tiny(checkpoint_every=10))
    spec = plan_runs(cfg)[0]
    Stop(25, RuntimeError).patch(monkeypatch)  # no graceful save: like kill -9, only the periodic checkpoints
    with pytest.raises(RuntimeError, match="stopped by the test"):
        train_run(cfg, spec, tmp_path, progress=False)
    assert (tmp_path / "runs" / spec.name / "checkpoints" / "last.ckpt").is_file()
    history = train_run(cfg, spec, tmp_path, progress=False)
    assert history.meta["resumed_from_step"] == 20
    assert_complete(history, cfg.max_steps)
    # Other settings: the checkpoint is not reused, the run starts over.
    changed = load_config({**cfg.to_dict(), "seed": 1})
    (tmp_path / "runs" / spec.name / "scaling" / "done.json").unlink()
    assert train_run(changed, plan_runs(changed)[0], tmp_path, progress=False).meta["resumed_from_step"] is None


def test_a_prediction_is_never_rewritten_once_its_run_began(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning.pytorch.callbacks import Callback

    from lightning_scaling.study import run as recipe

    original = recipe._callbacks

    class _CtrlC(Callback):
        def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
            if trainer.global_step == 15:
                raise KeyboardInterrupt

    def callbacks(cfg: Any, model: Any, data: Any, spec: Any, *args: Any) -> list[Any]:
        return original(cfg, model, data, spec, *args) + ([_CtrlC()] if spec.role == "holdout" else [])

    monkeypatch.setattr(recipe, "_callbacks", callbacks)
    cfg = tiny(checkpoint_every=10)
    with pytest.raises(KeyboardInterrupt):
        run_recipe(load_config(cfg), tmp_path, progress=False, plots=False, echo=None)
    before = json.loads((tmp_path / "prediction.json").read_text())
    assert (tmp_path / "runs" / "d16_b4" / "checkpoints" / "last.ckpt").is_file()  # the held-out run began
    monkeypatch.setattr(recipe, "_callbacks", original)
    # Rerun with a target loss: the held-out run resumes, and the prediction made before it began stays as it was.
    said: list[str] = []
    run_recipe(load_config({**cfg, "target_loss": 5.0}), tmp_path, progress=False, plots=False, echo=said.append)
    after = json.loads((tmp_path / "prediction.json").read_text())
    assert after == before
    assert any(line.startswith("prediction.json kept: made before d16_b4 began training (target loss ")
               and "the config's is now 5.0" in line for line in said), said


def test_a_prediction_made_after_its_run_began_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning_scaling.study import run as recipe

    monkeypatch.setattr(recipe, "_resume_point", lambda *a: Path("last.ckpt"))  # the held-out run "began"
    fitted = {"prediction": {"target_loss": 2.0}, "law": {}}
    holdout = [s for s in plan_runs(load_config(tiny())) if s.role == "holdout"]
    said: list[str] = []
    record = recipe._write_predictions(load_config(tiny()), holdout, fitted, tmp_path, said.append)  # no file yet
    assert record["written_after_training_began"] == "d16_b4" and "written_before_training" not in record
    assert "missing or unreadable" in said[0]


def test_the_recipe_hides_the_noise_scale_notes_but_not_that_it_measures_nothing() -> None:
    import warnings

    from lightning_scaling.study.run import _Quiet
    from lightning_scaling.warnings import ScalingWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with _Quiet():
            warnings.warn("GradientNoiseScale: skipping Embedding with shared parameters.", ScalingWarning)
            warnings.warn("GradientNoiseScale(method='per_example') found no LayerNorm/RMSNorm layers with trainable, "
                          "unshared parameters; no noise scale is measured.", ScalingWarning)
            warnings.warn("GradientNoiseScale (rank 1): cannot get the batch size (KeyError); pass `batch_size_fn`.",
                          ScalingWarning)
    assert [str(w.message)[:40] for w in caught] == ["GradientNoiseScale(method='per_example')",
                                                      "GradientNoiseScale (rank 1): cannot get "]


# --------------------------------------------------------------------------------------- 3. locks, shards, Ray
def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_run_lock_is_exclusive_and_stale_locks_are_taken_over(tmp_path: Path) -> None:
    path = tmp_path / "run.lock"
    lock = RunLock(path)
    assert lock.acquire() and not RunLock(path).acquire()
    assert lock.holder() == {"pid": os.getpid(), "host": socket.gethostname(), "time": pytest.approx(time.time(),
                                                                                                     abs=60)}
    lock.release()
    assert not path.exists() and RunLock(path).holder() is None
    path.write_text(json.dumps({"pid": dead_pid(), "host": socket.gethostname()}))  # died on this host
    taker = RunLock(path)
    assert taker.acquire() and taker.holder()["pid"] == os.getpid()
    taker.release()
    path.write_text(json.dumps({"pid": 1, "host": "another-node"}))  # alive elsewhere: its heartbeat is fresh
    assert not RunLock(path).acquire()
    old = time.time() - 700
    os.utime(path, (old, old))  # no heartbeat for 700 s > stale_after_s
    taker = RunLock(path)
    assert taker.acquire()
    taker.release()
    path.write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname()}))  # a live pid on this host...
    assert not RunLock(path).acquire()
    os.utime(path, (old, old))  # ...that never touches the lock: a recycled pid, not a holder
    assert taker.acquire()
    taker.release()
    with pytest.raises(ValueError, match="stale_after_s > heartbeat_s > 0"):
        RunLock(path, stale_after_s=1.0, heartbeat_s=2.0)


def test_the_holder_keeps_its_lock_fresh(tmp_path: Path) -> None:
    lock = RunLock(tmp_path / "run.lock", stale_after_s=0.5, heartbeat_s=0.02)
    assert lock.acquire()
    os.utime(lock.path, (0, 0))
    for _ in range(500):  # the heartbeat thread touches the file within a few of its 0.02 s periods
        if lock.path.stat().st_mtime > 0:
            break
        time.sleep(0.01)
    assert lock.path.stat().st_mtime > 0 and not lock.is_stale(lock.holder())
    lock.release()


@pytest.mark.parametrize(("text", "expected"), [("0/2", (0, 2)), ("3/4", (3, 4))])
def test_parse_shard(text: str, expected: tuple[int, int]) -> None:
    assert parse_shard(text) == expected


@pytest.mark.parametrize("text", ["2/2", "1", "a/b", "-1/2"])
def test_parse_shard_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="shard must be I/N with 0 <= I < N"):
        parse_shard(text)


def event_files(run_dir: Path) -> list[Path]:
    return [p for p in run_dir.iterdir() if p.name.startswith("events.out.tfevents")]


@pytest.fixture(scope="module")
def sharded_study(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any], list[str], list[str]]:
    """The tiny study trained as two shards, the shard without the held-out run first."""
    out = tmp_path_factory.mktemp("sharded")
    cfg = load_config(tiny())
    first = run_recipe(cfg, out, progress=False, plots=False, echo=None, shard=(1, 2))
    second = run_recipe(cfg, out, progress=False, plots=False, echo=None, shard=(0, 2))
    return out, second.report, first.report["trained_here"], second.report["trained_here"]


def test_two_shards_train_each_run_once(sharded_study: tuple[Path, dict[str, Any], list[str], list[str]]) -> None:
    out, report, first, second = sharded_study
    names = [s.name for s in plan_runs(load_config(tiny()))]
    assert first == [names[1], names[3]]  # run k -> shard k % 2
    assert second == [names[0], names[2], names[4]]  # the shard with the held-out run fits and reports
    for name in names:
        assert len(event_files(out / "runs" / name)) == 1 and not (out / "runs" / f"{name}.lock").exists()
    assert report["comparison"]["final_loss"]["actual"] > 0 and (out / "report.json").is_file()


def test_reports_print_on_rank_zero_only(sharded_study: tuple[Path, dict[str, Any], list[str], list[str]],
                                         tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    out = sharded_study[0]
    argv = ["recipe", "--config", str(write_cfg(tmp_path / "cfg.json", tiny())), "--out", str(out), "--no-plots",
            "--no-progress"]
    monkeypatch.setenv("RANK", "1")
    assert main(argv) == 0
    assert capsys.readouterr().out == ""
    monkeypatch.setenv("RANK", "0")
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert printed.count("finished earlier: loaded") == 5 and "Output folder" in printed


def test_the_shard_with_the_holdout_takes_over_unstarted_runs(tmp_path: Path) -> None:
    cfg = load_config(tiny())
    names = [s.name for s in plan_runs(cfg)]
    result = run_recipe(cfg, tmp_path, progress=False, plots=False, echo=None, shard=(0, 2))
    # Its own runs, then the unstarted (unlocked) runs of shard 1, then the held-out run.
    assert result.report["trained_here"] == [names[0], names[2], names[1], names[3], names[4]]
    later = run_recipe(cfg, tmp_path, progress=False, plots=False, echo=None, shard=(1, 2))
    assert later.report["trained_here"] == [] and set(later.report["runs"]) == {names[1], names[3]}


def test_two_processes_on_one_folder_train_each_run_once(tmp_path: Path) -> None:
    cfg_path = write_cfg(tmp_path / "cfg.json", tiny())
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                        os.environ.get("PYTHONPATH", "")])}
    other = subprocess.Popen([sys.executable, "-m", "lightning_scaling.cli", "recipe", "--config", str(cfg_path),
                              "--out", str(out), "--no-plots", "--no-progress", "--json"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        for _ in range(1200):  # start once the other process holds its first run
            if other.poll() is not None or list((out / "runs").glob("*.lock")):
                break
            time.sleep(0.1)
        here = run_recipe(load_config(cfg_path), out, progress=False, plots=False, echo=None).report
        stdout, stderr = other.communicate(timeout=600)
    finally:
        other.kill()
    assert other.returncode == 0, stderr[-2000:]
    there = json.loads(stdout)["trained_here"]
    names = [s.name for s in plan_runs(load_config(cfg_path))]
    assert not set(here["trained_here"]) & set(there) and set(here["trained_here"]) | set(there) == set(names)
    assert there, "the other process trained nothing: it did not run concurrently"
    for name in names:
        assert len(event_files(out / "runs" / name)) == 1


def test_bad_shard_or_missing_ray_fail_before_training(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["recipe", "--config", str(write_cfg(tmp_path / "cfg.json", tiny())), "--out", str(tmp_path / "out")]
    assert main([*argv, "--shard", "2/2"]) == 1
    assert capsys.readouterr().err.strip() == "lightning-scaling recipe: error: shard must be I/N with 0 <= I < N, " \
                                              "got '2/2'"
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    assert main([*argv, "--backend", "ray"]) == 1
    assert "--backend ray needs Ray: pip install 'lightning-scaling[ray]'" in capsys.readouterr().err
    assert not (tmp_path / "out" / "runs").exists()


def test_ray_backend_trains_two_runs_concurrently(tmp_path: Path) -> None:
    ray = pytest.importorskip("ray")
    from lightning_scaling.study.ray_backend import train_runs_ray

    cfg = load_config(tiny(resources={"num_cpus": 1}))
    specs = plan_runs(cfg)[:2]
    ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False)
    try:
        assert train_runs_ray(cfg, specs, tmp_path) == {specs[0].name: True, specs[1].name: True}
    finally:
        ray.shutdown()
    metas = [RunHistory.from_json(tmp_path / "runs" / s.name / "scaling" / "history.json").meta for s in specs]
    assert max(m["started_at"] for m in metas) < min(m["finished_at"] for m in metas)  # trained at the same time
    for spec, meta in zip(specs, metas):
        assert (tmp_path / "runs" / spec.name / "scaling" / "done.json").is_file() and meta["role"] == spec.role
        assert len(event_files(tmp_path / "runs" / spec.name)) == 1


def test_the_held_out_run_gets_the_finished_ladder_as_reference_runs() -> None:
    from lightning_scaling import RunHistory
    from lightning_scaling.demo import demo_config
    from lightning_scaling.study.predict import _references

    specs = plan_runs(demo_config(quick=True))
    holdout = next(s for s in specs if s.role == "holdout")
    fit_specs = [s for s in specs if s.role != "holdout"]
    histories = {s.name: RunHistory(name=s.name, step=[0, 1], loss=[2.0, 1.9]) for s in fit_specs}
    refs = _references(fit_specs, histories, holdout)
    # the ladder at the held-out batch size (same schedule, smaller models), not the sweep's other batch sizes
    assert [r.name for r in refs] == ["d8_b8", "d16_b8", "d24_b8"]
    assert _references(fit_specs, {}, holdout) is None


def test_other_schedules_train_every_size_and_the_held_out_model_is_predicted_under_each(tmp_path: Path) -> None:
    from lightning_scaling.backtest import run_schedule
    from lightning_scaling.fitting import ScalingLaw
    from lightning_scaling.history import final_loss
    from lightning_scaling.report import format_table
    from lightning_scaling.study.predict import _references

    cfg = load_config(tiny(schedules=["cosine"], max_steps=40))
    specs = plan_runs(cfg)
    cosine = [s for s in specs if s.schedule == "cosine"]
    assert [s.name for s in cosine] == ["d8_b4_cosine", "d12_b4_cosine", "d16_b4_cosine"]
    assert [s.role for s in specs[-2:]] == ["holdout", "holdout"] and specs[-2].schedule is None
    result = run_recipe(cfg, tmp_path, progress=False, plots=False, echo=None)
    h = result.histories
    for s in cosine:  # trained under the schedule asked for, the ladder under the model's own
        lr = run_schedule(h[s.name])[0]
        assert lr[-1] < 0.2 * lr.max() and run_schedule(h[s.name.removesuffix("_cosine")])[0][-1] == lr.max()
    # Predicted before either held-out run trained, from one law fitted on both schedules.
    record = json.loads((tmp_path / "prediction.json").read_text())
    first_trained = min((tmp_path / "runs" / s.name / "scaling" / "done.json").stat().st_mtime
                        for s in specs if s.role == "holdout")
    assert (tmp_path / "prediction.json").stat().st_mtime < first_trained
    const, cos = record["prediction"], record["schedule_predictions"]["cosine"]
    assert const["n_params"] == cos["n_params"] == 3072 and np.isfinite(cos["loss"]).all()
    assert record["law"]["params"]["anneal"] > 0  # the cosine runs fitted the annealing term ...
    law = ScalingLaw.from_dict(record["law"])  # ... and the cosine prediction uses it, with the cosine LR
    expected = law.predict_loss(3072, np.asarray(cos["steps"]), 4, run_schedule(h["d12_b4_cosine"])[0])
    np.testing.assert_allclose(cos["loss"], expected, rtol=1e-9)
    assert abs(cos["loss"][-1] - const["loss"][-1]) > 0.01
    comp = result.report["schedule_comparisons"]["cosine"]
    actual, from_step = final_loss(h["d16_b4_cosine"])
    assert comp["final_loss"]["actual"] == actual and comp["final_loss"]["from_step"] == from_step
    tail = np.asarray(cos["loss"])[np.asarray(cos["steps"]) >= from_step]
    assert comp["final_loss"]["predicted"] == pytest.approx(float(np.mean(tail)))
    # The held-out cosine run's references are the finished cosine ladder, not the constant one.
    fit_specs = [s for s in specs if s.role != "holdout"]
    assert [r.name for r in _references(fit_specs, h, specs[-1])] == ["d8_b4_cosine", "d12_b4_cosine"]
    assert "final loss under cosine" in format_table(result.report)
    assert result.report["runs"]["d16_b4_cosine"]["schedule"] == "cosine"


def test_a_schedule_added_to_a_finished_study_reuses_its_runs_and_keeps_their_predictions(tmp_path: Path) -> None:
    # A study of the previous version (no schedules; its done.json settings have no "schedule" key), then the same
    # study with cosine added: nothing is retrained, the prediction made before the held-out run trained is kept
    # (and is what the report compares), the cosine runs train and get their own prediction.
    first = run_recipe(load_config(tiny(max_steps=30)), tmp_path, progress=False, plots=False, echo=None)
    done = json.loads((tmp_path / "runs" / "d16_b4" / "scaling" / "done.json").read_text())
    assert "schedule" not in done["settings"]["spec"]
    before = json.loads((tmp_path / "prediction.json").read_text())
    second = run_recipe(load_config(tiny(max_steps=30, schedules=["cosine"])), tmp_path, progress=False, plots=False,
                        echo=None)
    assert sorted(second.report["trained_here"]) == ["d12_b4_cosine", "d16_b4_cosine", "d8_b4_cosine"]
    after = json.loads((tmp_path / "prediction.json").read_text())
    assert after["prediction"] == before["prediction"] and after["time"] == before["time"]
    assert set(after["schedule_predictions"]) == {"cosine"}
    comp = second.report["comparison"]["final_loss"]
    assert comp["predicted"] == first.report["comparison"]["final_loss"]["predicted"]


def test_schedule_sizes_pick_the_fitted_sizes_trained_under_each_schedule() -> None:
    specs = plan_runs(load_config(tiny(schedules=["cosine", "wsd"], schedule_sizes=[1])))
    assert [s.name for s in specs if s.schedule] == ["d12_b4_cosine", "d12_b4_wsd", "d16_b4_cosine", "d16_b4_wsd"]
    assert [s.role for s in specs if s.size == "d16"] == ["holdout"] * 3  # the held-out size under every schedule


def test_every_held_out_run_goes_to_the_shard_that_fits() -> None:
    from lightning_scaling.study import shard_runs

    specs = plan_runs(load_config(tiny(schedules=["cosine"])))
    shards = [[s.name for s in shard_runs(specs, (i, 2))] for i in (0, 1)]
    assert sorted(shards[0] + shards[1]) == sorted(s.name for s in specs)  # each run in exactly one shard
    assert shards[(len(specs) - 1) % 2][-2:] == ["d16_b4", "d16_b4_cosine"]  # the held-out runs, with the fit
    assert not {"d16_b4", "d16_b4_cosine"} & set(shards[len(specs) % 2])
