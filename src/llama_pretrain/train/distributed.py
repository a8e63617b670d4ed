"""The process group and its collectives: what every part of training may call, with or without torchrun.

``init_distributed`` reads the torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR...)
and joins the process group (NCCL on GPU, gloo on CPU); without it, training is one process.
``DistInfo`` describes this process's place in the job: its rank, device, the tensor-parallel
degree once the layout is checked (``parallelize.check_parallel``) and the device mesh built from
them. The collectives below (mean, max, gather of Python objects, barrier) are no-ops in a single
process, so the loop is the same code with and without torchrun. How the model is sharded over the
ranks is ``parallelize.py``'s job.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from ..devices import resolve_device


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    is_main: bool = True
    backend: str | None = None
    launched: bool = False
    """Joined a process group (torchrun; even one rank under it)."""
    tp: int = 1
    """Tensor-parallel degree (set once the layout is checked, ``check_parallel``)."""
    _mesh: Any = field(default=None, init=False, repr=False, compare=False)

    @property
    def dp_size(self) -> int:
        """Data-parallel groups: what the loader and the gradient accumulation divide by."""
        return self.world_size // self.tp

    @property
    def dp_rank(self) -> int:
        """This rank's data-parallel group (the tp ranks of one group read the same rows)."""
        return self.rank // self.tp

    def device_mesh(self):
        """The device mesh, built once: 1-D ``("dp",)`` over every rank, or 2-D ``("dp", "tp")``
        with tp innermost (consecutive ranks, i.e. one node's GPUs, form a tensor-parallel group)."""
        if self._mesh is None:
            from torch.distributed.device_mesh import init_device_mesh

            if self.tp == 1:
                self._mesh = init_device_mesh(self.device.type, (self.world_size,), mesh_dim_names=("dp",))
            else:
                self._mesh = init_device_mesh(self.device.type, (self.dp_size, self.tp), mesh_dim_names=("dp", "tp"))
        return self._mesh


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
        kwargs: dict[str, Any] = {"device_id": dev} if dev.type == "cuda" else {}
        # The rendezvous store can outlive a torchrun restart; keys of a dead attempt (a rank's
        # old address) must not be read by the new one, so each attempt gets its own namespace.
        store, rank, world_size = next(dist.rendezvous("env://", timeout=timeout))
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        store = dist.PrefixStore(f"llama_pretrain/attempt-{attempt}", store)
        dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world_size,
                                timeout=timeout, **kwargs)
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank,
                    device=dev, is_main=dist.get_rank() == 0, backend=backend, launched=True)


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def _reduce(value: float | torch.Tensor, op) -> float:
    """A number (or one-element tensor) reduced over the ranks."""
    t = value.detach().clone().float() if isinstance(value, torch.Tensor) else torch.tensor(float(value))
    if dist.is_initialized() and dist.get_world_size() > 1:
        backend = dist.get_backend()
        device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        t = t.to(device)
        dist.all_reduce(t, op=op)
    return float(t.item())


def all_reduce_mean(value: float | torch.Tensor) -> float:
    world = dist.get_world_size() if dist.is_initialized() else 1
    return _reduce(value, dist.ReduceOp.SUM) / world


def all_reduce_max(value: float | torch.Tensor) -> float:
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
