"""Shared pytest set-up: tests run on CPU with float32 and a fixed number of host devices."""
import os

# Tests never need an accelerator; keep them on CPU even where one exists.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
