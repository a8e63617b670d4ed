"""A model ladder (Figure 5 of the paper): several model sizes trained on the same shards for the
same token budget, each an ordinary run dir ``DIR/<size name>``, then ``DIR/figure5.png`` and
``DIR/ladder.json``.

A ladder file is a run config (the sections of ``llama-pretrain train --config``, shared by every
member) plus a ``[ladder]`` table whose ``sizes`` list names each size and its model fields::

    [ladder]
    sizes = [{name = "125m", dim = 768, n_layers = 12, n_heads = 12}, ...]

Peak learning rate per size: ``lr_ref * (dim_ref / dim) ** lr_exponent``. The default exponent 1
is 1/width, as muP prescribes for Adam on hidden matrices, and what Table 1 does from 7B at width
4096 to 70B at 8192 (3e-4 -> 1.5e-4); the built-in CPU ladder uses 0.5, because at its tiny widths
and 2M tokens the 1/width rule gave the smallest models rates so high that the sizes did not order.
The reference is the shared ``[model]`` section's preset (its ``peak_lr`` at its ``dim``) unless
``[ladder]`` sets ``lr_ref`` / ``dim_ref``. Without ``data.path`` the members train on the built-in
corpus: the demo's shards (``runs/demo/data``) when present, else prepared under ``DIR``.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import parse_json, read_json_object, read_toml
from ..config_fields import NON_NEGATIVE, POSITIVE, coerce
from ..errors import UserError
from .config import RunConfig, load_run_config

DEMO_DATA = Path("runs/demo/data")

# The built-in CPU ladder: widths 16-128 (llama2-tiny is the largest) on the demo's corpus, 250
# steps of 8,192 tokens (2.05M tokens) each; about 6 minutes in all on 2 idle CPU cores. (A
# width-64, 2-layer size ended above the width-32 one at every LR tried, 3e-3 to 1.2e-2.)
BUILTIN_LADDER: dict[str, Any] = {
    # Tried on 2 cores at 2.05M tokens: with the 1/width rule the widths 16-128 ended within 0.06
    # nats (and a width-16 model led for half the run); the square-root rule below orders them.
    "ladder": {"lr_exponent": 0.5, "sizes": [
        {"name": "d32", "dim": 32, "n_layers": 2, "n_heads": 1, "n_kv_heads": 1},
        {"name": "d96", "dim": 96, "n_layers": 3, "n_heads": 3, "n_kv_heads": 3},
        {"name": "d128", "dim": 128, "n_layers": 4, "n_heads": 4, "n_kv_heads": 2},
        {"name": "d192", "dim": 192, "n_layers": 4, "n_heads": 4, "n_kv_heads": 2},
    ]},
    "model": {"preset": "llama2-tiny"},
    "schedule": {"warmup_steps": 20, "min_lr_ratio": 0.1},
    "training": {"max_steps": 250, "seq_len": 256, "micro_batch_size": 32, "global_batch_tokens": 8192,
                 "seed": 0, "eval_every_steps": 50, "eval_batches": 4},
    "checkpoint": {"every_steps": 0, "keep_last": 1},
}


@dataclass
class Member:
    name: str
    cfg: RunConfig
    run_dir: Path


@dataclass
class Ladder:
    members: list[Member]
    lr_rule: str


def load_ladder(path: str | Path | None, run_dir: Path, sizes: str | None = None) -> Ladder:
    """Every member's run config, checked before anything trains (``path`` None: the built-in one)."""
    tree = copy.deepcopy(BUILTIN_LADDER) if path is None else read_toml(path)
    where = "built-in ladder" if path is None else str(path)
    table = tree.pop("ladder", None)
    if not isinstance(table, dict) or not isinstance(table.get("sizes"), list) or not table["sizes"]:
        raise UserError(f"{where}: needs a [ladder] table with a non-empty list `sizes`")
    if "lr" in tree.get("optimizer", {}):
        raise UserError(f"{where}: optimizer.lr is set per size by the ladder's rule; remove it "
                        f"(set [ladder] lr_ref / dim_ref instead)")
    unknown = sorted(set(table) - {"sizes", "lr_ref", "dim_ref", "lr_exponent"})
    if unknown:
        raise UserError(f"{where}: unknown [ladder] keys {', '.join(unknown)}; "
                        f"known: sizes, lr_ref, dim_ref, lr_exponent")
    shapes = _named_sizes(table["sizes"], where)
    chosen = _choose(shapes, sizes, where)
    reference = load_run_config(None, base=tree).model_config()
    lr_ref = coerce(table.get("lr_ref", reference.peak_lr), float, f"{where}: ladder.lr_ref", POSITIVE)
    dim_ref = coerce(table.get("dim_ref", reference.dim), int, f"{where}: ladder.dim_ref", POSITIVE)
    power = coerce(table.get("lr_exponent", 1.0), float, f"{where}: ladder.lr_exponent", NON_NEGATIVE)
    members = []
    for name in chosen:
        member_tree = copy.deepcopy(tree)
        member_tree["model"] = {**tree.get("model", {}), **shapes[name]}
        member_tree.setdefault("optimizer", {})["lr"] = lr_ref * (dim_ref / shapes[name].get("dim", dim_ref)) ** power
        try:
            cfg = load_run_config(None, base=member_tree)
        except UserError as e:
            raise UserError(f"{where}: size {name}: {e}") from None
        members.append(Member(name, cfg, run_dir / name))
    rule = (f"peak_lr = {lr_ref:g} * {dim_ref} / dim" if power == 1
            else f"peak_lr = {lr_ref:g} * ({dim_ref} / dim)^{power:g}")
    return Ladder(members, rule)


def _named_sizes(entries: list, where: str) -> dict[str, dict[str, Any]]:
    shapes: dict[str, dict[str, Any]] = {}
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not entry["name"]:
            raise UserError(f"{where}: each of ladder.sizes needs a name, got {entry!r}")
        name = entry["name"]
        if name in shapes or "/" in name or name.startswith("."):
            raise UserError(f"{where}: ladder size name {name!r} is repeated or not a plain directory name")
        shapes[name] = {k: v for k, v in entry.items() if k != "name"}
    return shapes


def _choose(shapes: dict[str, dict[str, Any]], sizes: str | None, where: str) -> list[str]:
    """The sizes ``--sizes a,b`` names (all of them when None), in the file's order."""
    if sizes is None:
        return list(shapes)
    names = [s.strip() for s in sizes.split(",")]
    unknown = [n for n in names if n not in shapes]
    if not all(names) or unknown or len(set(names)) != len(names):
        raise UserError(f"--sizes {sizes!r}: give distinct names from {where}: {', '.join(shapes)}")
    return [n for n in shapes if n in names]


# -- data -----------------------------------------------------------------------------------------
def ensure_data(ladder: Ladder, run_dir: Path) -> None:
    """Members without ``data.path`` train on the built-in corpus (the demo's shards if present)."""
    pending = [m for m in ladder.members if not m.cfg.data.path]
    if not pending:
        return
    vocab = pending[0].cfg.model_config().vocab_size
    data_dir = DEMO_DATA if _dataset_vocab(DEMO_DATA) == vocab else None
    if data_dir is None:
        from .demo import prepare_demo_data
        data_dir, _ = prepare_demo_data(run_dir, vocab, progress=pending[0].cfg.logging.progress)
    for m in pending:
        m.cfg.data.path = str(data_dir)


def _dataset_vocab(data_dir: Path) -> int | None:
    try:
        return int(parse_json((data_dir / "manifest.json").read_text())["tokenizer"]["vocab_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


# -- training -------------------------------------------------------------------------------------
def is_finished(member: Member) -> bool:
    """Its summary.json exists, its run.json holds this very config, and it has a checkpoint at
    max_steps: training it again would change nothing."""
    from ..interop.training_checkpoint import list_checkpoints, step_dir_name

    d = member.run_dir
    try:
        recorded = parse_json((d / "run.json").read_text())["config"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    ckpts = list_checkpoints(d / "checkpoints")
    return ((d / "summary.json").is_file() and recorded == member.cfg.to_dict() and bool(ckpts)
            and ckpts[-1].name == step_dir_name(member.cfg.training.max_steps))


def _quiet(msg: str) -> None:
    """``say`` on the ranks other than 0."""


def run_ladder(ladder: Ladder, run_dir: Path, say=print) -> dict[str, Any]:
    """Train (or reuse) every member, then write ladder.json and figure5.png; returns ladder.json
    (under torchrun: every rank trains, rank 0 reports and the others return {})."""
    from .loop import train
    from .distributed import barrier, init_distributed
    from .plot import plot_runs

    info = init_distributed(ladder.members[0].cfg.training.device)
    if info.is_main:
        ensure_data(ladder, run_dir)
    barrier()
    ensure_data(ladder, run_dir)  # the other ranks find what rank 0 prepared
    if not info.is_main:
        say = _quiet  # one copy of each line, from rank 0
    t0 = time.perf_counter()
    for m in ladder.members:
        if is_finished(m):
            say(f"[ladder] {m.name}: finished, reusing {m.run_dir}")
            continue
        say(f"[ladder] {m.name}: training into {m.run_dir} (peak lr {m.cfg.peak_lr:.3g})")
        train(m.cfg, m.run_dir)
    if not info.is_main:
        return {}
    runs = [member_record(m) for m in ladder.members]
    figure = plot_runs([m.run_dir for m in ladder.members], run_dir / "figure5.png",
                       labels=[f"{r['name']} ({_size(r['params'])} params)" for r in runs])
    out = {"lr_rule": ladder.lr_rule, "figure": str(figure), "wall_s": time.perf_counter() - t0, "runs": runs}
    _write_json(run_dir / "ladder.json", out)
    return out


def member_record(m: Member) -> dict[str, Any]:
    """One entry of ladder.json, from the member's config and its summary.json."""
    from ..compute.flops import param_counts

    summary = read_json_object(m.run_dir / "summary.json")
    model = m.cfg.model_config()
    counts = param_counts(model)
    return {"name": m.name, "params": counts.total, "non_embedding_params": counts.non_embedding,
            "dim": model.dim, "n_layers": model.n_layers, "peak_lr": m.cfg.peak_lr,
            "tokens": summary["tokens_seen"], "final_train_loss": summary["final_train_loss"],
            "final_val_loss": summary["final_val_loss"], "elapsed_s": summary.get("elapsed_s"),
            "run_dir": str(m.run_dir)}


def _size(n: int) -> str:
    return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def _write_json(path: Path, obj: Any) -> None:
    from ..fsutil import atomic_file

    with atomic_file(path, "w") as fh:
        json.dump(obj, fh, indent=1)
        fh.write("\n")
