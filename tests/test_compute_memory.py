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


def _saved_activation_bytes(model, tokens, **kw) -> int:
    """Unique storages autograd saves for backward, less parameters and buffers."""
    skip = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        if t.is_floating_point() and storage.data_ptr() not in skip:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(tokens, tokens, **kw)
    del loss
    return sum(seen.values())


@pytest.mark.parametrize("dtype, name", [(torch.float32, "fp32"), (torch.bfloat16, "bf16")])
@pytest.mark.parametrize("batch, seq", [(2, 64), (3, 128)])
@pytest.mark.parametrize("chunked_loss, fused", [("head", True), (True, False)])  # head fused / logits
def test_activation_formula_matches_saved_tensors(dtype, name, batch, seq, chunked_loss, fused):
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("llama2-debug", n_layers=3)
    model = Transformer(cfg).to(dtype)
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq))
    measured = _saved_activation_bytes(model, tokens, chunked_loss=chunked_loss)
    est = training_memory(cfg, seq, batch, 1, param_dtype=name, compute_dtype=name,
                          fused_loss=fused)["activations"]
    assert measured == pytest.approx(est, rel=0.01)


def test_activation_checkpointing_smaller_and_scales_with_tokens():
    cfg = ModelConfig.from_preset("llama2-7b")
    a = training_memory(cfg, 4096, 1, 8)
    b = training_memory(cfg, 4096, 2, 8)
    # per token, but for the head's gradient (bf16), which the fused loss makes in the forward
    head_grad = cfg.vocab_size * cfg.dim * 2
    assert b["activations_no_checkpointing"] - head_grad == 2 * (a["activations_no_checkpointing"] - head_grad)
    a0, b0 = (training_memory(cfg, 4096, mb, 8, fused_loss=False) for mb in (1, 2))
    assert b0["activations_no_checkpointing"] == 2 * a0["activations_no_checkpointing"]
    # the logits (bf16, 32000 per token) and their logsumexp against the fused head's gradient
    assert a0["activations"] - a["activations"] == (2 * cfg.vocab_size + 4) * 4096 - head_grad
    c = training_memory(cfg, 4096, 1, 8, activation_checkpointing=True)
    assert c["activations"] < a["activations"] / 5
    assert c["total"] < a["total"]


@pytest.mark.parametrize("chunked_loss, fused", [("head", True), (True, False)])  # head fused / logits
def test_activation_formula_under_cpu_autocast(chunked_loss, fused):
    # fp32 weights, bf16 autocast: fp32 residual stream, per-matmul input casts, cached bf16 weights.
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("llama2-debug", n_layers=3)
    model = Transformer(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (2, 64))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        measured = _saved_activation_bytes(model, tokens, chunked_loss=chunked_loss)
    est = training_memory(cfg, 64, 2, 1, param_dtype="fp32", compute_dtype="bf16", autocast=True,
                          fused_loss=fused)
    assert measured == pytest.approx(est["activations"], rel=0.01)
    assert est["peak"] > est["weights"] + est["optimizer"] + est["activations"]


def test_checkpointing_modes_order_and_booleans():
    from llama_pretrain.compute.memory import checkpoint_mode, selective_block_bytes_per_token

    cfg = ModelConfig.from_preset("llama2-7b")
    est = {m: training_memory(cfg, 4096, 1, 8, activation_checkpointing=m) for m in ("none", "full", "selective")}
    assert est["full"]["activations"] < est["selective"]["activations"] < est["none"]["activations"]
    assert training_memory(cfg, 4096, 1, 8, activation_checkpointing=True)["activations"] == est["full"]["activations"]
    assert training_memory(cfg, 4096, 1, 8, activation_checkpointing=False)["activations"] == est["none"]["activations"]
    assert est["selective"]["checkpointing_mode"] == "selective" and not est["none"]["activation_checkpointing"]
    # Selective keeps exactly the matmul and attention outputs: fp32, llama2-7b (MHA, d 4096, f 11008, 32 heads).
    assert selective_block_bytes_per_token(cfg, 4, 4) == 4 * (4096 + 3 * 4096 + 4096 + 4096 + 2 * 11008 + 4096) + 4 * 32
    with pytest.raises(ValueError, match="none, full, selective"):
        checkpoint_mode("sometimes")
