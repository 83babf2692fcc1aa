"""The run's directory: writable checks, atomic JSON, one run at a time, and provenance.

* :func:`ensure_writable_dir` fails fast (before training) on a directory that cannot be written.
* :func:`write_json` writes atomically (temporary file, then rename), from process 0 only.
* :class:`WorkdirLock`: a second run started on a workdir that a live run holds stops before any
  work, naming the holder (pid, host, start time, command). A lock left by a killed run is
  taken over: on the same host when its pid is gone, on any host when its heartbeat (refreshed
  every `HEARTBEAT_SECONDS` by the holder) is older than `STALE_SECONDS`. Only process 0 of a
  multi-host run takes the lock, so the processes of one run never lock each other out.
* :func:`provenance`: what a results file needs to be reproduced and compared across machines.
* :func:`process_pool`: the spawned worker processes that train stages or workdirs side by
  side; a worker ends itself when the process that started it is gone (:func:`exit_with_parent`,
  also used by the streaming feed's grain workers), so that killing a run never leaves its
  workers training (and holding its workdirs) or decoding unseen.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import socket
import subprocess
import sys
import threading
import time
from typing import Any

import jax
import numpy as np

from dsink_jax.train import parallel

LOCK_NAME = ".lock"
HEARTBEAT_SECONDS = 30.0
STALE_SECONDS = 300.0
PACKAGES = ("jax", "jaxlib", "flax", "optax", "ott-jax", "orbax-checkpoint",
            "tensorflow-datasets", "ml-collections", "numpy", "dsink_jax")


def ensure_writable_dir(path: str | os.PathLike) -> str:
    """Creates `path` if needed and checks that a file can be written there."""
    path = os.path.abspath(os.fspath(path))
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write_probe.{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as err:
        raise PermissionError(f"workdir {path!r} is not writable: {err.strerror or err}") from err
    return path


def json_default(value):
    """JSON for numpy scalars and arrays."""
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def write_json(path: str, obj: Any) -> None:
    """Writes JSON atomically (temporary file, then rename): a reader never sees half a file.

    Only process 0 writes (multi-host runs); the others return.
    """
    if not parallel.is_writer():
        return
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=json_default)
    os.replace(tmp, path)


# How often a worker (of `process_pool`, or grain's) checks that its parent is alive.
PARENT_POLL_SECONDS = 2.0


def exit_with_parent(parent_pid: int) -> None:
    """Called in a worker process: a daemon thread ends it once its parent `parent_pid` is gone
    (killed, even with SIGKILL: the worker is then re-parented). `process_pool`'s initializer;
    a stage resumes from its latest checkpoint when the command runs again, as after any kill."""
    def watch():
        while os.getppid() == parent_pid:
            time.sleep(PARENT_POLL_SECONDS)
        os._exit(1)  # pylint: disable=protected-access
    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def process_pool(max_workers: int):
    """A `ProcessPoolExecutor` of `max_workers` spawned processes (a forked JAX process can
    deadlock) that exit when this process is gone (see :func:`exit_with_parent`)."""
    import concurrent.futures  # pylint: disable=import-outside-toplevel
    import multiprocessing  # pylint: disable=import-outside-toplevel
    return concurrent.futures.ProcessPoolExecutor(
        max_workers=max_workers, mp_context=multiprocessing.get_context("spawn"),
        initializer=exit_with_parent, initargs=(os.getpid(),))


class WorkdirBusyError(RuntimeError):
    """Another live run holds the workdir."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


class WorkdirLock:
    """One run per workdir (a context manager; see the module docstring).

    Re-entrant within a process: a pipeline that holds its workdir may train stages in it.
    """

    _held: dict[str, int] = {}  # lock path -> depth, this process
    _guard = threading.Lock()

    def __init__(self, workdir: str | os.PathLike):
        self.path = os.path.join(os.path.abspath(os.fspath(workdir)), LOCK_NAME)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _holder(self) -> dict | None:
        try:
            with open(self.path) as f:
                return json.load(f)
        except (OSError, json.JSONDecodeError):
            return None

    def _stale(self, holder: dict | None) -> bool:
        if holder is None:  # unreadable: a kill between create and write
            return True
        try:
            age = time.time() - os.path.getmtime(self.path)
        except OSError:
            return True
        if holder.get("host") == socket.gethostname():
            return not _pid_alive(int(holder.get("pid", -1)))
        return age > STALE_SECONDS

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": datetime.datetime.now().isoformat(timespec="seconds"),
                "command": " ".join(sys.argv)}
        with os.fdopen(fd, "w") as f:
            json.dump(info, f)
        return True

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            try:
                os.utime(self.path)
            except OSError:
                return

    def acquire(self) -> "WorkdirLock":
        if not parallel.is_writer():
            return self
        with self._guard:
            if self._held.get(self.path):
                self._held[self.path] += 1
                return self
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            for _ in range(3):
                if self._create():
                    break
                holder = self._holder()
                if not self._stale(holder):
                    raise WorkdirBusyError(
                        f"{os.path.dirname(self.path)} is in use by another run (pid "
                        f"{holder.get('pid')} on {holder.get('host')}, started "
                        f"{holder.get('started')}: {holder.get('command')}); wait for it to "
                        f"finish or use another workdir")
                try:  # a killed run's lock: take it over
                    os.remove(self.path)
                except FileNotFoundError:
                    pass
            else:
                raise WorkdirBusyError(f"could not take the lock {self.path}")
            self._held[self.path] = 1
        self._thread = threading.Thread(target=self._heartbeat, daemon=True)
        self._thread.start()
        return self

    def release(self) -> None:
        if not parallel.is_writer():
            return
        with self._guard:
            depth = self._held.get(self.path, 0)
            if depth > 1:
                self._held[self.path] = depth - 1
                return
            self._held.pop(self.path, None)
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            os.remove(self.path)
        except FileNotFoundError:
            pass

    def __enter__(self) -> "WorkdirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _git_commit() -> str | None:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10, check=False)
        dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode:
        return None
    return out.stdout.strip() + ("+modified" if dirty.stdout.strip() else "")


def provenance() -> dict:
    """Package versions, JAX backend and devices, processes, git commit, host and command."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    devices = jax.devices()
    return {
        "versions": versions,
        "python": platform.python_version(),
        "jax_backend": jax.default_backend(),
        "device_kind": devices[0].device_kind,
        "device_count": len(devices),
        "process_count": jax.process_count(),
        "git_commit": _git_commit(),
        "host": socket.gethostname(),
        "command": " ".join(sys.argv),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
    }
