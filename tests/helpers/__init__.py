"""What several test modules share: the tiny training run, the CLI runner, the metrics reader,
synthetic datasets and text. pytest puts tests/ on the import path (pyproject's pythonpath), so a
test imports ``helpers.<module>``; no test module imports another."""
