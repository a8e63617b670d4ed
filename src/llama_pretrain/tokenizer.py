"""Llama's tokenizer: SentencePiece BPE, loaded from any ``.model`` or trained with Llama's spec.

``Tokenizer`` wraps ``sentencepiece.SentencePieceProcessor`` (so ids are sentencepiece's own) and
adds a multi-process ``encode_batch``. ``Tokenizer(path)`` of a Hugging Face ``tokenizer.json``
gives an ``HFTokenizer`` (at the end of this module) with the same interface. ``train_tokenizer``
samples a corpus of any size to a bounded number of lines and trains with the ``trainer_spec`` /
``normalizer_spec`` read from Meta's Llama 2 ``tokenizer.model`` (``LLAMA_TRAINER_SPEC``).

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
from .fsutil import atomic_file, model_file

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
    """A SentencePiece model: ``Tokenizer(path)`` loads any ``.model`` (Meta's included); a ``.json``
    path is a Hugging Face ``tokenizer.json`` and gives an ``HFTokenizer``.

    ``encode(text, bos=None, eos=None)``: None adds what the tokenizer itself adds (SentencePiece:
    BOS; a tokenizer.json: what its post-processor adds, ``add_bos`` / ``add_eos``), True makes
    sure the token is there (once), False leaves it out. ``stop_ids``: where generation stops.
    """

    kind = "sentencepiece"

    def __new__(cls, path: str | Path | None = None):
        if cls is Tokenizer and path is not None and is_hf_tokenizer(path):
            cls = HFTokenizer
        return super().__new__(cls)

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
        self.add_bos: bool = self.bos_id >= 0  # as Llama 2's tokenizer config says
        self.add_eos: bool = False
        self.stop_ids: list[int] = [self.eos_id] if self.eos_id >= 0 else []

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

    def encode(self, text: str, bos: bool | None = None, eos: bool | None = None) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a str, got {type(text).__name__}")
        try:
            return self.sp.encode(text, add_bos=self.add_bos if bos is None else bos,
                                  add_eos=self.add_eos if eos is None else eos)
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

    def encode_batch(self, texts: Sequence[str], bos: bool | None = None, eos: bool | None = None,
                     workers: int = 1) -> list[list[int]]:
        """Encode many texts; ``workers > 1`` spreads chunks over that many processes.

        Each worker runs sentencepiece's batched C++ encode on a chunk of texts, so the per-text
        Python overhead is paid once per chunk; the result is identical to ``encode`` per text.
        """
        texts = list(texts)
        for t in texts:
            if not isinstance(t, str):
                raise TypeError(f"encode_batch() takes str items, got {type(t).__name__}")
        bos, eos = self.add_bos if bos is None else bos, self.add_eos if eos is None else eos
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


def is_hf_tokenizer(path: str | Path) -> bool:
    """Whether ``path`` names a Hugging Face tokenizer.json (by its .json suffix)."""
    return Path(path).suffix == ".json"


def tokenizer_files(path: str | Path) -> dict[str, Path]:
    """The files of the tokenizer at ``path`` by the names they take in a model directory:
    ``tokenizer.model``, or ``tokenizer.json`` and the config files beside it."""
    if is_hf_tokenizer(path):
        return hf_files(Path(path))
    return {"tokenizer.model": Path(path)}


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


# ---------------------------------------------------------------------------------------------
# Hugging Face tokenizer.json

MODEL_TYPES = ("BPE", "Unigram", "WordLevel", "WordPiece")
# The files of a Hugging Face tokenizer besides tokenizer.json (each optional).
HF_SIDE_FILES = ("tokenizer_config.json", "special_tokens_map.json", "generation_config.json")
NAMED_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _tokenizers():
    try:
        import tokenizers
    except ImportError:  # pragma: no cover - a declared dependency
        raise UserError("reading a tokenizer.json needs the tokenizers package (pip install tokenizers)") from None
    return tokenizers


def _content(value: Any) -> str | None:
    """A special token as a config spells it: a string, or an AddedToken object's ``content``."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def hf_files(path: Path) -> dict[str, Path]:
    """The files of the tokenizer at ``path`` (a tokenizer.json): it, and beside it the side files
    that exist, by the names they have in a model directory."""
    root = path.parent
    files = {"tokenizer.json": model_file(root, path.name)}
    for name in HF_SIDE_FILES:
        found = model_file(root, name, required=False)
        if found is not None:
            files[name] = found
    return {name: p for name, p in files.items() if p is not None}


def _read_hf(path: Path) -> tuple[bytes, dict, dict[str, dict]]:
    """(tokenizer.json's bytes, its JSON, the side files' JSON by name)."""
    files = hf_files(path)
    main = files.pop("tokenizer.json")
    try:
        data = main.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read tokenizer {main}: {e.strerror or e}") from None
    spec = read_json_object(main)
    model = spec.get("model")
    kind = model.get("type") if isinstance(model, dict) else None
    if kind not in MODEL_TYPES:
        raise UserError(f"{main}: tokenizer model type {kind!r} is not one of {', '.join(MODEL_TYPES)}")
    side = {name: read_json_object(p) for name, p in files.items()}
    if "auto_map" in side.get("tokenizer_config.json", {}):  # its tokenizer is code, not this file
        raise UserError(f"{files['tokenizer_config.json']}: auto_map names code shipped with the model; "
                        "llama-pretrain never runs a model directory's code")
    return data, spec, side


def _special_tokens(side: dict[str, dict]) -> tuple[dict[str, str | None], list[str], dict]:
    """(named special tokens, extra special tokens, the tokenizer config) as transformers 5 reads them."""
    cfg = dict(side.get("tokenizer_config.json", {}))
    if "added_tokens_decoder" not in cfg:  # the legacy map overrides the config
        cfg.update(side.get("special_tokens_map.json", {}))
    named = {key: _content(cfg.get(key)) for key in NAMED_TOKENS}
    extra = cfg.get("extra_special_tokens") or cfg.get("additional_special_tokens") or []
    if isinstance(extra, dict):
        extra = list(extra.values())
    extras = [t for t in map(_content, extra if isinstance(extra, list) else []) if t]
    return named, extras, cfg


def _stop_ids(side: dict[str, dict], eos_id: int, vocab_size: int, where: Path) -> list[int]:
    """generation_config.json's ``eos_token_id`` (an id or a list), else the tokenizer's EOS."""
    got = side.get("generation_config.json", {}).get("eos_token_id")
    if got is None:
        return [eos_id] if eos_id >= 0 else []
    ids = got if isinstance(got, list) else [got]
    if not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < vocab_size for i in ids):
        raise UserError(f"{where.parent / 'generation_config.json'}: eos_token_id {got!r} is not token ids "
                        f"of a vocabulary of {vocab_size}")
    return list(dict.fromkeys(ids))


class HFTokenizer(Tokenizer):
    """A Hugging Face ``tokenizer.json`` read with the ``tokenizers`` library (made by
    ``Tokenizer(path)``), giving the ids ``AutoTokenizer.from_pretrained(dir)`` gives
    (transformers 5), special and added tokens included. Beside it, as transformers reads them:

    - ``tokenizer_config.json``: the named special tokens (``bos_token``, ``eos_token``,
      ``pad_token``, ...; a string or an AddedToken object), ``additional_special_tokens`` /
      ``extra_special_tokens``, ``split_special_tokens``, ``clean_up_tokenization_spaces``;
      ``special_tokens_map.json`` overrides the named tokens where the config has no
      ``added_tokens_decoder`` (transformers' legacy rule). A named token that is not yet an added
      token becomes one (special, matched whole in text), as transformers makes it.
    - The start and end tokens are those the tokenizer.json post-processor puts around a text
      (SmolLM2's adds none; Llama 3's TemplateProcessing adds ``<|begin_of_text|>``): with a
      tokenizer.json, transformers ignores the config's ``add_bos_token`` / ``add_eos_token``.
    - ``generation_config.json``: its ``eos_token_id`` (one id or several) are the ``stop_ids``.

    Every file goes through ``model_file`` (a regular file of the directory), JSON through
    ``read_json_object``; a model type the tokenizers library does not have is one line.
    """

    kind = "hf"

    def __init__(self, path: str | Path):
        self.path = Path(path)
        data, spec, side = _read_hf(self.path)
        self._load(data, spec, side)
        self._pools: dict[int, Any] = {}

    def _load(self, data: bytes, spec: dict, side: dict[str, dict]) -> None:  # type: ignore[override]
        tk = _tokenizers()
        try:
            tok = tk.Tokenizer.from_str(data.decode("utf-8"))
        except Exception as e:  # noqa: BLE001 - the Rust parser's errors are plain Exceptions
            detail = " ".join(str(e).split())[:300]
            raise UserError(f"{self.path}: not a tokenizer the tokenizers library reads ({detail})") from None
        tok.no_truncation()  # transformers encodes without them unless a call asks
        tok.no_padding()
        named, extras, cfg = _special_tokens(side)
        tok.encode_special_tokens = bool(cfg.get("split_special_tokens", False))
        present = {t.content for t in tok.get_added_tokens_decoder().values()}
        new = [t for t in dict.fromkeys([*named.values(), *extras]) if t and t not in present]
        if new:  # transformers makes every named token a special added token
            tok.add_special_tokens([tk.AddedToken(t, special=True, normalized=False) for t in new])
        self._data, self.spec, self._side, self.hf = data, spec, side, tok
        self.sha256 = hashlib.sha256(data).hexdigest()
        self.vocab_size = max(tok.get_vocab(with_added_tokens=True).values(), default=-1) + 1
        if self.vocab_size == 0:
            raise UserError(f"{self.path}: the tokenizer has no tokens")
        ids: dict[str, int] = {}
        for key, t in named.items():
            i = tok.token_to_id(t) if t else None
            ids[key] = -1 if i is None else int(i)
        self.bos_id, self.eos_id, self.pad_id, self.unk_id = (
            ids[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token"))
        self._prefix, self._suffix = self._template()
        self.add_bos, self.add_eos = bool(self._prefix), bool(self._suffix)
        self.stop_ids = _stop_ids(side, self.eos_id, self.vocab_size, self.path)
        self._clean_up = bool(cfg.get("clean_up_tokenization_spaces", False)) and spec["model"]["type"] != "BPE"

    def _template(self) -> tuple[list[int], list[int]]:
        """The ids the post-processor puts before and after a text's own."""
        plain = self.hf.encode("a", add_special_tokens=False).ids
        full = self.hf.encode("a", add_special_tokens=True).ids
        for k in range(len(full) - len(plain) + 1):
            if full[k:k + len(plain)] == plain:
                return full[:k], full[k + len(plain):]
        raise UserError(f"{self.path}: its post-processor changes a text's own tokens; "
                        "only tokens added before or after it are supported")

    def __getstate__(self):
        return {"path": self.path, "data": self._data, "spec": self.spec, "side": self._side}

    def __setstate__(self, state):
        self.path = state["path"]
        self._pools = {}
        self._load(state["data"], state["spec"], state["side"])

    @property
    def model_proto(self) -> bytes:
        raise TypeError(f"{self.path} is a Hugging Face tokenizer, not a SentencePiece model")

    def _around(self, ids: list[int], bos: bool | None, eos: bool | None) -> list[int]:
        head = self._prefix if bos is None else (self._prefix or self._one(self.bos_id)) if bos else []
        tail = self._suffix if eos is None else (self._suffix or self._one(self.eos_id)) if eos else []
        return [*head, *ids, *tail] if head or tail else ids

    @staticmethod
    def _one(i: int) -> list[int]:
        return [i] if i >= 0 else []

    def encode(self, text: str, bos: bool | None = None, eos: bool | None = None) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a str, got {type(text).__name__}")
        try:
            ids = self.hf.encode(text, add_special_tokens=False).ids
        except Exception:  # noqa: BLE001 - a lone surrogate cannot cross into Rust
            check_text(text, "the text to encode")
            raise
        return self._around(ids, bos, eos)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids`` as transformers' ``decode`` gives it (special tokens kept by default)."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        ids = [int(i) for i in ids]
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise UserError(f"token id {i} is out of range for a vocabulary of {self.vocab_size}")
        text = self.hf.decode(ids, skip_special_tokens=skip_special_tokens)
        return _clean_up(text) if self._clean_up else text

    def id_to_piece(self, i: int) -> str:
        return self.hf.id_to_token(int(i))

    def encode_batch(self, texts: Sequence[str], bos: bool | None = None, eos: bool | None = None,
                     workers: int = 1) -> list[list[int]]:
        """``encode`` of each text; the tokenizers library spreads a batch over its own threads."""
        texts = list(texts)
        for t in texts:
            if not isinstance(t, str):
                raise TypeError(f"encode_batch() takes str items, got {type(t).__name__}")
        run = getattr(self.hf, "encode_batch_fast", self.hf.encode_batch)
        try:
            out = run(texts, add_special_tokens=False)
        except Exception:  # noqa: BLE001
            for i, t in enumerate(texts):
                check_text(t, f"text {i} of the batch")
            raise
        return [self._around(e.ids, bos, eos) for e in out]


def _clean_up(text: str) -> str:
    """transformers' ``clean_up_tokenization`` (which it skips for BPE models)."""
    for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                 (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(a, b)
    return text
