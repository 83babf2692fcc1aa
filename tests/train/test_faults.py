"""Faults: kill -9 at random points (also inside a checkpoint save), corrupt checkpoints.

A run killed and restarted with the same command must end with exactly the parameters of an
uninterrupted run (bitwise on CPU).
"""

import json
import os
import pathlib
import random
import signal
import subprocess
import sys
import time
import warnings

import jax
import numpy as np
import pytest

from dsink_jax.train.checkpoint import Checkpointer

# The tests share a module fixture: one worker builds it once.
pytestmark = pytest.mark.xdist_group("faults")

ROOT = pathlib.Path(__file__).resolve().parents[2]
EPOCHS = 8
ARGS = ["--config=experiments/configs/baseline.py:preset=smoke,loss=elr,noise_rate=0.3",
        f"--config.optim.epochs={EPOCHS}", "--config.checkpoint_every_epochs=1",
        "--config.eval_every_epochs=1", "--config.keep_checkpoints=3"]

# Runs experiments/main.py; with KILL_IN_SAVE=k the process SIGKILLs itself while saving the
# checkpoint of step k (after a random delay within the save).
RUNNER = """
import os, random, runpy, signal, sys, threading
from dsink_jax.train import checkpoint
kill_at = int(os.environ.get("KILL_IN_SAVE", "0"))
original = checkpoint.Checkpointer.save
def save(self, step, state, **kwargs):
    if step == kill_at:
        delay = random.Random(kill_at).uniform(0.0, 0.05)
        threading.Timer(delay, lambda: os.kill(os.getpid(), signal.SIGKILL)).start()
    original(self, step, state, **kwargs)
checkpoint.Checkpointer.save = save
sys.argv = ["experiments/main.py"] + sys.argv[1:]
runpy.run_path("experiments/main.py", run_name="__main__")
"""


def _command(workdir):
    return [sys.executable, "-c", RUNNER, *ARGS, f"--workdir={workdir}"]


def _env(**extra):
    return dict(os.environ, JAX_PLATFORMS="cpu", **extra)


def _fingerprint(workdir):
    summary = json.loads((pathlib.Path(workdir) / "results.json").read_text())
    return summary["stages"][0]["params_fingerprint"]


def _checkpoints(workdir):
    """The checkpoint numbers (optimizer steps) on disk."""
    path = pathlib.Path(workdir) / "elr" / "checkpoints"
    return sorted(int(p.name) for p in path.iterdir() if p.name.isdigit()) if path.exists() else []


def _steps_per_epoch(workdir):
    stage = json.loads((pathlib.Path(workdir) / "elr" / "results.json").read_text())
    return stage["steps"] // stage["epochs"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("straight")
    subprocess.run(_command(workdir), cwd=ROOT, env=_env(), check=True, capture_output=True,
                   timeout=600)
    return _fingerprint(workdir), _steps_per_epoch(workdir)


@pytest.mark.slow(seconds=30)
def test_kill9_at_random_steps_then_resume_is_bitwise_identical(tmp_path, uninterrupted):
    fingerprint, steps_per_epoch = uninterrupted
    rng = random.Random(0)
    for epoch in (2, 5):  # kill somewhere after the checkpoint of this epoch appeared
        target = epoch * steps_per_epoch
        proc = subprocess.Popen(_command(tmp_path), cwd=ROOT, env=_env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            if _checkpoints(tmp_path) and _checkpoints(tmp_path)[-1] >= target:
                time.sleep(rng.uniform(0.0, 0.2))
                break
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert not (tmp_path / "results.json").exists(), "killed run must not report results"
    subprocess.run(_command(tmp_path), cwd=ROOT, env=_env(), check=True, capture_output=True,
                   timeout=600)
    assert _fingerprint(tmp_path) == fingerprint


@pytest.mark.slow(seconds=20)
def test_kill9_inside_a_checkpoint_save_then_resume(tmp_path, uninterrupted):
    fingerprint, steps_per_epoch = uninterrupted
    for epoch in (4,):
        kill_at = epoch * steps_per_epoch
        proc = subprocess.run(_command(tmp_path), cwd=ROOT, env=_env(KILL_IN_SAVE=str(kill_at)),
                              capture_output=True, timeout=600)
        assert proc.returncode == -signal.SIGKILL
        assert max(_checkpoints(tmp_path)) in (kill_at - steps_per_epoch, kill_at)
    subprocess.run(_command(tmp_path), cwd=ROOT, env=_env(), check=True, capture_output=True,
                   timeout=600)
    assert _fingerprint(tmp_path) == fingerprint


def test_corrupt_latest_checkpoint_warns_and_falls_back(tmp_path):
    state = {"w": np.arange(4, dtype=np.float32), "step": np.zeros((), np.int32)}
    ckpt = Checkpointer(tmp_path, keep=3)
    for epoch in (1, 2):
        ckpt.save(epoch, jax.tree.map(lambda x: x + epoch, state))
    ckpt.close()
    # Truncate every file of the latest checkpoint (a disk that filled up, a torn copy).
    for path in (tmp_path / "2").rglob("*"):
        if path.is_file():
            path.write_bytes(b"")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        restored, epoch = Checkpointer(tmp_path, keep=3).restore_latest(state)
    assert epoch == 1
    np.testing.assert_array_equal(restored["w"], state["w"] + 1)
    assert any("could not be restored" in str(w.message) for w in caught)


def test_no_readable_checkpoint_starts_fresh(tmp_path):
    state = {"w": np.zeros(2, np.float32)}
    ckpt = Checkpointer(tmp_path, keep=2)
    ckpt.save(1, state)
    ckpt.close()
    for path in (tmp_path / "1").rglob("*"):
        if path.is_file():
            path.write_bytes(b"garbage")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert Checkpointer(tmp_path, keep=2).restore_latest(state) is None
