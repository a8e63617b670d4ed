"""What every phase-2 task knows: the config, the units in global order and their phase-1 stats,
where the work files go, the hash-range partitioning, and which items are done.

Work files and markers are renamed into place but not fsynced (thousands of small items would
spend most of their time in fsync): a killed task loses nothing it finished, since the page cache
outlives the process; after a machine crash, delete ``OUT/_work/phase2`` before running again.
The shards and the manifest are fsynced."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ...config import parse_json
from ...errors import UserError
from ...fsutil import atomic_file
from ..drops import Stats
from ..sources import DataConfig

WORK_DIR = "phase2"
# Documents per hash range in the dedup stage: a partition task sorts about this many 16-byte
# records, so its memory stays flat (~20 MB) however big the corpus is.
DOCS_PER_RANGE = 1 << 18
UNIT_BITS = 32   # a document id is (unit ordinal << 32) | index in the unit
MAX_UNITS = 1 << 24  # a document id fits 64 bits with room to spare


@dataclass
class UnitInfo:
    """One phase-1 unit: its directory and its stats as phase 1 left them."""

    dir: Path
    source: int
    stats: Stats
    fingerprint: str


@dataclass
class Phase2:
    cfg: DataConfig
    units: list[UnitInfo]    # in global order: a unit's ordinal is its index here
    out: Path
    tokenizer: dict
    strict: bool = False
    extra: dict = field(default_factory=dict)
    docs_per_range: int = DOCS_PER_RANGE

    def __post_init__(self) -> None:
        if len(self.units) >= MAX_UNITS:
            raise UserError(f"{len(self.units)} input units; at most {MAX_UNITS - 1} are supported")
        for u in self.units:
            if u.stats.documents_kept >= 1 << UNIT_BITS:
                raise UserError(f"{u.dir}: {u.stats.documents_kept} documents in one unit; split the file")
        total = sum(u.stats.documents_kept for u in self.units)
        # A power of two, so a key's range is its top bits.
        self.range_bits = max(0, math.ceil(math.log2(max(1, math.ceil(total / self.docs_per_range)))))
        st = self.cfg.stages
        self.exact = st.exact_dedup.enabled
        self.bands = st.near_dedup.bands if st.near_dedup.enabled else 0
        self.rows = st.near_dedup.rows
        self.perm = st.near_dedup.bands * st.near_dedup.rows if st.near_dedup.enabled else 0
        # Changes with anything that changes phase 2's work files (not with ``extra``).
        # work_format: the layout of the work files, so a re-run with other code redoes them
        payload = {"work_format": 2, "config": self.cfg.to_dict(), "tokenizer": self.tokenizer.get("sha256"),
                   "strict": self.strict, "docs_per_range": self.docs_per_range,
                   "units": [[str(u.dir), u.fingerprint] for u in self.units]}
        self.fingerprint = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]

    # -- where ---------------------------------------------------------------------------------

    @property
    def root(self) -> Path:
        return self.out / "_work" / WORK_DIR

    @property
    def work(self) -> Path:
        return self.root / self.fingerprint

    # -- partitions ----------------------------------------------------------------------------

    @property
    def ranges(self) -> int:
        return 1 << self.range_bits

    @property
    def partitions(self) -> int:
        """Exact-key ranges first, then each band's ranges."""
        return self.ranges * (int(self.exact) + self.bands)

    def partition_kind(self, p: int) -> tuple[str, int]:
        """("exact", 0) or ("near", band) for partition ``p``."""
        if self.exact and p < self.ranges:
            return "exact", 0
        return "near", (p - self.ranges * int(self.exact)) // self.ranges

    def range_of(self, keys: np.ndarray) -> np.ndarray:
        if not self.range_bits:
            return np.zeros(len(keys), dtype=np.int64)
        return (keys >> np.uint64(64 - self.range_bits)).astype(np.int64)

    # -- completion markers --------------------------------------------------------------------

    def marker(self, stage: str, item: int) -> Path:
        return self.work / "done" / stage / f"{item:08d}"

    def is_done(self, stage: str, item: int) -> bool:
        return self.marker(stage, item).is_file()

    def mark_done(self, stage: str, item: int) -> None:
        with atomic_file(self.marker(stage, item), "w", durable=False) as fh:
            fh.write("")

    def write_json(self, path: Path, obj) -> None:
        with atomic_file(path, "w", durable=False) as fh:
            json.dump(obj, fh)

    def read_json(self, path: Path):
        try:
            return parse_json(path.read_text())
        except (OSError, ValueError) as e:
            raise UserError(f"{path}: phase-2 work file missing or damaged ({e}); "
                            f"delete {self.work} and run again") from None


def doc_ids(unit: int, n: int) -> np.ndarray:
    return (np.uint64(unit) << np.uint64(UNIT_BITS)) | np.arange(n, dtype=np.uint64)


def unit_span(unit: int) -> tuple[np.uint64, np.uint64]:
    """The document ids of a unit: [lo, hi)."""
    return np.uint64(unit) << np.uint64(UNIT_BITS), np.uint64(unit + 1) << np.uint64(UNIT_BITS)
