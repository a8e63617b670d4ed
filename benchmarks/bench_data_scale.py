"""`data prepare` at corpus scale: the staged phase 2 as a cluster runs it (each stage a job array
of separate processes), against the single-process in-memory pipeline it replaced (the peer: the
code at commit 54ffab2, run from a git worktree), on the same generated corpus.

    python benchmarks/bench_data_scale.py --work DIR [--sizes 100000,300000,1000000] [--tasks 1,2,4]
    python benchmarks/bench_data_scale.py --work DIR --quick      # a smoke test, a few thousand documents

For each corpus size N and task count T, every stage (units, keys, dedup, resolve, split, plan,
write, finish) runs as T processes side by side (resolve, plan and finish as one, as
examples/slurm/submit.sh does), each ``python -m llama_pretrain data prepare --stage S
--num-tasks T --task-index I``. Each process's peak RSS comes from ``os.wait4`` on that process
alone (its own ru_maxrss, not the cumulative maximum over all children), forked from a small
wrapper so that the benchmark's own memory does not leak into it. Prints per size: the
largest peak RSS of any task and its stage, the per-stage table, end-to-end documents/s for each
T, the reference's peak RSS and time and the ratios, and whether the output is byte-identical to
the reference's (every file under train/ and val/, and manifest.json's splits, total and sources).
Then the flatness check (largest task's peak RSS at the largest size / at the smallest <= 1.15)
and a projection for 100M documents. Results go to DIR/results.json.

The corpus: ~120-word documents of English-like prose (Zipf over the common English words of
tests/helpers/synthetic_text.py then 20,000 made-up words; capitals, commas, full stops,
paragraphs), 10,000 per JSONL file, every one passing the default quality filters. A small share
(--dup-percent, half exact copies, half copies with one word added) repeats documents of the file
before, so the dedup decisions are exercised across units and therefore across tasks. The
SentencePiece tokenizer (vocab 8000) is trained once on a sample. The machine's load average is
printed before and after each size: the times only mean something next to it.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from helpers.synthetic_text import WORDS  # noqa: E402
from workdir import own_work_dir  # noqa: E402

WORK_MARKER = ".bench-data-scale-work"
REFERENCE = "54ffab2"  # the last commit with phase 2 in one process, in memory
STAGES = ("units", "keys", "dedup", "resolve", "split", "plan", "write", "finish")
SINGLE = ("resolve", "plan", "finish")
TARGET_DOCS = 100_000_000
FLAT_LIMIT = 1.15
_SYLLABLES = [c + v for c in "bcdfghjklmnprstvwz" for v in ("a", "e", "i", "o", "u", "ai", "ou", "ea")]


# ---------------------------------------------------------------------------------------------
# The corpus


def word_tables(size: int = 20_000, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Every word in 16 forms (bit 0: capitalised, 1: ends a sentence, 2: ends a paragraph,
    3: takes a comma) as an object array [16, V], and the Zipf cumulative weights."""
    rng = np.random.default_rng(seed)
    words: dict[str, None] = dict.fromkeys(WORDS)
    while len(words) < len(WORDS) + size:
        n = int(rng.choice([1, 2, 2, 3, 3, 4]))
        words["".join(_SYLLABLES[i] for i in rng.integers(0, len(_SYLLABLES), n))] = None
    vocab = list(words)
    table = np.empty((16, len(vocab)), dtype=object)
    for code in range(16):
        for j, w in enumerate(vocab):
            w = w.capitalize() if code & 1 else w
            if code & 2:
                w += ".\n\n" if code & 4 else "."
            elif code & 8:
                w += ","
            table[code, j] = w
    cum = np.cumsum(1.0 / np.arange(1, len(vocab) + 1))
    return table, cum / cum[-1]


def unique_docs(rng: np.random.Generator, n: int, table: np.ndarray, cum: np.ndarray) -> list[str]:
    """``n`` documents of 100-140 words: sentences of ~11 words, paragraphs of ~4 sentences."""
    lens = rng.integers(100, 141, n)
    total = int(lens.sum())
    idx = np.searchsorted(cum, rng.random(total))
    end = rng.random(total) < 1 / 11
    last = np.cumsum(lens) - 1
    end[last] = True
    start = np.zeros(total, dtype=bool)
    start[0] = True
    start[1:] = end[:-1]
    para = end & (rng.random(total) < 0.25)
    para[last] = False
    comma = ~end & (rng.random(total) < 0.05)
    code = start.astype(np.int64) | (end << 1) | (para << 2) | (comma << 3)
    toks = table[code, idx].tolist()
    bounds = np.concatenate([[0], last + 1]).tolist()
    return [" ".join(toks[a:b]).replace("\n\n ", "\n\n") for a, b in zip(bounds[:-1], bounds[1:])]


def with_duplicates(rng: np.random.Generator, docs: list[str], prev: list[str], percent: float) -> list[str]:
    """``docs`` with ``percent`` of them replaced by documents of ``prev`` (or earlier ones of
    ``docs`` when there is no ``prev``): half exact copies, half with one word added."""
    out = list(docs)
    count = int(len(docs) * percent / 100)
    for k, pos in enumerate(sorted(rng.choice(np.arange(1, len(docs)), count, replace=False).tolist())):
        src = prev[int(rng.integers(len(prev)))] if prev else docs[int(rng.integers(pos))]
        if k % 2:
            words = src.split(" ")
            words.insert(int(rng.integers(1, len(words))), "indeed")
            src = " ".join(words)
        out[pos] = src
    return out


def make_corpus(work: Path, files: int, per_file: int, dup_percent: float) -> list[Path]:
    """``files`` JSONL files (reused when a finished corpus with these settings is there)."""
    corpus = work / "corpus"
    params = {"per_file": per_file, "dup_percent": dup_percent, "version": 1}
    paths = [corpus / f"{i:05d}.jsonl" for i in range(files)]
    done = corpus / "params.json"
    if done.is_file():
        have = json.loads(done.read_text())
        if have.pop("files", 0) >= files and have == params:
            return paths
    shutil.rmtree(corpus, ignore_errors=True)
    corpus.mkdir()
    table, cum = word_tables()
    prev: list[str] = []
    t0 = time.perf_counter()
    for i, path in enumerate(paths):
        rng = np.random.default_rng([7, i])
        docs = unique_docs(rng, per_file, table, cum)
        text = "".join(json.dumps({"text": t}) + "\n" for t in with_duplicates(rng, docs, prev, dup_percent))
        path.with_suffix(".tmp").write_text(text)
        path.with_suffix(".tmp").rename(path)
        prev = docs
    done.write_text(json.dumps({**params, "files": files}))
    print(f"corpus: {files} files x {per_file:,} documents in {time.perf_counter() - t0:.1f} s", flush=True)
    return paths


def make_tokenizer(work: Path, paths: list[Path], vocab: int, sample: int) -> Path:
    from llama_pretrain.tokenizer import train_tokenizer

    tok = work / f"tok{vocab}.model"
    if not tok.is_file():
        texts = []
        for p in paths:
            with p.open() as fh:
                texts += [json.loads(line)["text"] for line in fh]
            if len(texts) >= sample:
                break
        train_tokenizer(texts[:sample], tok, vocab, progress=False)
    return tok


def write_config(path: Path, files: list[Path]) -> Path:
    lines = ["[[sources]]", 'name = "synth"', "paths = [" + ", ".join(json.dumps(str(f)) for f in files) + "]"]
    path.write_text("\n".join(lines) + "\n")
    return path


# ---------------------------------------------------------------------------------------------
# Running processes, each one's peak RSS its own


# Runs one command and writes its peak RSS (KB) to argv[1]. A forked child's ru_maxrss starts at
# its parent's RSS (Linux keeps the high-water mark across exec), so the command is forked from
# this small interpreter, never from the benchmark process with its corpus and numpy.
_WRAPPER = """import os, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as fh:
    fh.write(str(usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run_processes(cmds: list[list[str]], env: dict, logs: list[Path]) -> tuple[float, list[float]]:
    """Start every command at once; returns (wall seconds until the last ended, each one's peak
    RSS in MB, from ``os.wait4`` on that process alone). A failing command stops the benchmark."""
    t0 = time.perf_counter()
    procs = []
    for cmd, log in zip(cmds, logs):
        with log.open("w") as fh:
            procs.append(subprocess.Popen([sys.executable, "-S", "-c", _WRAPPER, str(log.with_suffix(".rss")), *cmd],
                                          env=env, stdout=fh, stderr=subprocess.STDOUT))
    failed = [f"{' '.join(cmd)} (exit {p.wait()}):\n{log.read_text()[-3000:]}"
              for cmd, p, log in zip(cmds, procs, logs) if p.wait()]
    if failed:
        sys.exit("a process failed: " + "\n".join(failed))
    wall = time.perf_counter() - t0
    return wall, [int(log.with_suffix(".rss").read_text()) / 1024 for log in logs]  # KB on Linux


def env_for(src: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(src), OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", "import llama_pretrain; print(llama_pretrain.__file__)"],
                         env=env, capture_output=True, text=True, check=True).stdout.strip()
    if not out.startswith(str(src)):
        sys.exit(f"PYTHONPATH={src} imports llama_pretrain from {out}")
    return env


def prepare_cmd(cfg: Path, tok: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "llama_pretrain", "data", "prepare", "--config", str(cfg), "--tokenizer",
            str(tok), "--out", str(out), "--quiet"]


def run_staged(cfg: Path, tok: Path, out: Path, tasks: int, env: dict) -> dict:
    """Every stage as a job array of ``tasks`` processes; per stage its wall time and each task's RSS."""
    logs = out.with_name(out.name + "_logs")
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(logs, ignore_errors=True)
    logs.mkdir(parents=True)
    stages = {}
    for stage in STAGES:
        n = 1 if stage in SINGLE else tasks
        cmds = [prepare_cmd(cfg, tok, out) + ["--stage", stage, "--num-tasks", str(n), "--task-index", str(i)]
                for i in range(n)]
        wall, rss = run_processes(cmds, env, [logs / f"{stage}_{i}.log" for i in range(n)])
        stages[stage] = {"wall_s": wall, "rss_mb": rss}
    return stages


def run_reference(cfg: Path, tok: Path, out: Path, env: dict) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    wall, rss = run_processes([prepare_cmd(cfg, tok, out)], env, [out.with_name(out.name + ".log")])
    return {"wall_s": wall, "rss_mb": rss[0]}


def reference_tree(work: Path) -> Path:
    """A git worktree of the reference commit under ``work`` (made once, then reused)."""
    tree = work / f"ref-{REFERENCE}"
    if not (tree / "src" / "llama_pretrain").is_dir():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), REFERENCE], check=True,
                       capture_output=True)
    return tree


# ---------------------------------------------------------------------------------------------
# Checks and report


def identical(a: Path, b: Path) -> tuple[bool, str]:
    """Every file under train/ and val/ byte-identical, and manifest.json's splits, total and sources."""
    files = 0
    for split in ("train", "val"):
        fa = sorted(p.relative_to(a) for p in (a / split).rglob("*") if p.is_file())
        fb = sorted(p.relative_to(b) for p in (b / split).rglob("*") if p.is_file())
        if fa != fb:
            return False, f"{split}/ holds different files"
        for rel in fa:
            if not filecmp.cmp(a / rel, b / rel, shallow=False):
                return False, f"{rel} differs"
        files += len(fa)
    ma, mb = (json.loads((d / "manifest.json").read_text()) for d in (a, b))
    for key in ("splits", "total", "sources"):
        if ma[key] != mb[key]:
            return False, f"manifest.json's {key} differs"
    return True, f"{files} shard files (.bin, .idx) + manifest identical"


def summarise(n: int, stages: dict, tasks: int) -> dict:
    wall = sum(s["wall_s"] for s in stages.values())
    stage, rss = max(((name, max(s["rss_mb"])) for name, s in stages.items()), key=lambda kv: kv[1])
    return {"tasks": tasks, "wall_s": wall, "docs_per_s": n / wall, "max_rss_mb": rss, "max_rss_stage": stage,
            "stages": stages}


def print_size(n: int, ref: dict, runs: list[dict], kept: int) -> None:
    print(f"\n== {n:,} documents ({kept:,} kept) ==")
    print(f"reference (one process, {REFERENCE}): {ref['wall_s']:.1f} s, {n / ref['wall_s']:,.0f} docs/s, "
          f"peak RSS {ref['rss_mb']:.0f} MB")
    head = f"{'stage':<8}" + "".join(f" | T={r['tasks']}: wall s, max RSS MB" for r in runs)
    print(head)
    for stage in STAGES:
        cells = [(r["stages"][stage]["wall_s"], max(r["stages"][stage]["rss_mb"])) for r in runs]
        print(f"{stage:<8}" + "".join(f" | {w:>8.1f} {m:>18.0f}" for w, m in cells))
    for r in runs:
        print(f"T={r['tasks']}: {r['wall_s']:.1f} s, {r['docs_per_s']:,.0f} docs/s "
              f"({r['wall_s'] / ref['wall_s']:.2f}x the reference's time), max task RSS {r['max_rss_mb']:.0f} MB "
              f"({r['max_rss_stage']}; {r['max_rss_mb'] / ref['rss_mb']:.2f}x the reference's), "
              f"output identical: {r['identical']} ({r['detail']})")


def bench_size(args, work: Path, n: int, tok: Path, paths: list[Path], envs: tuple[dict, dict]) -> dict:
    files = paths[:n // args.docs_per_file]
    cfg = write_config(work / f"data_{n}.toml", files)
    runs_dir = work / "runs" / str(n)
    load_before = os.getloadavg()
    ref_out = runs_dir / "reference"
    ref = run_reference(cfg, tok, ref_out, envs[1])
    kept = json.loads((ref_out / "manifest.json").read_text())["total"]["documents_kept"]
    runs = []
    for t in args.largest_tasks if n == args.sizes[-1] else args.tasks:
        out = runs_dir / f"staged_{t}"
        r = summarise(n, run_staged(cfg, tok, out, t, envs[0]), t)
        r["identical"], r["detail"] = identical(out, ref_out)
        runs.append(r)
        if not args.keep:
            shutil.rmtree(out)
    if not args.keep:
        shutil.rmtree(ref_out)
    print_size(n, ref, runs, kept)
    load_after = os.getloadavg()
    print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f} (2-core machines: >2 is contention)")
    return {"documents": n, "kept": kept, "reference": ref, "runs": runs,
            "load_before": load_before, "load_after": load_after}


def _common(sizes: list[dict]) -> tuple[list[dict], list[dict]]:
    """The smallest and the largest size's runs, for the task counts both have."""
    both = {r["tasks"] for r in sizes[0]["runs"]} & {r["tasks"] for r in sizes[-1]["runs"]}
    return ([r for r in sizes[0]["runs"] if r["tasks"] in both], [r for r in sizes[-1]["runs"] if r["tasks"] in both])


def flatness(sizes: list[dict]) -> dict:
    """(largest task RSS at the largest size) / (at the smallest), per T and over the T both have."""
    first, last = _common(sizes)
    small = {r["tasks"]: r["max_rss_mb"] for r in first}
    per_t = {r["tasks"]: r["max_rss_mb"] / small[r["tasks"]] for r in last}
    worst = max(r["max_rss_mb"] for r in last) / max(small.values())
    return {"per_tasks": per_t, "overall": worst, "limit": FLAT_LIMIT, "ok": worst <= FLAT_LIMIT}


def stage_growth(sizes: list[dict]) -> dict:
    """Each stage's largest task RSS at the largest size / at the smallest (the T both have)."""
    def peak(runs: list[dict], stage: str) -> float:
        return max(max(r["stages"][stage]["rss_mb"]) for r in runs)
    first, last = _common(sizes)
    return {s: peak(last, s) / peak(first, s) for s in STAGES}


def projection(sizes: list[dict], task_counts=(64, 512)) -> dict:
    """100M documents: per-task memory (flat, and a linear bound from the measured slope), time
    with ``task_counts`` tasks at the one-task throughput measured at the largest size (the
    parallel stages divide by the tasks; resolve, plan and finish are one task each, extrapolated
    on their measured per-document slope), and the reference's memory from its per-document slope."""
    first, last = sizes[0], sizes[-1]
    n0, n1 = first["documents"], last["documents"]
    grow = n1 > n0
    rss0 = max(r["max_rss_mb"] for r in first["runs"])
    rss1 = max(r["max_rss_mb"] for r in last["runs"])
    slope = (rss1 - rss0) / (n1 - n0) if grow else 0.0
    ref_slope = (last["reference"]["rss_mb"] - first["reference"]["rss_mb"]) / (n1 - n0) if grow else 0.0
    one = min(last["runs"], key=lambda r: r["tasks"])
    par = sum(s["wall_s"] for name, s in one["stages"].items() if name not in SINGLE) * one["tasks"]
    # The one-task stages' time grows with the corpus from a fixed start-up: its slope, not a ratio.
    ser0, ser1 = (sum(s["wall_s"] for name, s in min(z["runs"], key=lambda r: r["tasks"])["stages"].items()
                      if name in SINGLE) for z in (first, last))
    ser = ser1 + max(0.0, (ser1 - ser0) / (n1 - n0) if grow else ser1 / n1) * (TARGET_DOCS - n1)
    scale = TARGET_DOCS / n1
    return {
        "documents": TARGET_DOCS,
        "task_rss_mb_flat": rss1,
        "task_rss_mb_linear_bound": rss1 + max(slope, 0.0) * (TARGET_DOCS - n1),
        "task_docs_per_s": n1 / par,
        "hours": {t: (par * scale / t + ser) / 3600 for t in task_counts},
        "serial_hours": ser / 3600,
        "reference_rss_gb": (last["reference"]["rss_mb"] + ref_slope * (TARGET_DOCS - n1)) / 1024,
        "reference_kb_per_doc": ref_slope * 1024,
        "reference_hours": TARGET_DOCS / (n1 / last["reference"]["wall_s"]) / 3600,
    }


def print_summary(sizes: list[dict]) -> None:
    print("\n== summary ==")
    print("documents  | reference s, RSS MB | per T: docs/s, max task RSS MB (its stage)")
    for s in sizes:
        ref = s["reference"]
        print(f"{s['documents']:>10,} | {ref['wall_s']:>8.1f} {ref['rss_mb']:>8.0f} | " + " | ".join(
            f"T={r['tasks']} {r['docs_per_s']:>7,.0f} {r['max_rss_mb']:>6.0f} ({r['max_rss_stage']})"
            for r in s["runs"]))
    if len(sizes) < 2:
        return
    f, g, p = flatness(sizes), stage_growth(sizes), projection(sizes)
    print(f"flatness ({sizes[-1]['documents']:,} vs {sizes[0]['documents']:,} documents): largest task RSS "
          f"ratio {f['overall']:.3f} (limit {FLAT_LIMIT}): {'PASS' if f['ok'] else 'FAIL'}; per T: "
          + ", ".join(f"T={t} {v:.3f}" for t, v in f["per_tasks"].items()))
    print("per-stage growth of the largest task RSS: " + ", ".join(f"{s} {v:.2f}x" for s, v in g.items()))
    print(f"projection for {TARGET_DOCS:,} documents: per task {p['task_rss_mb_flat']:.0f} MB if flat "
          f"(<= {p['task_rss_mb_linear_bound']:.0f} MB on the measured slope); one task does "
          f"{p['task_docs_per_s']:,.0f} docs/s, so " + ", ".join(f"{t} tasks {h:.1f} h" for t, h in p["hours"].items())
          + f" (of which {p['serial_hours']:.2f} h in the one-task stages resolve, plan, finish); the reference: "
          f"{p['reference_rss_gb']:.0f} GB in one process ({p['reference_kb_per_doc']:.2f} KB per document), "
          f"{p['reference_hours']:.1f} h")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, required=True, help="new, empty, or a dir this script made before")
    ap.add_argument("--sizes", default="100000,300000,1000000", help="corpus sizes (documents), comma-separated")
    ap.add_argument("--tasks", default="1,2,4", help="task counts per stage, comma-separated")
    ap.add_argument("--largest-tasks", default=None,
                    help="task counts at the largest size only (default: --tasks), to fit a time budget")
    ap.add_argument("--docs-per-file", type=int, default=10_000)
    ap.add_argument("--dup-percent", type=float, default=2.0, help="documents repeating one of the file before")
    ap.add_argument("--vocab", type=int, default=8000, help="tokenizer vocabulary")
    ap.add_argument("--quick", action="store_true", help="smoke test: 2,000 and 6,000 documents, T = 1, 2")
    ap.add_argument("--keep", action="store_true", help="keep every run's output")
    args = ap.parse_args()
    if args.quick:
        args.sizes, args.tasks, args.docs_per_file = "2000,6000", "1,2", 500
    sizes = args.sizes = sorted(int(x) for x in args.sizes.split(","))
    args.tasks = [int(x) for x in args.tasks.split(",")]
    args.largest_tasks = [int(x) for x in args.largest_tasks.split(",")] if args.largest_tasks else args.tasks
    if any(n % args.docs_per_file for n in sizes):
        ap.error("every size must be a multiple of --docs-per-file")
    work = own_work_dir(args.work.resolve(), WORK_MARKER)
    print(f"load average at start: {os.getloadavg()}; {os.cpu_count()} CPUs", flush=True)
    paths = make_corpus(work, sizes[-1] // args.docs_per_file, args.docs_per_file, args.dup_percent)
    tok = make_tokenizer(work, paths, args.vocab, sample=20_000)
    envs = (env_for(ROOT / "src"), env_for(reference_tree(work) / "src"))
    results: dict = {"sizes": [], "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
    for n in sizes:
        results["sizes"].append(bench_size(args, work, n, tok, paths, envs))
        (work / "results.json").write_text(json.dumps(results, indent=1))
    print_summary(results["sizes"])
    if len(sizes) > 1:
        results.update(flatness=flatness(results["sizes"]), stage_growth=stage_growth(results["sizes"]),
                       projection=projection(results["sizes"]))
    (work / "results.json").write_text(json.dumps(results, indent=1))
    print(f"\nwrote {work / 'results.json'}")


if __name__ == "__main__":
    main()
