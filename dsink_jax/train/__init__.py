"""Training: explicit state, pure jitted steps, the loop, checkpoints and results."""
