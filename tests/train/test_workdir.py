"""One run per workdir, atomic JSON and provenance."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from dsink_jax.train import parallel, workdir
from tests.multiprocess import running

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _write_lock(directory, **fields):
    info = {"pid": os.getpid(), "host": socket.gethostname(), "started": "2026-12-01T10:00:00",
            "command": "python experiments/main.py --workdir=x", **fields}
    path = os.path.join(directory, workdir.LOCK_NAME)
    with open(path, "w") as f:
        json.dump(info, f)
    return path


def test_a_live_holder_stops_a_second_run_naming_it(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _write_lock(tmp_path, pid=sleeper.pid)
        with pytest.raises(workdir.WorkdirBusyError,
                           match=rf"in use by another run \(pid {sleeper.pid} on "
                                 rf"{socket.gethostname()}, started 2026-12-01T10:00:00"):
            workdir.WorkdirLock(tmp_path).acquire()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_killed_runs_lock_does_not_block_the_resume(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _write_lock(tmp_path, pid=dead.pid)
    with workdir.WorkdirLock(tmp_path):
        with open(tmp_path / workdir.LOCK_NAME) as f:
            assert json.load(f)["pid"] == os.getpid()
    assert not (tmp_path / workdir.LOCK_NAME).exists()  # released


def test_another_hosts_lock_is_stale_only_without_a_heartbeat(tmp_path):
    path = _write_lock(tmp_path, host="some-other-node", pid=1)
    with pytest.raises(workdir.WorkdirBusyError, match="some-other-node"):
        workdir.WorkdirLock(tmp_path).acquire()
    old = time.time() - workdir.STALE_SECONDS - 10
    os.utime(path, (old, old))
    with workdir.WorkdirLock(tmp_path):
        pass


def test_the_lock_is_reentrant_within_a_process(tmp_path):
    with workdir.WorkdirLock(tmp_path):
        with workdir.WorkdirLock(tmp_path):
            pass
        assert (tmp_path / workdir.LOCK_NAME).exists()  # still held by the outer one
    assert not (tmp_path / workdir.LOCK_NAME).exists()


def test_processes_other_than_0_never_lock(tmp_path, monkeypatch):
    # The processes of one multi-host run share the workdir: only process 0 takes the lock.
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _write_lock(tmp_path, pid=sleeper.pid)
        monkeypatch.setattr(parallel, "is_writer", lambda: False)
        with workdir.WorkdirLock(tmp_path):
            pass
        assert json.loads((tmp_path / workdir.LOCK_NAME).read_text())["pid"] == sleeper.pid
    finally:
        sleeper.kill()
        sleeper.wait()


@pytest.mark.slow(seconds=14)
def test_the_same_command_twice_stops_the_second_before_training(tmp_path):
    command = [sys.executable, os.path.join(REPO, "experiments", "main.py"),
               "--config=" + os.path.join(REPO, "experiments", "configs", "baseline.py")
               + ":preset=smoke", "--config.optim.epochs=200", f"--workdir={tmp_path}"]
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    first = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (tmp_path / workdir.LOCK_NAME).exists():
            assert first.poll() is None and time.time() < deadline, "first run did not start"
            time.sleep(0.2)
        second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120,
                                check=False)
        assert second.returncode == 2, second.stderr[-2000:]
        assert f"in use by another run (pid {first.pid}" in second.stderr
    finally:
        first.kill()
        first.wait()


def test_write_json_is_atomic_and_numpy_aware(tmp_path):
    import numpy as np
    path = str(tmp_path / "r.json")
    workdir.write_json(path, {"a": np.float32(0.5), "b": np.arange(3), "c": np.int64(4)})
    assert json.loads(open(path).read()) == {"a": 0.5, "b": [0, 1, 2], "c": 4}
    assert os.listdir(tmp_path) == ["r.json"]


def test_provenance_names_versions_devices_and_commit():
    info = workdir.provenance()
    assert info["versions"]["jax"] and info["versions"]["flax"] and info["versions"]["ott-jax"]
    assert info["jax_backend"] == "cpu" and info["device_count"] >= 1
    assert info["process_count"] == 1
    assert "git_commit" in info and "command" in info


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="needs /proc")
def test_pool_workers_end_when_their_parent_is_killed():
    parent = subprocess.Popen([sys.executable, "-c", (
        "import os, time\n"
        "from dsink_jax.train import workdir\n"
        "pool = workdir.process_pool(1)\n"
        "print(pool.submit(os.getpid).result(), flush=True)\n"
        "pool.submit(time.sleep, 120)\n"
        "time.sleep(120)\n")], stdout=subprocess.PIPE, text=True)
    try:
        worker = int(parent.stdout.readline())
        assert running(worker)
        parent.kill()  # SIGKILL: no handler of the parent's runs
        parent.wait()
        deadline = time.time() + 5 * workdir.PARENT_POLL_SECONDS + 10
        while running(worker) and time.time() < deadline:
            time.sleep(0.2)
        assert not running(worker)
    finally:
        parent.kill()
        parent.wait()
