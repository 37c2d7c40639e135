"""Composes everything: train state, optax chain, train/eval steps, loop, checkpoints, metrics."""
