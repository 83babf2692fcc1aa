"""Backend names shared by every solver of `dsink_jax.ot`."""

# "native": this package's JAX implementation; "ott": ott-jax's solver for the same problem.
BACKENDS = ("native", "ott")
