"""Training: run config, optimizer and schedule, loop, checkpoints, metrics, parallelism."""
