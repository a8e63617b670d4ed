"""Running phase 2's stages: all of them in a local process pool, or one task of one stage.

An item's outputs are written whole (renamed into place), then its completion marker; a stage
run again skips the items marked done, so a killed or failed task is re-run alone. A stage
refuses to start until every item of the stage before it is done.
"""

from __future__ import annotations

import shutil
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any

from ...errors import UserError
from ...fsutil import reporting_full_disk, tree_bytes
from ..pool import init_worker, interruptible, pool_context, progress_bar
from .context import Phase2
from .dedup import run_dedup, run_keys, run_resolve
from .layout import run_plan, run_split
from .write import plan_path, run_finish, run_write, shard_items, staging, start_staging

STAGES = ("keys", "dedup", "resolve", "split", "plan", "write", "finish")
SINGLE = ("resolve", "plan", "finish")  # one item, run by task 0


def _plan(ctx: Phase2) -> dict:
    return ctx.read_json(plan_path(ctx))


def item_count(ctx: Phase2, stage: str) -> int:
    if stage in ("keys", "split"):
        return len(ctx.units)
    if stage == "dedup":
        return ctx.partitions
    if stage == "write":
        return len(shard_items(_plan(ctx)))
    return 1


def pending(ctx: Phase2, stage: str) -> list[int]:
    return [i for i in range(item_count(ctx, stage)) if not ctx.is_done(stage, i)]


def run_item(ctx: Phase2, stage: str, i: int, state: dict, bar=None) -> Any:
    """Do item ``i`` of ``stage`` and mark it done; ``state`` keeps what a task reuses (the plan)."""
    if stage == "finish":
        with reporting_full_disk(ctx.out, lambda: tree_bytes(staging(ctx))):
            return run_finish(ctx, _plan(ctx))
    if stage == "keys":
        run_keys(ctx, i)
    elif stage == "dedup":
        run_dedup(ctx, i)
    elif stage == "resolve":
        run_resolve(ctx, bar)
    elif stage == "split":
        run_split(ctx, i)
    elif stage == "plan":
        plan = run_plan(ctx)  # a UserError (nothing left) comes before anything is written
        start_staging(ctx)
        ctx.write_json(plan_path(ctx), plan)
    elif stage == "write":
        if "plan" not in state:
            state["plan"] = _plan(ctx)
        with reporting_full_disk(ctx.out, lambda: tree_bytes(staging(ctx))):
            run_write(ctx, state["plan"], i)
    ctx.mark_done(stage, i)
    return None


# ---------------------------------------------------------------------------------------------
# In a local process pool


_CTX: Phase2 | None = None
_STATE: dict = {}


def _init_pool_worker(ctx: Phase2) -> None:
    global _CTX
    _CTX = ctx
    init_worker()


def _pool_item(stage: str, i: int) -> None:
    if _CTX is None:
        raise RuntimeError("phase-2 pool worker without its context")
    with interruptible():  # Ctrl-C stops the item in progress
        run_item(_CTX, stage, i, _STATE)


def run_local(ctx: Phase2, workers: int = 1, progress: bool = True) -> dict:
    """Every stage, in ``workers`` processes; returns the manifest. On a failure the staging dir
    goes (the previous dataset stays whole) with the write stage's markers, since its shards were
    there; the other finished items stay for a re-run."""
    if ctx.is_done("finish", 0):  # the same run again: write the dataset again
        shutil.rmtree(ctx.work)
    state: dict = {}
    pool = None
    try:
        for stage in STAGES:
            todo = pending(ctx, stage)
            if stage == "finish":
                return run_item(ctx, stage, 0, state)
            bar = progress_bar(progress, total=len(ctx.units) if stage == "resolve" else len(todo), unit="item",
                       desc=stage)
            if workers > 1 and len(todo) > 1:
                if pool is None:
                    pool = ProcessPoolExecutor(max_workers=workers, mp_context=pool_context(),
                                               initializer=_init_pool_worker, initargs=(ctx,))
                futures = [pool.submit(_pool_item, stage, i) for i in todo]
                for f in as_completed(futures):
                    f.result()
                    bar.update(1)
            else:
                for i in todo:
                    run_item(ctx, stage, i, state, bar if stage == "resolve" else None)
                    if stage != "resolve":
                        bar.update(1)
            bar.close()
        raise RuntimeError("phase 2 ended without its finish stage")
    except BaseException:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
            pool = None
        if not ctx.is_done("swap", 0):  # once the swap began, staging is half of the new dataset
            shutil.rmtree(ctx.work / "done" / "write", ignore_errors=True)  # first: no marker outlives its shard
            shutil.rmtree(staging(ctx), ignore_errors=True)
        raise
    finally:
        if pool is not None:
            pool.shutdown(wait=True)


# ---------------------------------------------------------------------------------------------
# One task of one stage (a Slurm array task, say)


def run_task(ctx: Phase2, stage: str, num_tasks: int, task_index: int, progress: bool = True) -> dict | None:
    """This task's items of ``stage`` (items i with i % num_tasks == task_index); the manifest
    when it ran the finish stage."""
    if ctx.is_done("finish", 0) or (stage in SINGLE and task_index):
        return None  # this run is finished / one item, which task 0 does
    k = STAGES.index(stage)
    if k and not ctx.work.is_dir():
        raise UserError(f"no phase-2 work in {ctx.root} for these inputs and settings: stage {STAGES[0]} has "
                        f"not run, or the config, tokenizer, input files, --unit-bytes or --range-docs differ "
                        f"from the earlier stages'; run every stage from {STAGES[0]} with the same settings")
    if k:
        left = pending(ctx, STAGES[k - 1])
        if left:
            raise UserError(f"stage {STAGES[k - 1]} is not finished ({len(left)} of "
                            f"{item_count(ctx, STAGES[k - 1])} items left); run it before --stage {stage}")
    mine = [i for i in pending(ctx, stage) if stage in SINGLE or i % num_tasks == task_index]
    state: dict = {}
    result = None
    for i in mine:
        result = run_item(ctx, stage, i, state)
    return result
