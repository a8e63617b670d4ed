"""The one table of accelerators: bf16 dense peak, memory, power and links.

Peaks are NVIDIA datasheet bf16 *dense* tensor-core figures (no 2:4 sparsity), the denominator of
MFU (see ``flops.py``). ``tdp_w`` is the board power limit of the SXM part, the figure the Llama 2
paper multiplies by GPU-hours (Table 2). ``nvlink_gbps`` is the per-direction NVLink bandwidth per
GPU in gigabytes/s (A100 NVLink3: 600 GB/s bidirectional; H100/H200 NVLink4: 900 GB/s), the link
``plan`` puts FSDP's in-node rings and all tensor-parallel traffic on.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UserError


@dataclass(frozen=True)
class GPU:
    name: str
    bf16_peak_flops: float
    memory_bytes: int
    tdp_w: float
    nvlink_gbps: float
    description: str


_GB = 10**9
_GIB = 2**30

GPUS: dict[str, GPU] = {
    "a100-40gb": GPU("a100-40gb", 312e12, 40 * _GIB, 400.0, 300.0, "NVIDIA A100 SXM4 40GB"),
    "a100-80gb": GPU("a100-80gb", 312e12, 80 * _GIB, 400.0, 300.0, "NVIDIA A100 SXM4 80GB"),
    "h100": GPU("h100", 989e12, 80 * _GIB, 700.0, 450.0, "NVIDIA H100 SXM5 80GB"),
    "h200": GPU("h200", 989e12, 141 * _GB, 700.0, 450.0, "NVIDIA H200 SXM 141GB"),
}

ALIASES: dict[str, str] = {
    "a100": "a100-80gb", "a100-80g": "a100-80gb", "a100-sxm4-80gb": "a100-80gb",
    "a100-40g": "a100-40gb", "a100-sxm4-40gb": "a100-40gb",
    "h100-sxm": "h100", "h100-80gb": "h100", "h100-sxm5": "h100", "h100-sxm5-80gb": "h100",
    "h200-sxm": "h200", "h200-141gb": "h200",
}


def get_gpu(name: str) -> GPU:
    """Look a GPU up by name or alias (case and spaces/underscores ignored)."""
    key = str(name).strip().lower().replace("_", "-").replace(" ", "-")
    key = ALIASES.get(key, key)
    if key not in GPUS:
        raise UserError(f"unknown GPU {name!r}; known: {', '.join(GPUS)} "
                        f"(aliases: {', '.join(sorted(ALIASES))})")
    return GPUS[key]


def gpu_for_device(torch_device_name: str) -> GPU | None:
    """Match a ``torch.cuda.get_device_name()`` string (e.g. 'NVIDIA A100-SXM4-80GB') to the table.

    A100s are told apart by the memory in the name (40GB otherwise 80GB); H100 PCIe/NVL parts have
    other peaks and are not matched, so MFU is not reported against a wrong denominator.
    """
    s = torch_device_name.upper()
    if "A100" in s:
        return GPUS["a100-40gb"] if "40GB" in s else GPUS["a100-80gb"]
    if "H200" in s:
        return GPUS["h200"]
    if "H100" in s and not ("PCIE" in s or "NVL" in s):
        return GPUS["h100"]
    return None


def peak_flops_for_device(torch_device_name: str) -> float | None:
    """bf16 dense peak FLOP/s of a CUDA device by its name, or None when it is not in the table."""
    gpu = gpu_for_device(torch_device_name)
    return gpu.bf16_peak_flops if gpu else None
