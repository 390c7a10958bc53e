"""The training engine: loop, schedule, checkpoints."""
