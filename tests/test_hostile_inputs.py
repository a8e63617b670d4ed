"""Hostile inputs on the data / train / CLI side (issue 12, parts 5 and 6): each test is the attack.

A wrong tokenizer or an id past the vocabulary must be refused before step 1; a malformed
manifest, an undecodable string, an unscorable eval record or a pathologically deep TOML must be
one line and exit 2, with nothing written.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from llama_pretrain.cli import main as cli_main
from llama_pretrain.config import read_toml
from llama_pretrain.data.loader import TokenLoader
from llama_pretrain.data.shards import MANIFEST, dataset_tokenizer
from llama_pretrain.errors import UserError
from llama_pretrain.eval.tasks import TASKS
from llama_pretrain.eval.tasks.data import load_split
from llama_pretrain.tokenizer import Tokenizer, train_tokenizer

from helpers.runs import as_flags, tiny_run
from helpers.synthetic_text import make_corpus
from helpers.train_data import make_dataset

VOCAB = 512  # llama2-debug's


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory) -> tuple[Path, Path]:
    """Two different tokenizers with the same vocabulary size (the model's)."""
    d = tmp_path_factory.mktemp("tok")
    a = train_tokenizer(make_corpus(300, seed=1), d / "a.model", vocab_size=VOCAB, progress=False)
    b = train_tokenizer(make_corpus(300, seed=2), d / "b.model", vocab_size=VOCAB, progress=False)
    assert Tokenizer(a).sha256 != Tokenizer(b).sha256
    return a, b


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, tokenizers) -> Path:
    return make_dataset(tmp_path_factory.mktemp("ds") / "data", vocab_size=VOCAB,
                        tokenizer_sha256=Tokenizer(tokenizers[0]).sha256)


def _train(capsys, data: Path, run: Path, *extra: str) -> str:
    """``llama-pretrain train`` on llama2-debug; asserts exit 2 with one line; returns it."""
    rc = cli_main(["train", "--run-dir", str(run), f"--data.path={data}",
                   *as_flags(tiny_run({"training.max_steps": 2, "training.global_batch_tokens": 128})), *extra])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    return Path(shutil.copytree(src, dst))


def _manifest(d: Path) -> dict:
    return json.loads((d / MANIFEST).read_text())


def _set_manifest(d: Path, m: dict) -> None:
    (d / MANIFEST).write_text(json.dumps(m))


# -- 5. silently wrong results ------------------------------------------------------------------
def test_another_tokenizer_with_the_same_vocab_size_is_refused(dataset, tokenizers, tmp_path, capsys):
    a, b = tokenizers
    err = _train(capsys, dataset, tmp_path / "run", f"--data.tokenizer={b}")
    assert "is not the tokenizer" in err and str(b) in err
    assert not (tmp_path / "run").exists()
    assert dataset_tokenizer(dataset, a) == a
    # found beside the dataset: a same-named file of another tokenizer is skipped, not shipped
    other = _copy(dataset, tmp_path / "other")
    (other / "tokenizer.model").write_bytes(b.read_bytes())
    assert dataset_tokenizer(other) is None
    m = _manifest(other)
    m["tokenizer"]["path"] = str(a)
    _set_manifest(other, m)
    assert dataset_tokenizer(other) == a


def _plant(d: Path, split: str, token_id: int) -> None:
    """Overwrite one token of the split's last shard with ``token_id``, as a corrupt shard would."""
    sh = _manifest(d)["splits"][split]["shards"][-1]
    toks = np.memmap(d / sh["file"], dtype="<u2", mode="r+")
    toks[len(toks) // 2] = token_id
    toks.flush()


@pytest.mark.parametrize("recorded", [True, False], ids=["recorded-max", "old-manifest-scan"])
def test_out_of_vocabulary_id_refused_before_step_1(dataset, tmp_path, capsys, recorded):
    d = _copy(dataset, tmp_path / "d")
    _plant(d, "train", VOCAB + 88)
    m = _manifest(d)
    for sp in m["splits"].values():
        for sh in sp["shards"]:
            if recorded:  # what prepare records for such a shard
                sh["max_token_id"] = int(np.fromfile(d / sh["file"], "<u2").max())
            else:  # a manifest from before the field: the shards are scanned
                sh.pop("max_token_id", None)
    _set_manifest(d, m)
    err = _train(capsys, d, tmp_path / "run")
    assert f"token id {VOCAB + 88}" in err and m["splits"]["train"]["shards"][-1]["file"] in err
    assert not (tmp_path / "run").exists()


def test_out_of_vocabulary_id_in_the_validation_split_is_refused_too(dataset, tmp_path, capsys):
    d = _copy(dataset, tmp_path / "d")
    _plant(d, "val", VOCAB)
    m = _manifest(d)
    for sh in m["splits"]["val"]["shards"]:
        sh.pop("max_token_id", None)
    _set_manifest(d, m)
    err = _train(capsys, d, tmp_path / "run", "--training.eval_every_steps=1")
    assert f"token id {VOCAB}" in err and "val/" in err
    assert not (tmp_path / "run").exists()


# -- 6. one line instead of a traceback: manifests ------------------------------------------------
def _no_dtype(m): del m["dtype"]
def _splits_a_list(m): m["splits"] = [dict(name=k, **v) for k, v in m["splits"].items()]
def _tokens_lots(m): m["splits"]["train"]["shards"][0]["tokens"] = "lots"
def _no_file(m): del m["splits"]["train"]["shards"][0]["file"]
def _file_outside(m): m["splits"]["train"]["shards"][0]["file"] = "../../etc/passwd"
def _tokenizer_a_string(m): m["tokenizer"] = "tok.model"


@pytest.mark.parametrize("break_it, field", [
    (_no_dtype, "dtype is missing"),
    (_splits_a_list, "splits is [{"),
    (_tokens_lots, "splits.train.shards[0].tokens is 'lots'"),
    (_no_file, "splits.train.shards[0].file is missing"),
    (_file_outside, "splits.train.shards[0].file is '../../etc/passwd'"),
    (_tokenizer_a_string, "tokenizer is 'tok.model'"),
])
def test_malformed_manifest_is_one_line_naming_file_and_field(dataset, tmp_path, capsys, break_it, field):
    d = _copy(dataset, tmp_path / "d")
    m = _manifest(d)
    break_it(m)
    _set_manifest(d, m)
    with pytest.raises(UserError, match="malformed manifest") as e:
        TokenLoader(d)
    assert str(d / MANIFEST) in str(e.value) and field in str(e.value)
    assert field in _train(capsys, d, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_document_count_past_the_index_file_is_one_line(dataset, tmp_path):
    from llama_pretrain.data.shards import iter_documents

    d = _copy(dataset, tmp_path / "d")
    m = _manifest(d)
    m["splits"]["val"]["shards"][0]["documents"] = 10**6
    _set_manifest(d, m)
    with pytest.raises(UserError, match="val/00000.idx: missing or not 8000008 bytes"):
        next(iter_documents(d, "val"))


# -- 6. strings that are not UTF-8 ----------------------------------------------------------------
def _cli_process(*args, stdin: bytes = b"") -> subprocess.CompletedProcess:
    """The real command line: argv bytes reach Python as surrogate escapes."""
    return subprocess.run([sys.executable, "-m", "llama_pretrain", *args], input=stdin,
                          capture_output=True, timeout=120, check=False)


def _one_line(r: subprocess.CompletedProcess, needle: str) -> None:
    err = r.stderr.decode("utf-8", "replace").strip()
    assert r.returncode == 2 and len(err.splitlines()) == 1 and needle in err, err


def test_invalid_utf8_text_for_tokenizer_encode(tokenizers):
    a = str(tokenizers[0])
    _one_line(_cli_process("tokenizer", "encode", "--model", a, b"ok \xff here"),
              "TEXT is not valid UTF-8 text: the invalid UTF-8 byte 0xFF at character 3")
    _one_line(_cli_process("tokenizer", "encode", "--model", a, stdin=b"ok \xc3("),
              "standard input is not valid UTF-8: byte 0xC3 at offset 3")
    with pytest.raises(UserError, match="lone surrogate U\\+D800 at character 1"):
        Tokenizer(a).encode("x\ud800")
    with pytest.raises(UserError, match="text 1 of the batch"):
        Tokenizer(a).encode_batch(["fine", "x\udcff"])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizers) -> Path:
    import torch

    from llama_pretrain.config import ModelConfig
    from llama_pretrain.interop import save_native
    from llama_pretrain.model import Transformer

    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("llama2-debug", max_seq_len=1024)
    out = tmp_path_factory.mktemp("ckpt") / "ckpt"
    save_native(Transformer(cfg).state_dict(), cfg, out, tokenizer_model=tokenizers[0])
    return out


def test_lone_surrogate_in_generate_prompt(checkpoint, capsys):
    rc = cli_main(["generate", str(checkpoint), "--prompt", "hi \udcfe", "--max-new-tokens", "2"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert "--prompt is not valid UTF-8 text: the invalid UTF-8 byte 0xFE at character 3" in err


def _write_raw(data_dir: Path, task: str, split: str, lines: list[bytes]) -> Path:
    path = data_dir / task / f"{split}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return path


PIQA_OK = {"goal": "g", "sol1": "a", "sol2": "b", "label": 0}


@pytest.mark.parametrize("line, needle", [
    (b'{"goal": "bad \xff byte", "sol1": "a", "sol2": "b", "label": 0}',
     "record 1 field goal is not valid UTF-8 text: the invalid UTF-8 byte 0xFF"),
    (b'{"goal": "g", "sol1": "lone \\ud800", "sol2": "b", "label": 0}',
     "record 1 field sol1 is not valid UTF-8 text: the lone surrogate U+D800"),
])
def test_undecodable_eval_field_names_file_record_and_field(tmp_path, line, needle):
    path = _write_raw(tmp_path, "piqa", "validation", [json.dumps(PIQA_OK).encode(), line])
    with pytest.raises(UserError) as e:
        load_split(TASKS["piqa"], tmp_path, "validation")
    assert str(path) in str(e.value) and needle in str(e.value)


# -- 6. eval records that cannot be scored --------------------------------------------------------
ARC_OK = {"question": "q", "choices": {"text": ["x", "y", "z"], "label": ["A", "B", "C"]}, "answerKey": "A"}


@pytest.mark.parametrize("task, record, needle", [
    ("piqa", {**PIQA_OK, "label": None}, "field 'label' is None, not an integer label"),
    ("piqa", {**PIQA_OK, "label": "second"}, "field 'label' is 'second', not an integer label"),
    ("piqa", {**PIQA_OK, "label": 2}, "field 'label' gives answer index 2, out of range for its 2 choices"),
    ("piqa", {**PIQA_OK, "label": -1}, "answer index -1, out of range"),  # HF's unlabeled test records
    ("siqa", {"context": "c", "question": "q", "answerA": "a", "answerB": "b", "answerC": "c", "label": "4"},
     "answer index 3, out of range for its 3 choices"),
    ("winogrande", {"sentence": "A _ b", "option1": "x", "option2": "y", "answer": ""},
     "field 'answer' is '', not an integer label"),
    ("arc_easy", {**ARC_OK, "choices": {"text": ["x", "y", "z"], "label": ["A", "B"]}},
     "choices.label has 2 entries, choices.text 3"),
    ("arc_easy", {**ARC_OK, "answerKey": "E"}, "answerKey 'E' is not among choices.label"),
    ("mmlu", {"question": "q", "subject": "s", "choices": ["a", "b"], "answer": "Z"},
     "field 'answer' is 'Z', not an integer label"),
    ("mmlu", {"question": "q", "subject": "s", "choices": ["a", "b"], "answer": 3}, "answer index 3"),
    ("boolq", {"passage": "p", "question": "q", "answer": "maybe"}, "is 'maybe', not true/false"),
    ("agieval", {"query": "q", "choices": ["(A)x", "(B)y"], "gold": [5]}, "field 'gold' gives answer index 5"),
    ("hellaswag", {"ctx_a": "a", "ctx_b": "b", "activity_label": "x", "endings": ["e1", None], "label": "0"},
     "field 'endings' is ['e1', None], not a list of strings"),
])
def test_unscorable_eval_record_is_refused(tmp_path, task, record, needle):
    t = TASKS[task]
    good = load_split(t, _dir_with(tmp_path / "good", t, [record | _fix(task)]), t.split)
    assert len(good) == 1  # the record with its answer fixed is fine: only the answer is refused
    path = tmp_path / "bad" / task / f"{t.split}.jsonl"
    with pytest.raises(UserError) as e:
        load_split(t, _dir_with(tmp_path / "bad", t, [record]), t.split)
    assert str(e.value).startswith(f"{path}: record 0: ") and needle in str(e.value)


def _fix(task: str) -> dict:
    """The fields that make a record of ``task`` from the table above scorable again."""
    return {"piqa": {"label": 1}, "siqa": {"label": "3"}, "winogrande": {"answer": "2"},
            "arc_easy": ARC_OK, "mmlu": {"answer": "B"}, "boolq": {"answer": True}, "agieval": {"gold": [1]},
            "hellaswag": {"endings": ["e1", "e2"]}}[task]


def _dir_with(d: Path, task, records: list[dict]) -> Path:
    _write_raw(d, task.id, task.split, [json.dumps(r).encode() for r in records])
    return d


def test_eval_cli_refuses_a_bad_record_in_one_line_and_writes_nothing(checkpoint, tmp_path, capsys):
    data = _dir_with(tmp_path / "data", TASKS["piqa"], [PIQA_OK, {**PIQA_OK, "label": 7}])
    out = tmp_path / "results.json"
    rc = cli_main(["eval", str(checkpoint), "--tasks", "piqa", "--data-dir", str(data), "--out", str(out)])
    err = [ln for ln in capsys.readouterr().err.splitlines() if "error" in ln]
    assert rc == 2 and len(err) == 1 and "record 1: field 'label' gives answer index 7" in err[0], err
    assert not out.exists()


# -- 6. TOML nested thousands deep ----------------------------------------------------------------
@pytest.mark.parametrize("text", [
    "x = " + "[" * 5000 + "]" * 5000,                       # the parser recurses: RecursionError
    "x = " + "{a = " * 5000 + "1" + "}" * 5000,
    "[training]\n" + ".".join(["a"] * 5000) + " = 1\n",     # parses, then recursion meets it
    "[" + ".".join(["a"] * 5000) + "]\n",
])
def test_deep_toml_is_one_line(tmp_path, capsys, text):
    p = tmp_path / "deep.toml"
    p.write_text(text)
    with pytest.raises(UserError, match="deep"):
        read_toml(p)
    rc = cli_main(["train", "--config", str(p), "--print-config"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and str(p) in err, err


def test_toml_that_is_not_utf8_is_one_line(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_bytes(b'x = "\xff"\n')
    with pytest.raises(UserError, match="not valid TOML"):
        read_toml(p)
