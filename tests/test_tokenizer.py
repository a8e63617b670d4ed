"""Tokenizer: Llama's trainer spec, digit splitting, byte fallback, exact round trip, ids equal to
sentencepiece's and to the exported HF tokenizer's, multi-process encode_batch, bad input."""

from __future__ import annotations

import json
import pickle
import random

import pytest

from llama_pretrain.errors import UserError
from llama_pretrain.tokenizer import Tokenizer, train_tokenizer

from helpers.synthetic_text import make_corpus

VOCAB = 600


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok") / "tok.model"
    return train_tokenizer(make_corpus(), out, VOCAB, seed=0, num_threads=1, progress=False,
                           input_summary={"origin": "test"})


@pytest.fixture(scope="module")
def tok(model):
    return Tokenizer(model)


def _proto(path):
    from sentencepiece import sentencepiece_model_pb2 as pb

    m = pb.ModelProto()
    m.ParseFromString(path.read_bytes())
    return m


# Llama 2's tokenizer.model, as listed in ../shared/REFERENCE.md (written out here independently
# of LLAMA_TRAINER_SPEC so a wrong constant cannot pass its own test).
REFERENCE_TRAINER_SPEC = {
    "model_type": 2,  # BPE
    "character_coverage": 0.99995, "split_digits": True, "byte_fallback": True,
    "allow_whitespace_only_pieces": True, "split_by_unicode_script": True,
    "split_by_whitespace": True, "split_by_number": True, "max_sentencepiece_length": 16,
    "max_sentence_length": 4192, "shuffle_input_sentence": True,
    "treat_whitespace_as_suffix": False, "hard_vocab_limit": True, "unk_id": 0, "bos_id": 1,
    "eos_id": 2, "pad_id": -1, "unk_surface": " \u2047 ",
}
REFERENCE_NORMALIZER_SPEC = {"name": "identity", "add_dummy_prefix": True,
                             "remove_extra_whitespaces": False}


def test_trainer_spec_matches_llama_field_by_field(model):
    m = _proto(model)
    for field, want in REFERENCE_TRAINER_SPEC.items():
        assert m.trainer_spec.HasField(field), f"{field} not recorded in the trained model"
        got = getattr(m.trainer_spec, field)
        assert got == pytest.approx(want) if isinstance(want, float) else got == want, field
    for field, want in REFERENCE_NORMALIZER_SPEC.items():
        assert m.normalizer_spec.HasField(field), field
        assert getattr(m.normalizer_spec, field) == want, field
    assert m.normalizer_spec.precompiled_charsmap == b""
    assert m.trainer_spec.vocab_size == VOCAB == len(m.pieces)
    assert m.trainer_spec.num_threads == 1


def test_vocabulary_layout(tok):
    pieces = [tok.id_to_piece(i) for i in range(tok.vocab_size)]
    assert pieces[:3] == ["<unk>", "<s>", "</s>"]
    assert pieces[3:259] == [f"<0x{b:02X}>" for b in range(256)]
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, -1)
    assert tok.vocab_size == VOCAB


def test_numbers_split_into_single_digits(tok):
    ids = tok.encode("2023", bos=False)
    assert [tok.id_to_piece(i) for i in ids] == ["▁", "2", "0", "2", "3"]
    ids = tok.encode("the 1234567890 llama x99", bos=False)
    digits = [tok.id_to_piece(i) for i in ids if any(c.isdigit() for c in tok.id_to_piece(i))]
    assert digits == list("123456789099")
    # no learned piece (byte pieces <0xNN> aside) holds two digits
    learned = [tok.id_to_piece(i) for i in range(259, tok.vocab_size)]
    assert not any(sum(c.isdigit() for c in p) > 1 for p in learned)


@pytest.mark.parametrize("rare", ["龘", "🦙", "\x07", "\x00", "\x7f", "𝔘", "ﷺ"])
def test_unknown_characters_fall_back_to_bytes(tok, rare):
    text = f"the {rare} llama"
    ids = tok.encode(text, bos=False)
    assert tok.unk_id not in ids
    pieces = [tok.id_to_piece(i) for i in ids]
    byte_pieces = [p for p in pieces if p.startswith("<0x")]
    assert [int(p[3:5], 16) for p in byte_pieces] == list(rare.encode("utf-8"))
    assert tok.decode(ids) == text


def _fuzz_strings(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    pools = [
        "abcdefghijklmnopqrstuvwxyz", "ABCXYZ", "0123456789", " ", "  \t\n", "\n\n\r",
        ".,;:!?'\"()[]{}<>/\\|@#$%^&*-+=_~`", "日本語中文字龘", "éèàüßñçøå", "🦙😀👍🏽🇫🇷",
        "\x00\x01\x07\x0b\x0c\x1b\x7f", "ѯΩש١٢", "<s></s><unk>",
    ]
    out = []
    for _ in range(n):
        k = rng.randint(0, 40)
        s = "".join(rng.choice(rng.choice(pools)) * rng.choice([1, 1, 1, 3]) for _ in range(k))
        if rng.random() < 0.2:
            s += "".join(chr(rng.randint(0x20, 0x2FFFF)) for _ in range(rng.randint(1, 5)))
        out.append(s)
    # surrogates cannot be UTF-8; U+2581 is SentencePiece's own space marker (decodes to " ")
    return [s for s in (x.replace("\u2581", "_") for x in out)
            if not any(0xD800 <= ord(c) <= 0xDFFF for c in s)]


FUZZ = _fuzz_strings(400, seed=7) + [
    "", " ", "  ", "\t", "\n", " \n ", "   leading", "trailing   ", "a \t\t b\n\n\n c",
    "\r\n", "x\u3000y", "\u200b", "  2023  ", "\n\n",
]


def test_decode_encode_round_trip_is_exact(tok):
    for s in FUZZ:
        assert tok.decode(tok.encode(s)) == s, repr(s)
        assert tok.decode(tok.encode(s, bos=False, eos=True)) == s, repr(s)


def test_space_marker_character_is_the_documented_exception(tok):
    assert tok.decode(tok.encode("a\u2581b")) == "a b"


def test_ids_equal_sentencepiece_own_encode(tok, model):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model))
    for s in FUZZ:
        assert tok.encode(s) == [sp.bos_id()] + sp.encode(s), repr(s)
        assert tok.encode(s, bos=False, eos=True) == sp.encode(s) + [sp.eos_id()]


def test_encode_batch_workers_match_single_process(tok):
    from llama_pretrain import tokenizer as mod

    texts = make_corpus(600, seed=3) + FUZZ
    assert sum(map(len, texts)) > 2 * mod._MIN_PARALLEL_CHARS  # really goes to the pool
    want = [tok.encode(t) for t in texts]
    assert tok.encode_batch(texts, workers=1) == want
    assert tok.encode_batch(texts, workers=2) == want
    assert tok.encode_batch(texts, bos=False, eos=True, workers=2) == [
        tok.encode(t, bos=False, eos=True) for t in texts]
    assert tok.encode_batch([], workers=2) == []
    tok.close()


def test_exported_hf_tokenizer_gives_the_same_ids(tok, tmp_path):
    transformers = pytest.importorskip("transformers")
    from llama_pretrain.interop.hf import write_hf_tokenizer

    write_hf_tokenizer(tok.path, tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert (hf.bos_token_id, hf.eos_token_id, hf.unk_token_id) == (1, 2, 0)
    for s in FUZZ:
        assert hf(s)["input_ids"] == tok.encode(s), repr(s)
        assert hf.decode(tok.encode(s), skip_special_tokens=True) == s, repr(s)


def test_sidecar_and_determinism(model, tmp_path):
    side = json.loads(model.with_suffix(".json").read_text())
    tok = Tokenizer(model)
    assert side["sha256"] == tok.sha256
    assert side["trainer_spec"]["vocab_size"] == VOCAB
    assert side["normalizer_spec"]["name"] == "identity"
    assert side["input"]["origin"] == "test"
    assert side["input"]["lines_sampled"] == side["input"]["lines_seen"] > 1000
    again = train_tokenizer(make_corpus(), tmp_path / "again.model", VOCAB, seed=0, num_threads=1,
                            progress=False)
    assert Tokenizer(again).sha256 == tok.sha256


def test_sampling_is_bounded_and_seeded(tmp_path):
    corpus = make_corpus(200)
    a = train_tokenizer(corpus, tmp_path / "a.model", 400, input_sentences=150, seed=1,
                        num_threads=1, progress=False)
    b = train_tokenizer(iter(corpus), tmp_path / "b.model", 400, input_sentences=150, seed=1,
                        num_threads=1, progress=False)
    c = train_tokenizer(corpus, tmp_path / "c.model", 400, input_sentences=150, seed=2,
                        num_threads=1, progress=False)
    sa = json.loads(a.with_suffix(".json").read_text())["input"]
    assert sa["lines_sampled"] == 150 < sa["lines_seen"]
    assert a.read_bytes() == b.read_bytes()
    assert json.loads(c.with_suffix(".json").read_text())["input"]["chars_sampled"] != sa["chars_sampled"]


def test_spec_overrides_are_applied(tmp_path):
    out = train_tokenizer(make_corpus(100), tmp_path / "o.model", 400, num_threads=1, progress=False,
                          split_digits=False, character_coverage=1.0)
    m = _proto(out)
    assert m.trainer_spec.split_digits is False
    assert m.trainer_spec.character_coverage == 1.0
    with pytest.raises(UserError, match="unknown SentencePiece trainer option 'split_digit'"):
        train_tokenizer(["a b"], tmp_path / "x.model", 300, progress=False, split_digit=True)
    with pytest.raises(UserError, match="cannot be overridden"):
        train_tokenizer(["a b"], tmp_path / "x.model", 300, progress=False, input="y.txt")


@pytest.mark.parametrize("docs, vocab, match", [
    ([], 300, "empty corpus"),
    (["", "\n\n", ""], 300, "empty corpus"),
    (["tiny corpus of few words"], 5000, r"Vocabulary size too high \(5000\)"),
    (["abc def"] * 10, 100, "smaller than required_chars"),
])
def test_training_errors_are_one_line_and_leave_no_file(tmp_path, docs, vocab, match):
    out = tmp_path / "bad.model"
    with pytest.raises(UserError, match=match) as e:
        train_tokenizer(docs, out, vocab, num_threads=1, progress=False)
    assert "\n" not in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_bad_model_files(tmp_path):
    cases = {"text.model": b"this is not a sentencepiece model\n", "empty.model": b"",
             "junk.model": bytes(range(256)) * 4}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(UserError, match="SentencePiece model") as e:
            Tokenizer(tmp_path / name)
        assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="cannot read tokenizer"):
        Tokenizer(tmp_path / "missing.model")
    with pytest.raises(UserError, match="is a directory"):
        Tokenizer(tmp_path)


def test_loads_any_sentencepiece_model_and_pickles(tmp_path, tok):
    import io

    import sentencepiece as spm

    buf = io.BytesIO()  # a unigram model with default (non-Llama) settings
    spm.SentencePieceTrainer.train(sentence_iterator=iter("\n".join(make_corpus(50)).split("\n")),
                                   model_writer=buf, vocab_size=200, minloglevel=2, num_threads=1)
    (tmp_path / "uni.model").write_bytes(buf.getvalue())
    uni = Tokenizer(tmp_path / "uni.model")
    assert uni.vocab_size == 200 and uni.decode(uni.encode("the llama")) == "the llama"
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.sha256 == tok.sha256 and clone.encode("kalo 42") == tok.encode("kalo 42")
    with pytest.raises(UserError, match="out of range"):
        tok.decode([tok.vocab_size])
