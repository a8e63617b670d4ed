"""Everything distributed, applied from outside the model (as torchtitan does).

``init_distributed`` reads the torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR...)
and joins the process group (NCCL on GPU, gloo on CPU); without it, training is one process.
``parallelize`` applies, in order: float8 linears (``parallel.float8``, torchao), tensor
parallelism (``parallel.tp`` > 1), activation checkpointing per block, ``torch.compile`` per
block, then DDP or FSDP2 (``fully_shard`` per transformer block, then the root).

Tensor parallelism uses a 2-D DeviceMesh ``(dp, tp)``: ranks ``r`` with the same ``r // tp`` form
one tensor-parallel group (consecutive ranks, i.e. one node's GPUs), and FSDP shards over the
``dp`` axis. Within a group (Megatron-style, through DTensor's ``parallelize_module``): ``wq wk
wv w1 w3`` are split by output features (whole heads per rank), ``wo w2`` by input features, the
RMSNorms run on sequence shards (sequence parallelism: between blocks each rank holds T/tp
positions of the residual stream), the embedding table is split by vocabulary rows and the output
head by vocabulary columns, and the loss runs on the vocabulary shards (``loss_parallel``), so no
rank ever holds the full [tokens, vocab] logits.

DDP and FSDP act through the module's ``forward`` hooks, so the training loop calls the wrapped
model itself (``model(inputs, targets)``, the loss path of ``Transformer.forward``), never a
submodule. The collectives below (mean, max, gather of Python objects, barrier) are no-ops in a
single process, so the loop is the same code with and without torchrun.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..devices import resolve_device
from ..errors import UserError
from .config import FLOAT8_RECIPES

MODES = ("none", "ddp", "fsdp")


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    is_main: bool = True
    backend: str | None = None
    tp: int = 1
    """Tensor-parallel degree (set once the layout is checked, ``check_layout``)."""

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 or dist.is_initialized()

    @property
    def dp_size(self) -> int:
        """Data-parallel groups: what the loader and the gradient accumulation divide by."""
        return self.world_size // self.tp

    @property
    def dp_rank(self) -> int:
        """This rank's data-parallel group (the tp ranks of one group read the same rows)."""
        return self.rank // self.tp


def check_layout(mode: str, tp: int, n_heads: int, n_kv_heads: int, seq_len: int, world_size: int,
                 launched: bool, compile: bool = False, activation_checkpointing: bool | str = False) -> None:
    """One-line UserErrors for a tensor-parallel layout that cannot work (before anything is built)."""
    if tp == 1:
        return
    if tp < 1:
        raise UserError(f"parallel.tp must be >= 1, got {tp}")
    if mode == "ddp":
        raise UserError(f"parallel.mode=ddp cannot be combined with parallel.tp={tp}; use parallel.mode=fsdp "
                        f"(FSDP over the data-parallel axis) or none (tensor parallelism only)")
    if compile and activation_checkpointing not in (False, None, "", "none"):
        # torch 2.13: a compiled, checkpointed block of DTensors fails in backward ("expected all
        # tensors_saved_with_vc_check to be Tensors ... DeviceMesh"); compiling the attention and
        # feed-forward alone instead ran, but gave wrong gradients (the all-gather's backward).
        raise UserError(f"parallel.compile with parallel.activation_checkpointing and parallel.tp={tp} "
                        f"fails in torch's compiled backward; drop one of compile or activation checkpointing")
    for name, heads in (("n_heads", n_heads), ("n_kv_heads", n_kv_heads)):
        if heads % tp:
            raise UserError(f"parallel.tp={tp} does not divide model.{name}={heads}: each tensor-parallel "
                            f"rank holds whole heads; choose a tp that divides both head counts")
    if seq_len % tp:
        raise UserError(f"training.seq_len={seq_len} is not divisible by parallel.tp={tp} (sequence "
                        f"parallelism splits every sequence evenly)")
    if not launched:
        raise UserError(f"parallel.tp={tp} needs torchrun with a multiple of {tp} processes "
                        f"(e.g. torchrun --nproc_per_node={tp})")
    if world_size % tp:
        raise UserError(f"the world size {world_size} is not divisible by parallel.tp={tp}")
    if mode == "none" and world_size > tp:
        raise UserError(f"parallel.mode=none with {world_size} ranks and parallel.tp={tp} leaves "
                        f"{world_size // tp} data-parallel groups unsynchronised; use parallel.mode=fsdp")


def init_distributed(device: str = "auto", timeout_s: float = 600.0) -> DistInfo:
    """Join the torchrun process group if the environment describes one; else a single process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank, flag="training.device")
    # torchrun sets TORCHELASTIC_RUN_ID; under it even a single rank joins a process group, so
    # `torchrun --nproc_per_node 1` behaves like N ranks (FSDP, sharded checkpoints).
    launched = "TORCHELASTIC_RUN_ID" in os.environ or ("MASTER_ADDR" in os.environ and "RANK" in os.environ)
    if world_size <= 1 and not launched and not dist.is_initialized():
        return DistInfo(device=dev)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_s)
        kwargs = {"device_id": dev} if dev.type == "cuda" else {}
        # The rendezvous store can outlive a torchrun restart; keys of a dead attempt (a rank's
        # old address) must not be read by the new one, so each attempt gets its own namespace.
        store, rank, world_size = next(dist.rendezvous("env://", timeout=timeout))
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        store = dist.PrefixStore(f"llama_pretrain/attempt-{attempt}", store)
        dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world_size,
                                timeout=timeout, **kwargs)
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank,
                    device=dev, is_main=dist.get_rank() == 0, backend=backend)


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def apply_activation_checkpointing(model: nn.Module, mode: bool | str = "full") -> None:
    """Recompute activations in backward instead of storing them, per block: ``full`` keeps only
    each block's input; ``selective`` keeps the outputs of matmuls and attention (and of
    reduce-scatters under tensor parallelism) and recomputes the element-wise work around them
    (norms, RoPE, SwiGLU's gate) from those; ``none`` (or False) does nothing, True is ``full``.

    The block's ``forward`` is replaced on the instance, so parameter names stay Meta's (a wrapper
    module would add a prefix to every name and break checkpoints)."""
    import functools

    from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts

    from ..compute.memory import checkpoint_mode

    mode = checkpoint_mode(mode)
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
    found = set()
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


# float8 matmuls (torchao's float8 training): the tensor cores of compute capability 8.9+.
FLOAT8_MIN_CAPABILITY = (8, 9)


def check_float8(enabled: bool, emulate: bool, device: torch.device, tp: int, recipe: str = "tensorwise",
                 micro_batch_tokens: int = 16, all_gather: bool = False, mode: str = "none") -> None:
    """One-line UserErrors for ``parallel.float8`` where it cannot run, and for float8 settings
    that would do nothing without it (before anything is built)."""
    if not enabled:
        if emulate or recipe != "tensorwise" or all_gather:
            raise UserError("parallel.float8_emulate, parallel.float8_recipe and parallel.float8_all_gather "
                            "only apply with parallel.float8=true")
        return
    if all_gather and (recipe != "tensorwise" or mode != "fsdp"):
        raise UserError(f"parallel.float8_all_gather needs parallel.mode=fsdp and parallel.float8_recipe="
                        f"tensorwise (one scale per weight); this run has mode {mode}, recipe {recipe}")
    if micro_batch_tokens % 16:
        # the weight gradient's float8 matmul runs over the micro-batch's tokens (the inner dim)
        raise UserError(f"parallel.float8 needs training.micro_batch_size x training.seq_len to be a multiple "
                        f"of 16 (float8 matmuls take inner sizes in 16s); it is {micro_batch_tokens}")
    if tp > 1:
        raise UserError(f"parallel.float8 with parallel.tp={tp} is not supported (float8 needs its own "
                        f"tensor-parallel plan); use parallel.tp=1 with FSDP")
    try:
        _import_torchao_float8()
    except ImportError:
        raise UserError("parallel.float8 needs torchao: pip install 'llama-pretrain[float8]' "
                        "(or pip install torchao)") from None
    if emulate:
        return
    if device.type != "cuda":
        raise UserError(f"parallel.float8 needs a CUDA GPU with float8 tensor cores (compute capability "
                        f">= 8.9: H100, H200, L40S, RTX 4090); this run is on {device.type}. "
                        f"parallel.float8_emulate=true runs the same numerics without them (slower)")
    cap = torch.cuda.get_device_capability(device)
    if cap < FLOAT8_MIN_CAPABILITY:
        raise UserError(f"parallel.float8 needs compute capability >= 8.9 (H100, H200, L40S, RTX 4090); "
                        f"{torch.cuda.get_device_name(device)} has {cap[0]}.{cap[1]}")


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


def apply_float8(model: nn.Module, emulate: bool = False, recipe: str = "tensorwise", all_gather: bool = False) -> int:
    """Swap the eligible linears for torchao's ``Float8Linear`` (dynamic scales for inputs, weights
    and gradients, recomputed each step: one per tensor (``tensorwise``) or one per row
    (``rowwise``: finer, more accurate, usually slower)); weights stay in their own precision, so
    state dicts, checkpoints and exports are unchanged); returns how many were swapped. With
    ``all_gather`` (tensorwise, under FSDP2) the weight shards are all-gathered in float8, cast
    with scales ``precompute_float8_scales`` computes for every weight at once after each step."""
    if recipe not in FLOAT8_RECIPES:
        raise UserError(f"parallel.float8_recipe must be one of {', '.join(FLOAT8_RECIPES)}, got {recipe!r}")
    float8 = _import_torchao_float8()
    swapped = []

    def keep(module: nn.Module, fqn: str) -> bool:
        ok = float8_eligible(module, fqn)
        if ok:
            swapped.append(fqn)
        return ok

    import dataclasses

    config = dataclasses.replace(float8.Float8LinearConfig.from_recipe_name(recipe), emulate=emulate,
                                 enable_fsdp_float8_all_gather=all_gather)
    float8.convert_to_float8_training(model, config=config, module_filter_fn=keep)
    return len(swapped)


def precompute_float8_scales(model: nn.Module) -> None:
    """The float8 scales of every FSDP-sharded weight in one all-reduce of their amaxes (after the
    optimizer step, for the next step's float8 all-gathers)."""
    _import_torchao_float8().precompute_float8_dynamic_scale_for_fsdp(model)


def apply_compile(model: nn.Module) -> None:
    """Compile each block in place (same graph for every block; names unchanged)."""
    for block in model.layers.values():
        block.compile(fullgraph=False)


def build_mesh(info: DistInfo):
    """The device mesh: 1-D over every rank, or 2-D ``("dp", "tp")`` with tp innermost."""
    from torch.distributed.device_mesh import init_device_mesh

    if info.tp == 1:
        return init_device_mesh(info.device.type, (info.world_size,), mesh_dim_names=("dp",))
    return init_device_mesh(info.device.type, (info.dp_size, info.tp), mesh_dim_names=("dp", "tp"))


def apply_tensor_parallel(model: nn.Module, tp_mesh) -> None:
    """Shard ``model`` (a ``Transformer``) over ``tp_mesh`` in place; parameter names are unchanged.

    Between blocks the residual stream is a DTensor sharded on the sequence (this rank holds T/tp
    positions); each block all-gathers the normed sequence before attention and the feed-forward,
    and reduce-scatters their row-wise outputs back onto the sequence shards. (Kept a DTensor, not
    a local tensor, across block boundaries: a compiled block whose input is a plain tensor
    wrapped by the norm's hook failed in backward on torch 2.13, "'Tensor' object has no
    attribute '_local_tensor'".) The logits leave as a DTensor sharded on the
    vocabulary, which ``losses.cross_entropy`` reduces under ``loss_parallel``."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, RowwiseParallel,
                                                   SequenceParallel, parallelize_module)

    parallelize_module(model, tp_mesh, {
        # Vocabulary rows split; each rank looks up its rows, and the partial sums are
        # reduce-scattered onto the sequence shards.
        "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1),
                                          use_local_output=False),
        "norm": SequenceParallel(),
        "output": ColwiseParallel(input_layouts=Shard(1), output_layouts=Shard(-1), use_local_output=False),
    })
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


def apply_fsdp(model: nn.Module, info: DistInfo, mixed_precision: str, reshard_after_forward: bool,
               mesh=None) -> nn.Module:
    try:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    except ImportError:  # torch < 2.6 kept FSDP2 under _composable
        from torch.distributed._composable.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = mesh if mesh is not None else build_mesh(info)["dp"]
    if mixed_precision == "bf16":
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    else:
        mp = MixedPrecisionPolicy()
    blocks = list(model.layers.values())
    for i, block in enumerate(blocks):
        # The last block's parameters are needed again at once by backward: keep them gathered.
        fully_shard(block, mesh=mesh, mp_policy=mp,
                    reshard_after_forward=reshard_after_forward and i < len(blocks) - 1)
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    return model


def parallelize(model: nn.Module, info: DistInfo, mode: str = "none", compile: bool = False,
                activation_checkpointing: bool | str = False, mixed_precision: str = "fp32",
                reshard_after_forward: bool = True, float8: bool = False,
                float8_emulate: bool = False, float8_recipe: str = "tensorwise",
                float8_all_gather: bool = False) -> nn.Module:
    """Apply float8 linears (``float8``, checked by ``check_float8``), tensor parallelism
    (``info.tp`` > 1), activation checkpointing, compilation and data parallelism to ``model``
    (on its device).

    ``mode``: ``none`` (single process), ``ddp`` (replicated weights, all-reduced gradients) or
    ``fsdp`` (FSDP2: parameters, gradients and optimizer state sharded per block). With ``fsdp`` and
    ``mixed_precision="bf16"`` the shards stay fp32 (master weights) while compute uses bf16 and
    gradients are reduced in fp32. With ``info.tp`` > 1 (checked by ``check_layout``), FSDP shards
    over the data-parallel axis of the 2-D mesh; with one data-parallel group FSDP is not applied
    (nothing to shard over) and ``mode`` may be ``none`` or ``fsdp``.
    """
    if mode not in MODES:
        raise UserError(f"parallel.mode must be one of {', '.join(MODES)}, got {mode!r}")
    if mixed_precision not in ("fp32", "bf16"):
        raise UserError(f"parallel.mixed_precision must be fp32 or bf16, got {mixed_precision!r}")
    if mode != "none" and not dist.is_initialized():
        if info.world_size > 1:
            raise UserError("parallel.mode needs the torchrun process group; launch with torchrun")
        if mode == "ddp":
            mode = "none"  # one process: nothing to replicate
        else:  # FSDP in one process without torchrun: a process group of one, in memory
            backend = "nccl" if info.device.type == "cuda" else "gloo"
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    if float8:
        if info.tp > 1:
            raise UserError(f"parallel.float8 with parallel.tp={info.tp} is not supported")
        apply_float8(model, emulate=float8_emulate, recipe=float8_recipe, all_gather=float8_all_gather)
    mesh = None
    if info.tp > 1:
        if mode == "ddp" or info.world_size % info.tp or not dist.is_initialized():
            raise UserError(f"parallel.tp={info.tp} needs torchrun, a world size divisible by it and "
                            f"parallel.mode fsdp or none")
        mesh = build_mesh(info)
        apply_tensor_parallel(model, mesh["tp"])
        if info.dp_size == 1:
            mode = "none"
    apply_activation_checkpointing(model, activation_checkpointing)  # none / False: nothing
    if compile:
        apply_compile(model)
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [info.device.index] if info.device.type == "cuda" else None
        model = DDP(model, device_ids=ids)
    elif mode == "fsdp":
        model = apply_fsdp(model, info, mixed_precision, reshard_after_forward,
                           mesh=None if mesh is None else mesh["dp"])
    return model


@contextlib.contextmanager
def grad_sync(model: nn.Module, enabled: bool):
    """Skip gradient communication on all but the last micro-batch of an accumulation."""
    if hasattr(model, "no_sync") and not enabled:  # DDP
        with model.no_sync():
            yield
        return
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(enabled)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
        return
    yield


def _reduce(value, op) -> float:
    t = value.detach().clone().float() if isinstance(value, torch.Tensor) else torch.tensor(float(value))
    if dist.is_initialized() and dist.get_world_size() > 1:
        backend = dist.get_backend()
        device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        t = t.to(device)
        dist.all_reduce(t, op=op)
    return float(t.item()) if t.numel() == 1 else t.cpu()


def all_reduce_mean(value) -> float:
    world = dist.get_world_size() if dist.is_initialized() else 1
    return _reduce(value, dist.ReduceOp.SUM) / world


def all_reduce_max(value) -> float:
    return _reduce(value, dist.ReduceOp.MAX)


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def gather_object(obj):
    """``obj`` from every rank, in rank order (a one-element list in a single process)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
