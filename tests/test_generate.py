"""KV-cache decoding against full recomputation, sampling, and the cache's GQA size."""

import pytest
import torch

from llama_pretrain import ModelConfig, Transformer
from llama_pretrain.generate import generate_ids, sample_next


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Transformer(ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97,
                                   multiple_of=32, max_seq_len=96)).eval()


def test_greedy_with_cache_equals_recompute(model):
    prompt = [1, 5, 9, 33, 7]
    cached = generate_ids(model, prompt, max_new_tokens=40, use_cache=True)
    full = generate_ids(model, prompt, max_new_tokens=40, use_cache=False)
    assert len(cached) == 40
    assert cached == full


def test_cached_logits_equal_full_forward(model):
    torch.manual_seed(1)
    tokens = torch.randint(0, 97, (2, 30))
    with torch.no_grad():
        full = model(tokens)
        for max_len in (30, 0):  # preallocated, and grown call by call
            cache = model.new_cache(batch=2, max_len=max_len)
            parts = [model(tokens[:, :10], cache=cache), model(tokens[:, 10:25], cache=cache)]
            parts += [model(tokens[:, i:i + 1], cache=cache) for i in range(25, 30)]
            assert cache.length == 30
            assert torch.allclose(torch.cat(parts, dim=1), full, atol=1e-5)


def test_sampling_is_seeded_and_stops_at_eos(model):
    a = generate_ids(model, [1, 2, 3], max_new_tokens=30, temperature=1.0, top_p=0.9, seed=7)
    b = generate_ids(model, [1, 2, 3], max_new_tokens=30, temperature=1.0, top_p=0.9, seed=7)
    c = generate_ids(model, [1, 2, 3], max_new_tokens=30, temperature=1.0, top_p=0.9, seed=8)
    assert a == b and a != c
    greedy = generate_ids(model, [1, 2, 3], max_new_tokens=30)
    eos = greedy[4]
    stopped = generate_ids(model, [1, 2, 3], max_new_tokens=30, eos_id=eos)
    assert stopped == greedy[:greedy.index(eos)]


def test_top_p_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    seen = {int(sample_next(logits, 1.0, 0.7, g)) for _ in range(300)}
    assert seen == {0, 1}
    assert int(sample_next(logits, 0.0, 1.0, None)) == 0


def test_kv_cache_is_sized_by_kv_heads():
    cfg = dict(dim=64, n_layers=2, n_heads=8, vocab_size=50, multiple_of=32, max_seq_len=64)
    gqa = Transformer(ModelConfig(n_kv_heads=2, **cfg))
    mha = Transformer(ModelConfig(**cfg))
    gqa_bytes = gqa.new_cache(batch=3, max_len=64).nbytes()
    assert mha.new_cache(batch=3, max_len=64).nbytes() == 4 * gqa_bytes
    assert gqa_bytes == 2 * 2 * 3 * 2 * 64 * 8 * 4  # layers x (k,v) x B x kv x T x D x fp32


def test_generate_cli_with_checkpoint_tokenizer(tmp_path):
    import subprocess
    import sys

    from llama_pretrain.interop import save_native
    from llama_pretrain.tokenizer import Tokenizer, train_tokenizer

    words = ["alpha", "beta", "gamma", "delta", "llama", "model", "train", "token", "2023", "data"]
    corpus = [" ".join(words[(i * 7 + j) % len(words)] for j in range(12)) for i in range(300)]
    tok_path = train_tokenizer(corpus, tmp_path / "tok.model", 300, progress=False, num_threads=1)
    tok = Tokenizer(tok_path)
    torch.manual_seed(0)
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=tok.vocab_size,
                      multiple_of=32, max_seq_len=64)
    model = Transformer(cfg).eval()
    save_native(model.state_dict(), cfg, tmp_path / "ckpt", tokenizer_model=tok_path)

    def cli(*extra):
        return subprocess.run([sys.executable, "-m", "llama_pretrain", "generate", str(tmp_path / "ckpt"),
                               "--prompt", "llama model", "--max-new-tokens", "8", *extra],
                              capture_output=True, text=True)

    greedy = cli()
    assert greedy.returncode == 0, greedy.stderr
    prompt = tok.encode("llama model")
    new = generate_ids(model, prompt, max_new_tokens=8, eos_id=tok.eos_id)
    continuation = tok.decode(prompt + new)[len(tok.decode(prompt)):]
    assert greedy.stdout.rstrip("\n") == "llama model" + continuation
    sampled = ("--temperature", "1.0", "--top-p", "0.9", "--seed", "3")
    a, b = cli(*sampled), cli(*sampled)
    assert a.returncode == 0 and a.stdout == b.stdout
    bad = cli("--top-p", "0")
    assert bad.returncode == 2 and "--top-p" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    other = train_tokenizer(corpus, tmp_path / "other.model", 280, progress=False, num_threads=1)
    mismatch = cli("--tokenizer", str(other))
    assert mismatch.returncode == 2 and "vocab_size" in mismatch.stderr
    # a prompt that fills the 64-token context, or an unknown device, is a one-line error
    long = subprocess.run([sys.executable, "-m", "llama_pretrain", "generate", str(tmp_path / "ckpt"),
                           "--prompt", "llama model " * 64], capture_output=True, text=True)
    assert long.returncode == 2 and "context is 64" in long.stderr, long.stderr
    device = cli("--device", "tpu")
    assert device.returncode == 2 and "--device must be" in device.stderr, device.stderr
    for bad in (long, device):
        assert len(bad.stderr.strip().splitlines()) == 1, bad.stderr


def test_generate_from_a_missing_path_says_it_does_not_exist(tmp_path, capsys):
    from llama_pretrain.cli import main

    missing = tmp_path / "nonexistent"
    assert main(["generate", str(missing), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err.strip()
    assert f"{missing}: no such checkpoint (the path does not exist)" in err and "tokenizer" not in err, err
