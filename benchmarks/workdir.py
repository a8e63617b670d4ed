"""A benchmark's --work directory: new, empty, or marked as that benchmark's own. The benchmarks
replace their own subdirectories in it, so a folder holding anything else is refused."""

from __future__ import annotations

import sys
from pathlib import Path


def own_work_dir(work: Path, marker: str) -> Path:
    """``work``, made and marked (a ``marker`` file) as the calling script's; an existing dir
    without the marker that holds anything is refused."""
    if work.exists() and any(work.iterdir()) and not (work / marker).is_file():
        sys.exit(f"--work {work} holds files this script did not write; give a new or empty directory")
    work.mkdir(parents=True, exist_ok=True)
    (work / marker).touch()
    return work
