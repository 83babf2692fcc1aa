"""Training from a stream: kill -9 mid-epoch, then the same command, is bitwise the same, and
the killed run's grain workers end with it.

(2 hosts reading disjoint shards of a stream: tests/train/test_parallel.py.)"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.data.test_streaming import write_tree
from dsink_jax.train import workdir
from tests.multiprocess import ROOT, children, running

@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return write_tree(tmp_path_factory.mktemp("stream_tree"), num_train=96, num_test=24)


@pytest.mark.slow(seconds=50)
def test_kill9_mid_epoch_then_the_same_command_gives_identical_parameters(tree, tmp_path):
    command = [sys.executable, "experiments/main.py",
               f"--config=experiments/configs/baseline.py:dataset=filelist:{tree},preset=smoke,"
               "noise=sym,noise_rate=0.2", "--config.optim.epochs=2",
               "--config.optim.batch_size=8", "--config.checkpoint_every_steps=3",
               "--config.model.name=cnn",
               "--config.input.workers=2"]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    straight = tmp_path / "straight"
    # The uninterrupted reference trains alongside the run that is killed and resumed.
    log = open(tmp_path / "straight.log", "w")  # a file: an unread pipe could fill and stall it
    reference = subprocess.Popen(command + [f"--workdir={straight}"], cwd=ROOT, env=env,
                                 stdout=log, stderr=subprocess.STDOUT)
    from dsink_jax import configs, pipelines
    config = configs.build_config("baseline", dict(
        configs.COMMON_ARGS, dataset=f"filelist:{tree}", preset="smoke", noise="sym",
        noise_rate=0.2))
    steps_per_epoch = pipelines.prepare_training_set(config).num_train // 8
    killed = tmp_path / "killed"
    checkpoints = killed / "ce" / "checkpoints"
    proc = subprocess.Popen(command + [f"--workdir={killed}"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        saved = [int(n) for n in os.listdir(checkpoints) if n.isdigit()] if checkpoints.exists() else []
        if any(s > steps_per_epoch and s % steps_per_epoch for s in saved):
            break  # a checkpoint inside the second epoch exists
        time.sleep(0.02)
    workers = children(proc.pid)  # grain's decoding workers (input.workers=2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(workers) >= 2, workers
    deadline = time.time() + 5 * workdir.PARENT_POLL_SECONDS + 10
    while any(map(running, workers)) and time.time() < deadline:
        time.sleep(0.2)
    assert not any(map(running, workers)), f"grain workers outlived their killed run: {workers}"
    assert not (killed / "ce" / "results.json").exists()
    saved = sorted(int(n) for n in os.listdir(checkpoints) if n.isdigit())
    assert saved[-1] % steps_per_epoch, f"the run should be killed mid-epoch, saved {saved}"
    subprocess.run(command + [f"--workdir={killed}"], cwd=ROOT, env=env, check=True,
                   capture_output=True, timeout=600)
    reference.wait(timeout=600)
    log.close()
    assert reference.returncode == 0, (tmp_path / "straight.log").read_text()[-4000:]
    assert json.loads((straight / "ce" / "results.json").read_text())["steps"] == (
        2 * steps_per_epoch)
    fingerprint = lambda w: json.loads((w / "ce" / "results.json").read_text())[
        "params_fingerprint"]
    assert fingerprint(killed) == fingerprint(straight)

