"""The lean autograd pieces of model.py (RMSNorm, SwiGLU, RoPE) and selective checkpointing: the same
losses and gradients as transformers' Llama and as the plain-ops formulation they replaced."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llama_pretrain import ModelConfig, Transformer
from llama_pretrain import model as model_mod
from llama_pretrain.interop.hf import hf_config_dict, to_hf_state_dict
from llama_pretrain.model import _RMSNormFn, _SwiGLUFn, apply_rope, rms_norm_reference


def test_gradcheck_fp64():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: _RMSNormFn.apply(x, w, 1e-5), (x, w))
    a, b = (torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True) for _ in range(2))
    assert torch.autograd.gradcheck(_SwiGLUFn.apply, (a, b))
    q = torch.randn(2, 5, 3, 8, dtype=torch.float64, requires_grad=True)
    cos, sin = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda q: apply_rope(q, cos, sin), (q,))


# -- the formulation before this change, in plain ops (autograd saves what it likes) -------------
def _old_rope(x, cos, sin):
    xf = x.to(torch.promote_types(x.dtype, torch.float32)).unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2).type_as(x)


def _plain(monkeypatch):
    monkeypatch.setattr(model_mod.RMSNorm, "forward", lambda self, x: rms_norm_reference(x, self.weight, self.eps))
    monkeypatch.setattr(model_mod.FeedForward, "forward", lambda self, x: self.w2(F.silu(self.w1(x)) * self.w3(x)))
    monkeypatch.setattr(model_mod, "apply_rope", _old_rope)


def _loss_and_grads(model, tokens):
    model.zero_grad(set_to_none=True)
    loss = model(tokens[:, :-1], tokens[:, 1:])
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


CFG = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=257, multiple_of=32, max_seq_len=128)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.bfloat16, 2e-2)])
def test_same_loss_and_gradients_as_plain_ops(monkeypatch, dtype, tol):
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**CFG)).to(dtype)
    tokens = torch.randint(0, 257, (2, 65))
    loss, grads = _loss_and_grads(model, tokens)
    with monkeypatch.context() as m:
        _plain(m)
        ref_loss, ref_grads = _loss_and_grads(model, tokens)
    assert abs(loss.float().item() - ref_loss.float().item()) <= tol * 10
    for name, g in grads.items():
        r = ref_grads[name].float()
        assert (g.float() - r).abs().max().item() <= tol * (1 + r.abs().max().item()), name


def test_default_loss_path_fuses_the_head_except_low_precision_on_cpu():
    # fp32 (any device): the fused head keeps no logits; bf16 on CPU (weights or autocast): the
    # chunked loss over the logits, which is faster there (BENCHMARKS.md, memory).
    torch.manual_seed(0)
    tokens = torch.randint(0, 257, (2, 33))
    for dtype, autocast in [(torch.float32, False), (torch.bfloat16, False), (torch.float32, True)]:
        model = Transformer(ModelConfig(**CFG)).to(dtype)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            _, shapes = _saved_shapes(model, tokens[:, :-1], tokens[:, 1:])
        keeps_logits = (64, 257) in shapes
        assert keeps_logits == (dtype == torch.bfloat16 or autocast), (dtype, autocast)


def test_loss_and_gradients_match_transformers():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = ModelConfig(**CFG)
    model = Transformer(cfg)
    hf_cfg = transformers.LlamaConfig(**{k: v for k, v in hf_config_dict(cfg).items() if k != "torch_dtype"})
    hf = transformers.LlamaForCausalLM(hf_cfg)
    hf.load_state_dict(to_hf_state_dict(model.state_dict(), cfg))
    tokens = torch.randint(0, cfg.vocab_size, (2, 65))
    loss, grads = _loss_and_grads(model, tokens)
    hf_loss = hf(tokens, labels=tokens).loss
    hf_loss.backward()
    assert abs(loss.item() - hf_loss.item()) <= 1e-6
    ours_as_hf = to_hf_state_dict(grads, cfg)  # gradients permute like the weights (a linear map)
    for name, p in hf.named_parameters():
        assert torch.allclose(ours_as_hf[name], p.grad, rtol=1e-4, atol=1e-6), name


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_checkpointing_keeps_loss_and_gradients(mode):
    from llama_pretrain.train.config import ParallelConfig
    from llama_pretrain.train.distributed import DistInfo
    from llama_pretrain.train.parallelize import apply_activation_checkpointing

    torch.manual_seed(0)
    model = Transformer(ModelConfig(**CFG))
    tokens = torch.randint(0, 257, (2, 65))
    loss, grads = _loss_and_grads(model, tokens)
    apply_activation_checkpointing(model, ParallelConfig(activation_checkpointing=mode), DistInfo())
    loss2, grads2 = _loss_and_grads(model, tokens)
    assert loss2.item() == loss.item()
    for name, g in grads.items():
        assert torch.allclose(grads2[name], g, rtol=0, atol=1e-7), name


def test_checkpointing_setting_accepts_modes_and_booleans():
    from llama_pretrain.errors import UserError
    from llama_pretrain.train.config import load_run_config

    for raw, want in [("true", True), ("false", False), ("selective", "selective"), ("full", "full"),
                      ("none", "none")]:
        cfg = load_run_config(overrides=[f"parallel.activation_checkpointing={raw}"])
        assert cfg.parallel.activation_checkpointing == want
    with pytest.raises(UserError, match="parallel.activation_checkpointing must be none, full or selective"):
        load_run_config(overrides=["parallel.activation_checkpointing=sometimes"])


# aot_eager traces the Functions as Inductor does (dynamo + AOTAutograd) without compiling C++.
@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compiled_block_equals_eager(backend):
    torch.manual_seed(0)
    cfg = ModelConfig(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=64, multiple_of=16, max_seq_len=16)
    block = model_mod.TransformerBlock(0, cfg)
    cos, sin = model_mod.rope_cos_sin(cfg.head_dim, 16, cfg.rope_theta)
    x = torch.randn(2, 16, 32, requires_grad=True)

    def run(fn):
        x.grad = None
        block.zero_grad(set_to_none=True)
        out = fn(x, cos, sin)
        out.square().sum().backward()
        return out.detach(), x.grad.clone(), [p.grad.clone() for p in block.parameters()]

    eager = run(block)
    compiled = run(torch.compile(block, backend=backend))  # RoPE takes its real-valued form there
    torch.testing.assert_close(compiled[0], eager[0])
    torch.testing.assert_close(compiled[1], eager[1])
    for a, b in zip(compiled[2], eager[2]):
        torch.testing.assert_close(a, b)


def test_rmsnorm_with_sequence_sharded_dtensor_takes_plain_ops():
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    mesh = init_device_mesh("cpu", (1,))
    torch.manual_seed(0)
    norm = model_mod.RMSNorm(16)
    with torch.no_grad():
        norm.weight.mul_(torch.rand(16) + 0.5)
    x = torch.randn(2, 6, 16)
    want = norm(x)
    norm.weight = torch.nn.Parameter(distribute_tensor(norm.weight.detach(), mesh, [Replicate()]))
    xd = distribute_tensor(x, mesh, [Shard(1)]).requires_grad_()
    out = norm(xd)
    assert isinstance(out, DTensor)
    torch.testing.assert_close(out.full_tensor(), want)
    out.sum().backward()
    assert xd.grad is not None and norm.weight.grad is not None


def test_fsdp2_bf16_mixed_precision_with_selective_checkpointing(monkeypatch):
    # One process, a gloo group of one: FSDP2 casts the parameters to bf16 for compute, so the
    # Functions see bf16 inputs and weights; the loss and gradients stay those of the plain ops.
    from llama_pretrain.train.config import ParallelConfig
    from llama_pretrain.train.distributed import DistInfo
    from llama_pretrain.train.parallelize import parallelize

    def run(plain):
        torch.manual_seed(0)
        model = Transformer(ModelConfig(**CFG))
        with monkeypatch.context() as m:
            if plain:
                _plain(m)
            model = parallelize(model, ParallelConfig(mode="fsdp", mixed_precision="bf16",
                                                      activation_checkpointing="none" if plain else "selective"),
                                DistInfo())
            loss = model(tokens[:, :-1], tokens[:, 1:])
            loss.backward()
        return loss.item(), {n: p.grad.full_tensor() for n, p in model.named_parameters()}

    tokens = torch.randint(0, 257, (2, 65), generator=torch.Generator().manual_seed(1))
    (loss, grads), (ref_loss, ref_grads) = run(False), run(True)
    assert loss == ref_loss  # same forward kernels (measured: the gradients are bit-identical too)
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-3, atol=1e-5, msg=name)


# -- the output head fused with the loss (losses.linear_cross_entropy) ----------------------------
def _head_case(n=50, d=16, v=97, dtype=torch.float32, ignored=(3, 17, 18, 49)):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(n, d, generator=g, dtype=dtype).requires_grad_()
    w = (torch.randn(v, d, generator=g, dtype=dtype) * 0.5).requires_grad_()
    t = torch.randint(0, v, (n,), generator=g)
    t[list(ignored)] = -100
    return h, w, t


def _grads(loss_fn, h, w, scale=1.0):
    h.grad = w.grad = None
    loss = loss_fn()
    (loss * scale).backward()
    return loss.detach(), h.grad.clone(), w.grad.clone()


def test_linear_cross_entropy_gradcheck_fp64():
    from llama_pretrain.losses import linear_cross_entropy

    h, w, t = _head_case(n=7, d=5, v=11, dtype=torch.float64, ignored=(2,))
    # chunks of 3 rows: two whole chunks and a partial one, an ignored row inside the first
    assert torch.autograd.gradcheck(lambda h, w: linear_cross_entropy(h, w, t, chunk_rows=3), (h, w))


# 200 rows in blocks of 150: on CPU the softmax runs in 64-row pieces inside each block
@pytest.mark.parametrize("n, chunk_rows", [(50, 8), (50, 64), (200, 150)])
def test_linear_cross_entropy_equals_unfused_fp32(n, chunk_rows):
    from llama_pretrain.losses import linear_cross_entropy

    h, w, t = _head_case(n=n)
    for scale in (1.0, 0.25):  # the incoming gradient (the trainer's 1 / accumulation steps)
        ref = _grads(lambda: F.cross_entropy(h @ w.T, t, ignore_index=-100), h, w, scale)
        got = _grads(lambda: linear_cross_entropy(h, w, t, chunk_rows=chunk_rows), h, w, scale)
        assert abs(got[0].item() - ref[0].item()) <= 1e-6 * abs(ref[0].item())  # a few fp32 ulps
        torch.testing.assert_close(got[1], ref[1], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(got[2], ref[2], rtol=1e-5, atol=1e-7)


def test_linear_cross_entropy_all_ignored_and_no_grad():
    from llama_pretrain.losses import chunked_cross_entropy, linear_cross_entropy

    h, w, t = _head_case(n=10, ignored=range(10))
    got = _grads(lambda: linear_cross_entropy(h, w, t, chunk_rows=4), h, w)
    ref = _grads(lambda: chunked_cross_entropy(h @ w.T, t), h, w)  # our unfused convention: 0, not NaN
    assert got[0].item() == ref[0].item() == 0.0
    assert F.cross_entropy(h @ w.T, t, reduction="sum").item() == 0.0
    assert not got[1].any() and not got[2].any() and not ref[2].any()
    h, w, t = _head_case()
    want = F.cross_entropy(h @ w.T, t).item()
    with torch.no_grad():  # validation: the loss alone, no graph
        loss = linear_cross_entropy(h, w, t, chunk_rows=8)
    assert not loss.requires_grad and abs(loss.item() - want) <= 1e-6
    loss = linear_cross_entropy(h.detach(), w.detach(), t, chunk_rows=8)
    assert not loss.requires_grad and abs(loss.item() - want) <= 1e-6


def test_linear_cross_entropy_graph_can_be_kept():
    from llama_pretrain.losses import linear_cross_entropy

    h, w, t = _head_case()
    loss = linear_cross_entropy(h, w, t, chunk_rows=8)
    first = torch.autograd.grad(loss, (h, w), retain_graph=True)
    second = torch.autograd.grad(loss * 2, (h, w))  # the saved gradients were not scaled in place
    for a, b in zip(first, second):
        torch.testing.assert_close(b, 2 * a, rtol=0, atol=0)


def test_linear_cross_entropy_bf16_autocast_close_to_unfused():
    from llama_pretrain.losses import chunked_cross_entropy, linear_cross_entropy

    h, w, t = _head_case(n=200, d=32, v=301)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = _grads(lambda: chunked_cross_entropy(F.linear(h, w), t), h, w)  # bf16 logits, fp32 loss
        got = _grads(lambda: linear_cross_entropy(h, w, t, chunk_rows=64), h, w)
    exact = _grads(lambda: F.cross_entropy(h @ w.T, t), h, w)
    assert got[1].dtype == got[2].dtype == torch.float32  # through the casts' backward
    assert got[0].item() == ref[0].item()  # the same bf16 logits, the same fp32 reduction
    torch.testing.assert_close(got[1], ref[1], rtol=0, atol=0)  # bf16 g @ W, as the unfused path
    for i in (1, 2):  # the weight's gradient sums chunks in fp32: at least as close to fp32's
        assert (got[i] - exact[i]).abs().max() <= 1.05 * (ref[i] - exact[i]).abs().max() + 1e-7
        torch.testing.assert_close(got[i], ref[i], rtol=2e-2, atol=2e-2 * ref[i].abs().max().item())


def _saved_shapes(model, inputs, targets, **kw):
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(inputs, targets, **kw)
    return loss, shapes


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.bfloat16, 2e-2)])
def test_model_loss_fused_head_same_as_logits_path(dtype, tol):
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**CFG)).to(dtype)
    tokens = torch.randint(0, 257, (2, 65))
    targets = tokens[:, 1:].clone()
    targets[0, 10:20] = -100  # ignored positions

    def run(**kw):
        model.zero_grad(set_to_none=True)
        loss, shapes = _saved_shapes(model, tokens[:, :-1], targets, **kw)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, shapes

    loss, grads, shapes = run(chunked_loss="head")
    ref_loss, ref_grads, ref_shapes = run(chunked_loss=True)
    assert (128, 257) in ref_shapes  # the logits path keeps the [tokens, vocab] logits
    assert [s for s in shapes if 257 in s] == [(257, 64)]  # fused: only the head's gradient
    assert abs(loss.float().item() - ref_loss.float().item()) <= tol * 10
    for name, g in grads.items():
        r = ref_grads[name].float()
        assert (g.float() - r).abs().max().item() <= tol * (1 + r.abs().max().item()), name


def test_model_head_with_hooks_or_no_targets_takes_the_module():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**CFG))
    tokens = torch.randint(0, 257, (2, 17))
    calls = []
    model.output.register_forward_hook(lambda mod, inp, out: calls.append(out.shape))
    loss = model(tokens[:, :-1], tokens[:, 1:])
    assert calls == [(2, 16, 257)]
    model.output._forward_hooks.clear()
    fused = model(tokens[:, :-1], tokens[:, 1:])
    assert abs(fused.item() - loss.item()) <= 1e-6
    assert model(tokens).shape == (2, 17, 257)


def test_fsdp2_bf16_fused_loss_matches_logits_path():
    # FSDP2 on the root unshards the head's weight (bf16 under the param policy) for the root's
    # forward; the fused path reads it there and its gradient reaches FSDP's reduce-scatter.
    from llama_pretrain.train.config import ParallelConfig
    from llama_pretrain.train.distributed import DistInfo
    from llama_pretrain.train.parallelize import parallelize

    tokens = torch.randint(0, 257, (2, 65), generator=torch.Generator().manual_seed(1))

    def run(**kw):
        torch.manual_seed(0)
        model = parallelize(Transformer(ModelConfig(**CFG)), ParallelConfig(mode="fsdp", mixed_precision="bf16"),
                            DistInfo())
        loss = model(tokens[:, :-1], tokens[:, 1:], **kw)
        loss.backward()
        return loss.item(), {n: p.grad.full_tensor() for n, p in model.named_parameters()}

    (loss, grads), (ref_loss, ref_grads) = run(), run(chunked_loss=True)
    assert loss == ref_loss  # same bf16 logits, same fp32 reduction
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=2e-2, atol=1e-4, msg=name)
