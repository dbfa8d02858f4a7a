"""Lightning-free refit scheduling for live forecasts: what one refit computes, and where it runs.

A refit (:func:`compute_refit`) fits :func:`~lightning_scaling.forecast.forecast_run` to a history snapshot and,
optionally (:func:`add_extras`), renders the forecast figure and writes the TensorBoard forecast run and
``latest.json``. A cold fit costs about a second of mostly-Python numpy work, so :class:`RefitScheduler` runs the
fit where training does not pay for it:

- ``"process"``: a child Python process at a lower priority (``nice`` 10), fed pickled snapshots through a
  pipe. A thread would share the GIL with the training loop and slow every step while it fits; a process uses a
  free core, and on a busy machine the OS scheduler favours training. It imports no torch, Lightning or matplotlib.
- ``"thread"``: a background thread (for a ``forecast_run`` patched in-process, or where subprocesses are not
  allowed).
- ``"inline"``: on the caller's thread.

The worker process also writes the TensorBoard forecast run and ``latest.json`` (TensorBoard's own event writer,
no torch: a few hundred events of pure-Python work that no longer share the training thread's GIL). Besides the
forecast maths it imports the report helpers and TensorBoard's protobufs, not torch, Lightning or matplotlib. The
figure is made on the caller's thread when a result is picked up (matplotlib would cost the worker seconds of
imports, and the image goes to the caller's logger), and so are the files in the other modes, only while what the
training thread pays stays under ``max_overhead`` of the training time so far: a coarser cadence on short or fast
runs, a figure at every refit on long ones.

Refits are due on the caller's cadence; while one is in flight the latest due snapshot waits (a newer one
replaces it), so every refit belongs to a cadence step and none is lost behind a slow one. A process that cannot
start or dies makes the scheduler fall back to ``"inline"`` with one
:class:`~lightning_scaling.warnings.ForecastWarning`.

Run as ``python -m lightning_scaling.refit JOB_FD RESULT_FD`` it is the worker process itself.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

from lightning_scaling import forecast as _forecast  # module attribute: resolved at call time (tests patch it)
from lightning_scaling.warnings import ForecastWarning

__all__ = ["EXTRAS", "MODES", "RefitJob", "RefitResult", "RefitScheduler", "add_extras", "compute_refit"]

MODES = ("process", "thread", "inline")
#: Priority increment of the worker process: training keeps the cores it needs.
WORKER_NICE = 10
#: Expected cost of the first figure, imports included (matplotlib alone is about a second).
FIRST_EXTRAS_SECONDS = 1.0
#: Expected cost of the first TensorBoard forecast run (a few hundred scalars; 0.03-0.12 s measured on the demo).
FIRST_RUN_SECONDS = 0.1
#: What the budget tracks, each with its own last cost: the forecast run (the main view) and the figure.
EXTRAS = ("run", "figure")


@dataclass
class RefitJob:
    """One refit: the history snapshot and what to do with its forecast.

    Attributes:
        history: A private :class:`~lightning_scaling.RunHistory` snapshot (the worker may keep it).
        at_step: The cadence step the snapshot was taken at.
        fit_kwargs: Keyword arguments of ``forecast_run`` besides the history (``horizon``, ``init``, ...).
        draw: Render the forecast figure to an image array (needs matplotlib).
        log_dir: Where to write ``latest.json`` (milliseconds; ``None``: no files).
        write_run: Also write the TensorBoard forecast run under ``log_dir``.
        target_loss: Drawn on the figure.
    """

    history: Any
    at_step: int
    fit_kwargs: dict[str, Any] = field(default_factory=dict)
    draw: bool = False
    log_dir: str | None = None
    write_run: bool = False
    target_loss: float | None = None


@dataclass
class RefitResult:
    """What one refit produced; ``error`` holds an exception from the fit (no forecast) or from the extras."""

    at_step: int
    forecast: Any = None
    error: BaseException | None = None
    image: np.ndarray | None = None
    critical_batch: float | None = None
    smoothed_loss: float | None = None
    fit_seconds: float = 0.0
    total_seconds: float = 0.0
    run_seconds: float = 0.0
    figure_seconds: float = 0.0

    @property
    def extras_seconds(self) -> float:
        """What the forecast run and the figure cost the training thread (``latest.json`` is not counted)."""
        return self.run_seconds + self.figure_seconds


def compute_refit(job: RefitJob) -> RefitResult:
    """Fit, then optionally draw and write files; never raises (errors are returned in ``result.error``).

    Example::

        >>> from lightning_scaling.history import RunHistory
        >>> h = RunHistory(name="r", step=np.arange(3), loss=np.array([3.0, 2.9, 2.8]))
        >>> r = compute_refit(RefitJob(h, at_step=3, fit_kwargs={"horizon": 100}))
        >>> r.forecast is None and isinstance(r.error, ValueError)  # too little of the curve yet
        True
    """
    t0 = time.perf_counter()
    history = job.history
    result = RefitResult(at_step=job.at_step, critical_batch=_last_finite(getattr(history, "gns_b_simple", None)),
                         smoothed_loss=recent_mean_loss(history))
    try:
        result.forecast = _forecast.forecast_run(history, **job.fit_kwargs)
    except Exception as err:
        result.error = err
        result.fit_seconds = result.total_seconds = time.perf_counter() - t0
        return result
    result.fit_seconds = result.total_seconds = time.perf_counter() - t0
    add_extras(job, result)
    return result


def add_extras(job: RefitJob, result: RefitResult) -> None:
    """Draw the figure and write the files ``job`` asks for (``draw``, ``log_dir``, ``write_run``) for a successful
    fit; ``result.figure_seconds`` and ``result.run_seconds`` time the figure and the forecast run, whose sum is
    ``result.extras_seconds`` (``latest.json`` costs milliseconds and is not counted)."""
    if result.forecast is None or not (job.draw or job.log_dir is not None):
        return
    t0 = time.perf_counter()
    # a cost is recorded only for work done: a skipped figure or forecast run costs microseconds, which would
    # stand in for its expected cost in the budget (see RefitScheduler._extras_estimate)
    if job.draw:
        try:
            from lightning_scaling.report.figures import forecast_figure, render_figure

            result.image = render_figure(forecast_figure(job.history, result.forecast, target_loss=job.target_loss))
            result.figure_seconds = time.perf_counter() - t0
        except ImportError:
            pass  # matplotlib is optional for the figure
        except Exception as err:
            result.error = err  # reported by the caller, forecast still used
            result.figure_seconds = time.perf_counter() - t0
    if job.log_dir is not None and job.write_run:
        t1 = time.perf_counter()
        if _write_run(job, result):
            result.run_seconds = time.perf_counter() - t1
    if job.log_dir is not None:
        _write_json(job, result)
    result.total_seconds += time.perf_counter() - t0


def _write_run(job: RefitJob, result: RefitResult) -> bool:
    """Write the TensorBoard forecast run of a predictable forecast; whether it was written (or tried and failed)."""
    from lightning_scaling.report.figures import is_predictable
    from lightning_scaling.report.tensorboard import write_forecast_run

    fc = result.forecast
    if not is_predictable(fc.final_loss, fc.final_lower, fc.final_upper):  # keep the last readable one
        return False
    try:
        write_forecast_run(job.log_dir, fc, history=job.history)
    except Exception as err:
        result.error = err
    return True


def _write_json(job: RefitJob, result: RefitResult) -> None:
    from lightning_scaling.report.tensorboard import write_forecast_json

    try:
        write_forecast_json(job.log_dir, result.forecast, extra={"at_step": job.at_step,
                                                                 "fit_seconds": result.fit_seconds})
    except Exception as err:
        result.error = err


class RefitScheduler:
    """Runs refits on the caller's cadence without stalling the caller: in a worker process, a thread or inline.

    The caller calls :meth:`submit` at each cadence step and :meth:`poll` often (every training step: a
    non-blocking pipe check). At most one refit is in flight and one waits; a newer submit replaces the waiting
    one. :meth:`wants_extras` tells whether the figure and files fit the time budget of the caller's thread. The
    worker process writes the files (forecast run, ``latest.json``) itself, at no cost to the caller; the figure,
    and in the other modes the files, are made on the caller's thread when the result is picked up.

    Args:
        mode: ``"process"``, ``"thread"`` or ``"inline"``.
        max_overhead: Fraction of the training time that figures and files may cost in total.

    Raises:
        ValueError: ``mode`` is not one of :data:`MODES` or ``max_overhead`` is not positive.

    Attributes:
        mode: The mode in use (``"inline"`` after a worker failure).
        submitted_steps: Cadence steps of the submitted refits, in order; ``completed`` counts the results.
        skipped_steps: Cadence steps of the refits never run: a newer one replaced them while they waited.

    Example::

        >>> from lightning_scaling.history import RunHistory
        >>> s = RefitScheduler("inline")
        >>> h = RunHistory(name="r", step=np.arange(3), loss=np.array([3.0, 2.9, 2.8]))
        >>> s.submit(RefitJob(h, at_step=3, fit_kwargs={"horizon": 100}))
        >>> [r.at_step for r in s.poll()]
        [3]
        >>> s.close()
    """

    def __init__(self, mode: str = "process", *, max_overhead: float = 0.02) -> None:
        if mode not in MODES:
            raise ValueError(f"`mode` must be one of {MODES}, got {mode!r}")
        if not (isinstance(max_overhead, (int, float)) and max_overhead > 0):
            raise ValueError(f"`max_overhead` must be a positive fraction, got {max_overhead!r}")
        # Connection over plain pipe descriptors is POSIX-only (on Windows it expects sockets): a thread there.
        self.mode = "thread" if mode == "process" and sys.platform == "win32" else mode
        self.max_overhead = float(max_overhead)
        self.submitted_steps: list[int] = []
        self.skipped_steps: list[int] = []  # waiting refits replaced by a newer one before they started
        self.completed = 0
        self._extras_seconds = 0.0
        # cost of the next forecast run and figure: each the last one's (a refit that made neither teaches nothing:
        # until 0.3 its microseconds replaced the figure's expected second, and the second refit of every run drew
        # a figure on the training thread whatever the budget said)
        self._extras_estimate = {"run": FIRST_RUN_SECONDS, "figure": FIRST_EXTRAS_SECONDS}
        self._in_flight: Any = None  # a Future (thread) or the job (process)
        self._in_flight_job: RefitJob | None = None
        self._waiting: RefitJob | None = None
        self._done: list[RefitResult] = []
        self._executor: ThreadPoolExecutor | None = None
        self._worker: _Worker | None = None

    @property
    def busy(self) -> bool:
        """Whether a refit is in flight or waiting."""
        return self._in_flight is not None or self._waiting is not None

    def wants_extras(self, train_seconds: float, kinds: tuple[str, ...] = EXTRAS) -> bool:
        """Whether the next refit may make ``kinds`` (of :data:`EXTRAS`): if everything made so far and these would
        have cost the caller's thread at most ``max_overhead`` of ``train_seconds``. The first forecast run is
        expected to cost :data:`FIRST_RUN_SECONDS`, the first figure :data:`FIRST_EXTRAS_SECONDS`; then each its last
        cost. The worker process writes the forecast run itself: in ``"process"`` mode that costs the caller nothing."""
        need = sum(self._extras_estimate[k] for k in kinds if not (k == "run" and self.mode == "process"))
        if not need:  # free to the caller's thread: never refused, even after a figure overspent the budget
            return True
        return self._extras_seconds + need <= self.max_overhead * max(train_seconds, 0.0)

    def start(self) -> None:
        """Start the worker process now (``"process"`` mode), so that its interpreter and imports (about a second)
        are ready by the first refit instead of delaying it; a worker that cannot start falls back as in
        :meth:`submit`."""
        if self.mode == "process" and self._worker is None:
            try:
                self._worker = _Worker()
            except Exception as err:
                self._fall_back(err)

    def submit(self, job: RefitJob) -> None:
        """Start ``job`` now, or keep it waiting (replacing an older waiting one, counted in ``skipped_steps``)
        while a refit is in flight."""
        self.submitted_steps.append(job.at_step)
        if self._in_flight is None:
            self._start(job)
        else:
            if self._waiting is not None:
                self.skipped_steps.append(self._waiting.at_step)
            self._waiting = job

    @property
    def pending_steps(self) -> list[int]:
        """Cadence steps of the refits in flight or waiting (dropped by :meth:`close`)."""
        return [j.at_step for j in (self._in_flight_job, self._waiting) if j is not None]

    def poll(self) -> list[RefitResult]:
        """Finished refits since the last call (oldest first), starting the waiting job when the worker frees."""
        if self._in_flight is not None and self._finished():
            self._collect()
        done, self._done = self._done, []
        return done

    def finish(self, timeout: float = 120.0) -> list[RefitResult]:
        """Wait (up to ``timeout`` seconds in all) for the refit in flight and the waiting one; returns them."""
        deadline = time.monotonic() + timeout
        while self._in_flight is not None and time.monotonic() < deadline:
            if self._finished(wait=max(deadline - time.monotonic(), 0.0)):
                self._collect()
        return self.poll()

    def close(self) -> None:
        """Stop the worker (process or thread); a refit still in flight is dropped."""
        if self._worker is not None:
            self._worker.close(busy=self._in_flight is not None)
            self._worker = None
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
        self._in_flight = self._in_flight_job = self._waiting = None

    # ------------------------------------------------------------------------------------------ internals
    def _start(self, job: RefitJob) -> None:
        self.start()  # no-op once the worker runs (or after a fall-back)
        if self.mode == "process":
            try:
                files = replace(job, draw=False)  # the worker writes the files; the figure is made here, at pick-up
                self._worker.send(files)
                self._in_flight, self._in_flight_job = files, replace(job, log_dir=None, write_run=False)
                return
            except Exception as err:
                self._fall_back(err)
        fit_only = replace(job, draw=False, log_dir=None, write_run=False)  # the extras are made here, at pick-up
        if self.mode == "thread":
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ScalingForecast")
            self._in_flight, self._in_flight_job = self._executor.submit(compute_refit, fit_only), job
            return
        self._finish_one(compute_refit(job))

    def _finished(self, wait: float = 0.0) -> bool:
        if isinstance(self._in_flight, Future):
            try:
                self._in_flight.result(timeout=wait)
            except Exception:
                pass  # compute_refit returns its errors; a timeout means not yet
            return self._in_flight.done()
        try:
            return self._worker is not None and self._worker.ready(wait)
        except Exception as err:
            self._fall_back(err)
            return True

    def _collect(self) -> None:
        flight, job = self._in_flight, self._in_flight_job
        self._in_flight = self._in_flight_job = None
        if isinstance(flight, Future):
            result = flight.result()
        else:
            try:
                if self._worker is not None:
                    result = self._worker.receive()
                    result.run_seconds = 0.0  # the worker's time, not the training thread's
                else:  # the worker failed while this refit was in flight: redone here, at the caller's cost
                    result = compute_refit(flight)
            except Exception as err:  # the worker died mid-refit: redo it here
                self._fall_back(err)
                result = compute_refit(flight)
        add_extras(job, result)
        self._finish_one(result)
        waiting, self._waiting = self._waiting, None
        if waiting is not None:
            self._start(waiting)

    def _finish_one(self, result: RefitResult) -> None:
        self.completed += 1
        self._extras_seconds += result.extras_seconds
        for kind, seconds in (("run", result.run_seconds), ("figure", result.figure_seconds)):
            if seconds > 0:
                self._extras_estimate[kind] = seconds
        self._done.append(result)

    def _fall_back(self, err: BaseException) -> None:
        warnings.warn(f"ScalingForecast: the refit worker process failed ({type(err).__name__}: {err}); refitting "
                      "on the training thread from now on.", ForecastWarning, stacklevel=2)
        if self._worker is not None:
            with contextlib.suppress(Exception):
                self._worker.close(busy=True)
            self._worker = None
        self.mode = "inline"


class _Worker:
    """The parent's end of the worker process: pickled jobs in, pickled results out, on two private pipes.

    The pipes are passed as file descriptors (not stdin/stdout), so whatever the interpreter or a library prints
    at start-up cannot corrupt the protocol. The worker starts from ``-c`` with this copy of the package first on
    its path only when it is not importable from there already (never ahead of the standard library).
    """

    def __init__(self) -> None:
        root = str(Path(__file__).resolve().parent.parent)  # this copy of the package
        boot = ("import sys; sys.path[:] = [p for p in sys.path if p not in ('', '.')]\n"
                f"if {root!r} not in sys.path: sys.path.insert(0, {root!r})\n"
                "from lightning_scaling.refit import _worker_main; _worker_main(int(sys.argv[1]), int(sys.argv[2]))")
        job_r, job_w = os.pipe()
        res_r, res_w = os.pipe()
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
        try:
            self._proc = subprocess.Popen([sys.executable, "-c", boot, str(job_r), str(res_w)],
                                          stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, env=env,
                                          close_fds=True, pass_fds=(job_r, res_w))
        except BaseException:
            for fd in (job_w, res_r):
                os.close(fd)
            raise
        finally:
            for fd in (job_r, res_w):
                os.close(fd)
        self._send = Connection(job_w, readable=False)
        self._recv = Connection(res_r, writable=False)

    def send(self, job: RefitJob) -> None:
        self._send.send_bytes(pickle.dumps(job, protocol=pickle.HIGHEST_PROTOCOL))

    def ready(self, wait: float = 0.0) -> bool:
        if self._recv.poll(wait):
            return True
        if self._proc.poll() is not None:
            raise RuntimeError(f"worker exited with code {self._proc.returncode}")
        return False

    def receive(self) -> RefitResult:
        return pickle.loads(self._recv.recv_bytes())

    def close(self, busy: bool = False) -> None:
        """Ask an idle worker to quit (an empty message: processes forked since, e.g. DataLoader workers, may hold
        the pipe open, so end of file alone could take long); a busy one is killed: nobody waits for its fit."""
        with contextlib.suppress(Exception):
            if not busy:
                self._send.send_bytes(b"")
        for conn in (self._send, self._recv):
            with contextlib.suppress(Exception):
                conn.close()
        if busy:
            with contextlib.suppress(Exception):
                self._proc.kill()
        # Reaped off the caller's thread: an idle worker takes ~0.1 s to tear its interpreter down, which the end of
        # every run used to wait for (1% of an 8 s demo run); one that has not quit within 5 s is killed.
        threading.Thread(target=_reap, args=(self._proc,), name="ScalingForecast-reaper", daemon=True).start()


def _reap(proc: subprocess.Popen, grace: float = 5.0) -> None:
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _serve(recv: Connection, send: Connection) -> None:
    """Worker loop: one job at a time until the parent sends an empty message or closes the pipe."""
    while True:
        try:
            data = recv.recv_bytes()
        except EOFError:
            return
        if not data:
            return
        result = compute_refit(pickle.loads(data))
        try:
            data = pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as err:  # an unpicklable exception: send its text
            result.error = RuntimeError(f"{type(result.error).__name__}: {result.error} ({err})")
            data = pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL)
        send.send_bytes(data)


def _worker_main(job_fd: int, result_fd: int) -> None:
    """The worker process: lower priority, deaf to Ctrl-C (the parent ends it), serving jobs from ``job_fd``."""
    if hasattr(signal, "SIGINT"):
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(os, "nice"):
        try:
            os.nice(WORKER_NICE)
        except OSError:
            pass
    _serve(Connection(job_fd, writable=False), Connection(result_fd, readable=False))


def recent_mean_loss(history: Any) -> float | None:
    """Mean finite loss over the last 2% of a history (at least 5 records): the training loss as a person reads it.

    Example::

        >>> import types
        >>> recent_mean_loss(types.SimpleNamespace(loss=np.r_[np.full(95, 9.0), 3.0, 1.0, 2.0, 3.0, 1.0]))
        2.0
    """
    loss = np.asarray(getattr(history, "loss", ()), dtype=np.float64)
    loss = loss[np.isfinite(loss)]
    if loss.size == 0:
        return None
    k = max(_AVG_MIN_POINTS, int(round(_AVG_FRACTION * loss.size)))
    return float(np.mean(loss[-k:]))


#: Fraction of the logged history averaged for ``recent_mean_loss`` (at least ``_AVG_MIN_POINTS`` records).
_AVG_FRACTION, _AVG_MIN_POINTS = 0.02, 5


def _last_finite(values: Any) -> float | None:
    if values is None:
        return None
    arr = np.asarray(values, dtype=np.float64)
    arr = arr[np.isfinite(arr)]
    return float(arr[-1]) if arr.size else None


if __name__ == "__main__":  # python -m lightning_scaling.refit JOB_FD RESULT_FD
    # Run from the imported module, not this __main__ copy: results must pickle as lightning_scaling.refit classes.
    from lightning_scaling.refit import _worker_main as _main

    _main(int(sys.argv[1]), int(sys.argv[2]))
