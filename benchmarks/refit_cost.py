"""What ScalingForecast's refits cost in a real run: ``forecast/refit_seconds`` read back from TensorBoard logs.

``refit_seconds`` is the wall time of a whole refit: the fit, measured where it ran (by default in the worker
process, at a lower priority, so it stretches on a loaded machine while training does not wait for it), plus the
figure and files made on the training thread when they fit the time budget. What the training thread itself
spends is ``ScalingForecast.stall_seconds`` (``benchmarks/e2e_overhead.py`` reports it). Usage::

    lightning-scaling demo --out /tmp/demo
    python benchmarks/refit_cost.py /tmp/demo/runs
"""

from __future__ import annotations

import argparse
import glob
import os

import numpy as np
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

TAG = "forecast/refit_seconds"


def refit_seconds(run_dir: str) -> np.ndarray:
    acc = EventAccumulator(run_dir, size_guidance={"scalars": 0})
    acc.Reload()
    return np.array([e.value for e in acc.Scalars(TAG)]) if TAG in acc.Tags()["scalars"] else np.empty(0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("logdir", help="folder holding the runs' TensorBoard logs")
    args = p.parse_args()
    dirs = sorted({os.path.dirname(f) for f in glob.glob(os.path.join(args.logdir, "**", "events.out.tfevents.*"),
                                                         recursive=True)})
    every = []
    for d in dirs:
        v = refit_seconds(d)
        if v.size:
            every.append(v)
            print(f"{os.path.relpath(d, args.logdir)}: {v.size} refits, " + ", ".join(f"{x:.2f}" for x in v) + " s")
    if not every:
        raise SystemExit(f"no {TAG} under {args.logdir}")
    v = np.concatenate(every)
    print(f"all: {v.size} refits, median {np.median(v):.2f} s, mean {v.mean():.2f} s, "
          f"range {v.min():.2f}-{v.max():.2f} s")


if __name__ == "__main__":
    main()
