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

import pytest

from lightning_scaling.cli import main
from lightning_scaling.demo.data import StdlibTextDataModule
from lightning_scaling.demo.model import GPT
from lightning_scaling.demo.recipe import (
    check_config,
    load_config,
    plan_runs,
    run_recipe,
    train_run,
)
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
])
def test_dry_run_fails_with_one_line_per_silent_setting(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                        overrides: dict[str, Any], name: str, needle: str) -> None:
    path = write_cfg(tmp_path / "cfg.json", tiny(**overrides))
    assert main(["recipe", "--config", str(path), "--dry-run"]) == 1
    failed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("FAIL")]
    assert len(failed) == 1 and failed[0].startswith(f"FAIL {name}: ") and needle in failed[0], failed


def test_a_real_run_checks_before_training(tmp_path: Path) -> None:
    cfg = load_config(tiny(tokens_per_sample=7))
    with pytest.raises(ValueError, match=r"1 config check\(s\) failed .*FAIL tokens_per_sample"):
        run_recipe(cfg, tmp_path / "out", progress=False, plots=False, echo=None)
    assert not (tmp_path / "out" / "runs").exists()  # nothing trained


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

        from lightning_scaling.demo import recipe

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
