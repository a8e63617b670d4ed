"""TokenLoader and `train` over several prepared dataset directories read as one stream."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from llama_pretrain.cli import main as cli_main
from llama_pretrain.data.loader import TokenLoader
from llama_pretrain.data.shards import FORMAT, MANIFEST, ShardWriter
from llama_pretrain.errors import UserError
from llama_pretrain.train.config import load_run_config

from helpers.runs import as_flags, read_metrics, tiny_run

VOCAB = 512
SHA = "ab" * 32


def documents(seed: int, n_tokens: int) -> list[np.ndarray]:
    """Documents (BOS ... EOS) of random ids, about ``n_tokens`` in all."""
    rng = np.random.default_rng(seed)
    docs, n = [], 0
    while n < n_tokens:
        doc = np.concatenate([[1], rng.integers(3, VOCAB, size=int(rng.integers(5, 90))), [2]])
        docs.append(doc)
        n += len(doc)
    return docs


def write_dataset(out: Path, train: list[np.ndarray], val: list[np.ndarray] | None = None,
                  shard_tokens: int = 700, dtype: str = "uint16", sha: str = SHA) -> Path:
    """A prepared dataset dir holding these documents, as `data prepare` lays it out."""
    splits = {}
    for split, docs in (("train", train), ("val", val if val is not None else train[:3])):
        w = ShardWriter(out, split, dtype, shard_tokens)
        for d in docs:
            w.add(d)
        shards = w.close()
        splits[split] = {"shards": shards, "tokens": sum(s["tokens"] for s in shards),
                         "documents": sum(s["documents"] for s in shards)}
    manifest = {"format": FORMAT, "dtype": dtype, "tokenizer": {"vocab_size": VOCAB, "sha256": sha},
                "splits": splits}
    (out / MANIFEST).write_text(json.dumps(manifest))
    return out


@pytest.fixture
def dirs(tmp_path) -> tuple[Path, Path, Path]:
    """A and B, and AB: one dir holding A's documents then B's (other shard boundaries)."""
    a, b = documents(0, 3000), documents(1, 2000)
    return (write_dataset(tmp_path / "A", a), write_dataset(tmp_path / "B", b),
            write_dataset(tmp_path / "AB", a + b, shard_tokens=1100))


def batches(loader: TokenLoader, n: int) -> list[torch.Tensor]:
    return [next(loader) for _ in range(n)]


def test_two_dirs_read_as_their_concatenation(dirs):
    a, b, ab = dirs
    over_two = TokenLoader([a, b], batch_size=3, seq_len=16, seed=5)
    one = TokenLoader(ab, batch_size=3, seq_len=16, seed=5)
    assert over_two.num_tokens == one.num_tokens and over_two.num_windows == one.num_windows
    n = 2 * one.num_windows // 3 + 2  # two epochs and a bit: batches straddle the epoch change
    for x, y in zip(batches(over_two, n), batches(one, n)):
        assert torch.equal(x, y)
    # A one-element list is the single dir, state included (the state format of one dir is unchanged).
    single = TokenLoader(a, batch_size=2, seq_len=16, seed=5)
    listed = TokenLoader([str(a)], batch_size=2, seq_len=16, seed=5)
    assert all(torch.equal(x, y) for x, y in zip(batches(single, 5), batches(listed, 5)))
    assert single.state_dict() == listed.state_dict()
    assert set(single.state_dict()) == {"version", "position", "seed", "seq_len", "split", "num_windows",
                                        "tokenizer_sha256"}
    # The validation split is the same list.
    val = TokenLoader([a, b], split="val", batch_size=1, seq_len=8, shuffle=False)
    assert val.num_tokens == sum(TokenLoader(d, split="val", seq_len=8).num_tokens for d in (a, b))


def test_resume_mid_epoch_over_two_dirs(dirs):
    a, b, _ = dirs
    ld = TokenLoader([a, b], batch_size=4, seq_len=16, seed=2)
    batches(ld, 7)
    state = json.loads(json.dumps(ld.state_dict()))  # as a checkpoint stores it
    expected = batches(ld, 6)
    resumed = TokenLoader([a, b], batch_size=4, seq_len=16, seed=0)
    resumed.load_state_dict(state)
    assert all(torch.equal(x, y) for x, y in zip(batches(resumed, 6), expected))


def test_ranks_over_two_dirs_are_disjoint_and_make_the_one_process_batch(dirs):
    a, b, _ = dirs
    B, T, w = 3, 16, 2
    ranks = [TokenLoader([a, b], batch_size=B, seq_len=T, seed=1, rank=r, world_size=w) for r in range(w)]
    single = TokenLoader([a, b], batch_size=B * w, seq_len=T, seed=1)
    for _ in range(4):
        per_rank = [next(ld) for ld in ranks]
        assert torch.equal(torch.stack(per_rank, dim=1).reshape(B * w, T + 1), next(single))
        rows = [{tuple(r.tolist()) for r in batch} for batch in per_rank]
        assert not rows[0] & rows[1]
    assert len({json.dumps(ld.state_dict()) for ld in ranks + [single]}) == 1


@pytest.mark.parametrize("change, message", [
    ({"sha": "cd" * 32}, "tokenizer sha256"),
    ({"dtype": "uint32"}, "token dtype uint32 differs from uint16"),
])
def test_dirs_with_another_tokenizer_or_dtype_are_refused(dirs, tmp_path, change, message):
    a, _, _ = dirs
    odd = write_dataset(tmp_path / "odd", documents(3, 800), **change)
    with pytest.raises(UserError, match=message) as e:
        TokenLoader([a, odd], seq_len=16)
    assert str(e.value).startswith(str(odd)) and str(a) in str(e.value) and "\n" not in str(e.value)


def test_a_state_from_another_list_of_dirs_is_refused(dirs):
    a, b, ab = dirs
    state = TokenLoader([a, b], seq_len=16).state_dict()
    assert len(state["dirs"]) == 2
    for other in ([b, a], [ab], [a, a]):
        with pytest.raises(UserError, match="another list of data dirs"):
            TokenLoader(other, seq_len=16).load_state_dict(state)
    with pytest.raises(UserError, match=r"\(one dir\), now 2 dirs"):  # a single dir's state
        TokenLoader([a, b], seq_len=16).load_state_dict(TokenLoader(ab, seq_len=16).state_dict())
    # A state written before several dirs existed (no "dirs") still loads for its one dir.
    old = {"version": 1, "position": 5, "seed": 0, "seq_len": 16, "split": "train",
           "num_windows": TokenLoader(a, seq_len=16).num_windows, "tokenizer_sha256": SHA}
    ld = TokenLoader(a, seq_len=16)
    ld.load_state_dict(old)
    assert ld.position == 5


def test_config_takes_one_dir_or_a_list(tmp_path):
    assert load_run_config(None, ["data.path=/x/one"]).data.dirs == ["/x/one"]
    assert load_run_config(None, ['data.path=["/x/a", "/x/b"]']).data.dirs == ["/x/a", "/x/b"]
    toml = tmp_path / "run.toml"
    toml.write_text('[data]\npath = ["/x/a", "/x/b"]\n')
    cfg = load_run_config(toml)
    assert cfg.data.path == ["/x/a", "/x/b"] and 'path = ["/x/a", "/x/b"]' in cfg.to_toml()
    with pytest.raises(UserError, match="data.path must be a string or a list of strings"):
        load_run_config(None, ["data.path=[1, 2]"])
    with pytest.raises(UserError, match="data.path must not list an empty path"):
        load_run_config(None, ['data.path=["/x/a", ""]'])


def train_flags(tmp_path: Path, *data: Path, **over) -> list[str]:
    items = tiny_run({"training.max_steps": 2, "schedule.warmup_steps": 10, "checkpoint.every_steps": 2, **over})
    return (["train", "--run-dir", str(tmp_path / "run"), "--config", str(tmp_path / "empty.toml")]
            + as_flags(items) + [f"--data.path={d}" for d in data])


def test_train_on_two_data_dirs(dirs, tmp_path, capsys):
    a, b, _ = dirs
    (tmp_path / "empty.toml").write_text("")
    assert cli_main(train_flags(tmp_path, a, b)) == 0
    assert [r["step"] for r in read_metrics(tmp_path / "run") if "loss" in r] == [1, 2]
    saved = json.loads(next((tmp_path / "run" / "checkpoints").glob("step-*/trainer_state.json")).read_text())
    assert [d["tokens"] for d in saved["loader"][0]["dirs"]] == [TokenLoader(d, seq_len=8).num_tokens for d in (a, b)]
    # Resuming on the same dirs in another order is refused, in one line.
    capsys.readouterr()
    assert cli_main(train_flags(tmp_path, b, a, **{"training.max_steps": 3})) == 2
    err = capsys.readouterr().err.strip()
    assert "another list of data dirs" in err and len(err.splitlines()) == 1, err


def test_preflight_checks_every_dir(dirs, tmp_path, capsys):
    a, _, _ = dirs
    bad = write_dataset(tmp_path / "bad", documents(4, 800))
    m = json.loads((bad / MANIFEST).read_text())
    m["splits"]["train"]["shards"][0]["max_token_id"] = VOCAB  # an id outside the model's vocabulary
    (bad / MANIFEST).write_text(json.dumps(m))
    noval = write_dataset(tmp_path / "noval", documents(5, 800))
    m = json.loads((noval / MANIFEST).read_text())
    del m["splits"]["val"]
    (noval / MANIFEST).write_text(json.dumps(m))
    (tmp_path / "empty.toml").write_text("")
    for data, over, says in (([bad, a], {}, f"{bad / 'train' / '00000.bin'}: holds token id {VOCAB}"),
                             ([a, bad], {}, f"{bad / 'train' / '00000.bin'}: holds token id {VOCAB}"),
                             ([noval, a], {"training.eval_every_steps": 1}, f"{noval} has no 'val' split")):
        assert cli_main(train_flags(tmp_path, *data, **over)) == 2
        err = capsys.readouterr().err.strip()
        assert says in err and len(err.splitlines()) == 1, err
        assert not (tmp_path / "run").exists()
