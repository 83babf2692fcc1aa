"""Data parallel over 4 forced host devices gives the 1-device result (same global batch)."""

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import jax, numpy as np
    assert jax.device_count() == 4, jax.devices()
    from dsink_jax import configs, pipelines
    from dsink_jax.train import loop

    def run(num_devices, workdir, loss):
        args = dict(configs.COMMON_ARGS, preset="smoke", model="cnn", loss=loss)
        config = configs.build_config("baseline", args)
        config.progress = False
        config.num_devices = num_devices
        config.optim.batch_size = 64
        training_set = pipelines.prepare_training_set(config)
        method = pipelines.build_method(config, training_set)
        results, state = loop.train(config, workdir, training_set=training_set, method=method)
        return results, jax.device_get(state)

    import sys
    for loss in ("ce", "elr"):   # elr: per-sample memory updated from a sharded batch
        r1, s1 = run(1, sys.argv[1] + "/one_" + loss, loss)
        r4, s4 = run(4, sys.argv[1] + "/four_" + loss, loss)
        for a, b in zip(jax.tree.leaves((s1.params, s1.batch_stats, s1.extra)),
                        jax.tree.leaves((s4.params, s4.batch_stats, s4.extra))):
            np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)
        assert abs(r1["test_accuracy"] - r4["test_accuracy"]) <= 0.01, (r1, r4)
    # A global batch that 4 devices cannot split evenly fails before any training.
    args = dict(configs.COMMON_ARGS, preset="smoke", model="cnn")
    config = configs.build_config("baseline", args)
    config.optim.batch_size = 66
    training_set = pipelines.prepare_training_set(config)
    method = pipelines.build_method(config, training_set)
    try:
        loop.train(config, sys.argv[1] + "/uneven", training_set=training_set, method=method)
    except ValueError as err:
        assert "optim.batch_size=66 must be divisible by the number of devices (4)" in str(err)
    else:
        raise AssertionError("batch 66 on 4 devices was accepted")
    import os
    assert not os.path.exists(sys.argv[1] + "/uneven/checkpoints")
    print("PARALLEL-OK")
""")


def test_four_devices_match_one_device(tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "PARALLEL-OK" in proc.stdout


def test_more_devices_than_exist_is_a_clear_error():
    from dsink_jax.train import parallel
    mesh = parallel.make_mesh(1)
    parallel.check_batch_size(7, mesh)  # one device: any batch works
    import pytest
    with pytest.raises(ValueError, match="num_devices=99; allowed: 0"):
        parallel.make_mesh(99)


MULTI_HOST = textwrap.dedent("""
    import sys
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    process_id, processes, port, workdir = int(sys.argv[1]), int(sys.argv[2]), *sys.argv[3:5]
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=processes,
                               process_id=process_id)
    assert jax.process_count() == 2 and jax.device_count() == 4, jax.devices()
    import numpy as np
    from dsink_jax import configs, pipelines
    from dsink_jax.train import loop
    args = dict(configs.COMMON_ARGS, preset="smoke", model="cnn")
    config = configs.build_config("baseline", args)
    config.progress = False
    config.optim.batch_size = 64
    training_set = pipelines.prepare_training_set(config)
    method = pipelines.build_method(config, training_set)
    results, state = loop.train(config, workdir, training_set=training_set, method=method)
    leaves = [np.asarray(x.addressable_data(0)) for x in jax.tree.leaves(state.params)]
    np.savez(f"{workdir}/params_{process_id}.npz", *leaves)
""")

SINGLE = textwrap.dedent("""
    import sys
    import jax, numpy as np
    from dsink_jax import configs, pipelines
    from dsink_jax.train import loop
    args = dict(configs.COMMON_ARGS, preset="smoke", model="cnn")
    config = configs.build_config("baseline", args)
    config.progress = False
    config.optim.batch_size = 64
    training_set = pipelines.prepare_training_set(config)
    method = pipelines.build_method(config, training_set)
    workdir = sys.argv[4]  # after the launcher's process id, count and port (unused here)
    results, state = loop.train(config, workdir, training_set=training_set, method=method)
    np.savez(workdir + "/params.npz", *[np.asarray(x) for x in jax.tree.leaves(state.params)])
""")


def test_two_processes_match_one_process(tmp_path):
    """Multi-host on one machine: 2 processes x 2 CPU devices (gloo) vs 1 process, 1 device."""
    import numpy as np

    from tests.multiprocess import start_processes, wait_all

    multi, single = tmp_path / "multi", tmp_path / "single"
    single.mkdir()
    # Both runs at once: their start-up (imports, compilation) is mostly single-threaded.
    wait_all(start_processes(MULTI_HOST, 2, multi, devices=2)
             + start_processes(SINGLE, 1, single, devices=1))
    reference = np.load(single / "params.npz")
    for i in range(2):
        got = np.load(multi / f"params_{i}.npz")
        for key in reference.files:
            np.testing.assert_allclose(got[key], reference[key], rtol=1e-4, atol=1e-5)
    # Only process 0 wrote the metrics and results.
    assert (multi / "results.json").exists() and (multi / "metrics.jsonl").exists()
