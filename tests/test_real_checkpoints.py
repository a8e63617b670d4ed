"""Llama checkpoints as people ship them, on small models made here and compared with
transformers: tied input/output embeddings (import, export, GGUF, training under FSDP2 and tensor
parallelism, resume), Llama 3.1's RoPE scaling, and a directory as released models ship: sharded
bf16 safetensors with an index, several EOS ids, a context far above the training length."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from llama_pretrain import ModelConfig, Transformer, UserError, load_model
from llama_pretrain.compute.flops import flops_per_token, param_counts
from llama_pretrain.interop import load_checkpoint, save_hf, save_native
from llama_pretrain.data.loader import TokenLoader
from llama_pretrain.generate import generate_ids
from llama_pretrain.train.optim import param_groups

from helpers.parallel import assert_same_run, losses, train, weights
from helpers.runs import as_overrides, read_metrics, tiny_run
from helpers.train_data import make_dataset

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402

VOCAB = 512


def hf_llama(out: Path, tie: bool, **config) -> tuple[Path, torch.nn.Module]:
    """A 2-layer transformers Llama (dim 64, GQA 4/2, vocab 512) saved to ``out``, norms away from 1."""
    torch.manual_seed(0)
    fields = dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=256, rms_norm_eps=1e-5,
                  tie_word_embeddings=tie)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**fields, **config})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(out)
    return out, model


def max_diff(ours: torch.nn.Module, theirs: torch.nn.Module, tokens: torch.Tensor) -> float:
    with torch.no_grad():
        return (ours(tokens) - theirs(tokens).logits).abs().max().item()


# -- tied embeddings ----------------------------------------------------------------------------
@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_hf_dir_imports_tied_or_untied_with_transformers_logits(tie, tmp_path):
    src, hf = hf_llama(tmp_path / "hf", tie)
    assert ("lm_head.weight" in load_file(str(src / "model.safetensors"))) is not tie
    cfg, state, fmt = load_checkpoint(src)
    assert fmt == "hf" and cfg.tie_embeddings is tie and ("output.weight" in state) is not tie
    ours = load_model(src)
    assert (ours.output.weight is ours.tok_embeddings.weight) is tie
    tokens = torch.randint(0, VOCAB, (2, 200))
    assert max_diff(ours, hf, tokens) <= 1e-4

    # Our format holds the shared matrix once, as tok_embeddings.weight, and reads back tied.
    save_native(state, cfg, tmp_path / "ours")
    assert ("output.weight" in load_file(str(tmp_path / "ours" / "model.safetensors"))) is not tie
    again = load_model(tmp_path / "ours")
    with torch.no_grad():
        assert torch.equal(again(tokens), ours(tokens))

    # Export: transformers loads it tied (no lm_head written), every tensor bit-identical.
    save_hf(load_checkpoint(tmp_path / "ours")[1], cfg, tmp_path / "back")
    assert json.loads((tmp_path / "back" / "config.json").read_text())["tie_word_embeddings"] is tie
    a, b = load_file(str(src / "model.safetensors")), load_file(str(tmp_path / "back" / "model.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    back = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "back").eval()
    assert (back.lm_head.weight is back.model.embed_tokens.weight) is tie
    with torch.no_grad():
        assert torch.equal(back(tokens).logits, hf(tokens).logits)


@pytest.mark.parametrize("head", ["equal", "different", "absent, config untied"])
def test_tied_checkpoints_written_other_ways(head, tmp_path):
    # Some writers keep lm_head.weight beside a tied embedding: the same matrix is tied, one that
    # differs contradicts the config (transformers would silently untie it) and is refused in one
    # line. A checkpoint with no head is tied whatever its config says.
    src, hf = hf_llama(tmp_path / "hf", True)
    weights_file = src / "model.safetensors"
    state = load_file(str(weights_file))
    emb = state["model.embed_tokens.weight"]
    if head == "absent, config untied":
        config = json.loads((src / "config.json").read_text())
        (src / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": False}))
    else:
        state["lm_head.weight"] = emb.clone() if head == "equal" else emb + 1
        save_file(state, str(weights_file), metadata={"format": "pt"})
    if head == "different":
        with pytest.raises(UserError, match="lm_head.weight differs from embed_tokens.weight") as e:
            load_checkpoint(src)
        assert "\n" not in str(e.value)
        return
    cfg, ours, _ = load_checkpoint(src)
    assert cfg.tie_embeddings and "output.weight" not in ours
    assert max_diff(load_model(src), hf, torch.randint(0, VOCAB, (1, 64))) <= 1e-4


def test_gguf_of_a_tied_model_has_no_output_tensor(tmp_path):
    gguf = pytest.importorskip("gguf")
    from llama_pretrain.interop.gguf import save_gguf
    from llama_pretrain.tokenizer import train_tokenizer

    text = [f"line {i} says {'yes' if i % 3 else 'no'} to the tied head." for i in range(200)]
    tok = train_tokenizer(text, tmp_path / "tok.model", vocab_size=320, progress=False)
    cfg = ModelConfig.from_preset("llama2-debug", vocab_size=320, tie_embeddings=True)
    model = Transformer(cfg)
    save_gguf(model.state_dict(), cfg, tmp_path / "m.gguf", tok)
    names = {t.name for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}
    assert "token_embd.weight" in names and "output.weight" not in names  # llama.cpp's convention
    assert len(names) == 2 + 9 * cfg.n_layers


def test_tied_matrix_gets_one_gradient_the_sum_of_both_uses():
    cfg = ModelConfig.from_preset("llama2-debug", tie_embeddings=True)
    torch.manual_seed(0)
    tied = Transformer(cfg)
    untied = Transformer(ModelConfig.from_preset("llama2-debug"))
    untied.load_state_dict({**tied.state_dict(), "output.weight": tied.tok_embeddings.weight.detach().clone()})
    assert len(list(tied.parameters())) == len(list(untied.parameters())) - 1
    tokens = torch.randint(0, cfg.vocab_size, (2, 33))
    for fused in ("head", False):  # the output head fused with the loss, and the plain logits path
        for m in (tied, untied):
            m.zero_grad()
            m(tokens[:, :-1], tokens[:, 1:], chunked_loss=fused).backward()
        want = untied.tok_embeddings.weight.grad + untied.output.weight.grad
        torch.testing.assert_close(tied.tok_embeddings.weight.grad, want, rtol=1e-5, atol=1e-7)
    # Counted once (the FLOPs still count the head's matmul).
    counts = param_counts(cfg)
    assert counts.total == tied.num_params() == param_counts(untied.config).total - cfg.vocab_size * cfg.dim
    assert flops_per_token(cfg) == flops_per_token(untied.config)
    # Weight decay: the shared matrix is the head's, decayed, and in one group once.
    decay, no_decay = param_groups(tied, 0.1)
    assert sum(p is tied.tok_embeddings.weight for p in decay["params"]) == 1
    assert not any(p is tied.tok_embeddings.weight for p in no_decay["params"])


TIED = ["--model.tie_embeddings=true"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("tdata") / "data", vocab_size=VOCAB)


@pytest.fixture(scope="module")
def tied_reference(data, tmp_path_factory) -> Path:
    """One process, a tied llama2-debug, 6 steps (a checkpoint every 2)."""
    run = tmp_path_factory.mktemp("tref") / "run"
    train(0, data, run, "--training.max_steps=6", *TIED)
    return run


def test_tied_run_resumes_exactly(data, tied_reference, tmp_path):
    run = tmp_path / "run"
    train(0, data, run, "--training.max_steps=4", *TIED)
    ckpt = run / "checkpoints" / "step-0000004"
    from torch.distributed.checkpoint import FileSystemReader
    keys = FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
    assert "model.tok_embeddings.weight" in keys and "model.output.weight" not in keys  # saved once
    train(0, data, run, "--training.max_steps=6", *TIED)
    assert losses(run) == losses(tied_reference)  # bit-identical, steps 5 and 6 after the resume
    a, b = weights(run), weights(tied_reference)
    assert "output.weight" not in a and all(torch.equal(a[k], b[k]) for k in b)


@pytest.mark.parametrize("layout", [["--parallel.mode=fsdp"], ["--parallel.mode=fsdp", "--parallel.tp=2"]],
                         ids=["fsdp2", "tp2"])
def test_tied_training_on_two_ranks_equals_one_process(layout, data, tied_reference, tmp_path):
    run = tmp_path / "run"
    train(2, data, run, "--training.max_steps=6", *TIED, *layout)
    assert_same_run(tied_reference, run, atol=1e-5)


def test_init_from_a_tied_hf_dir_builds_a_tied_model(tmp_path):
    from llama_pretrain.train.init_from import load_weights, resolve_architecture

    src, hf = hf_llama(tmp_path / "hf", True)
    cfg = resolve_architecture(str(src), {})
    assert cfg.tie_embeddings
    with pytest.raises(UserError, match="model.tie_embeddings gives tie_embeddings=False"):
        resolve_architecture(str(src), {"tie_embeddings": False})
    model = Transformer(cfg)
    assert load_weights(model, str(src), cfg) == "hf"
    assert model.output.weight is model.tok_embeddings.weight
    assert max_diff(model.eval(), hf, torch.randint(0, VOCAB, (1, 64))) <= 1e-4


# -- RoPE as the config says -------------------------------------------------------------------
# Llama 3.1's scaling with a small original context (64), so that at head_dim 16 and theta 10,000
# the frequencies fall in all three bands: kept (wavelength 6.3 < 64/4), blended (19.9 and 62.8)
# and stretched by the factor (199 and up); the sequences run past the original context.
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64, "rope_theta": 10000.0}


def llama_cpp_rope_factors(head_dim: int, theta: float, rope: dict) -> list[float]:
    """What llama.cpp's converter writes as rope_freqs for a llama3 config, in float64."""
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    context = rope["original_max_position_embeddings"]
    out = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * theta ** (i / head_dim)
        if wavelen < context / high:
            out.append(1.0)
        elif wavelen > context / low:
            out.append(factor)
        else:
            smooth = (context / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return out


@pytest.mark.parametrize("key", ["rope_parameters", "rope_scaling"])
def test_llama3_rope_scaling_equals_transformers_past_the_original_context(key, tmp_path):
    # transformers 5 writes rope_parameters; Llama 3.1's own config.json (older transformers) has
    # rope_scaling and a top-level rope_theta.
    src, hf = hf_llama(tmp_path / "hf", True, max_position_embeddings=131072, rope_parameters=dict(LLAMA3))
    if key == "rope_scaling":
        config = json.loads((src / "config.json").read_text())
        config["rope_scaling"] = {k: v for k, v in config.pop("rope_parameters").items() if k != "rope_theta"}
        (src / "config.json").write_text(json.dumps({**config, "rope_theta": 10000.0}))
        hf = transformers.LlamaForCausalLM.from_pretrained(src).eval()
    cfg = load_checkpoint(src)[0]
    assert (cfg.rope_scaling, cfg.rope_factor, cfg.rope_original_max_seq_len, cfg.max_seq_len) == \
        ("llama3", 8.0, 64, 131072)
    ours = load_model(src)
    assert max_diff(ours, hf, torch.randint(0, VOCAB, (2, 300))) <= 1e-4
    assert ours.rope_cos.shape[0] <= 4096  # a 131072-position context allocates no table that long

    factors = llama_cpp_rope_factors(16, 10000.0, LLAMA3)
    assert 1.0 in factors and 8.0 in factors and any(1 < f < 8 for f in factors)
    # Export: transformers reads the scaling back; GGUF carries it as llama.cpp's rope_freqs.
    save_native(load_checkpoint(src)[1], cfg, tmp_path / "ours")
    save_hf(load_checkpoint(tmp_path / "ours")[1], load_checkpoint(tmp_path / "ours")[0], tmp_path / "back")
    back = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "back").eval()
    tokens = torch.randint(0, VOCAB, (1, 200))
    with torch.no_grad():
        assert torch.equal(back(tokens).logits, hf(tokens).logits)
    from llama_pretrain.interop.gguf import rope_freqs
    assert rope_freqs(cfg)["rope_freqs.weight"].tolist() == pytest.approx(factors, rel=1e-6)


@pytest.mark.parametrize("rope", [{"rope_type": "yarn", "factor": 4.0}, {"type": "linear", "factor": 2.0},
                                  {"rope_type": "dynamic", "factor": 2.0}])
def test_other_rope_types_are_refused_in_one_line(rope, tmp_path):
    src, _ = hf_llama(tmp_path / "hf", False)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "rope_scaling": rope}))
    r = subprocess.run([sys.executable, "-m", "llama_pretrain", "import-hf", str(src), "--out", str(tmp_path / "o")],
                       capture_output=True, text=True)
    kind = rope.get("rope_type", rope.get("type"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert f"RoPE scaling {kind!r} is not supported" in r.stderr and not (tmp_path / "o").exists()


def test_meta_params_with_scaled_rope_are_refused_not_guessed(tmp_path):
    from llama_pretrain.interop.config_files import model_config_from_file
    from llama_pretrain.interop.meta import save_meta

    cfg = ModelConfig.from_preset("llama2-debug")
    save_meta(Transformer(cfg).state_dict(), cfg, tmp_path / "meta")
    params = json.loads((tmp_path / "meta" / "params.json").read_text())
    (tmp_path / "meta" / "params.json").write_text(json.dumps({**params, "use_scaled_rope": True}))
    for read in (load_checkpoint, lambda p: model_config_from_file(p / "params.json")):
        with pytest.raises(UserError, match="use_scaled_rope is set") as e:
            read(tmp_path / "meta")
        assert "\n" not in str(e.value)


# -- checkpoints as people ship them -----------------------------------------------------------
@pytest.fixture(scope="module")
def shipped(tmp_path_factory) -> Path:
    """A tied Llama 3.1-style dir as released: bf16 weights in several safetensors shards with
    model.safetensors.index.json, a 131072-position context, several EOS ids."""
    out = tmp_path_factory.mktemp("shipped") / "hf"
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=VOCAB, max_position_embeddings=131072, rope_parameters=dict(LLAMA3), tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=[2, 7])
    model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out, max_shard_size="40KB")
    return out


def test_a_sharded_bf16_long_context_dir_imports_as_shipped(shipped, tmp_path):
    shards = sorted(shipped.glob("model-*.safetensors"))
    assert len(shards) > 1 and (shipped / "model.safetensors.index.json").is_file()
    assert not (shipped / "model.safetensors").exists()
    cfg, state, _ = load_checkpoint(shipped)
    assert cfg.tie_embeddings and cfg.rope_scaling == "llama3" and cfg.max_seq_len == 131072
    assert {t.dtype for t in state.values()} == {torch.bfloat16}  # the checkpoint's dtype, kept

    # A model runs in fp32 (the bf16 values exactly), as transformers' fp32 load of the dir.
    ours = load_model(shipped)
    assert ours.tok_embeddings.weight.dtype == torch.float32
    assert torch.equal(ours.tok_embeddings.weight, state["tok_embeddings.weight"].float())
    hf = transformers.LlamaForCausalLM.from_pretrained(shipped, dtype=torch.float32).eval()
    assert max_diff(ours, hf, torch.randint(0, VOCAB, (2, 300))) <= 1e-4

    # import-hf keeps bf16; export-hf gives back every tensor of the shards, bit for bit, in one file.
    save_native(state, cfg, tmp_path / "ours")
    assert {t.dtype for t in load_file(str(tmp_path / "ours" / "model.safetensors")).values()} == {torch.bfloat16}
    save_hf(*load_checkpoint(tmp_path / "ours")[1::-1], tmp_path / "back")
    original = {k: v for f in shards for k, v in load_file(str(f)).items()}
    back = load_file(str(tmp_path / "back" / "model.safetensors"))
    assert set(back) == set(original) and all(torch.equal(back[k], original[k]) for k in original)
    assert json.loads((tmp_path / "back" / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_init_from_the_shipped_dir_trains_at_a_short_seq_len(shipped, data, tmp_path):
    from llama_pretrain.train.config import load_run_config
    from llama_pretrain.train.loop import train as train_in_process

    run = tiny_run({"training.max_steps": 1, "training.global_batch_tokens": 64, "data.path": str(data),
                    "checkpoint.init_from": str(shipped)}, drop=["model.preset"])
    cfg = load_run_config(None, as_overrides(run))
    assert cfg.seq_len == 32 and cfg.model_config().max_seq_len == 131072
    train_in_process(cfg, tmp_path / "run")
    batch = next(TokenLoader(data, "train", 2, 32, 0, 0, 1))  # what step 1 read
    hf = transformers.LlamaForCausalLM.from_pretrained(shipped, dtype=torch.float32).eval()
    with torch.no_grad():
        want = F.cross_entropy(hf(input_ids=batch[:, :-1]).logits.flatten(0, 1), batch[:, 1:].flatten()).item()
    assert read_metrics(tmp_path / "run")[0]["loss"] == pytest.approx(want, rel=1e-4)
    final = load_model(tmp_path / "run" / "final")
    assert final.config.tie_embeddings and final.config.rope_scaling == "llama3"


def test_generation_stops_at_any_of_several_eos_ids(shipped):
    # generation_config.json may name several (Llama 3: <|end_of_text|>, <|eom_id|>, <|eot_id|>).
    model = load_model(shipped)
    prompt = [1, 5, 9]
    free = generate_ids(model, prompt, max_new_tokens=12)
    assert len(free) == 12
    first_seen: dict[int, int] = {}
    for i, t in enumerate(free):
        first_seen.setdefault(t, i)
    (a, i), (b, j) = list(first_seen.items())[:2]  # two ids the text reaches, a first
    assert generate_ids(model, prompt, max_new_tokens=12, eos_id=[b, a]) == free[:i]
    assert generate_ids(model, prompt, max_new_tokens=12, eos_id=[b]) == free[:j]
