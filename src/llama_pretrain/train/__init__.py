"""Training: ``loop`` (``train()`` and its parts), ``state`` (``TrainState``), ``checkpoint``
(writing and restoring), ``callbacks`` (the run's events), ``report`` / ``metrics`` / ``summary``
(what a run tells its user, one callback per report),
``config`` (the run config), ``optim`` (AdamW, schedule), ``guards``, ``distributed`` (the process
group and its collectives), ``parallelize`` (its checks, then DDP / FSDP2 / tensor parallelism / float8
/ compile / activation checkpointing from outside the model), ``demo`` (the default job), ``plot``."""
