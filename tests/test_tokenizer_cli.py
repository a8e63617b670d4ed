"""`llama-pretrain tokenizer train|encode|decode` on text, JSONL(.gz), Parquet and data configs."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys

import pytest

from llama_pretrain.cli import main
from llama_pretrain.commands.tokenizer import SPEC_OPTIONS
from llama_pretrain.tokenizer import Tokenizer

from helpers.synthetic_text import make_corpus


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    docs = make_corpus(300, seed=5)
    (d / "texts").mkdir()
    for i, doc in enumerate(docs[:50]):
        (d / "texts" / f"doc{i}.txt").write_text(doc)
    with open(d / "a.jsonl", "w") as fh:
        for doc in docs[50:150]:
            fh.write(json.dumps({"body": doc, "id": 1}) + "\n")
    with gzip.open(d / "b.jsonl.gz", "wt") as fh:
        for doc in docs[150:200]:
            fh.write(json.dumps({"body": doc}) + "\n")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": docs[200:300]}), d / "c.parquet")
    return d


def test_train_from_every_input_kind_then_encode_decode(corpus_dir, tmp_path, capsys):
    out = tmp_path / "tok.model"
    rc = main(["tokenizer", "train", "--input", str(corpus_dir / "a.jsonl"), str(corpus_dir / "b.jsonl.gz"),
               str(corpus_dir / "c.parquet"), "--text-field", "body", "--vocab-size", "500",
               "--out", str(out), "--num-threads", "1", "--no-progress"])
    assert rc == 0
    side = json.loads(out.with_suffix(".json").read_text())
    assert side["input"]["documents"] == 250
    assert side["input"]["sources"][0]["files"] == 3
    assert side["trainer_spec"]["vocab_size"] == 500

    rc = main(["tokenizer", "train", "--input", str(corpus_dir / "texts"), "--vocab-size", "400",
               "--out", str(tmp_path / "dir.model"), "--no-progress", "--input-sentences", "100",
               "--seed", "3", "--split-digits", "false", "--character_coverage", "1.0"])
    assert rc == 0
    side = json.loads((tmp_path / "dir.json").read_text())
    assert side["input"]["documents"] == 50 and side["input"]["lines_sampled"] == 100
    assert side["trainer_spec"]["split_digits"] is False
    assert side["trainer_spec"]["character_coverage"] == 1.0

    capsys.readouterr()
    assert main(["tokenizer", "encode", "--model", str(out), "the llama 42\tx"]) == 0
    ids = [int(x) for x in capsys.readouterr().out.split()]
    assert ids == Tokenizer(out).encode("the llama 42\tx")
    assert main(["tokenizer", "decode", "--model", str(out), *map(str, ids)]) == 0
    assert capsys.readouterr().out == "the llama 42\tx\n"
    assert main(["tokenizer", "encode", "--model", str(out), "--pieces", "--no-bos", "7"]) == 0
    tok = Tokenizer(out)
    rows = [line.split("\t") for line in capsys.readouterr().out.splitlines()]
    assert rows == [[str(i), tok.id_to_piece(i)] for i in tok.encode("7", bos=False)]
    assert [r[1] for r in rows] == ["▁", "7"]
    assert main(["tokenizer", "decode", "--model", str(out), "1,284", "[2]"]) == 0


def test_train_from_data_config(corpus_dir, tmp_path):
    cfg = tmp_path / "data.toml"
    cfg.write_text(f'[[sources]]\nname = "web"\npaths = ["{corpus_dir / "a.jsonl"}"]\ntext_field = "body"\n'
                   f'[[sources]]\nname = "books"\npaths = ["{corpus_dir / "texts"}"]\nweight = 2.0\n')
    out = tmp_path / "cfg.model"
    assert main(["tokenizer", "train", "--data-config", str(cfg), "--vocab-size", "450",
                 "--out", str(out), "--no-progress"]) == 0
    side = json.loads(out.with_suffix(".json").read_text())
    assert [s["name"] for s in side["input"]["sources"]] == ["web", "books"]
    assert side["input"]["documents"] == 150


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "llama_pretrain", "tokenizer", *args],
                          capture_output=True, text=True, timeout=120)


def test_bad_input_exits_2_with_one_line_and_no_model(corpus_dir, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"text": ""}) + "\n")
    corrupt = tmp_path / "corrupt.jsonl.gz"
    corrupt.write_bytes(b"\x1f\x8b not really gzip")
    notmodel = tmp_path / "x.model"
    notmodel.write_text("hello")
    cases = [
        (["train", "--input", str(empty), "--vocab-size", "300", "--out", str(tmp_path / "o.model")],
         "empty corpus"),
        (["train", "--input", str(corpus_dir / "texts"), "--vocab-size", "90000", "--out",
          str(tmp_path / "o.model")], "Vocabulary size too high"),
        (["train", "--input", str(corrupt), "--vocab-size", "300", "--out", str(tmp_path / "o.model")],
         "cannot read"),
        (["train", "--input", str(tmp_path / "nope"), "--vocab-size", "300", "--out",
          str(tmp_path / "o.model")], "does not exist"),
        (["encode", "--model", str(notmodel), "hi"], "not a SentencePiece model"),
        (["decode", "--model", str(notmodel), "1"], "not a SentencePiece model"),
    ]
    for args, msg in cases:
        r = _cli(*args)
        assert r.returncode == 2, (args, r.stderr)
        lines = [ln for ln in r.stderr.splitlines() if "error:" in ln]
        assert len(lines) == 1 and msg in lines[0], r.stderr
        assert "Traceback" not in r.stderr
    assert not (tmp_path / "o.model").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corrupt.jsonl.gz", "empty.jsonl", "x.model"]


def test_spec_options_cover_sentencepiece_trainer_spec():
    from sentencepiece import sentencepiece_model_pb2 as pb

    fields = {f.name for f in pb.TrainerSpec.DESCRIPTOR.fields}
    own = {"input", "input_format", "model_prefix", "vocab_size", "input_sentence_size"}
    assert set(SPEC_OPTIONS) - {"normalization_rule_name", "normalization_rule_tsv",
                                "add_dummy_prefix", "remove_extra_whitespaces"} == fields - own


def test_input_that_is_not_a_regular_file_says_so(tmp_path, capsys):
    assert main(["tokenizer", "train", "--input", "/dev/null", "--vocab-size", "300",
                 "--out", str(tmp_path / "t.model")]) == 2
    err = capsys.readouterr().err.strip()
    assert "/dev/null is not a regular file" in err and "does not exist" not in err, err
