"""Training from a stream: 2 hosts x 2 devices read disjoint shards that cover every epoch once
and train the model of 1 process; kill -9 mid-epoch, then the same command, is bitwise the same."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from tests.data.test_streaming import write_tree
from tests.multiprocess import ROOT, start_processes, wait_all

TRAIN = textwrap.dedent("""
    import json, sys
    import jax
    process_id, processes, port, tree, workdir = (int(sys.argv[1]), int(sys.argv[2]),
                                                  *sys.argv[3:6])
    if processes > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}",
                                   num_processes=processes, process_id=process_id)
    import numpy as np
    from dsink_jax import configs, pipelines
    from dsink_jax.train import feed as feed_lib, loop
    # Record which training records each process reads, step by step.
    seen = []
    original = feed_lib.StreamingFeed._global
    def spy(self, local):
        if "labels" in local:
            seen.append(np.asarray(local["indices"]).tolist())
        return original(self, local)
    feed_lib.StreamingFeed._global = spy
    config = configs.build_config("baseline", dict(configs.COMMON_ARGS, dataset="filelist:" + tree,
                                                   preset="smoke", noise="sym", noise_rate=0.2,
                                                   imbalance=2.0))
    config.progress = False
    config.optim.batch_size = 8
    config.input.workers = 1
    training_set = pipelines.prepare_training_set(config)
    method = pipelines.build_method(config, training_set)
    results, state = loop.train(config, workdir, training_set=training_set, method=method)
    leaves = [np.asarray(x.addressable_data(0)) for x in jax.tree.leaves(state.params)]
    np.savez(f"{workdir}/params_{process_id}.npz", *leaves)
    json.dump({"seen": seen, "num_train": training_set.num_train,
               "steps": int(results["steps"])}, open(f"{workdir}/seen_{process_id}.json", "w"))
""")


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return write_tree(tmp_path_factory.mktemp("stream_tree"), num_train=96, num_test=24)


def test_two_hosts_read_disjoint_shards_covering_each_epoch_and_match_one_process(tree,
                                                                                  tmp_path):
    from dsink_jax.data import epoch_batches
    # Both runs at once: their start-up (imports, compilation) is mostly single-threaded.
    wait_all(start_processes(TRAIN, 2, tree, tmp_path / "multi", devices=2)
             + start_processes(TRAIN, 1, tree, tmp_path / "single", devices=1))
    seen = [json.loads((tmp_path / "multi" / f"seen_{i}.json").read_text()) for i in range(2)]
    num_train, steps = seen[0]["num_train"], seen[0]["steps"]
    steps_per_epoch = num_train // 8
    for step in range(steps):
        first, second = seen[0]["seen"][step], seen[1]["seen"][step]
        assert not set(first) & set(second)  # disjoint shards
        epoch, k = divmod(step, steps_per_epoch)
        # Together: the step's global batch of the one-process order, process 0 its first half.
        np.testing.assert_array_equal(first + second, epoch_batches(0, epoch, num_train, 8)[k])
    for epoch in range(steps // steps_per_epoch):  # each epoch's records exactly once
        rows = [i for s in range(epoch * steps_per_epoch, (epoch + 1) * steps_per_epoch)
                for p in range(2) for i in seen[p]["seen"][s]]
        assert len(rows) == len(set(rows)) == steps_per_epoch * 8
    # 4 devices reduce the gradients in another order than 1: the parameters agree to float
    # rounding accumulated over the steps (a wrong shard or batch moves them by ~1e-2).
    reference = np.load(tmp_path / "single" / "params_0.npz")
    for i in range(2):
        got = np.load(tmp_path / "multi" / f"params_{i}.npz")
        for key in reference.files:
            np.testing.assert_allclose(got[key], reference[key], rtol=1e-3, atol=2e-4)


def test_kill9_mid_epoch_then_the_same_command_gives_identical_parameters(tree, tmp_path):
    command = [sys.executable, "experiments/main.py",
               f"--config=experiments/configs/baseline.py:dataset=filelist:{tree},preset=smoke,"
               "noise=sym,noise_rate=0.2", "--config.optim.epochs=3",
               "--config.optim.batch_size=8", "--config.checkpoint_every_steps=3",
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
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "ce" / "results.json").exists()
    saved = sorted(int(n) for n in os.listdir(checkpoints) if n.isdigit())
    assert saved[-1] % steps_per_epoch, f"the run should be killed mid-epoch, saved {saved}"
    subprocess.run(command + [f"--workdir={killed}"], cwd=ROOT, env=env, check=True,
                   capture_output=True, timeout=600)
    reference.wait(timeout=600)
    log.close()
    assert reference.returncode == 0, (tmp_path / "straight.log").read_text()[-4000:]
    assert json.loads((straight / "ce" / "results.json").read_text())["steps"] == (
        3 * steps_per_epoch)
    fingerprint = lambda w: json.loads((w / "ce" / "results.json").read_text())[
        "params_fingerprint"]
    assert fingerprint(killed) == fingerprint(straight)

