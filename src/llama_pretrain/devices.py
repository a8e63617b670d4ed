"""Device and dtype names as users type them, parsed in one place for every command.

Dtypes have one spelling: ``fp32``, ``bf16``, ``fp16``; the long torch names (``float32``,
``bfloat16``, ``float16``) are accepted as aliases so older command lines keep working.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import UserError

if TYPE_CHECKING:
    import torch

# torch is imported only when a name is parsed, so command-line parsers (and --help) stay instant.
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}  # short name -> torch attribute
_ALIASES = {long: short for short, long in DTYPES.items()}
DTYPE_CHOICES = tuple(DTYPES) + tuple(_ALIASES)


def dtype_name(name: str, flag: str = "--dtype") -> str:
    """The canonical short name (``fp32``/``bf16``/``fp16``) of ``name`` or one of its aliases."""
    canonical = _ALIASES.get(name, name)
    if canonical not in DTYPES:
        raise UserError(f"{flag} must be one of {', '.join(DTYPES)}, got {name!r}")
    return canonical


def parse_dtype(name: str | None, flag: str = "--dtype") -> "torch.dtype | None":
    """The torch dtype of ``name`` (None stays None: keep the stored dtype)."""
    import torch

    return None if name is None else getattr(torch, DTYPES[dtype_name(name, flag)])


def resolve_device(spec: str, local_rank: int = 0, flag: str = "--device") -> "torch.device":
    """``auto`` (CUDA when present, else CPU), ``cpu``, ``mps``, ``cuda`` (the local rank's GPU) or
    ``cuda:N``; a one-line error for anything else or for a GPU that is not there."""
    import torch

    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec in ("cpu", "mps"):
        return torch.device(spec)
    if spec == "cuda" or spec.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise UserError(f"{flag} is {spec!r} but no CUDA device is available")
        count = torch.cuda.device_count()
        if spec == "cuda":
            return torch.device("cuda", local_rank % count)
        index = spec.removeprefix("cuda:")
        if not index.isdigit() or int(index) >= count:
            raise UserError(f"{flag} {spec!r}: expected cuda:N with N in 0..{count - 1}")
        return torch.device("cuda", int(index))
    raise UserError(f"{flag} must be auto, cpu, cuda or cuda:N, got {spec!r}")
