"""``data prepare``: raw documents -> cleaned, deduplicated, mixed token shards.

Two phases, so that the output is the same for any number of workers or tasks:

1. **Per input file** (a *unit*, run in ``--workers`` processes): read records, normalise, drop
   blocklisted sites, scrub PII, apply the quality rules, tokenise (``BOS text EOS``) and compute
   each document's exact hash and MinHash signature. The results go to ``OUT/_work/units/<source>/
   <file index>/`` (written as a whole, then renamed). A unit whose directory exists with the same
   fingerprint (config, tokenizer, file size and mtime) is reused: that is how a killed run resumes.
2. **Phase 2** (``phase2/``: stages of tasks over files, in a local pool or as job arrays with
   ``--stage``): exact and near dedup over all documents in global order (sources in config
   order, files in sorted order; the first occurrence wins), the train/validation split, the
   mixture weights, the accounting (per source, checked to add up, before anything is written),
   then the shard files and ``manifest.json`` (written last; the old manifest is removed first, so
   a dataset with a manifest is always complete). No task holds more than one unit, hash range
   or shard.

With ``--num-tasks N --task-index I`` (and no ``--stage``) a job runs phase 1 for every N-th file
only and finalises its own part; ``data merge`` then runs phase 2 over the units of all parts in
the same global order, so exact and near duplicates *across* tasks are removed there, and the
merged dataset is byte-identical to a single-job run.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..config import parse_json
from ..errors import UserError
from ..fsutil import (atomic_dir, check_output_dir)
from . import drops
from .dedup import MinHasher, exact_key
from .drops import Stats
from .filters import Blocklist, TextSplit, c4_filter, gopher
from .normalize import normalize_text
from .pii import scrub_pii
from .outdir import STAGING, UNIT_FILES, UNIT_NAMES, WORK, check_out_dir, dataset_foreign, out_lock  # noqa: F401
from .pool import init_worker, interruptible, pool_context, progress_bar
from .shards import PIPELINE_VERSION, dtype_for_vocab, np_dtype
from .sources import (MIN_UNIT_BYTES, QUALITY_STAGES, UNIT_BYTES, DataConfig, Record, SourceConfig, Span, Stages,
                      expand_paths, file_spans, iter_records)
from .wordcache import WordCacheEncoder

BATCH_DOCS = 256


@dataclass
class UnitRef:
    source: int      # index in cfg.sources
    file_index: int  # index of the file within its source
    path: str
    dir: Path
    part: int = 0    # which part of a file read as several units (sources.file_spans); 0: the whole file


# ---------------------------------------------------------------------------------------------
# Phase 1: one input file


def _source_stages(cfg: DataConfig, src: SourceConfig) -> Stages:
    stages = copy.deepcopy(cfg.stages)
    if src.quality is not None:
        for name in QUALITY_STAGES:
            stage = getattr(stages, name)
            stage.enabled = stage.enabled and bool(src.quality)
    return stages


def _fingerprint(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


_worker_cache: dict[str, Any] = {}


def _cached(key: str, make):
    if key not in _worker_cache:
        _worker_cache[key] = make()
    return _worker_cache[key]


def process_unit(job: dict) -> tuple[Stats, bool]:
    """Run phase 1 on one file (in a worker process); returns the unit's stats and whether they
    were reused from an earlier run."""
    with interruptible():
        return _process_unit(job)


def _process_unit(job: dict) -> tuple[Stats, bool]:
    from ..tokenizer import Tokenizer

    out = Path(job["dir"])
    old = _reusable_stats(out / "stats.json", job["fingerprint"])
    if old is not None:
        return old, True
    stages = _DocStages(job["stages"])
    tok = _cached("tok:" + job["tokenizer"], lambda: Tokenizer(job["tokenizer"]))
    enc = _cached("enc:" + job["tokenizer"], lambda: WordCacheEncoder(tok))  # its cache outlives units
    span = job.get("span")
    stats = Stats(files=0 if span is not None and span.part else 1)  # a file counts once, in its first part
    with atomic_dir(out, UNIT_FILES) as tmp:
        with _UnitFiles(tmp, enc, stages.hasher, stats) as files:
            for rec in iter_records(Path(job["path"]), job["text_field"], job["url_field"], span):
                stats.documents_in += 1
                text = _clean(rec, stages, stats, job["strict"])
                if text is not None:
                    files.add(text, stages.exact_key(text))
        stats.check(job["path"])
        unit = {"fingerprint": job["fingerprint"], "path": job["path"], **stats.unit_dict()}
        (tmp / "stats.json").write_text(json.dumps(unit, sort_keys=True))
    return stats, False


def _reusable_stats(path: Path, fingerprint: str) -> Stats | None:
    """The stats of a unit finished by an earlier run with the same fingerprint, else None."""
    if not path.is_file():
        return None
    try:
        old = parse_json(path.read_text())
    except ValueError:
        return None
    return Stats.from_unit_dict(old) if old.get("fingerprint") == fingerprint else None


def read_unit_stats(dir: Path) -> Stats:
    """A finished unit's stats (``OSError`` / ``ValueError`` / ``KeyError`` if missing or damaged)."""
    return Stats.from_unit_dict(parse_json((dir / "stats.json").read_text()))


def _clean(rec: Record, stages: _DocStages, stats: Stats, strict: bool) -> str | None:
    """The record's text after the per-document stages, or None when it is dropped (and counted)."""
    if rec.error is not None:
        if strict:
            raise UserError(f"{rec.loc}: bad record ({rec.error}); drop --strict to skip such records")
        stats.drop(rec.error, locations=[rec.loc])
        return None
    if rec.text is None:  # only Record.bad makes one, with an error
        raise ValueError(f"{rec.loc}: a record with neither text nor error")
    text, reason = stages.apply(rec.text, rec.url, stats.pii_replacements)
    if reason is not None:
        stats.drop(reason, locations=[rec.loc])
        return None
    return text


class _DocStages:
    """Phase 1's per-document stages, for one source's stage settings (the blocklist and the
    MinHash permutations are built once per worker process)."""

    def __init__(self, st: Stages):
        self.st = st
        bl = st.blocklist
        self.blocklist = (_cached("bl:" + json.dumps(asdict(bl), sort_keys=True),
                                  lambda: Blocklist(bl.default_list, bl.domains, bl.files))
                          if bl.enabled else None)
        nd = st.near_dedup
        self.hasher = (_cached(f"mh:{nd.bands}:{nd.rows}:{nd.seed}:{nd.ngram}",
                               lambda: MinHasher(nd.bands * nd.rows, nd.seed, nd.ngram))
                       if nd.enabled else None)
        self._split: TextSplit | None = None  # the last kept text's splits, for its exact key

    def apply(self, text: str, url: str | None, pii_counts: dict[str, int]) -> tuple[str | None, str | None]:
        """``(text, None)`` to keep the document (as changed by the stages), ``(_, reason)`` to drop it."""
        st = self.st
        if st.normalize.enabled:
            text = normalize_text(text, st.normalize.fix_encoding)
        if not text.strip():
            return text, drops.EMPTY_TEXT
        if self.blocklist is not None and self.blocklist.blocks(url):
            return text, drops.BLOCKLISTED_DOMAIN
        if st.pii.enabled:
            text, counts = scrub_pii(text, st.pii.emails, st.pii.phones, st.pii.ips)
            for kind, n in counts.items():
                pii_counts[kind] += n
        return self._quality(text)

    def _quality(self, text: str) -> tuple[str | None, str | None]:
        st, reason = self.st, None
        self._split = None
        if st.c4.enabled:  # the filters read their thresholds from a plain dict
            cleaned, reason = c4_filter(text, vars(st.c4))
            if cleaned is None:
                return None, reason
            text = cleaned
        if reason is None and (st.gopher_quality.enabled or st.gopher_repetition.enabled):
            self._split = TextSplit(text)
            reason = gopher(text, vars(st.gopher_quality) if st.gopher_quality.enabled else None,
                            vars(st.gopher_repetition) if st.gopher_repetition.enabled else None, self._split)
        return text, reason

    def exact_key(self, text: str) -> int:
        """The exact-dedup key of a text ``apply`` kept, from the Gopher rules' lowercased words
        when they were made."""
        sp = self._split
        words = sp.lower_words_if_made() if sp is not None and sp.text is text else None
        return exact_key(text, words)


class _UnitFiles:
    """A unit's work files: the documents' tokens, lengths, exact hashes and MinHash signatures,
    written a batch at a time (a batch is tokenised in one call); counts what it writes as kept."""

    NAMES = UNIT_NAMES

    def __init__(self, dir: Path, enc: WordCacheEncoder, hasher, stats: Stats):
        self.enc, self.hasher, self.stats = enc, hasher, stats
        self.dtype = np_dtype(dtype_for_vocab(enc.tok.vocab_size))
        self.files = {name: open(dir / f"{name}.bin", "wb") for name in self.NAMES}
        self.batch: list[str] = []
        self.keys: list[int] = []  # the batch's exact-dedup keys

    def add(self, text: str, key: int) -> None:
        self.batch.append(text)
        self.keys.append(key)
        if len(self.batch) >= BATCH_DOCS:
            self._flush()

    def _flush(self) -> None:
        batch, f = self.batch, self.files
        if not batch:
            return
        ids, lengths = self.enc.encode(batch)
        lengths = lengths.astype("<u4")
        f["tokens"].write(ids.astype(self.dtype).tobytes())
        f["lengths"].write(lengths.tobytes())
        f["hashes"].write(np.array(self.keys, dtype="<u8").tobytes())
        if self.hasher is not None:
            f["minhash"].write(self.hasher.signatures(batch).astype("<u4").tobytes())
        self.stats.keep(len(batch), int(lengths.sum()))
        batch.clear()
        self.keys.clear()

    def __enter__(self) -> _UnitFiles:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        try:
            if exc_type is None:
                self._flush()
        finally:
            for fh in self.files.values():
                fh.close()


# ---------------------------------------------------------------------------------------------
# Planning and phase-1 driver


def plan_units(cfg: DataConfig, out: Path, tokenizer_sha: str, num_tasks: int = 1, task_index: int = 0,
               strict: bool = False, tokenizer_path: str = "",
               unit_bytes: int = UNIT_BYTES) -> list[tuple[UnitRef, dict]]:
    """All units of the config (global order: source, file, part) that belong to ``task_index``,
    with their jobs. A file over ``unit_bytes`` may be several units (``sources.file_spans``)."""
    jobs = []
    k = 0
    for si, src in enumerate(cfg.sources):
        try:
            files = expand_paths(src.paths)
        except UserError as e:
            raise UserError(f"source {src.name}: {e}") from None
        stages = _source_stages(cfg, src)
        settings = {"v": PIPELINE_VERSION, "stages": asdict(stages), "text_field": src.text_field,
                    "url_field": src.url_field, "tokenizer": tokenizer_sha,
                    "strict": strict}  # a --strict rerun must re-read what a lax run kept
        run = {"stages": stages, "tokenizer": tokenizer_path, "strict": strict}
        for fi, path in enumerate(files):
            try:
                s = os.stat(path)
            except OSError as e:
                raise UserError(f"cannot read {path}: {e.strerror}") from None
            spans: list[Span | None] = [*file_spans(path, s.st_size, unit_bytes)] or [None]
            for span in spans:
                mine = k % num_tasks == task_index
                k += 1
                if mine:
                    jobs.append(_unit_job(out, si, src, fi, path, span, s, settings, run))
    return jobs


def _unit_job(out: Path, si: int, src: SourceConfig, fi: int, path: Path, span: Span | None, s: os.stat_result,
              settings: dict, run: dict) -> tuple[UnitRef, dict]:
    """The unit of file ``fi`` of source ``si`` (of its part ``span``) and its job (``run`` added).
    Its fingerprint is ``settings`` plus the file's identity (path, size, mtime) and the part's range."""
    name = f"{fi:06d}" if span is None else f"{fi:06d}-{span.part:04d}"
    ref = UnitRef(si, fi, str(path), out / WORK / "units" / src.name / name, span.part if span else 0)
    ident = {"path": str(path), "size": s.st_size, "mtime": s.st_mtime_ns}
    if span is not None:  # a whole file's fingerprint is as before parts existed: its work is reused
        ident["span"] = [span.part, span.start, span.end]
    return ref, {"path": str(path), "dir": str(ref.dir), "text_field": src.text_field, "url_field": src.url_field,
                 "fingerprint": _fingerprint({**settings, **ident}), "span": span,
                 "size": s.st_size if span is None else span.nbytes, **run}


def largest_first(jobs: list[tuple[UnitRef, dict]]) -> list[int]:
    """The order to hand ``jobs`` to a pool in: biggest file first (ties in job order), so that a
    big file is not the last one started while the other workers sit idle."""
    return sorted(range(len(jobs)), key=lambda i: -jobs[i][1]["size"])


class _UnitProgress:
    """Collects phase 1's results in job order and shows them on a progress bar (on a terminal)."""

    def __init__(self, total: int, progress: bool):
        self.results: list[tuple[Stats, bool] | None] = [None] * total
        self.t0 = time.perf_counter()
        self.docs = self.toks = 0
        self.bar = progress_bar(progress, total=total, unit="file", desc="prepare")

    def __enter__(self) -> _UnitProgress:
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()

    def done(self, i: int, result: tuple[Stats, bool]) -> None:
        self.results[i] = result
        stats, reused = result
        self.docs += stats.documents_in
        self.toks += stats.tokens
        dt = max(time.perf_counter() - self.t0, 1e-9)
        self.bar.set_postfix_str(f"{self.docs / dt:,.0f} docs/s, {self.toks / dt:,.0f} tok/s"
                                 + (" (reused)" if reused else ""), refresh=False)
        self.bar.update(1)

    def ordered(self) -> list[tuple[Stats, bool]]:
        """Every job's result, in job order."""
        done = [r for r in self.results if r is not None]
        if len(done) < len(self.results):  # never: a job that fails raises instead
            raise RuntimeError("a unit of phase 1 gave no result")
        return done


def run_units(jobs: list[tuple[UnitRef, dict]], workers: int = 1,
              progress: bool = True) -> list[tuple[Stats, bool]]:
    """Phase 1 over ``jobs`` (in ``workers`` processes); returns ``process_unit``'s results in job order."""
    with _UnitProgress(len(jobs), progress) as track:
        if workers <= 1 or len(jobs) <= 1:
            for i, (_, job) in enumerate(jobs):
                track.done(i, process_unit(job))
        else:
            with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=pool_context(),
                                     initializer=init_worker) as ex:
                futures = {ex.submit(process_unit, jobs[i][1]): i for i in largest_first(jobs)}
                try:
                    for f in as_completed(futures):
                        track.done(futures[f], f.result())
                except BaseException:
                    ex.shutdown(wait=True, cancel_futures=True)
                    raise
    return track.ordered()


# ---------------------------------------------------------------------------------------------
# Phase 2: dedup, split, mix, account, write


def finalize(cfg: DataConfig, units: list[UnitRef], unit_stats: list[Stats], out: Path, tokenizer: dict,
             strict: bool = False, progress: bool = True, extra: dict | None = None, workers: int = 1,
             range_docs: int | None = None) -> dict:
    """Phase 2 over ``units`` (already in global order), its stages run in ``workers`` local
    processes (``phase2/``); writes the dataset and returns the manifest."""
    from .phase2.run import run_local

    out.mkdir(parents=True, exist_ok=True)
    ctx = phase2_context(cfg, units, unit_stats, out, tokenizer, strict, extra, range_docs)
    return run_local(ctx, workers, progress)


def phase2_context(cfg: DataConfig, units: list[UnitRef], unit_stats: list[Stats], out: Path, tokenizer: dict,
                   strict: bool = False, extra: dict | None = None, range_docs: int | None = None):
    """What every phase-2 task of this run knows (``phase2.context.Phase2``)."""
    from .phase2.context import DOCS_PER_RANGE, Phase2, UnitInfo

    if range_docs is not None and range_docs < 1:
        raise UserError(f"--range-docs must be >= 1, got {range_docs}")
    infos = [UnitInfo(ref.dir, ref.source, st, _unit_fingerprint(ref.dir)) for ref, st in zip(units, unit_stats)]
    return Phase2(cfg, infos, out, tokenizer, strict, extra or {}, range_docs or DOCS_PER_RANGE)


def _unit_fingerprint(dir: Path) -> str:
    try:
        return str(parse_json((dir / "stats.json").read_text()).get("fingerprint", ""))
    except (OSError, ValueError, AttributeError):
        raise UserError(f"{dir}: work files missing; re-run the task that made them") from None


# ---------------------------------------------------------------------------------------------
# Entry point


def tokenizer_info(tokenizer_path: str | Path) -> dict:
    from ..tokenizer import Tokenizer

    tok = Tokenizer(tokenizer_path)
    return {"path": str(tokenizer_path), "sha256": tok.sha256, "vocab_size": tok.vocab_size,
            "bos_id": tok.bos_id, "eos_id": tok.eos_id}


def _check_run_args(num_tasks: int, task_index: int, workers: int, unit_bytes: int) -> None:
    if unit_bytes < MIN_UNIT_BYTES:
        raise UserError(f"--unit-bytes must be at least {MIN_UNIT_BYTES}, got {unit_bytes}")
    if num_tasks < 1:
        raise UserError(f"--num-tasks must be >= 1, got {num_tasks}")
    if not 0 <= task_index < num_tasks:
        raise UserError(f"--task-index must be in [0, {num_tasks}), got {task_index}")
    if workers < 1:
        raise UserError(f"--workers must be >= 1, got {workers}")


def prepare(cfg: DataConfig, tokenizer_path: str | Path, out: str | Path, workers: int = 1,
            strict: bool = False, num_tasks: int = 1, task_index: int = 0, progress: bool = True,
            unit_bytes: int = UNIT_BYTES, range_docs: int | None = None) -> dict:
    """Run the pipeline; returns the manifest (also written to ``out/manifest.json``). A JSONL or
    Parquet file over ``unit_bytes`` is read as several units; the output does not depend on it."""
    _check_run_args(num_tasks, task_index, workers, unit_bytes)
    out = check_out_dir(out)
    tok = tokenizer_info(tokenizer_path)
    jobs = plan_units(cfg, out, tok["sha256"], num_tasks, task_index, strict, str(tokenizer_path), unit_bytes)
    if not jobs:
        raise UserError(f"task {task_index} of {num_tasks} has no input files "
                        f"(there are fewer files than tasks)")
    refs = [r for r, _ in jobs]
    extra: dict[str, Any] = {}
    if num_tasks > 1:
        extra["part"] = {"task_index": task_index, "num_tasks": num_tasks, "unit_bytes": unit_bytes,
                         "units": [{"source": r.source, "file_index": r.file_index, "part": r.part,
                                    "dir": os.path.relpath(r.dir, out)} for r in refs]}
    with out_lock(out, "data prepare"):
        results = run_units(jobs, workers, progress)
        m = finalize(cfg, refs, [st for st, _ in results], out, tok, strict, progress, extra, workers, range_docs)
    m["_reused_units"] = sum(reused for _, reused in results)
    return m


def prepare_stage(cfg: DataConfig, tokenizer_path: str | Path, out: str | Path, stage: str, num_tasks: int = 1,
                  task_index: int = 0, workers: int = 1, strict: bool = False, progress: bool = True,
                  unit_bytes: int = UNIT_BYTES, range_docs: int | None = None) -> dict | None:
    """One task of one stage over a shared ``out`` (a job array's task): phase 1 for the units
    i % num_tasks == task_index, or that task's items of a phase-2 stage (``phase2/run.py``).
    Returns the manifest when this task finished the dataset, else None."""
    from .phase2.run import STAGES, run_task

    _check_run_args(num_tasks, task_index, workers, unit_bytes)
    first_or_last = stage in ("units", "finish")  # finish removes the work files: it reads them all
    out = check_output_dir(out, lambda d: dataset_foreign(d, walk_work=first_or_last), "data prepare", whole=False)
    tok = tokenizer_info(tokenizer_path)
    if stage not in ("units", *STAGES):
        raise UserError(f"unknown --stage {stage!r}; the stages, in order: units, {', '.join(STAGES)}")
    if stage == "units":
        jobs = plan_units(cfg, out, tok["sha256"], num_tasks, task_index, strict, str(tokenizer_path), unit_bytes)
        with out_lock(out, "data prepare", shared=True):
            run_units(jobs, workers, progress)
        return None
    jobs = plan_units(cfg, out, tok["sha256"], 1, 0, strict, str(tokenizer_path), unit_bytes)
    stats = [_reusable_stats(ref.dir / "stats.json", job["fingerprint"]) for ref, job in jobs]
    left = sum(st is None for st in stats)
    if left:
        raise UserError(f"stage units is not finished ({left} of {len(jobs)} units left); "
                        f"run it before --stage {stage}")
    ctx = phase2_context(cfg, [r for r, _ in jobs], [st for st in stats if st is not None], out, tok, strict,
                         None, range_docs)
    with out_lock(out, "data prepare", shared=True):
        return run_task(ctx, stage, num_tasks, task_index, progress)


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
