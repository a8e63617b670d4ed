"""The data pipeline (``llama-pretrain data prepare``) and the training loader.

Modules: ``sources`` (config, readers), ``normalize``, ``filters`` (blocklist, quality rules),
``pii``, ``dedup`` (exact + MinHash LSH), ``mixture`` (weights, train/val split), ``drops``
(the drop reasons and the one accounting type), ``shards`` (on-disk format, the dataset's
tokenizer), ``prepare`` / ``merge`` (the pipeline), ``loader`` (``TokenLoader``),
``builtin`` (a corpus from the Python standard library). Heavy imports are lazy.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "TokenLoader": "loader",
    "expand_paths": "sources", "SourceConfig": "sources", "DataConfig": "sources",
    "load_data_config": "sources", "iter_texts": "sources",
    "read_manifest": "shards", "open_tokens": "shards",
    "write_builtin_corpus": "builtin",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(name)
