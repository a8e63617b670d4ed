"""Everything distributed, applied from outside the model (as torchtitan does).

``init_distributed`` reads the torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR...)
and joins the process group (NCCL on GPU, gloo on CPU); without it, training is one process.
``parallelize`` applies, in order: activation checkpointing per block, ``torch.compile`` per block,
then DDP or FSDP2 (``fully_shard`` per transformer block, then the root).

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

MODES = ("none", "ddp", "fsdp")


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    is_main: bool = True
    backend: str | None = None

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 or dist.is_initialized()


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


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each block's activations in backward instead of storing them.

    The block's ``forward`` is replaced on the instance, so parameter names stay Meta's (a wrapper
    module would add a prefix to every name and break checkpoints)."""
    from torch.utils.checkpoint import checkpoint

    for block in model.layers.values():
        inner = block.forward

        def checkpointed(*args, _inner=inner, **kwargs):
            return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        block.forward = checkpointed


def apply_compile(model: nn.Module) -> None:
    """Compile each block in place (same graph for every block; names unchanged)."""
    for block in model.layers.values():
        block.compile(fullgraph=False)


def apply_fsdp(model: nn.Module, info: DistInfo, mixed_precision: str, reshard_after_forward: bool) -> nn.Module:
    try:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    except ImportError:  # torch < 2.6 kept FSDP2 under _composable
        from torch.distributed._composable.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(info.device.type, (info.world_size,))
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
                activation_checkpointing: bool = False, mixed_precision: str = "fp32",
                reshard_after_forward: bool = True) -> nn.Module:
    """Apply activation checkpointing, compilation and data parallelism to ``model`` (on its device).

    ``mode``: ``none`` (single process), ``ddp`` (replicated weights, all-reduced gradients) or
    ``fsdp`` (FSDP2: parameters, gradients and optimizer state sharded per block). With ``fsdp`` and
    ``mixed_precision="bf16"`` the shards stay fp32 (master weights) while compute uses bf16 and
    gradients are reduced in fp32.
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
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    if compile:
        apply_compile(model)
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [info.device.index] if info.device.type == "cuda" else None
        model = DDP(model, device_ids=ids)
    elif mode == "fsdp":
        model = apply_fsdp(model, info, mixed_precision, reshard_after_forward)
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
