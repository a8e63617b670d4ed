"""Llama's tokenizer: SentencePiece BPE, loaded from any ``.model`` or trained with Llama's spec.

``Tokenizer`` wraps ``sentencepiece.SentencePieceProcessor`` (so ids are sentencepiece's own) and
adds a multi-process ``encode_batch``. ``train_tokenizer`` samples a corpus of any size to a
bounded number of lines and trains with the ``trainer_spec`` / ``normalizer_spec`` read from Meta's
Llama 2 ``tokenizer.model`` (``LLAMA_TRAINER_SPEC``).

Round trip: with ``add_dummy_prefix`` SentencePiece encodes a leading "▁" before the text, and its
decoder drops exactly that one space again, so ``decode(encode(x)) == x`` for every string
(leading/trailing spaces, runs of tabs and newlines, control bytes, emoji: identity normalisation
keeps them and byte fallback spells out what is not in the vocabulary). The one exception is the
character U+2581 "▁" itself, which SentencePiece uses as its space marker: it decodes to " ".
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import os
import random
import re
import sys
import warnings
import weakref
from pathlib import Path
from typing import Any, Iterable, Sequence

from .config import read_json_object
from .errors import UserError
from .fsutil import atomic_file

# Llama 2's trainer_spec and normalizer_spec as read from Meta's tokenizer.model
# (../shared/REFERENCE.md). Input paths, vocab size, sample size and thread count are per run.
LLAMA_TRAINER_SPEC: dict[str, Any] = {
    "model_type": "BPE",
    "vocab_size": 32000,
    "character_coverage": 0.99995,
    "split_digits": True,
    "byte_fallback": True,
    "allow_whitespace_only_pieces": True,
    "split_by_unicode_script": True,
    "split_by_whitespace": True,
    "split_by_number": True,
    "max_sentencepiece_length": 16,
    "max_sentence_length": 4192,
    "shuffle_input_sentence": True,
    "treat_whitespace_as_suffix": False,
    "hard_vocab_limit": True,
    "unk_id": 0,
    "bos_id": 1,
    "eos_id": 2,
    "pad_id": -1,
    "unk_surface": " \u2047 ",
    # normalizer_spec (SentencePiece takes these as trainer flags too)
    "normalization_rule_name": "identity",
    "add_dummy_prefix": True,
    "remove_extra_whitespaces": False,
}

# Trainer options this module sets itself; overriding them would break sampling or file output.
_RESERVED = {"input", "input_format", "model_prefix", "sentence_iterator", "model_writer",
             "input_sentence_size"}

DEFAULT_INPUT_SENTENCES = 5_000_000

# Below this much text a pool costs more than it saves, so encode_batch stays in-process.
_MIN_PARALLEL_CHARS = 1 << 16


def _spm():
    try:
        import sentencepiece
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise UserError("the sentencepiece package is not installed (pip install sentencepiece)") from e
    return sentencepiece


def _spm_message(e: BaseException) -> str:
    """SentencePiece errors look like 'INTERNAL: src/x.cc(744) [cond] Message.'; keep the message."""
    msg = " ".join(str(e).split())
    msg = re.sub(r"^[A-Z_]+: ", "", msg)
    m = re.match(r"^\S+\.cc\(\d+\) \[(.*?)\] ?(.*)$", msg)
    if m:  # the message, or the failed check when there is none
        msg = m.group(2) or f"check failed: {m.group(1)}"
    return msg or type(e).__name__


def check_text(text: str, what: str) -> None:
    """``UserError`` naming ``what`` when ``text`` is not encodable as UTF-8: it holds a lone
    surrogate (invalid UTF-8 bytes in a command-line argument arrive as U+DC80..U+DCFF; JSON can
    spell one as an unpaired "\\ud800" escape), which SentencePiece cannot take."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        c = ord(text[e.start])
        found = (f"the invalid UTF-8 byte 0x{c - 0xDC00:02X}" if 0xDC80 <= c <= 0xDCFF
                 else f"the lone surrogate U+{c:04X}")
        raise UserError(f"{what} is not valid UTF-8 text: {found} at character {e.start}") from None


class Tokenizer:
    """A SentencePiece model: ``Tokenizer(path)`` loads any ``.model`` (Meta's included)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            data = self.path.read_bytes()
        except IsADirectoryError:
            raise UserError(f"{self.path}: is a directory, not a SentencePiece .model file") from None
        except OSError as e:
            raise UserError(f"cannot read tokenizer {self.path}: {e.strerror or e}") from None
        self._load(data)
        self._pools: dict[int, Any] = {}

    def _load(self, data: bytes) -> None:
        spm = _spm()
        if not data:
            raise UserError(f"{self.path}: empty file, not a SentencePiece model")
        try:
            sp = spm.SentencePieceProcessor(model_proto=data)
        except (RuntimeError, OSError, ValueError) as e:
            raise UserError(f"{self.path}: not a SentencePiece model ({_spm_message(e)})") from None
        if sp.get_piece_size() == 0:
            raise UserError(f"{self.path}: not a SentencePiece model (no pieces)")
        self._data = data
        self.sp = sp
        self.sha256 = hashlib.sha256(data).hexdigest()
        self.vocab_size: int = sp.get_piece_size()
        self.bos_id: int = sp.bos_id()
        self.eos_id: int = sp.eos_id()
        self.pad_id: int = sp.pad_id()
        self.unk_id: int = sp.unk_id()

    # Pickles as the model bytes, so a Tokenizer can go to DataLoader / pool workers.
    def __getstate__(self):
        return {"path": self.path, "data": self._data}

    def __setstate__(self, state):
        self.path = state["path"]
        self._pools = {}
        self._load(state["data"])

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"

    @property
    def model_proto(self) -> bytes:
        """The serialized ModelProto (the .model file's bytes)."""
        return self._data

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a str, got {type(text).__name__}")
        try:
            return self.sp.encode(text, add_bos=bos, add_eos=eos)
        except RuntimeError:  # checked only on failure: the check costs a copy of the text
            check_text(text, "the text to encode")
            raise

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; control ids (<s>, </s>) decode to nothing, so decode(encode(x)) == x."""
        if hasattr(ids, "tolist"):  # numpy arrays, torch tensors
            ids = ids.tolist()
        ids = [int(i) for i in ids]
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise UserError(f"token id {i} is out of range for a vocabulary of {self.vocab_size}")
        return self.sp.decode(ids)

    def id_to_piece(self, i: int) -> str:
        return self.sp.id_to_piece(int(i))

    def encode_batch(self, texts: Sequence[str], bos: bool = True, eos: bool = False,
                     workers: int = 1) -> list[list[int]]:
        """Encode many texts; ``workers > 1`` spreads chunks over that many processes.

        Each worker runs sentencepiece's batched C++ encode on a chunk of texts, so the per-text
        Python overhead is paid once per chunk; the result is identical to ``encode`` per text.
        """
        texts = list(texts)
        for t in texts:
            if not isinstance(t, str):
                raise TypeError(f"encode_batch() takes str items, got {type(t).__name__}")
        try:
            return self._encode_batch(texts, bos, eos, max(1, int(workers)))
        except (RuntimeError, TypeError):  # what sentencepiece raises for a batch with a lone surrogate
            for i, t in enumerate(texts):
                check_text(t, f"text {i} of the batch")
            raise

    def _encode_batch(self, texts: list[str], bos: bool, eos: bool, workers: int) -> list[list[int]]:
        total = sum(map(len, texts))
        if workers == 1 or len(texts) < 2 or total < _MIN_PARALLEL_CHARS:
            return self.sp.encode(texts, add_bos=bos, add_eos=eos, num_threads=1)
        if multiprocessing.current_process().daemon:
            # A daemonic process (pool / DataLoader worker) cannot fork; use threads instead.
            return self.sp.encode(texts, add_bos=bos, add_eos=eos, num_threads=workers)
        pool = self._pool(workers)
        out: list[list[int]] = []
        for part in pool.imap(_encode_chunk, ((c, bos, eos) for c in _chunks(texts, total, workers))):
            out.extend(part)
        return out

    def _pool(self, workers: int):
        pool = self._pools.get(workers)
        if pool is None:
            # fork where available: spawn/forkserver re-import the caller's __main__, which breaks
            # (or re-runs) scripts without a __main__ guard. Workers only run sentencepiece's C++,
            # so a parent's other threads (torch) do not matter to them.
            methods = multiprocessing.get_all_start_methods()
            ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
            with warnings.catch_warnings():  # Python >= 3.12 warns about fork with threads
                warnings.simplefilter("ignore", DeprecationWarning)
                pool = ctx.Pool(workers, initializer=_init_worker, initargs=(self._data,))
            weakref.finalize(self, pool.terminate)
            self._pools[workers] = pool
        return pool

    def close(self) -> None:
        """Stop the worker processes ``encode_batch`` started (also done at exit)."""
        for pool in self._pools.values():
            pool.terminate()
        self._pools.clear()


def _chunks(texts: list[str], total: int, workers: int) -> Iterable[list[str]]:
    # Several chunks per worker for load balance; bounded so memory and latency stay small.
    target = max(1 << 14, min(1 << 20, total // (workers * 8) + 1))
    start, size = 0, 0
    for i, t in enumerate(texts):
        size += len(t)
        if size >= target:
            yield texts[start:i + 1]
            start, size = i + 1, 0
    if start < len(texts):
        yield texts[start:]


_worker_sp = None


def _init_worker(data: bytes) -> None:
    global _worker_sp
    _worker_sp = _spm().SentencePieceProcessor(model_proto=data)


def _encode_chunk(args: tuple[list[str], bool, bool]) -> list[list[int]]:
    texts, bos, eos = args
    if _worker_sp is None:
        raise RuntimeError("the pool's initializer (_init_worker) did not run in this process")
    return _worker_sp.encode(texts, add_bos=bos, add_eos=eos, num_threads=1)


# ---------------------------------------------------------------------------------------------
# Training


def _sample_lines(texts: Iterable[str], k: int, seed: int, max_len: int, progress: bool):
    """Reservoir-sample (Algorithm R) up to ``k`` lines from documents; memory is O(k).

    SentencePiece treats each input line as a sentence, so documents are split on newlines
    (which is why Llama's vocabulary has no newline piece: "\\n" encodes as the byte <0x0A>).
    Lines longer than ``max_len`` UTF-8 bytes are skipped, as SentencePiece would skip them.
    """
    rng = random.Random(seed)
    reservoir: list[str] = []
    stats = {"documents": 0, "lines_seen": 0, "lines_too_long": 0, "chars_seen": 0}
    bar = None
    if progress and sys.stderr.isatty():  # tqdm's carriage returns do not belong in a log file
        from tqdm import tqdm
        bar = tqdm(desc="reading corpus", unit=" docs", file=sys.stderr, mininterval=0.5)
    n = 0
    for doc in texts:
        stats["documents"] += 1
        if bar is not None:
            bar.update(1)
        if not isinstance(doc, str) or not doc:
            continue
        for line in doc.split("\n"):
            if not line:
                continue
            # a char is at most 4 UTF-8 bytes: encode only lines that could be too long
            if len(line) > max_len or (len(line) * 4 > max_len
                                       and len(line.encode("utf-8", "surrogatepass")) > max_len):
                stats["lines_too_long"] += 1
                continue
            stats["chars_seen"] += len(line)
            if n < k:
                reservoir.append(line)
            else:
                j = rng.randrange(n + 1)
                if j < k:
                    reservoir[j] = line
            n += 1
    if bar is not None:
        bar.close()
    stats["lines_seen"] = n
    stats["lines_sampled"] = len(reservoir)
    stats["chars_sampled"] = sum(map(len, reservoir))
    return reservoir, stats


def _flag(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return str(value)


def _spec_to_dict(msg) -> dict:
    from google.protobuf.json_format import MessageToDict

    d = MessageToDict(msg, preserving_proto_field_name=True, always_print_fields_with_no_presence=True) \
        if "always_print_fields_with_no_presence" in MessageToDict.__code__.co_varnames \
        else MessageToDict(msg, preserving_proto_field_name=True)
    d.pop("precompiled_charsmap", None)  # binary table, empty for identity
    return d


def _known_options() -> set[str]:
    from sentencepiece import sentencepiece_model_pb2 as pb

    return ({f.name for f in pb.TrainerSpec.DESCRIPTOR.fields}  # type: ignore[attr-defined]  # protobuf makes the classes at import
            | {"normalization_rule_name", "normalization_rule_tsv", "add_dummy_prefix",
               "remove_extra_whitespaces"})


def _check_train_out(out: Path) -> None:
    """Refuse an --out whose model or sidecar path holds a file this command did not write."""
    if out.is_dir():
        raise UserError(f"--out {out} is a directory; give a FILE.model path")
    if out.suffix == ".json":
        raise UserError(f"--out {out}: the .json name is taken by the sidecar; use FILE.model")
    sidecar = out.with_suffix(".json")
    for path in (out, sidecar):
        if path.is_symlink() or (path.exists() and not path.is_file()):
            raise UserError(f"refusing to write {path}: it is a symlink or not a regular file; give another --out")
    ours = False
    if sidecar.exists():
        try:
            ours = read_json_object(sidecar).get("format") == "llama-pretrain-tokenizer"
        except UserError:
            ours = False
        if not ours:
            raise UserError(f"refusing to write {sidecar}: it is not a tokenizer sidecar this command wrote; "
                            "move it away or give another --out")
    if out.exists() and not ours:
        raise UserError(f"refusing to replace {out}: it has no tokenizer sidecar ({sidecar.name}) of ours; "
                        "move it away or give another --out")


def _trainer_spec(vocab_size: int, num_threads: int | None, overrides: dict) -> dict:
    """Llama's trainer spec with the user's overrides (reserved and unknown options refused)."""
    known = _known_options()
    spec = dict(LLAMA_TRAINER_SPEC)
    for key, value in overrides.items():
        if key in _RESERVED:
            raise UserError(f"trainer option {key!r} is set by llama-pretrain and cannot be overridden")
        if key not in known:
            raise UserError(f"unknown SentencePiece trainer option {key!r}")
        spec[key] = value
    spec["vocab_size"] = int(vocab_size)
    spec["num_threads"] = int(num_threads or overrides.get("num_threads") or os.cpu_count() or 1)
    # We sample ourselves; 0 makes SentencePiece train on exactly the lines it is given.
    spec["input_sentence_size"] = 0
    return spec


def _write_model(out: Path, data: bytes, sidecar_fields: dict) -> None:
    """The sidecar (spec, input summary, sha256) and the model, each written atomically."""
    from sentencepiece import sentencepiece_model_pb2 as pb
    proto = pb.ModelProto()  # type: ignore[attr-defined]  # protobuf makes the classes at import
    proto.ParseFromString(data)
    sidecar = {
        "format": "llama-pretrain-tokenizer",
        "model_file": out.name,
        "sha256": hashlib.sha256(data).hexdigest(),
        "vocab_size": len(proto.pieces),
        "sentencepiece_version": getattr(_spm(), "__version__", None),
        "seed": sidecar_fields["seed"],
        "trainer_spec": _spec_to_dict(proto.trainer_spec),
        "normalizer_spec": _spec_to_dict(proto.normalizer_spec),
        "input": sidecar_fields["input"],
    }
    # Sidecar first, model last: a .model under its final name always has its sidecar.
    with atomic_file(out.with_suffix(".json"), "w") as fh:
        json.dump(sidecar, fh, indent=2, ensure_ascii=False)
        fh.write("\n")
    with atomic_file(out, "wb") as fh:
        fh.write(data)


def train_tokenizer(texts: Iterable[str], out: str | Path, vocab_size: int, *,
                    input_sentences: int = DEFAULT_INPUT_SENTENCES, seed: int = 0,
                    num_threads: int | None = None, progress: bool = True,
                    input_summary: dict | None = None, **spec_overrides) -> Path:
    """Train a SentencePiece model with Llama's spec on a sample of ``texts`` (documents).

    Up to ``input_sentences`` lines are reservoir-sampled with ``seed`` (same corpus + seed ->
    same model bytes). Writes ``out`` atomically, plus ``out.with_suffix('.json')`` with the
    effective spec, the input summary and the model's sha256. ``spec_overrides`` replace any
    trainer_spec / normalizer option. Returns ``out``. An existing ``out`` is replaced only when
    its sidecar says this command wrote it.
    """
    spm = _spm()
    out = Path(out)
    _check_train_out(out)
    if int(vocab_size) < 1:
        raise UserError(f"vocab size must be positive, got {vocab_size}")
    if int(input_sentences) < 1:
        raise UserError(f"input sentences must be positive, got {input_sentences}")
    spec = _trainer_spec(vocab_size, num_threads, spec_overrides)
    lines, stats = _sample_lines(texts, int(input_sentences), seed, int(spec["max_sentence_length"]),
                                 progress)
    if not lines:
        raise UserError("empty corpus: the input has no non-empty lines of text to train on")
    if progress:
        print(f"training {spec['model_type']} tokenizer: vocab {spec['vocab_size']}, "
              f"{len(lines):,} lines ({stats['chars_sampled']:,} chars), {spec['num_threads']} threads",
              file=sys.stderr, flush=True)

    spm.set_random_generator_seed(int(seed))
    buf = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=buf,
            minloglevel=1 if progress else 2,
            **{k: _flag(v) for k, v in spec.items()},
        )
    except (RuntimeError, OSError, ValueError) as e:
        raise UserError(f"cannot train tokenizer: {_spm_message(e)}") from None
    del lines
    data = buf.getvalue()
    if not data:
        raise UserError("cannot train tokenizer: SentencePiece returned no model")
    _write_model(out, data, {"seed": int(seed), "input": {**(input_summary or {}), **stats,
                                                          "input_sentences": int(input_sentences)}})
    return out
