"""``data prepare``'s word-cache tokenisation against sentencepiece's own ``encode`` of each whole
text: identical ids on prose, random and adversarial texts (runs of spaces, edge spaces, literal
"▁", byte fallback), and for models whose normaliser rules the cache out."""

from __future__ import annotations

import random

import numpy as np
import pytest

from llama_pretrain.data import wordcache
from llama_pretrain.data.wordcache import WordCacheEncoder
from llama_pretrain.errors import UserError
from llama_pretrain.tokenizer import Tokenizer, train_tokenizer

from helpers.synthetic_text import WORDS, prose, random_text

ODD = ["", " ", "  ", "a", " a", "a ", "a  b", "  lead", "trail  ", "tab\tsep word", "new\nline word",
       "x\u2581y", "\u2581start", "end\u2581", "a \u2581b", "emoji 🙂 here 🙂🙂", "日本語 テキスト", "naïve café",
       "nbsp\u00a0space word", "ideo\u3000space", "digits 12345 67", "\n\nblank  \n lines ", "...", "a . b",
       "word " * 40, "unknown ☃ snowman ☃☃", "mixed 🙂 tabs\t\t and  double"]


def corpus(rng: random.Random, n: int) -> list[str]:
    out = []
    for i in range(n):
        r = i % 4
        if r == 0:
            out.append(prose(rng, rng.randint(2, 12)))
        elif r == 1:
            out.append(random_text(rng))
        elif r == 2:  # rare made-up words, numbers and punctuation
            out.append(" ".join(rng.choice(WORDS) + rng.choice(["", "s", "ed", ",", ".", "ly"])
                                if rng.random() < 0.7 else str(rng.randint(0, 10 ** 6))
                                for _ in range(rng.randint(1, 60))))
        else:
            out.append(rng.choice(ODD) + " ".join(rng.choice(ODD) for _ in range(rng.randint(1, 5))))
    return out


@pytest.fixture(scope="module")
def texts():
    return corpus(random.Random(3), 600) + ODD


def _train(tmp, name, texts, **spec):
    return Tokenizer(train_tokenizer(texts[:400], tmp / f"{name}.model", 400, progress=False, **spec))


@pytest.fixture(scope="module")
def llama_tok(tmp_path_factory, texts):
    return _train(tmp_path_factory.mktemp("wc"), "llama", texts)


def _reference(tok, texts):
    ids = [tok.sp.encode(t, add_bos=True, add_eos=True) for t in texts]
    return np.array([i for x in ids for i in x], dtype=np.int32), np.array([len(x) for x in ids])


def _check(enc, texts, batch):
    for s in range(0, len(texts), batch):
        chunk = texts[s:s + batch]
        flat, lens = enc.encode(chunk)
        ref_flat, ref_lens = _reference(enc.tok, chunk)
        assert lens.tolist() == ref_lens.tolist()
        assert flat.tolist() == ref_flat.tolist()


def test_word_cache_gives_sentencepiece_ids(llama_tok, texts):
    enc = WordCacheEncoder(llama_tok)
    assert enc.enabled  # Llama's normaliser spec: identity, dummy prefix, extra spaces kept
    _check(enc, texts, 97)
    _check(enc, texts[::-1], 256)  # again, now mostly from the cache
    assert len(enc.index) > 100


def test_word_cache_batches_of_one_and_all_odd(llama_tok):
    enc = WordCacheEncoder(llama_tok)
    _check(enc, ODD, 1)
    _check(enc, [t for t in ODD if t], len(ODD))
    _check(enc, ["a  b"] * 3, 3)  # a batch without a single text for the cache


@pytest.mark.parametrize("limit", ["MAX_WORDS", "MAX_IDS"])
def test_word_cache_reset_keeps_ids(llama_tok, texts, monkeypatch, limit):
    monkeypatch.setattr(wordcache, limit, 20)
    enc = WordCacheEncoder(llama_tok)
    _check(enc, texts[:200], 16)
    assert len(enc.index) < 200


@pytest.mark.parametrize("spec", [{"normalization_rule_name": "nmt_nfkc"}, {"remove_extra_whitespaces": True},
                                  {"add_dummy_prefix": False}, {"user_defined_symbols": ["ab\u2581cd"]}])
def test_models_outside_the_conditions_are_encoded_whole(tmp_path, texts, spec):
    tok = _train(tmp_path, "other", texts, **spec)
    enc = WordCacheEncoder(tok)
    assert not enc.enabled
    _check(enc, texts[:120] + ["ab cd ab  cd"], 64)


def test_lone_surrogate_is_refused_as_encode_batch_does(llama_tok):
    enc = WordCacheEncoder(llama_tok)
    with pytest.raises(UserError):
        llama_tok.encode_batch(["fine text", "bad \ud800 text"], bos=True, eos=True)
    with pytest.raises(UserError):
        enc.encode(["fine text", "bad \ud800 text"])


def test_literal_space_marker_before_a_space(tmp_path):
    # "x▁ y" normalises to "▁x▁▁y": split at its space it would be "▁x▁" + "▁y", but the whole
    # text may use a "▁▁"-led piece there; such texts must be encoded whole.
    rng = random.Random(5)
    train = [" ".join(rng.choice(WORDS) + rng.choice(["", "  ", "   "]) for _ in range(30)) for _ in range(300)]
    tok = _train(tmp_path, "spaces", train)
    assert tok.sp.piece_to_id("\u2581\u2581") != tok.unk_id
    enc = WordCacheEncoder(tok)
    assert enc.enabled
    # the words after the marker are rare letters, which "▁" does not merge with
    texts = [f"{a}\u2581 {b} {a}\u2581\u2581 {b}{b}" for a in WORDS[:40] for b in ("zq", "qj", "xk", "jx")]
    _check(enc, texts, 128)
