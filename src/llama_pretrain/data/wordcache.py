"""Tokenisation for ``data prepare`` with a cache of each space-separated word's tokens: the same
ids as sentencepiece's ``encode`` of the whole text, a fraction of its cost on text whose words
repeat (all natural text does).

Why it is exact: with an identity normaliser that escapes spaces as "▁", adds the dummy prefix
and keeps extra whitespace (Llama's), the normalised text is "▁" + the text with each " " made a
"▁". If no vocabulary piece has a "▁" after any other character (pieces are "▁"* then no "▁";
checked when the model is loaded), no piece can span a point where a "▁" follows a non-"▁", so
BPE - which merges only adjacent symbols into vocabulary pieces - works on each stretch between
such points independently, and the whole text's ids are the stretches' ids back to back. For a
text without a run of spaces, a leading or trailing space or a literal "▁", those stretches are
exactly ``"▁" + w`` for the words ``w`` of ``text.split(" ")``, which is what encoding ``w`` alone
gives (the dummy prefix supplies its "▁"). Every other text, and every model that fails the
checks, is encoded whole by sentencepiece. tests/test_data_fastpaths.py compares with ``encode``.
A Hugging Face tokenizer.json is always encoded whole (its ``encode_batch`` is the tokenizers
library's, threaded in Rust).
"""

from __future__ import annotations

from itertools import chain, repeat

import numpy as np

SPACE = "\u2581"
# The cache is dropped when it holds more words or ids than this: a few tens of MB per worker
# (with pieces of at most 16 characters, sentencepiece's default, the ids bound the characters too).
MAX_WORDS = 1 << 18
MAX_IDS = 1 << 21


def _decomposable(tok) -> bool:
    """Whether ``tok``'s model meets the conditions above."""
    try:
        from sentencepiece import sentencepiece_model_pb2 as pb
    except ImportError:  # pragma: no cover - protobuf is a dependency
        return False
    m = pb.ModelProto()  # type: ignore[attr-defined]  # protobuf makes the classes at import
    try:
        m.ParseFromString(tok.model_proto)
    except Exception:  # a model sentencepiece loads but this protobuf cannot parse: be safe
        return False
    ns = m.normalizer_spec
    if (ns.name != "identity" or ns.precompiled_charsmap or not ns.add_dummy_prefix
            or ns.remove_extra_whitespaces or not ns.escape_whitespaces
            or m.trainer_spec.treat_whitespace_as_suffix):
        return False
    if m.HasField("denormalizer_spec") and m.denormalizer_spec.precompiled_charsmap:
        return False
    sp = tok.sp
    if sp.piece_to_id(SPACE) == sp.unk_id():  # every stretch must begin with a known piece
        return False
    for i in range(sp.get_piece_size()):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i):
            continue  # never matched against the text
        if SPACE in sp.id_to_piece(i).lstrip(SPACE):
            return False
    return True


class WordCacheEncoder:
    """``encode(texts)``: the batch's ids of each text as the tokenizer encodes it (SentencePiece:
    with BOS) and EOS after it, as one flat int32 array and the per-text lengths (what
    ``Tokenizer.encode_batch(texts, eos=True)`` gives)."""

    def __init__(self, tok):
        self.tok = tok
        self.enabled = tok.kind == "sentencepiece" and _decomposable(tok)
        if not self.enabled:
            return
        sp = self.sp = tok.sp
        # pieces that begin with "▁" (byte, control and unknown pieces never do)
        self.word_start = np.array([sp.id_to_piece(i).startswith(SPACE) and not sp.is_byte(i) and not sp.is_control(i)
                                    and not sp.is_unknown(i) for i in range(sp.get_piece_size())], dtype=bool)
        self._reset()

    def _reset(self) -> None:
        self.index: dict[str, int] = {}  # word -> its entry
        # entries 0 and 1: BOS and EOS; an entry's ids are store[start[e]:start[e] + length[e]].
        # The arrays grow by doubling; the first n_ids / n_entries are in use.
        self.store = np.array([self.tok.bos_id, self.tok.eos_id], dtype=np.int32)
        self.start = np.array([0, 1], dtype=np.int64)
        self.length = np.array([1, 1], dtype=np.int64)
        self.n_ids = self.n_entries = 2

    def _encode_new(self, words: list[str]) -> None:
        """Encode ``words`` and add them to the cache. They are encoded as one text (joined by
        spaces: exact, as above), far cheaper than one sentencepiece call per word, and split
        where a piece begins with "▁": each word's first piece does, and only that one."""
        ids = np.asarray(self.sp.encode(" ".join(words), add_bos=False, add_eos=False), dtype=np.int64)
        cuts = np.flatnonzero(self.word_start[ids])
        if len(cuts) != len(words) or (len(cuts) and cuts[0] != 0):  # not expected: be safe
            lists = self.sp.encode(words, add_bos=False, add_eos=False, num_threads=1)
            lens = np.fromiter(map(len, lists), dtype=np.int64, count=len(lists))
            ids = np.fromiter(chain.from_iterable(lists), dtype=np.int64, count=int(lens.sum()))
        else:
            lens = np.diff(np.append(cuts, len(ids)))
        self._add(words, lens, ids)

    def _add(self, words: list[str], lens: np.ndarray, ids: np.ndarray) -> None:
        e0, e1 = self.n_entries, self.n_entries + len(lens)
        i0, i1 = self.n_ids, self.n_ids + int(lens.sum())
        if e1 > len(self.length):
            size = max(e1, 2 * len(self.length))
            self.start, self.length = np.resize(self.start, size), np.resize(self.length, size)
        if i1 > len(self.store):
            self.store = np.resize(self.store, max(i1, 2 * len(self.store)))
        self.start[e0:e1] = i0 + np.cumsum(lens) - lens
        self.length[e0:e1] = lens
        self.store[i0:i1] = ids
        self.index.update(zip(words, range(e0, e1)))
        self.n_ids, self.n_entries = i1, e1

    def _whole(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        ids = self.tok.encode_batch(texts, eos=True, workers=1)
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        return np.fromiter(chain.from_iterable(ids), dtype=np.int32, count=int(lengths.sum())), lengths

    def encode(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        if not self.enabled or not texts:
            return self._whole(texts)
        fast = [bool(t) and " " != t[0] and " " != t[-1] and "  " not in t and SPACE not in t for t in texts]
        if not any(fast):
            return self._whole(texts)
        if len(self.index) > MAX_WORDS or self.n_ids > MAX_IDS:
            self._reset()
        index = self.index
        texts_f = [t for t, f in zip(texts, fast) if f] if not all(fast) else texts
        # one split of the whole batch (a text has no double, leading or trailing space: each
        # space in the join separates two words)
        words = " ".join(texts_f).split(" ")
        k = np.fromiter(map(str.count, texts_f, repeat(" ")), dtype=np.int64, count=len(texts_f)) + 1
        ent = np.fromiter(map(index.get, words, repeat(-1)), dtype=np.int64, count=len(words))
        miss = np.flatnonzero(ent < 0)
        if len(miss):
            missed = [words[i] for i in miss.tolist()]
            new = list(dict.fromkeys(missed))
            try:
                self._encode_new(new)
            except (RuntimeError, TypeError):  # e.g. a lone surrogate: let encode_batch say so
                return self._whole(texts)
            ent[miss] = np.fromiter(map(index.__getitem__, missed), dtype=np.int64, count=len(missed))
        # the entries of each text with BOS (entry 0) before and EOS (entry 1) after
        n_entries = k + 2
        ends = np.cumsum(n_entries)
        seq = np.empty(int(ends[-1]), dtype=np.int64)
        is_word = np.ones(len(seq), dtype=bool)
        is_word[ends - n_entries] = False
        is_word[ends - 1] = False
        seq[is_word] = ent
        seq[ends - n_entries] = 0
        seq[ends - 1] = 1
        lens = self.length[seq]
        total = int(lens.sum())
        # the ids of every entry back to back: each entry's start, shifted by where it lands
        where = np.repeat(self.start[seq] - (np.cumsum(lens) - lens), lens) + np.arange(total)
        flat = self.store[where]
        cum = np.concatenate([[0], np.cumsum(lens)])
        doc_lens = cum[ends] - cum[ends - n_entries]
        if all(fast):
            return flat, doc_lens
        # some texts encoded whole: put them back in their places
        slow = [t for t, f in zip(texts, fast) if not f]
        s_flat, s_lens = self._whole(slow)
        pieces, lengths = [], np.empty(len(texts), dtype=np.int64)
        fast_parts = iter(np.split(flat, np.cumsum(doc_lens)[:-1]))
        slow_parts = iter(np.split(s_flat, np.cumsum(s_lens)[:-1]))
        fl, sl = iter(doc_lens), iter(s_lens)
        for i, f in enumerate(fast):
            pieces.append(next(fast_parts) if f else next(slow_parts))
            lengths[i] = next(fl) if f else next(sl)
        return np.concatenate(pieces), lengths
