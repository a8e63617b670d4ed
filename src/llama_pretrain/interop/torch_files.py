"""``torch.save`` files (``pytorch_model*.bin``, Meta's ``consolidated.NN.pth``), read the way
safetensors files are: shapes first, from the file's own description, before any tensor exists.

A torch file is a zip of a pickle (``data.pkl``, the dict of tensors) and one member per storage.
``torch.load`` would inflate a deflate-compressed member in memory, and allocates every storage at
the size the pickle claims, so the shapes are read here instead: the zip must hold only stored
(uncompressed) members, ``data.pkl`` goes through an unpickler that admits nothing but dense
tensors in a dict (no object is built, no code runs), and each tensor must lie within its
storage, each storage within its member. The tensors are then memory-mapped
(``torch.load(mmap=True, weights_only=True)``): backed by the file, allocated only when copied.
"""

from __future__ import annotations

import math
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UserError
from .checks import check_tensors

# The storage classes torch.save names (legacy typed storages), by the dtype they stand for.
_STORAGE_DTYPES = {f"{name}Storage": getattr(torch, dtype) for name, dtype in (
    ("Double", "float64"), ("Float", "float32"), ("Half", "float16"), ("BFloat16", "bfloat16"),
    ("Long", "int64"), ("Int", "int32"), ("Short", "int16"), ("Char", "int8"), ("Byte", "uint8"),
    ("Bool", "bool"), ("ComplexDouble", "complex128"), ("ComplexFloat", "complex64"))}
HEAD_NAMES = ("lm_head.weight", "output.weight")  # may share the embedding's bytes (tied weights)


@dataclass(frozen=True)
class _Storage:
    key: str
    dtype: torch.dtype
    numel: int  # in elements of dtype


@dataclass(frozen=True)
class TensorInfo:
    """What the pickle says of one tensor, with no tensor built."""

    storage: _Storage
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _ints(value, what: str) -> tuple[int, ...]:
    if not isinstance(value, tuple) or not all(type(v) is int and v >= 0 for v in value):
        raise pickle.UnpicklingError(f"{what} {value!r} is not a tuple of non-negative integers")
    return value


def _tensor(storage, offset, size, stride, dtype: torch.dtype) -> TensorInfo:
    if not isinstance(storage, _Storage) or type(offset) is not int or offset < 0:
        raise pickle.UnpicklingError("a tensor without a storage of the file")
    size, stride = _ints(size, "shape"), _ints(stride, "stride")
    if len(size) != len(stride):
        raise pickle.UnpicklingError(f"shape {size} and stride {stride} differ in length")
    return TensorInfo(storage, offset, size, stride, dtype)


def _rebuild_tensor_v2(storage, offset, size, stride, *_):
    return _tensor(storage, offset, size, stride, getattr(storage, "dtype", None))


def _rebuild_tensor_v3(storage, offset, size, stride, requires_grad, hooks, dtype, *_):
    if not isinstance(dtype, torch.dtype) or not isinstance(storage, _Storage) or storage.dtype != torch.uint8:
        raise pickle.UnpicklingError("a tensor whose dtype or storage is not a torch one")
    return _tensor(storage, offset * dtype.itemsize, size, stride, dtype)  # offset counted in dtype


def _rebuild_parameter(data, *_):
    return data


class _ShapeUnpickler(pickle.Unpickler):
    """Reads ``data.pkl`` into {name: TensorInfo}, and ``storages`` (key -> ``_Storage``) as
    declared; any global but these is refused."""

    FUNCTIONS = {("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
                 ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
                 ("torch._utils", "_rebuild_parameter"): _rebuild_parameter}

    def __init__(self, file) -> None:
        super().__init__(file)
        self.storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str):
        import collections

        if (module, name) in self.FUNCTIONS:
            return self.FUNCTIONS[(module, name)]
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module in ("torch", "torch.storage") and name == "UntypedStorage":
            return torch.uint8  # a storage stands for its dtype here: it is all persistent_load needs
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        kind = torch.__dict__.get(name) if module == "torch" else None  # no lazy import of a submodule
        if isinstance(kind, torch.dtype):
            return kind
        raise pickle.UnpicklingError(f"refers to {module}.{name}, which no state dict of tensors needs")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], torch.dtype)
                and isinstance(pid[2], str) and isinstance(pid[3], str) and type(pid[4]) is int and pid[4] >= 0):
            raise pickle.UnpicklingError(f"unknown persistent id {str(pid)[:80]}")
        storage = _Storage(pid[2], pid[1], pid[4])
        if self.storages.setdefault(storage.key, storage) != storage:  # torch.load keeps the first
            raise pickle.UnpicklingError(f"storage {storage.key!r} declared twice, differently")
        return storage


def _zip_members(path: Path) -> tuple[zipfile.ZipFile, str]:
    """The open zip and its record prefix ("archive/"), once every member is stored uncompressed."""
    try:
        z = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise UserError(f"{path}: not a torch.save zip file ({e}); the legacy pre-1.6 format is not "
                        "read, re-save it with a current torch") from None
    for info in z.infolist():
        if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 1 or info.file_size != info.compress_size:
            z.close()
            raise UserError(f"{path}: member {info.filename!r} is compressed or encrypted; torch.save writes "
                            "stored members, which can be memory-mapped")
    names = z.namelist()
    if len(set(names)) != len(names):  # zip readers differ on which duplicate they take
        z.close()
        raise UserError(f"{path}: the zip holds two members of one name")
    pickles = [n for n in names if n == "data.pkl" or (n.endswith("/data.pkl") and n.count("/") == 1)]
    if len(pickles) != 1:
        z.close()
        raise UserError(f"{path}: expected one data.pkl record, found {len(pickles)}")
    return z, pickles[0][: -len("data.pkl")]


def torch_file_tensors(path: str | Path) -> dict[str, TensorInfo]:
    """Name -> ``TensorInfo`` of a torch.save file of a dict of dense tensors, building no tensor;
    each must lie within its storage and each storage within its zip member."""
    path = Path(path)
    z, prefix = _zip_members(path)
    with z:
        unpickler = _ShapeUnpickler(z.open(prefix + "data.pkl"))
        try:
            state = unpickler.load()
        except Exception as e:  # noqa: BLE001 - any malformed pickle is a bad file
            raise UserError(f"{path}: not a state dict of tensors ({type(e).__name__}: {e})") from None
        if not isinstance(state, dict):
            raise UserError(f"{path}: expected a dict of tensors, got {type(state).__name__}")
        for name, value in state.items():
            if not isinstance(name, str) or not isinstance(value, TensorInfo):
                raise UserError(f"{path}: entry {name!r} is a {type(value).__name__}, not a tensor")
        sizes = {info.filename: info.file_size for info in z.infolist()}
    for key, storage in unpickler.storages.items():  # each within its record: mmap reads no further
        record = sizes.get(f"{prefix}data/{key}", 0)
        if storage.numel * storage.dtype.itemsize > record:
            raise UserError(f"{path}: storage {key!r} claims {storage.numel * storage.dtype.itemsize} bytes, "
                            f"its record holds {record}")
    for name, t in state.items():
        _check_within(path, name, t)
    return state


def _check_within(path: Path, name: str, t: TensorInfo) -> None:
    """The tensor's elements lie in its storage, without overlapping themselves (a stride-0 tensor
    would claim more elements than bytes)."""
    item = t.storage.dtype.itemsize
    storage_bytes = t.storage.numel * item
    numel = math.prod(t.shape)
    span = 0 if numel == 0 else 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride))
    start = t.offset * item
    if numel > span or start + span * t.dtype.itemsize > storage_bytes:
        raise UserError(f"{path}: tensor {name} (shape {t.shape}, stride {t.stride}) is not backed by its "
                        f"storage's {storage_bytes} bytes")


def check_backed(path, tensors: dict[str, TensorInfo]) -> None:
    """UserError unless the tensors together hold no more bytes than their storages: the file holds
    every weight it declares (only an output head may repeat the embedding, as tied weights do)."""
    views = {(t.storage.key, t.offset, t.shape, t.stride) for n, t in tensors.items() if n not in HEAD_NAMES}
    total = sum(t.nbytes for n, t in tensors.items()
                if not (n in HEAD_NAMES and (t.storage.key, t.offset, t.shape, t.stride) in views))
    stored = sum(s.numel * s.dtype.itemsize for s in {t.storage.key: t.storage for t in tensors.values()}.values())
    if total > stored:
        raise UserError(f"{path}: its tensors claim {total} bytes but its storages hold {stored} "
                        "(tensors share bytes)")


def read_torch_file(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a torch.save file, memory-mapped, once ``torch_file_tensors`` and
    ``check_backed`` passed."""
    path = Path(path)
    expected = torch_file_tensors(path)
    check_backed(path, expected)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file
        raise UserError(f"{path}: cannot read weights ({type(e).__name__}: {e})") from None
    check_tensors(state, path)
    if {k: tuple(v.shape) for k, v in state.items()} != {k: t.shape for k, t in expected.items()}:
        raise UserError(f"{path}: torch.load read other tensors than the file describes")
    return state
