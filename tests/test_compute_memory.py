"""Memory estimate against a real Transformer: exact model-state bytes, saved-activation bytes."""

import pytest
import torch

from llama_pretrain.compute.memory import training_memory
from llama_pretrain.config import ModelConfig
from llama_pretrain.model import Transformer


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize("dtype, name", [(torch.float32, "fp32"), (torch.bfloat16, "bf16")])
def test_model_state_bytes_exact_after_one_adamw_step(dtype, name):
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("llama2-debug")
    model = Transformer(cfg).to(dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tokens = torch.randint(0, cfg.vocab_size, (2, 32))
    model(tokens, tokens).backward()
    opt.step()
    measured = {
        "weights": _nbytes(model.parameters()),
        "gradients": _nbytes(p.grad for p in model.parameters()),
        "optimizer": _nbytes(t for s in opt.state.values() for t in s.values() if torch.is_tensor(t)),
    }
    est = training_memory(cfg, 32, 2, 1, param_dtype=name, compute_dtype=name)
    assert {k: est[k] for k in measured} == measured


def test_sharding_divides_model_state():
    cfg = ModelConfig.from_preset("llama2-7b")
    one = training_memory(cfg, 4096, 1, 1, param_dtype="fp32", compute_dtype="fp32")
    many = training_memory(cfg, 4096, 1, 64, param_dtype="fp32", compute_dtype="fp32")
    assert many["weights"] == one["weights"] // 64
    assert many["activations"] == one["activations"]
    mixed = training_memory(cfg, 4096, 1, 64)  # fp32 master, bf16 compute: + gathered bf16 blocks
    assert mixed["weights"] > many["weights"]


def _saved_activation_bytes(model, tokens) -> int:
    """Unique storages autograd saves for backward, less parameters and buffers."""
    skip = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        if t.is_floating_point() and storage.data_ptr() not in skip:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(tokens, tokens)
    del loss
    return sum(seen.values())


@pytest.mark.parametrize("dtype, name", [(torch.float32, "fp32"), (torch.bfloat16, "bf16")])
@pytest.mark.parametrize("batch, seq", [(2, 64), (3, 128)])
def test_activation_formula_matches_saved_tensors(dtype, name, batch, seq):
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("llama2-debug", n_layers=3)
    model = Transformer(cfg).to(dtype)
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq))
    measured = _saved_activation_bytes(model, tokens)
    est = training_memory(cfg, seq, batch, 1, param_dtype=name, compute_dtype=name)["activations"]
    assert measured == pytest.approx(est, rel=0.01)


def test_activation_checkpointing_smaller_and_scales_with_tokens():
    cfg = ModelConfig.from_preset("llama2-7b")
    a = training_memory(cfg, 4096, 1, 8)
    b = training_memory(cfg, 4096, 2, 8)
    assert b["activations_no_checkpointing"] == 2 * a["activations_no_checkpointing"]
    c = training_memory(cfg, 4096, 1, 8, activation_checkpointing=True)
    assert c["activations"] < a["activations"] / 5
    assert c["total"] < a["total"]


def test_activation_formula_under_cpu_autocast():
    # fp32 weights, bf16 autocast: fp32 residual stream, per-matmul input casts, cached bf16 weights.
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("llama2-debug", n_layers=3)
    model = Transformer(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (2, 64))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        measured = _saved_activation_bytes(model, tokens)
    est = training_memory(cfg, 64, 2, 1, param_dtype="fp32", compute_dtype="bf16", autocast=True)
    assert measured == pytest.approx(est["activations"], rel=0.01)
    assert est["peak"] > est["weights"] + est["optimizer"] + est["activations"]
