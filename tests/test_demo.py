"""The built-in demo: stdlib byte data, the GPT, and the recipe pipeline end to end on a tiny setting."""

from __future__ import annotations

import json
import sysconfig
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_scaling import RunHistory
from lightning_scaling.demo import GPT, StdlibTextDataModule, StdlibTextDataset, kaplan_n_params, load_stdlib_bytes
from lightning_scaling.demo.data import _is_val, stdlib_files
from lightning_scaling.demo.model import LRSchedule
from lightning_scaling.demo import demo_config
from lightning_scaling.study import EXAMPLE_CONFIG, RecipeConfig, first_step_below, load_config, plan_runs


# ----------------------------------------------------------------------------------------------------------- data
def test_split_is_by_file_deterministic_and_disjoint(tmp_path: Path) -> None:
    # A synthetic "stdlib" with known contents: the split depends only on the relative path (crc32), so it is
    # the same on every call, and no file contributes to both splits.
    root = tmp_path / "lib"
    for i in range(40):
        (root / f"pkg{i % 3}").mkdir(parents=True, exist_ok=True)
        (root / f"pkg{i % 3}" / f"m{i}.py").write_text(f"# file {i}#\n" + "x" * (100 + i))
    (root / "site-packages").mkdir()
    (root / "site-packages" / "vendored.py").write_text("SHOULD NOT APPEAR")
    files = stdlib_files(root=root)
    assert len(files) == 40 and not any("site-packages" in f for f in files)
    val_files = {f for f in files if _is_val(f, 0.25)}
    # crc32 of "split:<path>" decides: recompute independently.
    expected = {f for f in files if zlib.crc32(("split:" + f).encode()) % 10_000 < 2_500}
    assert val_files == expected and 0 < len(val_files) < 40
    train = load_stdlib_bytes("train", root=root, max_bytes=None, val_fraction=0.25).tobytes()
    val = load_stdlib_bytes("val", root=root, max_bytes=None, val_fraction=0.25).tobytes()
    assert len(train) + len(val) == sum((root / f).stat().st_size for f in files)
    for f in files:
        marker = (root / f).read_text().splitlines()[0].encode()
        assert (marker in val) == (f in val_files)
        assert (marker in train) == (f not in val_files)
    assert load_stdlib_bytes("train", root=root, max_bytes=None, val_fraction=0.25).tobytes() == train
    assert len(load_stdlib_bytes("train", root=root, max_bytes=1000, val_fraction=0.25)) == 1000


def test_real_stdlib_windows_and_datamodule() -> None:
    root = Path(sysconfig.get_paths()["stdlib"])
    assert "os.py" in stdlib_files(root=root)
    ds = StdlibTextDataset("train", block_size=16, max_bytes=20_000)
    raw = load_stdlib_bytes("train", max_bytes=20_000)
    assert len(ds) == (20_000 - 1) // 16
    x, y = ds[3]
    assert x.dtype == torch.int64 and x.shape == (16,)
    np.testing.assert_array_equal(x.numpy(), raw[48:64])
    np.testing.assert_array_equal(y.numpy(), raw[49:65])
    dm = StdlibTextDataModule(block_size=16, batch_size=4, max_bytes=20_000, seed=1)
    dm.setup("fit")
    b1 = next(iter(dm.train_dataloader()))[0]
    b2 = next(iter(dm.train_dataloader()))[0]
    assert b1.shape == (4, 16) and torch.equal(b1, b2)  # seeded shuffle: same order every epoch start
    assert dm.tokens_per_sample == 16
    with pytest.raises(ValueError, match="split"):
        load_stdlib_bytes("test")
    with pytest.raises(ValueError, match="batch_size"):
        StdlibTextDataModule(batch_size=0)


# ---------------------------------------------------------------------------------------------------------- model
@pytest.mark.parametrize("n_layer,d_model,n_head", [(1, 16, 2), (2, 64, 4), (3, 48, 3)])
def test_gpt_n_params_formula(n_layer: int, d_model: int, n_head: int) -> None:
    model = GPT(n_layer=n_layer, d_model=d_model, n_head=n_head, block_size=8)
    assert model.n_params == 12 * n_layer * d_model**2 == kaplan_n_params(n_layer, d_model)
    # Actual non-embedding parameters: the 12 d^2 matrices plus 2 LayerNorms (weight+bias) per block + final LN.
    assert model.count_non_embedding_params() == model.n_params + (4 * n_layer + 2) * d_model
    untied = GPT(n_layer=n_layer, d_model=d_model, n_head=n_head, block_size=8, tie_embeddings=False)
    assert untied.count_non_embedding_params() == model.count_non_embedding_params()


def test_gpt_initial_loss_is_log_vocab_and_causal() -> None:
    torch.manual_seed(0)
    model = GPT(n_layer=2, d_model=32, n_head=2, block_size=16)
    x, y = torch.randint(0, 256, (8, 16)), torch.randint(0, 256, (8, 16))
    with torch.no_grad():
        loss = model._loss((x, y))
    # Small-init logits: the cross-entropy of a near-uniform prediction over 256 bytes is ln 256 = 5.545 nats.
    assert abs(float(loss) - np.log(256)) < 0.05
    # Causality: changing the last token leaves the logits of earlier positions unchanged.
    x2 = x.clone()
    x2[:, -1] = (x2[:, -1] + 1) % 256
    with torch.no_grad():
        torch.testing.assert_close(model(x)[:, :-1], model(x2)[:, :-1])


def test_lr_schedule_closed_form() -> None:
    f = LRSchedule(warmup_steps=10, max_steps=110, kind="cosine", min_ratio=0.1)
    assert f(4) == pytest.approx(0.5)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through the cosine: cos(pi/2) = 0
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)
    assert LRSchedule(warmup_steps=10, max_steps=110, kind="constant")(80) == 1.0


# --------------------------------------------------------------------------------------------------------- recipe
def test_config_validation_and_plan(tmp_path: Path) -> None:
    cfg = demo_config()
    specs = plan_runs(cfg)
    assert len({s.size for s in specs}) >= 4  # >= 4 sizes
    sweep_sizes = [s for s in specs if s.size_index == cfg.sweep_size]
    assert len({s.batch_size for s in sweep_sizes}) >= 3  # >= 3 batch sizes at one size
    assert specs[-1].role == "holdout" and specs[-1].size_index == len(cfg.sizes) - 1
    base = cfg.to_dict()
    with pytest.raises(ValueError, match="unknown config keys"):
        load_config({**base, "max_step": 5})
    with pytest.raises(ValueError, match="sizes"):
        load_config({**base, "sizes": [{"d_model": 8}, {"d_model": 16}]})
    with pytest.raises(ValueError, match="class_path"):
        load_config({**base, "model": {"init_args": {}}})
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        load_config(tmp_path / "missing.yaml")
    # The shipped example config parses and plans.
    example = EXAMPLE_CONFIG
    ex = load_config(example)
    assert isinstance(ex, RecipeConfig) and plan_runs(ex)[-1].role == "holdout"


def test_first_step_below_on_known_curve() -> None:
    steps = np.arange(0, 1001)
    h = RunHistory(step=steps, loss=1.0 + 100.0 / np.maximum(steps, 1))  # reaches 1.5 at step 200 exactly
    assert first_step_below(h, 1.5) == pytest.approx(200, rel=0.03)
    assert np.isnan(first_step_below(h, 0.5))


def test_demo_command_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``lightning-scaling demo`` on a tiny setting: train, fit, predict before training, compare, plot, resume;
    then ``fit`` and ``forecast`` on its output."""
    from lightning_scaling.cli import main

    out = tmp_path / "demo"
    argv = ["demo", "--quick", "--steps", "40", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    cfg = load_config(demo_config(quick=True).to_dict(), max_steps=40)
    specs = plan_runs(cfg)
    assert "predicted before it was trained" in printed and f"Output folder: {out.resolve()}" in printed
    report = json.loads((out / "report.json").read_text())
    # Every run trained to max_steps with its history, TensorBoard events and done marker.
    for spec in specs:
        run_dir = out / "runs" / spec.name
        h = RunHistory.from_json(run_dir / "scaling" / "history.json")
        assert h.step[-1] == cfg.max_steps - 1 and h.batch_size == spec.batch_size
        assert h.n_params == 12 * 2 * spec.overrides["d_model"] ** 2
        assert h.gns_step is not None and len(h.gns_step) > 0  # GradientNoiseScale fed the history
        assert any(p.name.startswith("events.out.tfevents") for p in run_dir.iterdir())
        assert (run_dir / "scaling" / "done.json").exists()
    # The prediction was written before the held-out run was trained.
    pred_file = out / "prediction.json"
    holdout_hist = out / "runs" / specs[-1].name / "scaling" / "history.json"
    pred = json.loads(pred_file.read_text())
    assert pred_file.stat().st_mtime < holdout_hist.stat().st_mtime
    assert pred["written_before_training"] == specs[-1].name
    assert pred["prediction"]["n_params"] == 12 * 2 * 32**2
    # The report compares prediction and actual; the actual final loss is the held-out history's tail mean.
    comp = report["comparison"]
    actual = RunHistory.from_json(holdout_hist)
    assert comp["final_loss"]["actual"] == pytest.approx(float(np.mean(actual.loss[-10:])))
    assert np.isfinite(comp["final_loss"]["predicted"])
    assert comp["final_loss"]["predicted"] == pytest.approx(np.mean(pred["prediction"]["loss"][-10:]))
    for name in ("loss_curves.png", "critical_batch.png", "loss_vs_n.png", "report.png"):
        assert (out / name).stat().st_size > 5_000
    # Resume: nothing is retrained, the prediction file from before training is kept.
    marks = {s.name: (out / "runs" / s.name / "scaling" / "done.json").stat().st_mtime for s in specs}
    pred_mtime = pred_file.stat().st_mtime
    assert main([*argv, "--no-plots"]) == 0
    assert capsys.readouterr().out.count("finished earlier") == len(specs)
    assert {s.name: (out / "runs" / s.name / "scaling" / "done.json").stat().st_mtime for s in specs} == marks
    assert pred_file.stat().st_mtime == pred_mtime
    # fit and forecast work on the demo's output.
    assert main(["fit", str(out / "runs"), "--predict-n", "1e5", "--bootstrap", "0", "--json"]) == 0
    fitted = json.loads(capsys.readouterr().out)
    assert len(fitted["runs"]) == len(specs) and np.isfinite(fitted["prediction"]["min_loss"])
    assert main(["forecast", str(out / "runs" / specs[-1].name), "--horizon", "80", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["horizon"] == 80
