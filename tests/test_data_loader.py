"""TokenLoader: packed windows over memory-mapped shards, deterministic shuffle, ranks, resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from llama_pretrain.data.loader import FeistelPermutation, TokenLoader
from llama_pretrain.data.shards import FORMAT, ShardWriter, dtype_for_vocab
from llama_pretrain.errors import UserError


def make_dataset(d, n_tokens: int = 5000, shard_tokens: int = 1100, seed: int = 0, first: int = 0,
                 vocab: int = 65536):
    """A dataset whose token stream is first, first + 1, ... so every window is recognisable."""
    rng = np.random.default_rng(seed)
    stream = np.arange(first, first + n_tokens, dtype=np.int64)
    dtype = dtype_for_vocab(vocab)
    w = ShardWriter(d, "train", dtype, shard_tokens)
    pos = 0
    while pos < n_tokens:
        n = int(rng.integers(5, 120))
        w.add(stream[pos:pos + n])
        pos += n
    manifest = {"format": FORMAT, "dtype": dtype,
                "tokenizer": {"vocab_size": vocab, "sha256": "ab" * 32},
                "splits": {"train": {"shards": w.close()}, "val": {"shards": []}}}
    (d / "manifest.json").write_text(json.dumps(manifest))
    return stream


def test_permutation_is_a_bijection():
    for n in (1, 2, 3, 7, 64, 65, 1000, 4099):
        for key in (0, 1, 12345):
            p = FeistelPermutation(n, key)
            assert sorted(p(i) for i in range(n)) == list(range(n))
    a = [FeistelPermutation(1000, 1)(i) for i in range(20)]
    b = [FeistelPermutation(1000, 2)(i) for i in range(20)]
    assert a != b and a != list(range(20))


def test_windows_cover_each_epoch_once_and_reshuffle(tmp_path):
    stream = make_dataset(tmp_path)
    T = 32
    ld = TokenLoader(tmp_path, batch_size=1, seq_len=T, seed=3)
    assert len(ld._shards) > 3 and all(isinstance(s, np.memmap) for s in ld._shards)
    assert ld.num_tokens == len(stream) and ld.num_windows == (len(stream) - 1) // T
    assert ld.vocab_size == 65536 and ld.tokenizer_sha256 == "ab" * 32
    starts = []
    for _ in range(2 * ld.num_windows):
        x = next(ld)
        assert x.shape == (1, T + 1) and x.dtype == torch.int64
        s = int(x[0, 0])
        assert s % T == 0 and torch.equal(x[0], torch.from_numpy(stream[s:s + T + 1]))  # crosses shards too
        starts.append(s // T)
    e0, e1 = starts[:ld.num_windows], starts[ld.num_windows:]
    assert sorted(e0) == list(range(ld.num_windows)) == sorted(e1)
    assert e0 != e1 and ld.epoch == 2


def test_uint32_shards_keep_ids_above_65535(tmp_path):
    stream = make_dataset(tmp_path, n_tokens=3000, first=65_000, vocab=70_000)  # ids 65,000 .. 67,999
    shards = json.loads((tmp_path / "manifest.json").read_text())["splits"]["train"]["shards"]
    assert len(shards) > 1
    for sh in shards:
        assert (tmp_path / sh["file"]).stat().st_size == 4 * sh["tokens"]
    ld = TokenLoader(tmp_path, batch_size=4, seq_len=64, shuffle=False)
    assert ld.num_tokens == len(stream)
    batches = torch.cat([next(ld) for _ in range(ld.num_windows // 4)])
    assert torch.equal(batches, torch.stack([torch.from_numpy(stream[k * 64:k * 64 + 65])
                                             for k in range(len(batches))]))
    assert int(batches.max()) > 65_535
    # uint16 shards refuse such ids instead of wrapping them
    with pytest.raises(ValueError, match="do not fit uint16"):
        ShardWriter(tmp_path / "small", "train", "uint16", 100).add(np.array([1, 65_536]))


def test_resume_continues_with_the_exact_next_batch(tmp_path):
    make_dataset(tmp_path)
    ref = TokenLoader(tmp_path, batch_size=4, seq_len=50, seed=7)
    batches = [next(ref) for _ in range(60)]  # crosses two epoch boundaries (num_windows = 99)
    ld = TokenLoader(tmp_path, batch_size=4, seq_len=50, seed=7)
    for _ in range(23):
        next(ld)
    state = json.loads(json.dumps(ld.state_dict()))
    assert all(isinstance(v, (int, str)) for v in state.values())
    fresh = TokenLoader(tmp_path, batch_size=4, seq_len=50, seed=999)  # seed comes from the state
    fresh.load_state_dict(state)
    for i in range(23, 60):
        assert torch.equal(next(fresh), batches[i])
    with pytest.raises(UserError, match="seq_len"):
        TokenLoader(tmp_path, batch_size=4, seq_len=64).load_state_dict(state)


def test_ranks_are_disjoint_and_union_equals_one_process(tmp_path):
    make_dataset(tmp_path)
    B, w, T = 2, 3, 40
    ranks = [TokenLoader(tmp_path, batch_size=B, seq_len=T, seed=1, rank=r, world_size=w) for r in range(w)]
    single = TokenLoader(tmp_path, batch_size=B * w, seq_len=T, seed=1)
    seen = set()
    for step in range(30):  # ~1.5 epochs of 124 windows
        per_rank = [next(ld) for ld in ranks]
        one = next(single)
        assert torch.equal(torch.stack(per_rank, dim=1).reshape(B * w, T + 1), one)
        firsts = [{int(x) for x in b[:, 0]} for b in per_rank]
        assert sum(map(len, firsts)) == B * w and len(set.union(*firsts)) == B * w  # disjoint
        if step < single.num_windows // (B * w):
            assert not (set.union(*firsts) & seen)
            seen |= set.union(*firsts)
    assert len({json.dumps(ld.state_dict()) for ld in ranks + [single]}) == 1


def test_errors(tmp_path):
    with pytest.raises(UserError, match="not a prepared dataset"):
        TokenLoader(tmp_path)
    make_dataset(tmp_path, n_tokens=100, shard_tokens=1024)
    with pytest.raises(UserError, match="fewer than seq_len"):
        TokenLoader(tmp_path, seq_len=256)
    with pytest.raises(UserError, match="no split"):
        TokenLoader(tmp_path, split="test", seq_len=8)
    with pytest.raises(UserError, match="rank"):
        TokenLoader(tmp_path, seq_len=8, rank=2, world_size=2)
    (tmp_path / "train" / "00000.bin").write_bytes(b"\x00")
    with pytest.raises(UserError, match="incomplete"):
        TokenLoader(tmp_path, seq_len=8)


def test_shards_record_their_max_token_id_and_keep_their_bytes(tmp_path):
    """The manifest's max_token_id is each shard's true maximum; the shard bytes are the ids alone."""
    from llama_pretrain.data.shards import check_token_ids

    stream = make_dataset(tmp_path, n_tokens=3000, shard_tokens=700, vocab=4000)  # ids 0 .. 2999
    m = json.loads((tmp_path / "manifest.json").read_text())
    shards = m["splits"]["train"]["shards"]
    start = 0
    for sh in shards:
        raw = (tmp_path / sh["file"]).read_bytes()
        assert raw == stream[start:start + sh["tokens"]].astype("<u2").tobytes()
        assert sh["max_token_id"] == int(stream[start:start + sh["tokens"]].max())
        start += sh["tokens"]
    check_token_ids(tmp_path, "train", 3000)
    refusal = f"{shards[-1]['file']}: holds token id 2999, outside the vocabulary of 2999"
    with pytest.raises(UserError, match=refusal):
        check_token_ids(tmp_path, "train", 2999)
    # a manifest from before the field: the memory maps are scanned, with the same verdict
    for sh in shards:
        del sh["max_token_id"]
    (tmp_path / "manifest.json").write_text(json.dumps(m))
    check_token_ids(tmp_path, "train", 3000)
    with pytest.raises(UserError, match="holds token id 2999"):
        check_token_ids(tmp_path, "train", 2999)


def test_prepare_records_max_token_id(tmp_path):
    import random

    from helpers.synthetic_text import prose

    from llama_pretrain.data.prepare import prepare
    from llama_pretrain.data.sources import DataConfig, SourceConfig
    from llama_pretrain.tokenizer import train_tokenizer

    rng = random.Random(7)
    docs = [prose(rng) for _ in range(60)]
    tok = train_tokenizer(docs, tmp_path / "tok.model", 400, progress=False)
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    m = prepare(DataConfig([SourceConfig("input", [str(tmp_path / "in.jsonl")])]), tok, tmp_path / "out",
                progress=False)
    for split in ("train", "val"):
        for sh in m["splits"][split]["shards"]:
            assert sh["max_token_id"] == int(np.fromfile(tmp_path / "out" / sh["file"], dtype="<u2").max())
