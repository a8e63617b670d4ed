"""The default job: `llama-pretrain train` with no config, end to end on a laptop CPU.

Stages, each reused when its output already exists in the run dir (so re-running resumes):
  1. corpus     RUN_DIR/corpus     Python's standard library: its source code, and its English
                                   documentation (pydoc topics, docstrings) up-sampled as a second source
  2. tokenizer  RUN_DIR/tokenizer.model   SentencePiece BPE with Llama's spec, vocab 4096 (llama2-tiny)
  3. shards     RUN_DIR/data       cleaned, deduplicated, mixed token shards (train + val)
  4. train      RUN_DIR            llama2-tiny for a fixed number of steps (configs/demo.toml)
  5. report     summary, RUN_DIR/figure5.png, and a generated sample
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, TypedDict

from ..errors import UserError, alike_on_every_rank


# Mirrors configs/demo.toml (a test keeps the two equal). The budget is sized for ~5 minutes of
# training on 2 CPU cores.
DEMO_CONFIG: dict[str, dict[str, Any]] = {
    "model": {"preset": "llama2-tiny"},
    "optimizer": {"lr": 3.0e-3},
    "schedule": {"warmup_steps": 20, "min_lr_ratio": 0.1},
    "training": {"max_steps": 240, "seq_len": 256, "micro_batch_size": 16, "global_batch_tokens": 16384,
                 "seed": 0, "eval_every_steps": 40, "eval_batches": 8},
    "checkpoint": {"every_steps": 80, "keep_last": 2},
    "logging": {"every_steps": 1},
}

SAMPLE_PROMPT = "import os\n\n\ndef "


class _Sampling(TypedDict):
    temperature: float
    top_p: float
    seed: int


SAMPLE: _Sampling = {"temperature": 0.8, "top_p": 0.95, "seed": 0}


def _stage(name: str, msg: str) -> None:
    print(f"[{name}] {msg}", file=sys.stderr, flush=True)


def prepare_demo_data(run_dir: Path, vocab_size: int, progress: bool = True,
                      max_docs: int | None = None) -> tuple[Path, Path]:
    """Stages 1-3; returns (dataset dir, tokenizer.model)."""
    from ..data.builtin import write_builtin_corpus
    from ..data.prepare import prepare
    from ..data.sources import iter_texts, load_data_config
    from ..tokenizer import train_tokenizer

    corpus_dir = run_dir / "corpus"
    data_toml = corpus_dir / "builtin_data.toml"
    if not data_toml.is_file():
        t0 = time.perf_counter()
        data_toml = Path(write_builtin_corpus(corpus_dir, max_docs=max_docs))
        _stage("corpus", f"wrote {corpus_dir} from the standard library ({time.perf_counter() - t0:.1f} s)")
    else:
        _stage("corpus", f"reusing {corpus_dir}")
    data_cfg = load_data_config(data_toml)

    tok_path = run_dir / "tokenizer.model"
    if not tok_path.is_file():
        t0 = time.perf_counter()

        def texts():
            for src in data_cfg.sources:
                yield from iter_texts(src)

        train_tokenizer(texts(), tok_path, vocab_size, seed=0, progress=progress)
        _stage("tokenizer", f"trained {tok_path} (vocab {vocab_size}, {time.perf_counter() - t0:.1f} s)")
    else:
        _stage("tokenizer", f"reusing {tok_path}")

    data_dir = run_dir / "data"
    if not (data_dir / "manifest.json").is_file():
        t0 = time.perf_counter()
        m = prepare(data_cfg, tok_path, data_dir, workers=1, progress=progress)
        tokens = {k: v.get("tokens") for k, v in m.get("splits", {}).items()}
        _stage("data", f"prepared {data_dir} {tokens} ({time.perf_counter() - t0:.1f} s)")
    else:
        _stage("data", f"reusing {data_dir}")
    return data_dir, tok_path


def run_demo(run_dir: Path, overrides: list[str] | None = None, print_config: bool = False,
             sample_tokens: int = 48, max_docs: int | None = None) -> int:
    from .summary import print_summary
    from .config import load_run_config
    from .loop import refuse_model_dir, train

    overrides = list(overrides or [])
    has_data = any(o.startswith("data.path=") for o in overrides)
    if not has_data:
        overrides.insert(0, f"data.path={run_dir / 'data'}")
    try:
        cfg = load_run_config(None, overrides, base=DEMO_CONFIG)
    except UserError as e:  # the same on every rank under torchrun: rank 0 says it
        raise alike_on_every_rank(e) from None
    if print_config:
        sys.stdout.write(cfg.to_toml())
        return 0
    from .distributed import barrier, init_distributed

    refuse_model_dir(run_dir)  # before the demo data is written into it
    t0 = time.perf_counter()
    info = init_distributed(cfg.training.device)  # under torchrun: rank 0 prepares, the others wait
    if not has_data and info.is_main:
        prepare_demo_data(run_dir, cfg.model_config().vocab_size, progress=cfg.logging.progress,
                          max_docs=max_docs)
    barrier()
    summary = train(cfg, run_dir)
    if not info.is_main:
        return 0
    print()
    print_summary(summary, run_dir)
    print(f"{'total time':<10}  {time.perf_counter() - t0:.1f} s (all stages, this invocation)")

    from .plot import plot_runs
    fig = plot_runs([run_dir], run_dir / "figure5.png")
    print(f"{'plot':<10}  {fig}")
    sample = demo_sample(run_dir / "final", sample_tokens)
    if sample is not None:
        print(f"\nsample (temperature {SAMPLE['temperature']}, top-p {SAMPLE['top_p']}, seed {SAMPLE['seed']}):\n"
              f"{SAMPLE_PROMPT}{sample}")
    return 0


def demo_sample(final_dir: Path, max_new_tokens: int) -> str | None:
    """A short sampled continuation from the trained model, or None when there is no final model
    (--checkpoint.export_final=false) or no tokenizer beside it."""
    if not final_dir.is_dir():
        return None
    from ..generate import generate
    from ..interop import find_tokenizer, load_model
    from ..tokenizer import Tokenizer

    tok_path = find_tokenizer(final_dir)
    if tok_path is None:
        return None
    model = load_model(final_dir, "cpu")
    return generate(model, Tokenizer(tok_path), SAMPLE_PROMPT, max_new_tokens=max_new_tokens, **SAMPLE)
