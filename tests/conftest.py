"""Shared pytest set-up: tests run on CPU with float32 and a fixed number of host devices."""
import os
# pytest reports an exception raised in a destructor ("unraisable") by importing tracemalloc
# inside its hook. When that happens while tensorflow-datasets holds its lazy-import context
# (etils: every `import` returns a LazyModule), tracemalloc's own first import fails and the
# test errors out (seen once under load in test_tfds_imagenet_lt_streams_under_mock_data: 50
# "Failed to process unraisable exception"). Imported here, it is in sys.modules and the lazy
# module resolves to it.
import tracemalloc  # noqa: F401  pylint: disable=unused-import

# Tests never need an accelerator; keep them on CPU even where one exists.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# XLA's CPU backend optimisation passes cost more compile time than they save at test sizes
# (most of the suite's time is compiling small programs): the suite runs at optimisation level
# 0, 5:01 against 6:04 on 2 idle cores. Only the tests see it; the benchmarks, experiments and
# the library keep full optimisation. Set XLA_FLAGS yourself to override. The tests that start
# processes add their flags to these (`tests.multiprocess.xla_flags`).
if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_backend_optimization_level=0").strip()

# One persistent XLA compilation cache for the whole run: the xdist workers and the
# subprocesses the tests launch (hosts, killed and resumed runs, benchmark scripts) compile the
# same programs again and again. The controller makes a fresh directory; the workers it starts
# and their children inherit the variable. The cache holds compiled executables only, so no
# result changes; a fresh directory per run keeps every run's first compilation honest.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile
    _CACHE = tempfile.mkdtemp(prefix="dsink_jax_test_xla_cache_")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
    atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
# Cache every program, not only those that took over a second to compile: at optimisation level
# 0 most compile faster than that, and the processes the tests start compile them again (measured
# under load: 2-8 % less CPU time for the subprocess-heavy test files).
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")


def pytest_collection_modifyitems(session, config, items):
    """Runs the tests marked `slow` first, the longest first.

    The suite runs on pytest-xdist workers; a long test started last keeps one worker busy
    while the others idle, so starting the long ones first shortens the whole run
    (longest-processing-time-first scheduling). The order of the others is kept.
    """
    del session, config
    def weight(item):
        marker = item.get_closest_marker("slow")
        return -(marker.kwargs.get("seconds", 1) if marker else 0)
    items.sort(key=weight)  # stable: ties keep their collection order
