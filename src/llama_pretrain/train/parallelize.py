"""Parallelism applied from outside the model (as torchtitan does): the one seam between
``parallel.*`` (a ``ParallelConfig``) and the training loop.

``check_parallel`` holds every rule on how the parallel settings combine with each other, the model,
the batch and the device (layouts, float8), and runs once, in preflight, before anything is built.
``parallelize`` assumes a checked config and applies, in order: float8 linears (``parallel.float8``,
torchao), tensor parallelism (``parallel.tp`` > 1), activation checkpointing per block,
``torch.compile`` per block, then DDP or FSDP2 (``fully_shard`` per transformer block, then the
root); each ``apply_*(model, ParallelConfig, DistInfo)`` does nothing when its setting is off. A new
parallel option is a field of ``ParallelConfig`` (``config.py``) and its rules and ``apply_*`` here.

Tensor parallelism uses a 2-D DeviceMesh ``(dp, tp)`` (``DistInfo.device_mesh``): ranks ``r`` with
the same ``r // tp`` form one tensor-parallel group (consecutive ranks, i.e. one node's GPUs), and
FSDP shards over the ``dp`` axis. Within a group (Megatron-style, through DTensor's
``parallelize_module``): ``wq wk wv w1 w3`` are split by output features (whole heads per rank),
``wo w2`` by input features, the RMSNorms run on sequence shards (sequence parallelism: between
blocks each rank holds T/tp positions of the residual stream), the embedding table is split by
vocabulary rows and the output head by vocabulary columns, and the loss runs on the vocabulary
shards (``loss_parallel``), so no rank ever holds the full [tokens, vocab] logits. Both split the
[vocab, dim] matrix by its rows, so a tied head and embedding share one sharded Parameter.

DDP and FSDP act through the module's ``forward`` hooks, so the training loop calls the wrapped
model itself (``model(inputs, targets)``, the loss path of ``Transformer.forward``), never a
submodule.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn

from ..config import ModelConfig
from ..errors import UserError
from .config import ParallelConfig, RunConfig
from .distributed import DistInfo

if TYPE_CHECKING:
    from ..model import Transformer


# -- the rules ---------------------------------------------------------------------------------
def check_parallel(cfg: RunConfig, info: DistInfo, model_cfg: ModelConfig) -> None:
    """One-line UserErrors for parallel settings that cannot work together, before anything is
    built (each field's own allowed values are checked with the config). The checked
    tensor-parallel degree is recorded in ``info.tp``, where the loader and the mesh read it."""
    p = cfg.parallel
    _check_layout(p, info, model_cfg, cfg.seq_len)
    info.tp = p.tp
    _check_float8(p, info.device, cfg.training.micro_batch_size * cfg.seq_len)


def _check_layout(p: ParallelConfig, info: DistInfo, model_cfg: ModelConfig, seq_len: int) -> None:
    tp, mode, world_size = p.tp, p.mode, info.world_size
    if tp == 1:
        return
    if mode == "ddp":
        raise UserError(f"parallel.mode=ddp cannot be combined with parallel.tp={tp}; use parallel.mode=fsdp "
                        f"(FSDP over the data-parallel axis) or none (tensor parallelism only)")
    if p.compile and p.activation_checkpointing not in (False, None, "", "none"):
        # torch 2.13: a compiled, checkpointed block of DTensors fails in backward ("expected all
        # tensors_saved_with_vc_check to be Tensors ... DeviceMesh"); compiling the attention and
        # feed-forward alone instead ran, but gave wrong gradients (the all-gather's backward).
        raise UserError(f"parallel.compile with parallel.activation_checkpointing and parallel.tp={tp} "
                        f"fails in torch's compiled backward; drop one of compile or activation checkpointing")
    for name, heads in (("n_heads", model_cfg.n_heads), ("n_kv_heads", model_cfg.kv_heads)):
        if heads % tp:
            raise UserError(f"parallel.tp={tp} does not divide model.{name}={heads}: each tensor-parallel "
                            f"rank holds whole heads; choose a tp that divides both head counts")
    if seq_len % tp:
        raise UserError(f"training.seq_len={seq_len} is not divisible by parallel.tp={tp} (sequence "
                        f"parallelism splits every sequence evenly)")
    if not info.launched:
        raise UserError(f"parallel.tp={tp} needs torchrun with a multiple of {tp} processes "
                        f"(e.g. torchrun --nproc_per_node={tp})")
    if world_size % tp:
        raise UserError(f"the world size {world_size} is not divisible by parallel.tp={tp}")
    if mode == "none" and world_size > tp:
        raise UserError(f"parallel.mode=none with {world_size} ranks and parallel.tp={tp} leaves "
                        f"{world_size // tp} data-parallel groups unsynchronised; use parallel.mode=fsdp")


# float8 matmuls (torchao's float8 training): the tensor cores of compute capability 8.9+.
FLOAT8_MIN_CAPABILITY = (8, 9)


def _check_float8(p: ParallelConfig, device: torch.device, micro_batch_tokens: int) -> None:
    """``parallel.float8`` where it cannot run, and float8 settings that would do nothing without it."""
    if not p.float8:
        if p.float8_emulate or p.float8_recipe != "tensorwise" or p.float8_all_gather:
            raise UserError("parallel.float8_emulate, parallel.float8_recipe and parallel.float8_all_gather "
                            "only apply with parallel.float8=true")
        return
    if p.float8_all_gather and (p.float8_recipe != "tensorwise" or p.mode != "fsdp"):
        raise UserError(f"parallel.float8_all_gather needs parallel.mode=fsdp and parallel.float8_recipe="
                        f"tensorwise (one scale per weight); this run has mode {p.mode}, recipe {p.float8_recipe}")
    if micro_batch_tokens % 16:
        # the weight gradient's float8 matmul runs over the micro-batch's tokens (the inner dim)
        raise UserError(f"parallel.float8 needs training.micro_batch_size x training.seq_len to be a multiple "
                        f"of 16 (float8 matmuls take inner sizes in 16s); it is {micro_batch_tokens}")
    if p.tp > 1:
        raise UserError(f"parallel.float8 with parallel.tp={p.tp} is not supported (float8 needs its own "
                        f"tensor-parallel plan); use parallel.tp=1 with FSDP")
    try:
        _import_torchao_float8()
    except ImportError:
        raise UserError("parallel.float8 needs torchao: pip install 'llama-pretrain[float8]' "
                        "(or pip install torchao)") from None
    if p.float8_emulate:
        return
    if device.type != "cuda":
        raise UserError(f"parallel.float8 needs a CUDA GPU with float8 tensor cores (compute capability "
                        f">= 8.9: H100, H200, L40S, RTX 4090); this run is on {device.type}. "
                        f"parallel.float8_emulate=true runs the same numerics without them (slower)")
    cap = torch.cuda.get_device_capability(device)
    if cap < FLOAT8_MIN_CAPABILITY:
        raise UserError(f"parallel.float8 needs compute capability >= 8.9 (H100, H200, L40S, RTX 4090); "
                        f"{torch.cuda.get_device_name(device)} has {cap[0]}.{cap[1]}")


# -- applying them -----------------------------------------------------------------------------
def parallelize(model: Transformer, p: ParallelConfig, info: DistInfo) -> nn.Module:
    """``model`` (on its device) with every parallel setting of ``p`` applied; ``p`` and ``info``
    as ``check_parallel`` passed them, and ``p.mixed_precision`` resolved to fp32 or bf16.

    ``p.mode``: ``none`` (single process), ``ddp`` (replicated weights, all-reduced gradients) or
    ``fsdp`` (FSDP2: parameters, gradients and optimizer state sharded per block). With ``fsdp`` and
    bf16 the shards stay fp32 (master weights) while compute uses bf16 and gradients are reduced in
    fp32. With ``info.tp`` > 1, FSDP shards over the data-parallel axis of the 2-D mesh; with one
    data-parallel group FSDP is not applied (nothing to shard over)."""
    mode = _data_parallel_mode(p, info)
    apply_float8(model, p, info)
    apply_tensor_parallel(model, p, info)
    apply_activation_checkpointing(model, p, info)
    apply_compile(model, p, info)
    if mode == "ddp":
        return apply_ddp(model, p, info)
    if mode == "fsdp":
        return apply_fsdp(model, p, info)
    return model


def _data_parallel_mode(p: ParallelConfig, info: DistInfo) -> str:
    """``parallel.mode`` as this process runs it: in one process without torchrun, ddp has nothing
    to replicate (none) and fsdp shards over an in-memory process group of one; with tensor
    parallelism and one data-parallel group, there is nothing to shard over (none)."""
    mode = p.mode
    if mode != "none" and not dist.is_initialized():
        if mode == "ddp":
            return "none"
        backend = "nccl" if info.device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return "none" if info.tp > 1 and info.dp_size == 1 else mode


def _import_torchao_float8():
    """``torchao.float8``, imported without its start-up noise: torch's deprecation warnings about
    the enums torchao registers, and, on a machine without CUDA, the expected failures to load
    torchao's CUDA kernels (warnings that name nothing the user can act on)."""
    import logging

    quiet = [logging.getLogger("torch.utils._pytree")]
    if not torch.cuda.is_available():
        quiet.append(logging.getLogger("torchao"))
    levels = [lg.level for lg in quiet]
    for lg in quiet:
        lg.setLevel(logging.ERROR)
    try:
        import torchao.float8

        return torchao.float8
    finally:
        for lg, level in zip(quiet, levels):
            lg.setLevel(level)


def float8_eligible(module: nn.Module, fqn: str) -> bool:
    """The blocks' linear layers whose sizes the float8 matmul takes (multiples of 16). The output
    head stays in the compute precision: its vocabulary-wide logits feed the loss directly."""
    return (fqn.startswith("layers.") and isinstance(module, nn.Linear)
            and module.in_features % 16 == 0 and module.out_features % 16 == 0)


def apply_float8(model: nn.Module, p: ParallelConfig, info: DistInfo) -> int:
    """With ``p.float8``: swap the eligible linears for torchao's ``Float8Linear`` (dynamic scales
    for inputs, weights and gradients, recomputed each step: one per tensor (``tensorwise``) or one
    per row (``rowwise``: finer, more accurate, usually slower)); weights stay in their own
    precision, so state dicts, checkpoints and exports are unchanged); returns how many were
    swapped. With ``float8_all_gather`` (tensorwise, under FSDP2) the weight shards are
    all-gathered in float8, cast with scales ``precompute_float8_scales`` computes for every weight
    at once after each step."""
    if not p.float8:
        return 0
    float8 = _import_torchao_float8()
    swapped = []

    def keep(module: nn.Module, fqn: str) -> bool:
        ok = float8_eligible(module, fqn)
        if ok:
            swapped.append(fqn)
        return ok

    import dataclasses

    config = dataclasses.replace(float8.Float8LinearConfig.from_recipe_name(p.float8_recipe),
                                 emulate=p.float8_emulate, enable_fsdp_float8_all_gather=p.float8_all_gather)
    float8.convert_to_float8_training(model, config=config, module_filter_fn=keep)
    return len(swapped)


def precompute_float8_scales(model: nn.Module, p: ParallelConfig) -> None:
    """With float8 all-gathers: the float8 scales of every FSDP-sharded weight in one all-reduce of
    their amaxes (after the optimizer step, for the next step's float8 all-gathers)."""
    if p.float8_all_gather:
        _import_torchao_float8().precompute_float8_dynamic_scale_for_fsdp(model)


def float8_summary(model: nn.Module, p: ParallelConfig) -> str:
    """The float8 part of the run's banner ("" without float8)."""
    if not p.float8:
        return ""
    from torchao.float8.float8_linear import Float8Linear

    n = sum(isinstance(m, Float8Linear) for m in model.modules())
    return (f" with float8 matmuls ({p.float8_recipe}) in {n} linear layers"
            + (" (emulated)" if p.float8_emulate else "")
            + (" and float8 weight all-gathers" if p.float8_all_gather else ""))


def apply_tensor_parallel(model: Transformer, p: ParallelConfig, info: DistInfo) -> None:
    """With ``info.tp`` > 1: shard ``model`` (a ``Transformer``) over the mesh's tp axis in place;
    parameter names are unchanged.

    Between blocks the residual stream is a DTensor sharded on the sequence (this rank holds T/tp
    positions); each block all-gathers the normed sequence before attention and the feed-forward,
    and reduce-scatters their row-wise outputs back onto the sequence shards. (Kept a DTensor, not
    a local tensor, across block boundaries: a compiled block whose input is a plain tensor
    wrapped by the norm's hook failed in backward on torch 2.13, "'Tensor' object has no
    attribute '_local_tensor'".) The logits leave as a DTensor sharded on the
    vocabulary, which ``losses.cross_entropy`` reduces under ``loss_parallel``."""
    if info.tp == 1:
        return
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, RowwiseParallel,
                                                   SequenceParallel, parallelize_module)

    tp_mesh = info.device_mesh()["tp"]
    parallelize_module(model, tp_mesh, {
        # Vocabulary rows split; each rank looks up its rows, and the partial sums are
        # reduce-scattered onto the sequence shards.
        "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1),
                                          use_local_output=False),
        "norm": SequenceParallel(),
        "output": ColwiseParallel(input_layouts=Shard(1), output_layouts=Shard(-1), use_local_output=False),
    })
    if model.config.tie_embeddings:
        # Both plans split the [vocab, dim] matrix by vocabulary rows (Shard(0)), each into a new
        # Parameter: the head takes the embedding's, so the two stay one.
        model.output.weight = model.tok_embeddings.weight
    for block in model.layers.values():
        parallelize_module(block, tp_mesh, {
            "attention_norm": SequenceParallel(),
            # The first argument (x) is gathered over the sequence; cos, sin, mask and cache pass as they are.
            "attention": PrepareModuleInput(input_layouts=(Shard(1), None, None, None, None),
                                            desired_input_layouts=(Replicate(), None, None, None, None)),
            "attention.wq": ColwiseParallel(),
            "attention.wk": ColwiseParallel(),
            "attention.wv": ColwiseParallel(),
            "attention.wo": RowwiseParallel(output_layouts=Shard(1), use_local_output=False),
            "ffn_norm": SequenceParallel(),
            "feed_forward": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
            "feed_forward.w1": ColwiseParallel(),
            "feed_forward.w3": ColwiseParallel(),
            "feed_forward.w2": RowwiseParallel(output_layouts=Shard(1), use_local_output=False),
        })


def apply_activation_checkpointing(model: Transformer, p: ParallelConfig, info: DistInfo) -> None:
    """Recompute activations in backward instead of storing them, per block
    (``p.activation_checkpointing``): ``full`` keeps only each block's input; ``selective`` keeps
    the outputs of matmuls and attention (and of reduce-scatters under tensor parallelism) and
    recomputes the element-wise work around them (norms, RoPE, SwiGLU's gate) from those; ``none``
    (or False) does nothing, True is ``full``.

    The block's ``forward`` is replaced on the instance, so parameter names stay Meta's (a wrapper
    module would add a prefix to every name and break checkpoints)."""
    import functools

    from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts

    from ..compute.memory import checkpoint_mode

    mode = checkpoint_mode(p.activation_checkpointing)
    if mode == "none":
        return
    context_fn = None
    if mode == "selective":
        context_fn = functools.partial(create_selective_checkpoint_contexts, _selective_policy)
    for block in model.layers.values():
        inner = block.forward

        def checkpointed(*args, _inner=inner, **kwargs):
            if context_fn is None:
                return checkpoint(_inner, *args, use_reentrant=False, **kwargs)
            return checkpoint(_inner, *args, use_reentrant=False, context_fn=context_fn, **kwargs)

        block.forward = checkpointed


def _saved_ops() -> set:
    """The ops whose outputs selective checkpointing keeps: every matmul and attention kernel
    (costly to redo) and tensor parallelism's reduce-scatter (a collective better not repeated)."""
    names = [("aten", "mm"), ("aten", "addmm"), ("aten", "bmm"),
             ("aten", "_scaled_dot_product_flash_attention"),
             ("aten", "_scaled_dot_product_flash_attention_for_cpu"),
             ("aten", "_scaled_dot_product_efficient_attention"),
             ("aten", "_scaled_dot_product_cudnn_attention"),
             ("aten", "_scaled_mm"),  # float8 matmuls (parallel.float8)
             ("_c10d_functional", "reduce_scatter_tensor")]
    found: set = set()
    for ns, name in names:
        packet = getattr(getattr(torch.ops, ns), name, None)
        if packet is not None:
            found.update(getattr(packet, o) for o in packet.overloads())
            found.add(packet)
    return found


def _selective_policy(ctx, op, *args, **kwargs):
    from torch.utils.checkpoint import CheckpointPolicy

    if not hasattr(_selective_policy, "saved"):
        _selective_policy.saved = _saved_ops()
    return CheckpointPolicy.MUST_SAVE if op in _selective_policy.saved else CheckpointPolicy.PREFER_RECOMPUTE


def apply_compile(model: Transformer, p: ParallelConfig, info: DistInfo) -> None:
    """With ``p.compile``: compile each block in place (same graph for every block; names unchanged)."""
    if not p.compile:
        return
    for block in model.layers.values():
        block.compile(fullgraph=False)


def apply_ddp(model: nn.Module, p: ParallelConfig, info: DistInfo) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [info.device.index] if info.device.type == "cuda" else None
    return DDP(model, device_ids=ids)


def apply_fsdp(model: Transformer, p: ParallelConfig, info: DistInfo) -> nn.Module:
    """FSDP2 over the mesh's dp axis: each block, then the root (``p.mixed_precision``,
    ``p.reshard_after_forward``)."""
    try:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    except ImportError:  # torch < 2.6 kept FSDP2 under _composable
        from torch.distributed._composable.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = info.device_mesh()["dp"]
    if p.mixed_precision == "bf16":
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    else:
        mp = MixedPrecisionPolicy()
    blocks = list(model.layers.values())
    for i, block in enumerate(blocks):
        # The last block's parameters are needed again at once by backward: keep them gathered.
        fully_shard(block, mesh=mesh, mp_policy=mp,
                    reshard_after_forward=p.reshard_after_forward and i < len(blocks) - 1)
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=p.reshard_after_forward)
    return model


# -- what the loop asks of the parallel model --------------------------------------------------
@contextlib.contextmanager
def grad_sync(model: nn.Module, enabled: bool):
    """Skip gradient communication on all but the last micro-batch of an accumulation."""
    no_sync = getattr(model, "no_sync", None)
    if no_sync is not None and not enabled:  # DDP
        with no_sync():
            yield
        return
    set_sync = getattr(model, "set_requires_gradient_sync", None)
    if set_sync is not None:  # FSDP2
        set_sync(enabled)
        try:
            yield
        finally:
            set_sync(True)
        return
    yield


def eager_no_grad(p: ParallelConfig, info: DistInfo):
    """Compiled blocks of DTensors run eagerly for a no-grad pass: on torch 2.13 their no-grad
    graph failed ("'Tensor' object has no attribute 'elem'")."""
    if info.tp > 1 and p.compile:
        return torch.compiler.set_stance("force_eager")
    return contextlib.nullcontext()


def sharded(model: nn.Module) -> bool:
    """Whether ``model``'s weights are spread over ranks (FSDP2 or tensor parallelism: DTensor
    parameters), so that the full weights need every rank's part."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(q, DTensor) for q in model.parameters())
