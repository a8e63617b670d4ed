"""The architecture against transformers' Llama and RoPE against Meta's formula, the presets against
the paper, the loss, and the inference path (per-row positions, padding mask, KV cache)."""

import pytest
import torch
import torch.nn.functional as F

from llama_pretrain import ModelConfig, Transformer, UserError
from llama_pretrain.compute.flops import flops_per_token, param_counts
from llama_pretrain.interop.hf import hf_config_dict, to_hf_state_dict
from llama_pretrain.losses import chunked_cross_entropy, cross_entropy
from llama_pretrain.model import apply_rope

transformers = pytest.importorskip("transformers")

PAPER_COUNTS = {
    "llama2-7b": 6_738_415_616,
    "llama2-13b": 13_015_864_320,
    "llama2-34b": 33_743_970_304,
    "llama2-70b": 68_976_648_192,
    "llama1-65b": 65_285_660_672,
}


@pytest.mark.parametrize("name,count", PAPER_COUNTS.items())
def test_paper_parameter_counts(name, count):
    cfg = ModelConfig.from_preset(name)
    assert param_counts(cfg).total == count
    # The arithmetic agrees with a real (meta-device, unallocated) module.
    with torch.device("meta"):
        model = Transformer(cfg)
    assert model.num_params() == count


def test_preset_shapes_follow_table1():
    assert ModelConfig.from_preset("llama2-70b").hidden_dim == 28672
    assert ModelConfig.from_preset("llama2-34b").hidden_dim == 22016
    assert ModelConfig.from_preset("llama2-13b").hidden_dim == 13824
    for name in ("llama2-7b", "llama2-13b", "llama2-34b", "llama2-70b"):
        assert ModelConfig.from_preset(name).max_seq_len == 4096
    for name in ("llama1-7b", "llama1-13b", "llama1-33b", "llama1-65b"):
        cfg = ModelConfig.from_preset(name)
        assert cfg.max_seq_len == 2048 and cfg.kv_heads == cfg.n_heads
    assert ModelConfig.from_preset("llama2-34b").kv_heads == 8
    assert ModelConfig.from_preset("llama2-70b").kv_heads == 8
    assert ModelConfig.from_preset("llama2-7b").peak_lr == 3.0e-4
    assert ModelConfig.from_preset("llama2-70b").peak_lr == 1.5e-4
    assert ModelConfig.from_preset("llama1-33b").peak_lr == 1.5e-4


def test_flops_per_token_formula():
    cfg = ModelConfig.from_preset("llama2-7b")
    n = param_counts(cfg).non_embedding
    assert n == 6_738_415_616 - 32000 * 4096
    assert flops_per_token(cfg) == 6 * n + 12 * 32 * 32 * 128 * 4096


@pytest.mark.parametrize("fields,message", [
    (dict(dim=100, n_heads=3), "model.dim (100) must be divisible by model.n_heads (3)"),
    (dict(dim=64, n_heads=4, n_kv_heads=3), "model.n_heads (4) must be divisible by model.n_kv_heads (3)"),
    (dict(dim=36, n_heads=4), "even"),
    (dict(n_layers=0), "model.n_layers must be positive"),
    (dict(vocab_size=-5), "model.vocab_size must be positive"),
    (dict(norm_eps=0), "model.norm_eps"),
    (dict(dim=64.0), "model.dim must be an integer"),
])
def test_config_validation_names_the_field(fields, message):
    with pytest.raises(UserError) as e:
        ModelConfig(**fields)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_unknown_preset_lists_known():
    with pytest.raises(UserError, match="llama2-7b"):
        ModelConfig.from_preset("llama3-8b")


def _hf_twin(model: Transformer):
    cfg = model.config
    hf_cfg = transformers.LlamaConfig(**{k: v for k, v in hf_config_dict(cfg).items() if k != "torch_dtype"})
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    hf.load_state_dict(to_hf_state_dict(model.state_dict(), cfg))
    return hf


@pytest.mark.parametrize("fields", [
    dict(dim=64, n_layers=2, n_heads=4),                     # no GQA
    dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2),       # GQA 2 groups
    dict(dim=96, n_layers=3, n_heads=6, n_kv_heads=1),       # multi-query
    dict(dim=64, n_layers=2, n_heads=2, n_kv_heads=2, ffn_dim_multiplier=1.3, multiple_of=64,
         rope_theta=500000.0),
])
def test_logits_match_transformers(fields):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=257, max_seq_len=1024, multiple_of=fields.pop("multiple_of", 32), **fields)
    model = Transformer(cfg).eval()
    hf = _hf_twin(model)
    tokens = torch.randint(0, cfg.vocab_size, (2, 600))
    with torch.no_grad():
        ours = model(tokens)
        theirs = hf(tokens).logits
    assert ours.shape == (2, 600, cfg.vocab_size)
    assert (ours - theirs).abs().max().item() <= 1e-4
    # The loss path equals transformers' own causal-LM loss (shifted labels).
    with torch.no_grad():
        loss = model(tokens[:, :-1], tokens[:, 1:])
        hf_loss = hf(tokens, labels=tokens).loss
    assert abs(loss.item() - hf_loss.item()) < 1e-5


def test_per_row_positions_match_transformers():
    """Gapped positions, different per row: a constant shift per row would not show (RoPE is relative)."""
    torch.manual_seed(0)
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=257, multiple_of=32,
                      max_seq_len=1024)
    model = Transformer(cfg).eval()
    hf = _hf_twin(model)
    tokens = torch.randint(0, cfg.vocab_size, (2, 50))
    positions = torch.stack([torch.randperm(1024)[:50].sort().values for _ in range(2)])
    with torch.no_grad():
        ours = model(tokens, positions=positions)
        theirs = hf(tokens, position_ids=positions).logits
    assert (ours - theirs).abs().max().item() <= 1e-4


def _meta_rope(x, positions, theta):
    """Meta's reference (llama/model.py, apply_rotary_emb): each pair (x[2i], x[2i+1]) is a complex
    number, rotated by position * theta^(-2i/d)."""
    d = x.shape[-1]
    freqs = 1.0 / (theta ** (torch.arange(0, d, 2)[: d // 2].float() / d))
    angles = positions[..., None].float() * freqs  # [B, T, d/2]
    rotation = torch.polar(torch.ones_like(angles), angles)[:, :, None, :]  # broadcast over heads
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(pairs * rotation).flatten(3)


@pytest.mark.parametrize("theta", [10000.0, 500000.0])
def test_rope_is_metas_complex_rotation(theta):
    """Pins Meta's interleaved convention on its own: the comparison with transformers passes
    through the q/k permutation, which a half-split RoPE with no permutation would also pass."""
    torch.manual_seed(0)
    cfg = ModelConfig(dim=96, n_layers=1, n_heads=6, vocab_size=11, multiple_of=8, max_seq_len=512,
                      rope_theta=theta)
    model = Transformer(cfg)
    B, T, H = 3, 9, 4
    x = torch.randn(B, T, H, cfg.head_dim)
    start = torch.arange(T)
    positions = torch.stack([start, start + 37, torch.randperm(500)[:T].sort().values])  # per-row offsets
    per_row = apply_rope(x, model.rope_cos[positions], model.rope_sin[positions])
    assert torch.allclose(per_row, _meta_rope(x, positions, theta), atol=1e-5)
    shared = apply_rope(x, model.rope_cos[:T], model.rope_sin[:T])  # the training path's tables
    assert torch.allclose(shared, _meta_rope(x, start.expand(B, T), theta), atol=1e-5)


def test_training_path_is_causal_sdpa_without_a_mask(monkeypatch):
    calls = []
    sdpa = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append((kwargs.get("attn_mask"), kwargs.get("is_causal")))
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    model = Transformer(ModelConfig.from_preset("llama2-debug"))
    x = torch.randint(0, 512, (2, 16))
    model(x)
    model(x[:, :-1], x[:, 1:])
    assert len(calls) == 4 and all(mask is None and causal for mask, causal in calls)


@pytest.fixture(scope="module")
def gqa_model():
    torch.manual_seed(0)
    return Transformer(ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97,
                                   multiple_of=32, max_seq_len=64)).eval()


def _left_pad(rows: list[torch.Tensor], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(r) for r in rows)
    tokens = torch.full((len(rows), T), pad_id)
    mask = torch.zeros((len(rows), T), dtype=torch.bool)
    for i, r in enumerate(rows):
        tokens[i, T - len(r):] = r
        mask[i, T - len(r):] = True
    return tokens, mask


def _positions(mask: torch.Tensor, new: int) -> torch.Tensor:
    return (mask.long().cumsum(-1) - 1).clamp(min=0)[:, -new:]


@torch.no_grad()
def test_left_padded_batch_equals_each_row_alone(gqa_model):
    torch.manual_seed(1)
    rows = [torch.randint(1, 97, (n,)) for n in (12, 5, 9)]
    tokens, mask = _left_pad(rows)
    batch = gqa_model(tokens, positions=_positions(mask, tokens.shape[1]), mask=mask)
    assert batch.isfinite().all()  # pad queries too
    for i, r in enumerate(rows):
        assert torch.allclose(batch[i, -len(r):], gqa_model(r[None])[0], atol=1e-5)


@torch.no_grad()
def test_kv_cache_decode_of_padded_batch_equals_full_recompute(gqa_model):
    """Prefill, a 3-token extension and single steps (the harness's and generate's calls)."""
    torch.manual_seed(2)
    rows = [torch.randint(1, 97, (n,)) for n in (7, 3, 10)]
    more = torch.randint(1, 97, (3, 6))
    tokens, mask = _left_pad(rows)
    cache = gqa_model.new_cache(3)
    logits = [gqa_model(tokens, positions=_positions(mask, tokens.shape[1]), mask=mask, cache=cache,
                        last_only=True)]
    for chunk in (more[:, :3], more[:, 3:4], more[:, 4:5], more[:, 5:6]):
        mask = torch.cat([mask, torch.ones_like(chunk, dtype=torch.bool)], dim=1)
        T = chunk.shape[1]
        logits.append(gqa_model(chunk, positions=_positions(mask, T), mask=mask, cache=cache))
    logits = torch.cat(logits, dim=1)
    assert cache.length == tokens.shape[1] + 6
    for i, r in enumerate(rows):
        full = gqa_model(torch.cat([r, more[i]])[None])[0, len(r) - 1:]
        assert torch.allclose(logits[i], full, atol=1e-5)


def test_loss_ignores_minus_100_and_matches_reference():
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("llama2-debug"))
    x = torch.randint(0, 512, (2, 16))
    y = torch.randint(0, 512, (2, 16))
    y[0, :5] = -100
    logits = model(x)
    ref = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100)
    assert torch.allclose(model(x, y), ref, atol=1e-6)


def test_bf16_loss_path_keeps_no_fp32_logits_and_is_exact():
    torch.manual_seed(0)
    logits = (torch.randn(300, 1000) * 3).to(torch.bfloat16).requires_grad_()
    targets = torch.randint(0, 1000, (300,))
    targets[::5] = -100
    ours = cross_entropy(logits, targets)
    ref_logits = logits.detach().float().requires_grad_()
    ref = F.cross_entropy(ref_logits, targets)
    assert abs(ours.item() - ref.item()) < 1e-5
    ours.backward()
    ref.backward()
    assert logits.grad.dtype == torch.bfloat16
    # Equal to the fp32 reference up to bf16 rounding of each gradient element.
    assert torch.allclose(logits.grad.float(), ref_logits.grad, rtol=1e-2, atol=1e-7)
    # Saved for backward: the bf16 logits themselves, never an fp32 [N, V] copy.
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        cross_entropy(logits, targets)
    big_fp32 = [t for t in saved if t.dtype == torch.float32 and t.numel() >= logits.numel()]
    assert not big_fp32


def test_custom_cross_entropy_gradcheck():
    x = torch.randn(5, 11, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([1, 2, -100, 4, 0])
    assert torch.autograd.gradcheck(lambda z: chunked_cross_entropy(z, t, chunk_rows=2), (x,))


def test_gradients_match_numerical_differences():
    torch.manual_seed(0)
    cfg = ModelConfig(dim=16, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=11, multiple_of=8, max_seq_len=8)
    model = Transformer(cfg).double()
    model.init_rope()
    x = torch.randint(0, 11, (1, 6))
    y = torch.randint(0, 11, (1, 6))
    params = [p for p in model.parameters()]

    def f(*ps):
        return torch.func.functional_call(model, {n: p for (n, _), p in zip(model.named_parameters(), ps)}, (x, y))

    inputs = tuple(p.detach().clone().requires_grad_() for p in params)
    assert torch.autograd.gradcheck(f, inputs, atol=1e-6, fast_mode=True)


def test_meta_parameter_names():
    model = Transformer(ModelConfig.from_preset("llama2-debug"))
    names = set(model.state_dict())
    for n in ("tok_embeddings.weight", "norm.weight", "output.weight", "layers.0.attention.wq.weight",
              "layers.1.attention.wk.weight", "layers.1.attention.wv.weight", "layers.1.attention.wo.weight",
              "layers.0.feed_forward.w1.weight", "layers.0.feed_forward.w2.weight",
              "layers.0.feed_forward.w3.weight", "layers.0.attention_norm.weight", "layers.0.ffn_norm.weight"):
        assert n in names
    assert model.output.weight.data_ptr() != model.tok_embeddings.weight.data_ptr()  # untied


def test_initialisation_is_documented_scheme():
    torch.manual_seed(0)
    cfg = ModelConfig(dim=256, n_layers=8, n_heads=4, vocab_size=4096, multiple_of=32, max_seq_len=64)
    model = Transformer(cfg)
    assert abs(model.layers["0"].attention.wq.weight.std().item() - 0.02) < 0.002
    assert abs(model.layers["3"].attention.wo.weight.std().item() - 0.02 / 4) < 0.0005
    assert abs(model.layers["3"].feed_forward.w2.weight.std().item() - 0.02 / 4) < 0.0005
    assert torch.equal(model.norm.weight, torch.ones(256))
    # Same seed, same weights.
    torch.manual_seed(0)
    again = Transformer(cfg)
    assert torch.equal(again.output.weight, model.output.weight)
