"""Screenshots of TensorBoard on a run folder, taken by headless Chromium, to look at the panels as a user would.

Also checks, through TensorBoard's own HTTP API, that the forecast run is *replaced* at each refit (one curve,
never one per refit) while TensorBoard is running.

Needs ``tensorboard`` (a dependency) and Debian's ``chromium`` (``apt-get install -y chromium``). Usage::

    lightning-scaling demo --quick --out /tmp/demo14
    python benchmarks/tensorboard_screens.py /tmp/demo14/runs --out /tmp/screens     # demo output
    python benchmarks/tensorboard_screens.py --plain --out /tmp/screens_plain         # a plain Lightning run

then open the PNGs. ``--plain`` trains a small Lightning model with the four callbacks and a TensorBoardLogger
first (about half a minute on 2 CPU cores) and screenshots that.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np

PAGES = {"custom_scalars": "#custom_scalars", "scalars": "#scalars", "images": "#images"}


def start_tensorboard(logdir: str, port: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", logdir, "--port", str(port),
                             "--host", "127.0.0.1", "--reload_interval", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(120):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/data/runs", timeout=1).read()
            return proc
        except OSError:
            time.sleep(0.5)
    proc.terminate()
    raise RuntimeError("TensorBoard did not start")


def get(port: int, path: str, **query: str) -> object:
    url = f"http://127.0.0.1:{port}{path}" + ("?" + urllib.parse.urlencode(query) if query else "")
    return json.loads(urllib.request.urlopen(url, timeout=10).read())


def screenshot(port: int, fragment: str, png: Path, *, height: int = 1000) -> None:
    chrome = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if chrome is None:
        raise RuntimeError("no chromium: apt-get install -y chromium")
    url = f"http://localhost:{port}/{fragment}"
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([chrome, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                        "--disable-component-update", "--disable-sync", "--no-first-run",
                        f"--user-data-dir={profile}", f"--window-size=1400,{height}", f"--screenshot={png}",
                        "--virtual-time-budget=15000", url],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)


def live_replacement_check(port_base: int) -> dict[str, object]:
    """Write the forecast run twice while TensorBoard runs; the second curve must replace the first."""
    from types import SimpleNamespace

    from lightning_scaling.report.tensorboard import FORECAST_TAG, write_forecast_run

    steps = np.arange(0, 201)
    with tempfile.TemporaryDirectory() as d:
        def write(offset: float) -> None:
            loss = 2 + 100 / (100 + steps) + offset
            write_forecast_run(d, SimpleNamespace(steps=steps, loss=loss, lower=loss - 0.1, upper=loss + 0.1))

        write(0.0)
        proc = start_tensorboard(d, port_base)
        try:
            def points() -> list:
                for _ in range(60):
                    try:
                        pts = get(port_base, "/data/plugin/scalars/scalars", run="forecast", tag=FORECAST_TAG)
                        if pts:
                            return pts
                    except OSError:
                        pass
                    time.sleep(0.5)
                return []

            first = points()
            write(1.0)
            time.sleep(4)  # reload_interval is 1 s
            second = points()
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    return {"points_before": len(first), "points_after": len(second),
            "last_value_before": first[-1][2] if first else None, "last_value_after": second[-1][2] if second else None}


def plain_run(root: Path) -> Path:
    """A plain Lightning run (not the demo) with the four callbacks and a TensorBoardLogger."""
    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.loggers import TensorBoardLogger

    from lightning_scaling.callbacks import ForecastEarlyStopping, GradientNoiseScale, LossTrajectory, ScalingForecast
    from lightning_scaling.demo.data import StdlibTextDataModule
    from lightning_scaling.demo.model import GPT

    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    model = GPT(n_layer=2, n_head=2, d_model=32, block_size=32, lr=3e-3, warmup_steps=10, schedule="cosine",
                max_steps=300)
    data = StdlibTextDataModule(block_size=32, batch_size=16, max_bytes=400_000, val_bytes=20_000)
    callbacks = [LossTrajectory(tokens_per_sample=32), GradientNoiseScale(log_every_n_steps=10),
                 ScalingForecast(every_n_steps=50, target_loss=2.6), ForecastEarlyStopping(min_delta=1e-4)]
    trainer = pl.Trainer(max_steps=300, accelerator="cpu", logger=TensorBoardLogger(root, name="plain_gpt"),
                         callbacks=callbacks, enable_checkpointing=False, enable_progress_bar=False,
                         limit_val_batches=0, log_every_n_steps=10)
    trainer.fit(model, datamodule=data)
    return root


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("logdir", nargs="?", help="folder of runs (omit with --plain)")
    p.add_argument("--plain", action="store_true", help="train a plain Lightning run first and use it")
    p.add_argument("--out", default="tensorboard_screens", help="folder for the PNGs and checks.json")
    p.add_argument("--port", type=int, default=6006)
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    logdir = str(plain_run(out / "plain_logs")) if args.plain else args.logdir
    if logdir is None:
        p.error("give LOGDIR or --plain")
    checks: dict[str, object] = {"live_replacement": live_replacement_check(args.port + 1)}
    proc = start_tensorboard(logdir, args.port)
    try:
        time.sleep(3)
        runs = get(args.port, "/data/runs")
        checks["runs"] = runs
        for name, fragment in PAGES.items():
            screenshot(args.port, fragment, out / f"{name}.png", height=2000 if name == "custom_scalars" else 1000)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    (out / "checks.json").write_text(json.dumps(checks, indent=1))
    print(json.dumps(checks, indent=1))
    print("screenshots:", ", ".join(sorted(str(f) for f in out.glob("*.png"))))


if __name__ == "__main__":
    main()
