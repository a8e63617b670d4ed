"""`tokenizer train --out`: the model and its .json sidecar replace only what this command wrote."""

from __future__ import annotations

import json
import random
import string

import pytest

from llama_pretrain.cli import main


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "c.txt"
    rng = random.Random(0)
    words = ["".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(2, 8))) for _ in range(600)]
    path.write_text("\n".join(" ".join(rng.choices(words, k=12)) for _ in range(400)) + "\n")
    return path


def _train(corpus, out) -> int:
    return main(["tokenizer", "train", "--input", str(corpus), "--vocab-size", "300", "--out", str(out),
                 "--num-threads", "1", "--no-progress"])


@pytest.mark.parametrize("victim", ["notes.json", "notes.model"])
def test_a_users_file_at_the_model_or_sidecar_path_survives(corpus, tmp_path, capsys, victim):
    # --out notes.model writes notes.json beside it: either may be the user's own file
    (tmp_path / victim).write_text("my own notes\n")
    assert _train(corpus, tmp_path / "notes.model") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "refusing" in err and victim in err, err
    assert (tmp_path / victim).read_text() == "my own notes\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == [victim]


def test_a_symlinked_sidecar_is_refused(corpus, tmp_path, capsys):
    (tmp_path / "elsewhere.json").write_text("{}")
    (tmp_path / "tok.json").symlink_to(tmp_path / "elsewhere.json")
    assert _train(corpus, tmp_path / "tok.model") == 2
    assert "symlink" in capsys.readouterr().err
    assert (tmp_path / "elsewhere.json").read_text() == "{}"


def test_its_own_earlier_model_is_replaced(corpus, tmp_path):
    out = tmp_path / "tok.model"
    assert _train(corpus, out) == 0
    first = out.read_bytes()
    assert _train(corpus, out) == 0  # same corpus and seed: the same model again
    assert out.read_bytes() == first
    assert json.loads(out.with_suffix(".json").read_text())["format"] == "llama-pretrain-tokenizer"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tok.json", "tok.model"]
