"""Data parallel (4 forced host devices; 2 processes x 2 devices, in memory and streamed) gives
the 1-device result for the same global batch."""

import textwrap

import pytest

# What both launches share: the two data sources and one training call. The in-memory runs
# are the digits (8x8) with the CNN; the streamed ones a folder of JPEGs read by a grain
# worker, whose per-step record indices are recorded ("seen") as each process reads them.
PRELUDE = textwrap.dedent("""
    import json, os, sys
    import jax, numpy as np
    from dsink_jax import configs, pipelines
    from dsink_jax.train import feed as feed_lib, loop
    seen = []
    original = feed_lib.StreamingFeed._global
    def spy(self, local):
        if "labels" in local:
            seen.append(np.asarray(local["indices"]).tolist())
        return original(self, local)
    feed_lib.StreamingFeed._global = spy

    def config_for(source, tree, loss="ce"):
        if source == "memory":
            args = dict(configs.COMMON_ARGS, preset="smoke", model="cnn", loss=loss)
        else:
            args = dict(configs.COMMON_ARGS, dataset="filelist:" + tree, preset="smoke",
                        model="cnn", noise="sym", noise_rate=0.2, imbalance=2.0, loss=loss)
        config = configs.build_config("baseline", args)
        config.progress = False
        config.optim.batch_size = 64 if source == "memory" else 8
        config.input.workers = 1
        return config

    def train(config, workdir, num_devices=0):
        config.num_devices = num_devices
        training_set = pipelines.prepare_training_set(config)
        method = pipelines.build_method(config, training_set)
        return loop.train(config, workdir, training_set=training_set, method=method)
""")

# Process i of 2 (2 forced CPU devices each, gloo collectives): both sources over the 4 devices.
MULTI_HOST = PRELUDE + textwrap.dedent("""
    process_id, processes, port, tree, workdir = (int(sys.argv[1]), int(sys.argv[2]),
                                                  *sys.argv[3:6])
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=processes,
                               process_id=process_id)
    assert jax.process_count() == 2 and jax.device_count() == 4, jax.devices()
    for source in ("memory", "stream"):
        results, state = train(config_for(source, tree), f"{workdir}/{source}")
        leaves = [np.asarray(x.addressable_data(0)) for x in jax.tree.leaves(state.params)]
        np.savez(f"{workdir}/{source}_params_{process_id}.npz", *leaves)
    json.dump({"seen": seen, "steps": int(results["steps"])},
              open(f"{workdir}/seen_{process_id}.json", "w"))
""")

# One process with 4 forced CPU devices: the references on 1 device, the same runs data
# parallel over 4 (ce, and elr whose per-sample memory is updated from a sharded batch), and a
# global batch that 4 devices cannot split.
ONE_PROCESS = PRELUDE + textwrap.dedent("""
    tree, workdir = sys.argv[4:6]  # after the launcher's process id, count and port (unused)
    assert jax.device_count() == 4, jax.devices()
    out = {}
    for loss in ("ce", "elr"):
        for devices in (1, 4):
            results, state = train(config_for("memory", tree, loss),
                                   f"{workdir}/{loss}_{devices}", devices)
            state = jax.device_get(state)
            np.savez(f"{workdir}/{loss}_{devices}.npz",
                     *jax.tree.leaves((state.params, state.batch_stats, state.extra)))
            out[f"{loss}_{devices}"] = results["test_accuracy"]
    results, state = train(config_for("stream", tree), f"{workdir}/stream", 1)
    np.savez(f"{workdir}/stream_1.npz", *[np.asarray(x) for x in jax.tree.leaves(state.params)])
    out["num_train"] = pipelines.prepare_training_set(config_for("stream", tree)).num_train
    config = config_for("memory", tree)
    config.optim.batch_size = 66
    try:
        train(config, workdir + "/uneven", 4)
    except ValueError as err:
        out["uneven"] = str(err)
    out["uneven_checkpoints"] = os.path.exists(workdir + "/uneven/checkpoints")
    json.dump(out, open(f"{workdir}/one_process.json", "w"))
""")


@pytest.mark.slow(seconds=60)
def test_hosts_and_devices_match_one_device(tmp_path):
    """One launch checks every data-parallel layout against one device.

    2 processes x 2 devices (multi-host on one machine) run the in-memory and the streamed
    source, while a third process with 4 devices runs the 1-device references and the same
    in-memory runs over 4 devices. Streamed: the two hosts read disjoint shards that together
    are each step's global batch of the one-process order and cover every epoch once.
    """
    import json

    import numpy as np

    from dsink_jax.data import epoch_batches
    from tests.data.test_streaming import write_tree
    from tests.multiprocess import start_processes, wait_all

    tree = write_tree(tmp_path / "tree", num_train=96, num_test=24)
    multi, single = tmp_path / "multi", tmp_path / "single"
    multi.mkdir()
    single.mkdir()
    # All three at once: their start-up (imports, compilation) is mostly single-threaded.
    wait_all(start_processes(MULTI_HOST, 2, tree, multi, devices=2)
             + start_processes(ONE_PROCESS, 1, tree, single, devices=4))
    out = json.loads((single / "one_process.json").read_text())

    # 4 devices = 1 device, for ce and elr (to float rounding of the reduction order).
    for loss in ("ce", "elr"):
        one, four = np.load(single / f"{loss}_1.npz"), np.load(single / f"{loss}_4.npz")
        for key in one.files:
            np.testing.assert_allclose(four[key], one[key], rtol=2e-4, atol=2e-5)
        assert abs(out[f"{loss}_1"] - out[f"{loss}_4"]) <= 0.01, out
    # A global batch that 4 devices cannot split evenly fails before any training.
    assert "optim.batch_size=66 must be divisible by the number of devices (4)" in out["uneven"]
    assert not out["uneven_checkpoints"]

    # 2 hosts = 1 device, both sources; only process 0 wrote the metrics and results.
    reference = np.load(single / "ce_1.npz")
    for i in range(2):
        got = np.load(multi / f"memory_params_{i}.npz")
        for key in got.files:  # the params lead the reference's leaves
            np.testing.assert_allclose(got[key], reference[key], rtol=1e-4, atol=1e-5)
    assert (multi / "memory" / "results.json").exists()
    assert (multi / "memory" / "metrics.jsonl").exists()
    # Streamed: the parameters agree to float rounding accumulated over the steps (measured: at
    # most 3e-6 with the CNN; a wrong shard or batch moves them by ~1e-2).
    reference = np.load(single / "stream_1.npz")
    for i in range(2):
        got = np.load(multi / f"stream_params_{i}.npz")
        for key in reference.files:
            np.testing.assert_allclose(got[key], reference[key], rtol=1e-4, atol=5e-5)
    seen = [json.loads((multi / f"seen_{i}.json").read_text()) for i in range(2)]
    num_train, steps = out["num_train"], seen[0]["steps"]
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


def test_more_devices_than_exist_is_a_clear_error():
    from dsink_jax.train import parallel
    mesh = parallel.make_mesh(1)
    parallel.check_batch_size(7, mesh)  # one device: any batch works
    import pytest
    with pytest.raises(ValueError, match="num_devices=99; allowed: 0"):
        parallel.make_mesh(99)


