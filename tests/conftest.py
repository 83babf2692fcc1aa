"""Shared pytest set-up: tests run on CPU with float32 and a fixed number of host devices."""
import os

# Tests never need an accelerator; keep them on CPU even where one exists.
os.environ.setdefault("JAX_PLATFORMS", "cpu")


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
