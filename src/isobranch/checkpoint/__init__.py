"""Durable runs: checkpoints of a run's states and branch results, and resuming a run."""
