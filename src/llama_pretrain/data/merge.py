"""``data merge``: join the parts written by ``data prepare --num-tasks N --task-index I``.

Each part keeps its phase-1 units (``PART/_work/units/...``) and lists them in its manifest. The
merge collects the units of all N parts, orders them as a single job would (sources in config
order, files in sorted order) and runs phase 2 once: exact and near duplicates across tasks are
removed here, the split and mixture are decided globally, and the shards are written to ``--out``.
The result is byte-identical to one ``data prepare`` run over the same inputs.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from .prepare import UnitRef, check_out_dir, finalize, out_lock, read_unit_stats
from .shards import read_manifest
from .sources import data_config_from_dict


def merge(parts: list[str | Path], out: str | Path, progress: bool = True, workers: int = 1) -> dict:
    if not parts:
        raise UserError("no part directories given")
    out = check_out_dir(out, "data merge")
    manifests = [(Path(p), read_manifest(p)) for p in parts]
    first_dir, first = manifests[0]
    for d, m in manifests:
        if "part" not in m:
            raise UserError(f"{d} was not prepared with --num-tasks; nothing to merge")
        if m["tokenizer"]["sha256"] != first["tokenizer"]["sha256"]:
            raise UserError(f"{d} used a different tokenizer than {first_dir}")
        if m["config"] != first["config"]:
            raise UserError(f"{d} was prepared with a different data config than {first_dir}")
        if m["part"]["num_tasks"] != first["part"]["num_tasks"]:
            raise UserError(f"{d} is part of a {m['part']['num_tasks']}-task run, {first_dir} of "
                            f"{first['part']['num_tasks']}")
    n = first["part"]["num_tasks"]
    seen: dict[int, Path] = {}
    for d, m in manifests:
        i = m["part"]["task_index"]
        if i in seen:
            raise UserError(f"task {i} given twice: {seen[i]} and {d}")
        seen[i] = d
    missing = sorted(set(range(n)) - set(seen))
    if missing:
        raise UserError(f"missing part(s) for task index {', '.join(map(str, missing))} of {n}")
    if out.resolve() in {d.resolve() for d, _ in manifests}:
        raise UserError("--out must not be one of the parts")

    cfg = data_config_from_dict(first["config"])
    refs, stats = [], []
    for d, m in manifests:
        if m["part"].get("unit_bytes") != first["part"].get("unit_bytes"):  # the tasks' units would not fit
            raise UserError(f"{d} was prepared with a different --unit-bytes than {first_dir}")
        for u in m["part"]["units"]:
            ref = UnitRef(u["source"], u["file_index"], "", d / u["dir"], u.get("part", 0))
            try:
                st = read_unit_stats(ref.dir)
            except (OSError, ValueError, KeyError):
                raise UserError(f"{ref.dir}: work files missing; re-run that task") from None
            refs.append(ref)
            stats.append(st)
    order = sorted(range(len(refs)), key=lambda i: (refs[i].source, refs[i].file_index, refs[i].part))
    refs = [refs[i] for i in order]
    stats = [stats[i] for i in order]
    merged_from = [str(d) for d, _ in sorted(manifests, key=lambda x: x[1]["part"]["task_index"])]
    with out_lock(out, "data merge"):
        return finalize(cfg, refs, stats, out, first["tokenizer"], progress=progress,
                        extra={"merged_from": merged_from}, workers=workers)
