"""Property-based (hypothesis) tests over the data, config, loss and OT interfaces.

Each property states what must hold for every input of a bounded space: either the documented
invariants (counts, marginals, finiteness, closed forms) or a ValueError / TypeError / ConfigError
raised before any work. Shapes are drawn from a few fixed choices so that JAX compiles each
jitted function a bounded number of times.

By default the examples are derandomised (the same examples on every run, so the suite is
stable). To search further, e.g. before a release::

  DSINK_FUZZ_EXAMPLES=500 DSINK_FUZZ_RANDOM=1 python -m pytest tests/fuzz -q
"""
import os

from hypothesis import HealthCheck
from hypothesis import settings

_SCALE = int(os.environ.get("DSINK_FUZZ_EXAMPLES", "0"))
_RANDOM = os.environ.get("DSINK_FUZZ_RANDOM", "") not in ("", "0")


def fuzz_settings(max_examples: int) -> settings:
    """Hypothesis settings of one property: no deadline (JAX compiles), a bounded budget."""
    return settings(
        max_examples=_SCALE or max_examples,
        deadline=None,
        derandomize=not _RANDOM,
        database=None,
        # Building arrays from drawn lists is slow by design; the budget bounds the cost.
        suppress_health_check=(HealthCheck.too_slow, HealthCheck.data_too_large),
        print_blob=True,
    )
