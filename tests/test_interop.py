"""Hugging Face and Meta checkpoints in and out, and the errors for bad ones."""

import json
import subprocess
import sys

import pytest
import torch

from llama_pretrain import ModelConfig, Transformer, UserError, load_model
from llama_pretrain.interop import load_checkpoint, save_hf, save_native
from llama_pretrain.interop.meta import save_meta

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402


def cli(*args, check=False):
    r = subprocess.run([sys.executable, "-m", "llama_pretrain", *map(str, args)], capture_output=True, text=True)
    if check and r.returncode:
        raise AssertionError(r.stderr)
    return r


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    torch.manual_seed(1)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=300,
                                   max_position_embeddings=1024, rms_norm_eps=1e-5, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # HF zero-inits nothing we care about, but make norms non-trivial
        for n, p in model.named_parameters():
            if "norm" in n:
                p.add_(torch.randn_like(p) * 0.1)
    out = tmp_path_factory.mktemp("hf")
    model.save_pretrained(out)
    return out, model


def test_hf_import_gives_same_logits_and_roundtrip_is_bit_exact(hf_dir, tmp_path):
    src, hf = hf_dir
    r = cli("import-hf", src, "--out", tmp_path / "ours")
    assert r.returncode == 0, r.stderr
    ours = load_model(tmp_path / "ours")
    assert ours.config.hidden_dim == 176 and ours.config.kv_heads == 2
    tokens = torch.randint(0, 300, (2, 700))
    with torch.no_grad():
        assert (ours(tokens) - hf(tokens).logits).abs().max().item() <= 1e-4
    r = cli("export-hf", tmp_path / "ours", "--out", tmp_path / "back")
    assert r.returncode == 0, r.stderr
    a = load_file(str(next(src.glob("*.safetensors"))))
    b = load_file(str(tmp_path / "back" / "model.safetensors"))
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "back").eval()
    with torch.no_grad():
        assert torch.equal(reloaded(tokens).logits, hf(tokens).logits)


def test_export_of_our_model_loads_in_transformers(tmp_path):
    torch.manual_seed(0)
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=1, vocab_size=200, multiple_of=32, max_seq_len=640)
    model = Transformer(cfg).eval()
    save_native(model.state_dict(), cfg, tmp_path / "ckpt")
    save_hf(model.state_dict(), cfg, tmp_path / "hf")
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tokens = torch.randint(0, 200, (1, 600))
    with torch.no_grad():
        assert (model(tokens) - hf(tokens).logits).abs().max().item() <= 1e-4
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["num_key_value_heads"] == 1


def test_meta_layout_sharded_checkpoint_loads(tmp_path):
    torch.manual_seed(0)
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, multiple_of=32, max_seq_len=128)
    model = Transformer(cfg).eval()
    state = model.state_dict()
    # Split the way Meta's model-parallel layers do across two shards.
    shards = [{}, {}]
    for name, w in state.items():
        if w.dim() == 1:
            parts = [w, w]
        elif name.endswith(("wo.weight", "w2.weight", "tok_embeddings.weight")):
            parts = list(w.chunk(2, dim=1))
        else:
            parts = list(w.chunk(2, dim=0))
        for shard, part in zip(shards, parts):
            shard[name] = part.clone()
    save_meta(state, cfg, tmp_path / "meta")
    (tmp_path / "meta" / "consolidated.00.pth").unlink()
    for i, shard in enumerate(shards):
        shard["rope.freqs"] = torch.zeros(8)
        torch.save(shard, tmp_path / "meta" / f"consolidated.{i:02d}.pth")
    params = json.loads((tmp_path / "meta" / "params.json").read_text())
    params["vocab_size"] = -1  # as in Meta's release: taken from the embedding
    (tmp_path / "meta" / "params.json").write_text(json.dumps(params))
    loaded = load_model(tmp_path / "meta")
    tokens = torch.randint(0, 256, (2, 100))
    with torch.no_grad():
        assert torch.equal(loaded(tokens), model(tokens))


def test_meta_checkpoint_with_pickled_objects_is_refused(tmp_path):
    cfg = ModelConfig.from_preset("llama2-debug")
    save_meta(Transformer(cfg).state_dict(), cfg, tmp_path / "meta")

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, tmp_path / "meta" / "consolidated.00.pth")
    with pytest.raises(UserError, match="consolidated.00.pth"):
        load_checkpoint(tmp_path / "meta")


def test_bad_checkpoints_are_one_line_errors_and_write_nothing(tmp_path, hf_dir):
    src, _ = hf_dir
    # Missing dir.
    r = cli("export-hf", tmp_path / "nope", "--out", tmp_path / "o1")
    assert r.returncode == 2 and "no such checkpoint" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o1").exists()
    # Another architecture.
    other = tmp_path / "gpt2"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    r = cli("import-hf", other, "--out", tmp_path / "o2")
    assert r.returncode == 2 and "not a Llama model" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o2").exists()
    # Fields of the wrong type.
    for field, value in (("hidden_size", "64"), ("num_attention_heads", 0), ("rope_parameters", "linear")):
        cfg = json.loads((src / "config.json").read_text())
        cfg[field] = value
        (other / "config.json").write_text(json.dumps(cfg))
        r = cli("model", "info", "--config", other / "config.json")
        assert r.returncode == 2 and "config.json" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    # Mismatched shapes: config says 3 layers' width differs from the weights.
    bad = tmp_path / "bad"
    bad.mkdir()
    cfg = json.loads((src / "config.json").read_text())
    cfg["intermediate_size"] = 256
    (bad / "config.json").write_text(json.dumps(cfg))
    for f in src.glob("*.safetensors"):
        (bad / f.name).write_bytes(f.read_bytes())
    r = cli("import-hf", bad, "--out", tmp_path / "o3")
    assert r.returncode == 2 and "shape" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o3").exists()
    # Corrupt weights file.
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "config.json").write_text((src / "config.json").read_text())
    (corrupt / "model.safetensors").write_bytes(b"garbage" * 10)
    r = cli("import-hf", corrupt, "--out", tmp_path / "o4")
    assert r.returncode == 2 and "model.safetensors" in r.stderr
    assert not (tmp_path / "o4").exists()
    # Existing output is not overwritten without --force.
    (tmp_path / "o5").mkdir()
    (tmp_path / "o5" / "keep.txt").write_text("mine")
    r = cli("import-hf", src, "--out", tmp_path / "o5")
    assert r.returncode == 2 and "--force" in r.stderr
    assert (tmp_path / "o5" / "keep.txt").read_text() == "mine"
    # A missing or non-SentencePiece --tokenizer is a one-line error and nothing is written.
    (tmp_path / "not.model").write_text("not a tokenizer")
    for tok, needle in ((tmp_path / "missing.model", "cannot read tokenizer"),
                        (tmp_path / "not.model", "not a SentencePiece model")):
        r = cli("export-hf", src, "--out", tmp_path / "o6", "--tokenizer", tok)
        assert r.returncode == 2 and needle in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert not (tmp_path / "o6").exists()


@pytest.mark.parametrize("fields", [dict(preset="llama2-debug"), dict(preset="llama2-tiny"),
                                    dict(dim=128, n_layers=3, n_heads=8, n_kv_heads=2, multiple_of=64,
                                         ffn_dim_multiplier=1.3, vocab_size=100)])
def test_expected_shapes_are_the_models(fields):
    from llama_pretrain.interop.checks import expected_shapes
    fields = dict(fields)
    cfg = ModelConfig.from_preset(fields.pop("preset"), **fields) if "preset" in fields else ModelConfig(**fields)
    with torch.device("meta"):
        model = Transformer(cfg)
    assert expected_shapes(cfg) == {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_config_is_checked_against_the_header_before_any_tensor_is_read(hf_dir, tmp_path, monkeypatch):
    from llama_pretrain.interop import native

    def no_reading(file):
        raise AssertionError(f"read {file} before checking the config")
    monkeypatch.setattr(native, "read_safetensors", no_reading)
    cfg = ModelConfig.from_preset("llama2-debug")
    ours = save_native(Transformer(cfg).state_dict(), cfg, tmp_path / "ours")
    meta = json.loads((ours / "config.json").read_text())
    meta["model"]["n_layers"] = 3
    (ours / "config.json").write_text(json.dumps(meta))
    theirs = tmp_path / "hf"
    theirs.mkdir()
    for f in hf_dir[0].glob("*.safetensors"):
        (theirs / f.name).write_bytes(f.read_bytes())
    hf_cfg = json.loads((hf_dir[0] / "config.json").read_text())
    (theirs / "config.json").write_text(json.dumps({**hf_cfg, "num_hidden_layers": 3}))
    for d in (ours, theirs):
        with pytest.raises(UserError, match="tensors do not match the config"):
            load_checkpoint(d)
