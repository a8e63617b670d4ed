"""``data prepare``: raw documents -> cleaned, deduplicated, mixed token shards.

Two phases, so that the output is the same for any number of workers or tasks:

1. **Per input file** (a *unit*, run in ``--workers`` processes): read records, normalise, drop
   blocklisted sites, scrub PII, apply the quality rules, tokenise (``BOS text EOS``) and compute
   each document's exact hash and MinHash signature. The results go to ``OUT/_work/units/<source>/
   <file index>/`` (written as a whole, then renamed). A unit whose directory exists with the same
   fingerprint (config, tokenizer, file size and mtime) is reused: that is how a killed run resumes.
2. **Finalise** (one process, streaming over the units in global order: sources in config order,
   files in sorted order): exact and near dedup (first occurrence wins), the train/validation split,
   the mixture weights, then the shard files and ``manifest.json`` (written last; the old manifest
   is removed first, so a dataset with a manifest is always complete).

With ``--num-tasks N --task-index I`` a job runs phase 1 for every N-th file only and finalises
its own part; ``data merge`` then runs phase 2 over the units of all parts in the same global order,
so exact and near duplicates *across* tasks are removed there, and the merged dataset is
byte-identical to a single-job run. Memory: phase 1 holds one batch of documents per worker;
phase 2 holds the dedup index (a hash per kept document and its LSH band keys) and a few numbers
per kept document, not the text.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserError
from ..fsutil import atomic_dir, atomic_file
from .shards import FORMAT, MANIFEST, ShardWriter, dtype_for_vocab, np_dtype
from .sources import QUALITY_STAGES, DataConfig, SourceConfig, expand_paths, iter_records

PIPELINE_VERSION = 1
WORK = "_work"
MAX_LOCATIONS = 5
BATCH_DOCS = 256
# Reasons that mean the input itself is bad (``--strict`` stops at the first one).
BAD_INPUT = {"malformed_json", "invalid_utf8", "missing_text_field", "text_not_a_string", "empty_file",
             "binary_file", "binary_data", "corrupt_file", "unreadable_file"}


@dataclass
class UnitRef:
    source: int      # index in cfg.sources
    file_index: int  # index of the file within its source
    path: str
    dir: Path


# ---------------------------------------------------------------------------------------------
# Phase 1: one input file


def _source_stages(cfg: DataConfig, src: SourceConfig) -> dict:
    stages = json.loads(json.dumps(cfg.stages))
    if src.quality is not None:
        for name in QUALITY_STAGES:
            stages[name]["enabled"] = stages[name]["enabled"] and bool(src.quality)
    return stages


def _fingerprint(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


_worker_cache: dict[str, Any] = {}


def _cached(key: str, make):
    if key not in _worker_cache:
        _worker_cache[key] = make()
    return _worker_cache[key]


def process_unit(job: dict) -> dict:
    """Run phase 1 on one file (in a worker process); returns the unit's stats."""
    from ..tokenizer import Tokenizer
    from .dedup import MinHasher, exact_key
    from .filters import Blocklist, c4_filter, gopher_quality, gopher_repetition
    from .normalize import normalize_text
    from .pii import scrub_pii

    out = Path(job["dir"])
    stats_path = out / "stats.json"
    if stats_path.is_file():
        try:
            old = json.loads(stats_path.read_text())
            if old.get("fingerprint") == job["fingerprint"]:
                old["reused"] = True
                return old
        except ValueError:
            pass

    st = job["stages"]
    tok = _cached("tok:" + job["tokenizer"], lambda: Tokenizer(job["tokenizer"]))
    dtype = np_dtype(dtype_for_vocab(tok.vocab_size))
    bl = (_cached("bl:" + json.dumps(st["blocklist"], sort_keys=True),
                  lambda: Blocklist(st["blocklist"]["default_list"], st["blocklist"]["domains"],
                                    st["blocklist"]["files"]))
          if st["blocklist"]["enabled"] else None)
    nd = st["near_dedup"]
    hasher = (_cached(f"mh:{nd['bands']}:{nd['rows']}:{nd['seed']}:{nd['ngram']}",
                      lambda: MinHasher(nd["bands"] * nd["rows"], nd["seed"], nd["ngram"]))
              if nd["enabled"] else None)

    stats: dict[str, Any] = {"fingerprint": job["fingerprint"], "path": job["path"], "documents_in": 0,
                             "documents_passed": 0, "tokens": 0, "dropped": {}, "locations": {},
                             "pii_replacements": {"email": 0, "phone": 0, "ip": 0}}

    def drop(reason: str, loc: str) -> None:
        stats["dropped"][reason] = stats["dropped"].get(reason, 0) + 1
        locs = stats["locations"].setdefault(reason, [])
        if len(locs) < MAX_LOCATIONS:
            locs.append(loc)

    with atomic_dir(out) as tmp:
        files = {name: open(tmp / f"{name}.bin", "wb") for name in ("tokens", "lengths", "hashes", "minhash")}
        batch: list[str] = []

        def flush() -> None:
            if not batch:
                return
            ids = tok.encode_batch(batch, bos=True, eos=True, workers=1)
            lengths = np.fromiter((len(x) for x in ids), dtype="<u4", count=len(ids))
            flat = np.fromiter((t for x in ids for t in x), dtype=dtype, count=int(lengths.sum()))
            files["tokens"].write(flat.tobytes())
            files["lengths"].write(lengths.tobytes())
            files["hashes"].write(np.array([exact_key(t) for t in batch], dtype="<u8").tobytes())
            if hasher is not None:
                files["minhash"].write(np.stack([hasher.signature(t) for t in batch]).astype("<u4").tobytes())
            stats["documents_passed"] += len(batch)
            stats["tokens"] += int(lengths.sum())
            batch.clear()

        try:
            for rec in iter_records(Path(job["path"]), job["text_field"], job["url_field"]):
                stats["documents_in"] += 1
                if rec.error is not None:
                    if job["strict"]:
                        raise UserError(f"{rec.loc}: bad record ({rec.error}); drop --strict to skip such records")
                    drop(rec.error, rec.loc)
                    continue
                text = rec.text
                if st["normalize"]["enabled"]:
                    text = normalize_text(text, st["normalize"]["fix_encoding"])
                if not text.strip():
                    drop("empty_text", rec.loc)
                    continue
                if bl is not None and bl.blocks(rec.url):
                    drop("blocklisted_domain", rec.loc)
                    continue
                if st["pii"]["enabled"]:
                    text, counts = scrub_pii(text, st["pii"]["emails"], st["pii"]["phones"], st["pii"]["ips"])
                    for k, v in counts.items():
                        stats["pii_replacements"][k] += v
                reason = None
                if st["c4"]["enabled"]:
                    text, reason = c4_filter(text, st["c4"])
                if reason is None and st["gopher_quality"]["enabled"]:
                    reason = gopher_quality(text, st["gopher_quality"])
                if reason is None and st["gopher_repetition"]["enabled"]:
                    reason = gopher_repetition(text, st["gopher_repetition"])
                if reason is not None:
                    drop(reason, rec.loc)
                    continue
                batch.append(text)
                if len(batch) >= BATCH_DOCS:
                    flush()
            flush()
        finally:
            for fh in files.values():
                fh.close()
        (tmp / "stats.json").write_text(json.dumps(stats, sort_keys=True))
    stats["reused"] = False
    return stats


# ---------------------------------------------------------------------------------------------
# Planning and phase-1 driver


def plan_units(cfg: DataConfig, out: Path, tokenizer_sha: str, num_tasks: int = 1, task_index: int = 0,
               strict: bool = False, tokenizer_path: str = "") -> list[tuple[UnitRef, dict]]:
    """All units of the config (global order) that belong to ``task_index``, with their jobs."""
    jobs = []
    k = 0
    for si, src in enumerate(cfg.sources):
        try:
            files = expand_paths(src.paths)
        except UserError as e:
            raise UserError(f"source {src.name}: {e}") from None
        stages = _source_stages(cfg, src)
        for fi, path in enumerate(files):
            mine = k % num_tasks == task_index
            k += 1
            if not mine:
                continue
            try:
                s = os.stat(path)
            except OSError as e:
                raise UserError(f"cannot read {path}: {e.strerror}") from None
            ref = UnitRef(si, fi, str(path), out / WORK / "units" / src.name / f"{fi:06d}")
            fp = _fingerprint({"v": PIPELINE_VERSION, "stages": stages, "text_field": src.text_field,
                               "url_field": src.url_field, "path": str(path), "size": s.st_size,
                               "mtime": s.st_mtime_ns, "tokenizer": tokenizer_sha,
                               "strict": strict})  # a --strict rerun must re-read what a lax run kept
            jobs.append((ref, {"path": str(path), "dir": str(ref.dir), "stages": stages,
                               "text_field": src.text_field, "url_field": src.url_field,
                               "tokenizer": tokenizer_path, "fingerprint": fp, "strict": strict}))
    return jobs


def run_units(jobs: list[tuple[UnitRef, dict]], workers: int = 1, progress: bool = True) -> list[dict]:
    """Phase 1 over ``jobs`` (in ``workers`` processes); returns their stats in job order."""
    from tqdm import tqdm

    results: list[dict | None] = [None] * len(jobs)
    t0 = time.perf_counter()
    docs = toks = 0
    bar = tqdm(total=len(jobs), unit="file", desc="prepare", disable=not progress, file=sys.stderr,
               dynamic_ncols=True)

    def done(i: int, stats: dict) -> None:
        nonlocal docs, toks
        results[i] = stats
        docs += stats["documents_in"]
        toks += stats["tokens"]
        dt = max(time.perf_counter() - t0, 1e-9)
        bar.set_postfix_str(f"{docs / dt:,.0f} docs/s, {toks / dt:,.0f} tok/s"
                            + (" (reused)" if stats.get("reused") else ""), refresh=False)
        bar.update(1)

    try:
        if workers <= 1 or len(jobs) <= 1:
            for i, (_, job) in enumerate(jobs):
                done(i, process_unit(job))
        else:
            import multiprocessing as mp

            with ProcessPoolExecutor(max_workers=min(workers, len(jobs)),
                                     mp_context=mp.get_context("spawn")) as ex:
                futures = {ex.submit(process_unit, job): i for i, (_, job) in enumerate(jobs)}
                try:
                    for f in as_completed(futures):
                        done(futures[f], f.result())
                except BaseException:
                    ex.shutdown(wait=True, cancel_futures=True)
                    raise
    finally:
        bar.close()
    return results  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------
# Phase 2: dedup, split, mix, write


def _new_source_stats(src: SourceConfig) -> dict:
    return {"documents_in": 0, "documents_kept": 0, "tokens": 0, "dropped": {}, "bad_record_locations": {},
            "weight": src.weight, "files": 0, "pii_replacements": {"email": 0, "phone": 0, "ip": 0}}


def _add_drop(s: dict, reason: str, n: int = 1, locs: list[str] = ()) -> None:
    s["dropped"][reason] = s["dropped"].get(reason, 0) + n
    if reason in BAD_INPUT and locs:
        have = s["bad_record_locations"].setdefault(reason, [])
        have.extend(locs[:MAX_LOCATIONS - len(have)])


def finalize(cfg: DataConfig, units: list[UnitRef], unit_stats: list[dict], out: Path, tokenizer: dict,
             strict: bool = False, progress: bool = True, extra: dict | None = None) -> dict:
    """Phase 2 over ``units`` (already in global order); writes the dataset and returns the manifest."""
    from tqdm import tqdm

    from .dedup import NearDedup
    from .mixture import copy_masks, split_validation

    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)
    dtype = dtype_for_vocab(tokenizer["vocab_size"])
    nd = cfg.stages["near_dedup"]
    perm = nd["bands"] * nd["rows"]
    exact_on = cfg.stages["exact_dedup"]["enabled"]
    near = NearDedup(nd["bands"], nd["rows"], nd["seed"]) if nd["enabled"] else None
    exact_seen: set[int] = set()
    srcs = [_new_source_stats(s) for s in cfg.sources]

    # Dedup pass: per unit, which documents survive (global first-occurrence order).
    kept_units: list[tuple[UnitRef, np.ndarray, np.ndarray, np.ndarray]] = []  # ref, keep idx, lengths, hashes
    bar = tqdm(total=sum(s["documents_passed"] for s in unit_stats), unit="doc", desc="dedup",
               disable=not progress, file=sys.stderr, dynamic_ncols=True)
    for ref, st in zip(units, unit_stats):
        s = srcs[ref.source]
        s["files"] += 1
        s["documents_in"] += st["documents_in"]
        for reason, n in st["dropped"].items():
            _add_drop(s, reason, n, st["locations"].get(reason, []))
        for k, v in st["pii_replacements"].items():
            s["pii_replacements"][k] += v
        n = st["documents_passed"]
        lengths = np.fromfile(ref.dir / "lengths.bin", dtype="<u4")
        hashes = np.fromfile(ref.dir / "hashes.bin", dtype="<u8")
        if len(lengths) != n or len(hashes) != n:
            raise UserError(f"{ref.dir}: work files are incomplete; delete that directory and re-run")
        sigs = (np.fromfile(ref.dir / "minhash.bin", dtype="<u4").reshape(-1, perm)
                if near is not None and n else None)
        keep = np.ones(n, dtype=bool)
        for i in range(n):
            if exact_on:
                h = int(hashes[i])
                if h in exact_seen:
                    keep[i] = False
                    _add_drop(s, "exact_duplicate")
                    continue
                exact_seen.add(h)
            if near is not None and near.is_duplicate(sigs[i]):
                keep[i] = False
                _add_drop(s, "near_duplicate")
        bar.update(n)
        idx = np.nonzero(keep)[0]
        kept_units.append((ref, idx, lengths[idx], hashes[idx]))
    bar.close()
    del exact_seen, near

    # Split: decided over all kept documents at once.
    all_hashes = np.concatenate([k[3] for k in kept_units]) if kept_units else np.zeros(0, "<u8")
    is_val = split_validation(all_hashes, cfg.val_fraction, cfg.seed)
    pos = 0
    per_unit: list[tuple[UnitRef, np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
    for ref, idx, lengths, hashes in kept_units:
        per_unit.append((ref, idx, lengths, hashes, is_val[pos:pos + len(idx)]))
        pos += len(idx)

    warnings = []
    for si, src in enumerate(cfg.sources):
        s = srcs[si]
        mine = [u for u in per_unit if u[0].source == si]
        s["documents_kept"] = int(sum(len(u[1]) for u in mine))
        s["tokens"] = int(sum(int(u[2].sum()) for u in mine))
        s["val_documents"] = int(sum(int(u[4].sum()) for u in mine))
        s["val_tokens"] = int(sum(int(u[2][u[4]].sum()) for u in mine))
        s["tokens_before_mixing"] = s["tokens"] - s["val_tokens"]
        if s["documents_kept"] == 0 and s["files"]:
            msg = f"source {src.name}: no documents left after filtering"
            if strict:
                raise UserError(msg + " (" + _top_reasons(s["dropped"]) + ")")
            warnings.append(msg)
        assert s["documents_in"] == s["documents_kept"] + sum(s["dropped"].values()), src.name
    if not any(s["documents_kept"] for s in srcs):
        total_drops: dict[str, int] = {}
        for s in srcs:
            for r, n in s["dropped"].items():
                total_drops[r] = total_drops.get(r, 0) + n
        raise UserError("no documents left after filtering (" + (_top_reasons(total_drops) or "no input") + ")")

    # Write: validation (each document once), then training (each source's passes).
    for split in ("train", "val"):
        d = out / split
        if d.exists():
            shutil.rmtree(d)
    writers = {sp: ShardWriter(out, sp, dtype, cfg.shard_tokens) for sp in ("train", "val")}
    (out / "train").mkdir(parents=True, exist_ok=True)
    (out / "val").mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=None, unit="tok", unit_scale=True, desc="write", disable=not progress, file=sys.stderr,
               dynamic_ncols=True)

    def unit_tokens(ref: UnitRef) -> tuple[np.ndarray, np.ndarray]:
        lengths_all = np.fromfile(ref.dir / "lengths.bin", dtype="<u4")
        offsets = np.concatenate([[0], np.cumsum(lengths_all, dtype=np.int64)])
        path = ref.dir / "tokens.bin"
        toks = (np.memmap(path, dtype=np_dtype(dtype), mode="r") if path.stat().st_size
                else np.zeros(0, dtype=np_dtype(dtype)))
        return toks, offsets

    try:
        for ref, idx, lengths, hashes, val in per_unit:
            if val.any():
                toks, offs = unit_tokens(ref)
                for i in idx[val]:
                    writers["val"].add(toks[offs[i]:offs[i + 1]])
                bar.update(int(lengths[val].sum()))
        for si, src in enumerate(cfg.sources):
            mine = [u for u in per_unit if u[0].source == si]
            tr_hashes = np.concatenate([u[3][~u[4]] for u in mine]) if mine else np.zeros(0, "<u8")
            tr_lengths = np.concatenate([u[2][~u[4]] for u in mine]) if mine else np.zeros(0, "<u4")
            masks = copy_masks(tr_hashes, tr_lengths, src.weight, cfg.seed)
            after = 0
            train_docs = 0
            for mask in masks:
                pos = 0
                for ref, idx, lengths, hashes, val in mine:
                    train_idx = idx[~val]
                    sel = train_idx if mask is None else train_idx[mask[pos:pos + len(train_idx)]]
                    pos += len(train_idx)
                    if not len(sel):
                        continue
                    toks, offs = unit_tokens(ref)
                    for i in sel:
                        writers["train"].add(toks[offs[i]:offs[i + 1]])
                    n = int((offs[sel + 1] - offs[sel]).sum())
                    after += n
                    train_docs += len(sel)
                    bar.update(n)
            srcs[si]["tokens_after_mixing"] = after
            srcs[si]["train_documents_after_mixing"] = train_docs
        shards = {sp: w.close() for sp, w in writers.items()}
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    finally:
        bar.close()

    total_after = sum(s["tokens_after_mixing"] for s in srcs)
    for s in srcs:
        s["effective_share"] = round(s["tokens_after_mixing"] / total_after, 6) if total_after else 0.0
        s["natural_share"] = 0.0
    total_before = sum(s["tokens_before_mixing"] for s in srcs)
    for s in srcs:
        s["natural_share"] = round(s["tokens_before_mixing"] / total_before, 6) if total_before else 0.0
    total = _new_source_stats(SourceConfig("total", ["-"]))
    del total["weight"]
    for s in srcs:
        for k, v in s.items():
            if k in ("weight", "effective_share", "natural_share"):
                continue
            if k == "dropped":
                for r, n in v.items():
                    total["dropped"][r] = total["dropped"].get(r, 0) + n
            elif k == "bad_record_locations":
                for r, locs in v.items():
                    have = total["bad_record_locations"].setdefault(r, [])
                    have.extend(locs[:MAX_LOCATIONS - len(have)])
            elif k == "pii_replacements":
                for r, n in v.items():
                    total[k][r] += n
            else:
                total[k] = total.get(k, 0) + v
    total["effective_share"] = 1.0 if total_after else 0.0
    total["natural_share"] = 1.0 if total_before else 0.0
    for d in [total] + srcs:
        d["dropped"] = dict(sorted(d["dropped"].items()))
        d["bad_record_locations"] = dict(sorted(d["bad_record_locations"].items()))

    manifest = {
        "format": FORMAT,
        "pipeline_version": PIPELINE_VERSION,
        "dtype": dtype,
        "tokenizer": tokenizer,
        "config": cfg.to_dict(),
        "splits": {sp: {"tokens": int(sum(x["tokens"] for x in shards[sp])),
                        "documents": int(sum(x["documents"] for x in shards[sp])),
                        "shards": shards[sp]} for sp in ("train", "val")},
        "total": total,
        "sources": {src.name: srcs[i] for i, src in enumerate(cfg.sources)},
        "warnings": warnings,
    }
    if extra:
        manifest.update(extra)
    with atomic_file(out / MANIFEST, "w") as fh:
        json.dump(manifest, fh, indent=2, sort_keys=False)
        fh.write("\n")
    return manifest


def _top_reasons(dropped: dict[str, int], k: int = 4) -> str:
    top = sorted(dropped.items(), key=lambda kv: -kv[1])[:k]
    return ", ".join(f"{r}: {n}" for r, n in top)


# ---------------------------------------------------------------------------------------------
# Entry point


def tokenizer_info(tokenizer_path: str | Path) -> dict:
    from ..tokenizer import Tokenizer

    tok = Tokenizer(tokenizer_path)
    return {"path": str(tokenizer_path), "sha256": tok.sha256, "vocab_size": tok.vocab_size,
            "bos_id": tok.bos_id, "eos_id": tok.eos_id}


def check_out_dir(out: str | Path) -> Path:
    """``out`` as a Path; a ``UserError`` if it exists and is not a directory."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory")
    return out


def prepare(cfg: DataConfig, tokenizer_path: str | Path, out: str | Path, workers: int = 1,
            strict: bool = False, num_tasks: int = 1, task_index: int = 0, progress: bool = True) -> dict:
    """Run the pipeline; returns the manifest (also written to ``out/manifest.json``)."""
    if num_tasks < 1:
        raise UserError(f"--num-tasks must be >= 1, got {num_tasks}")
    if not 0 <= task_index < num_tasks:
        raise UserError(f"--task-index must be in [0, {num_tasks}), got {task_index}")
    if workers < 1:
        raise UserError(f"--workers must be >= 1, got {workers}")
    out = check_out_dir(out)
    tok = tokenizer_info(tokenizer_path)
    jobs = plan_units(cfg, out, tok["sha256"], num_tasks, task_index, strict, str(tokenizer_path))
    if not jobs:
        raise UserError(f"task {task_index} of {num_tasks} has no input files "
                        f"(there are fewer files than tasks)")
    stats = run_units(jobs, workers, progress)
    refs = [r for r, _ in jobs]
    extra: dict[str, Any] = {}
    if num_tasks > 1:
        extra["part"] = {"task_index": task_index, "num_tasks": num_tasks,
                         "units": [{"source": r.source, "file_index": r.file_index,
                                    "dir": os.path.relpath(r.dir, out)} for r in refs]}
    m = finalize(cfg, refs, stats, out, tok, strict, progress, extra)
    m["_reused_units"] = sum(1 for s in stats if s.get("reused"))
    return m


def format_summary(m: dict) -> str:
    """A plain-text table of the manifest's accounting."""
    rows = [("source", "weight", "docs in", "kept", "dropped", "tokens", "after mix", "share")]
    for name, s in list(m["sources"].items()) + [("total", m["total"])]:
        rows.append((name, f"{s['weight']:g}" if "weight" in s else "", f"{s['documents_in']:,}",
                     f"{s['documents_kept']:,}", f"{sum(s['dropped'].values()):,}", f"{s['tokens']:,}",
                     f"{s['tokens_after_mixing']:,}", f"{s['effective_share'] * 100:.1f}%"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    lines.insert(-1, "-" * len(lines[0]))
    if m["total"]["dropped"]:
        lines.append("dropped: " + ", ".join(f"{r} {n:,}" for r, n in
                                             sorted(m["total"]["dropped"].items(), key=lambda kv: -kv[1])))
    sp = m["splits"]
    lines.append(f"train: {sp['train']['tokens']:,} tokens in {len(sp['train']['shards'])} shard(s); "
                 f"val: {sp['val']['tokens']:,} tokens, {sp['val']['documents']:,} documents")
    for w in m.get("warnings", []):
        lines.append(f"warning: {w}")
    return "\n".join(lines)
