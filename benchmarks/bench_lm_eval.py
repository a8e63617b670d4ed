"""`llama-pretrain eval` against lm-evaluation-harness's `hf` backend, end to end, on the CPU.

    python benchmarks/bench_lm_eval.py [--preset llama2-small] [--questions 200] [--batch-size 16]

Builds everything here: a SentencePiece tokenizer and ARC-Easy-format records (question, 4 answer
texts) from a small word list, a model of --preset (random weights: speed does not depend on
them), saved as our checkpoint and exported with `export-hf` for lm-eval. Then it runs, as fresh
processes, `llama-pretrain eval CKPT --tasks arc_easy` and `lm_eval --model hf` over a task YAML
with our ARC prompt ("Question: ...\\nAnswer:" + " " + answer), each --repeats times, and prints
the wall times, their ratio and the largest per-choice log-likelihood difference.
`--before SRC` also times another tree's `llama_pretrain` (its src dir) in the same rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = ("the a which what animal plant water sun moon rock soil energy heat light cold warm grows "
         "moves eats needs makes most likely best because when during after before large small").split()


def records(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        q = " ".join(rng.choice(WORDS) for _ in range(rng.randint(12, 40))) + "?"
        texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 6))) for _ in range(4)]
        out.append({"id": f"q{i}", "question": q, "choices": {"text": texts, "label": list("ABCD")},
                    "answerKey": "ABCD"[i % 4]})
    return out


def build(d: Path, preset: str, n: int) -> None:
    import torch

    from llama_pretrain.config import ModelConfig
    from llama_pretrain.interop import save_native
    from llama_pretrain.model import Transformer
    from llama_pretrain.tokenizer import train_tokenizer

    recs = records(n)
    (d / "data" / "arc_easy").mkdir(parents=True)
    (d / "data" / "arc_easy" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    text = [r["question"] + " " + " ".join(r["choices"]["text"]) for r in records(2000, seed=1)]
    sp = train_tokenizer(text, d / "tok.model", vocab_size=400, progress=False)
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset(preset, vocab_size=400)
    save_native(Transformer(cfg).state_dict(), cfg, d / "ckpt", tokenizer_model=sp)
    subprocess.run([sys.executable, "-m", "llama_pretrain", "export-hf", str(d / "ckpt"), "--out", str(d / "hf")],
                   check=True, capture_output=True)
    (d / "tasks").mkdir()
    (d / "tasks" / "local_arc.yaml").write_text(
        f"task: local_arc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {d / 'data' / 'arc_easy' / 'test.jsonl'}\n  cache_dir: {d / 'hf_cache'}\ntest_split: test\n"
        'output_type: multiple_choice\ndoc_to_text: "Question: {{question}}\\nAnswer:"\n'
        'doc_to_choice: "{{choices.text}}"\ndoc_to_target: "{{choices.label.index(answerKey)}}"\n'
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")


def run_ours(d: Path, batch: int, src: str | None = None) -> tuple[float, list[float]]:
    out = d / "ours.json"
    env = {**os.environ, "PYTHONPATH": src} if src else None
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "llama_pretrain", "eval", str(d / "ckpt"), "--tasks", "arc_easy",
                    "--data-dir", str(d / "data"), "--batch-size", str(batch), "--device", "cpu", "--out", str(out)],
                   check=True, capture_output=True, env=env)
    took = time.perf_counter() - t
    rows = json.loads(out.read_text())["samples"]["arc_easy"]
    return took, [x for r in rows for x in r["loglikelihoods"]]


def run_lm_eval(d: Path, batch: int) -> tuple[float, list[float]]:
    out = d / "lm_eval_out"
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
                    f"pretrained={d / 'hf'},dtype=float32", "--tasks", "local_arc", "--include_path",
                    str(d / "tasks"), "--batch_size", str(batch), "--device", "cpu", "--output_path", str(out),
                    "--log_samples"], check=True, capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    took = time.perf_counter() - t
    path = next(out.rglob("samples_local_arc*.jsonl"))
    samples = sorted((json.loads(line) for line in path.read_text().splitlines()), key=lambda s: s["doc_id"])
    return took, [float(r[0][0]) for s in samples for r in s["resps"]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="llama2-small")
    ap.add_argument("--questions", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--before", help="src dir of another tree to time too (e.g. a git worktree's src)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        build(d, args.preset, args.questions)
        ours, theirs, before = [], [], []
        for _ in range(args.repeats):  # interleaved, so a change in the machine's load hits both
            if args.before:
                before.append(run_ours(d, args.batch_size, args.before)[0])
            t, a = run_ours(d, args.batch_size)
            ours.append(t)
            t, b = run_lm_eval(d, args.batch_size)
            theirs.append(t)
        diff = max(abs(x - y) for x, y in zip(a, b))
        print(f"{args.questions} ARC-format questions x 4 choices, {args.preset}, batch {args.batch_size}")
        print(f"ours     {[round(t, 2) for t in ours]} s, median {statistics.median(ours):.2f}")
        print(f"lm-eval  {[round(t, 2) for t in theirs]} s, median {statistics.median(theirs):.2f}")
        if before:
            print(f"before   {[round(t, 2) for t in before]} s, median {statistics.median(before):.2f}, "
                  f"ratio {statistics.median(theirs) / statistics.median(before):.2f}x")
        print(f"ratio    {statistics.median(theirs) / statistics.median(ours):.2f}x of the medians, "
              f"{min(theirs) / min(ours):.2f}x of the fastest runs (the least disturbed on a shared machine); "
              f"{len(a)} log-likelihoods, largest difference {diff:.2e} nats")


if __name__ == "__main__":
    main()
