"""Several processes on one study folder: a run lock with a heartbeat (Lightning-free)."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any




class RunLock:
    """An exclusive lock on one run folder, shared through the filesystem (``<out>/runs/<run>.lock``).

    The lock file is created atomically (``O_CREAT | O_EXCL``) and records the holder's pid and host; while held,
    a daemon thread touches it every ``heartbeat_s``. A lock is stale (and is taken over) when its holder is a dead
    process on this host, or when its heartbeat is older than ``stale_after_s`` (a holder on another node that
    died, or a recycled pid). Works on any shared filesystem with atomic exclusive create (local disks, NFSv3+,
    Lustre, GPFS).

    Args:
        path: the lock file.
        stale_after_s: heartbeat age after which a lock held from another host counts as abandoned.
        heartbeat_s: seconds between the holder's touches of the lock file.

    Example::

        >>> import tempfile
        >>> lock = RunLock(Path(tempfile.mkdtemp()) / "run.lock")
        >>> lock.acquire(), RunLock(lock.path).acquire()
        (True, False)
        >>> lock.release()
    """

    def __init__(self, path: str | os.PathLike[str], *, stale_after_s: float = 600.0,
                 heartbeat_s: float = 30.0) -> None:
        if not (stale_after_s > heartbeat_s > 0):
            raise ValueError(f"need stale_after_s > heartbeat_s > 0, got {stale_after_s}, {heartbeat_s}")
        self.path = Path(path)
        self.stale_after_s, self.heartbeat_s = float(stale_after_s), float(heartbeat_s)
        self._stop: Any = None
        self._me = {"pid": os.getpid(), "host": socket.gethostname()}

    def holder(self) -> dict[str, Any] | None:
        """The holder's record (``pid``, ``host``, ``time``), or ``None`` when the run is not locked."""
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # being written right now: held

    def held_elsewhere(self) -> bool:
        """Whether another live process holds the lock now."""
        info = self.holder()
        return info is not None and not (info and self.is_stale(info)) and \
            (info.get("pid"), info.get("host")) != (self._me["pid"], self._me["host"])

    def is_stale(self, info: Mapping[str, Any]) -> bool:
        """Whether the lock recorded as ``info`` was abandoned by its holder."""
        if info.get("host") == self._me["host"] and isinstance(info.get("pid"), int) and not _pid_alive(info["pid"]):
            return True
        try:  # also on this host: a recycled pid looks alive, but its new owner does not touch our lock
            return time.time() - self.path.stat().st_mtime > self.stale_after_s
        except FileNotFoundError:
            return True

    def acquire(self) -> bool:
        """Take the lock; ``False`` when another live process holds it (a stale lock is taken over)."""
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                info = self.holder()
                if info is None:
                    continue  # released between our two calls
                if not (info and self.is_stale(info)):
                    return False
                self._remove_if(info)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump({**self._me, "time": time.time()}, f)
            self._start_heartbeat()
            return True
        return False

    def release(self) -> None:
        """Drop the lock (only if this process holds it)."""
        if self._stop is not None:
            self._stop.set()
            self._stop = None
        self._remove_if(self._me)

    def _remove_if(self, info: Mapping[str, Any]) -> None:
        # Remove only the lock we looked at: two processes taking over one stale lock must not delete each other's.
        current = self.holder()
        if current is not None and all(current.get(k) == info.get(k) for k in ("pid", "host")):
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass

    def _start_heartbeat(self) -> None:

        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(self.heartbeat_s):
                try:
                    os.utime(self.path)
                except OSError:
                    return

        threading.Thread(target=beat, daemon=True, name=f"lock-{self.path.name}").start()
        self._stop = stop


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, owned by another user
    return True
