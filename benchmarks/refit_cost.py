"""What ScalingForecast's refits cost in a real run: ``forecast/refit_seconds`` read back from TensorBoard logs.

``refit_seconds`` is the wall time of a whole refit (the fit, the figure and the TensorBoard/JSON files), measured
where it ran: on the background thread it competes with training for the cores and the GIL, so it is longer than
the same fit on an idle machine, while the training thread only waits for the hand-off. Usage::

    lightning-scaling demo --out /tmp/demo
    python benchmarks/refit_cost.py /tmp/demo/runs

Measured on the demo (9 runs, 4 refits each, 2-core CPU with load average ~5 from other jobs): 36 refits,
median 2.17 s, mean 2.52 s, range 0.81-5.49 s.
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
