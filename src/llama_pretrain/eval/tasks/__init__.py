"""The 20 benchmarks of Table 3, by task id, and the groups Table 3 averages them into."""

from __future__ import annotations

from ...errors import UserError
from . import aggregated, code, commonsense, knowledge, math, reading

TASKS = {t.id: t for mod in (commonsense, knowledge, reading, math, aggregated, code) for t in mod.TASKS}

# Table 3's columns, in its order; each is the mean of its tasks' primary metrics.
GROUPS = {
    "Code": ["humaneval", "mbpp"],
    "Commonsense Reasoning": ["piqa", "siqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge",
                              "openbookqa", "commonsense_qa"],
    "World Knowledge": ["naturalquestions", "triviaqa"],
    "Reading Comprehension": ["squad", "quac", "boolq"],
    "Math": ["gsm8k", "math"],
    "MMLU": ["mmlu"],
    "BBH": ["bbh"],
    "AGI Eval": ["agieval"],
}
# Names accepted by --tasks for whole groups (a task id wins over a group alias: `math` is MATH).
GROUP_ALIASES = {
    "code": "Code", "commonsense": "Commonsense Reasoning", "commonsense_reasoning": "Commonsense Reasoning",
    "world_knowledge": "World Knowledge", "reading_comprehension": "Reading Comprehension",
    "math_group": "Math", "aggregated": None,
}


def resolve(spec: str) -> list[str]:
    """Task ids from a comma list of task ids, group names and ``all``, in Table 3 order."""
    wanted: list[str] = []
    for name in (s.strip() for s in spec.split(",")):
        if not name:
            continue
        key = name.lower()
        if key in ("all", "table3"):
            ids = [t for g in GROUPS.values() for t in g]
        elif key in TASKS:
            ids = [key]
        elif key == "aggregated":
            ids = ["mmlu", "bbh", "agieval"]
        elif (group := GROUP_ALIASES.get(key)) is not None:  # "aggregated" (None) is handled above
            ids = GROUPS[group]
        elif name in GROUPS:
            ids = GROUPS[name]
        else:
            raise UserError(f"unknown task {name!r}; tasks: {', '.join(TASKS)}; groups: "
                            f"{', '.join(GROUP_ALIASES)}, all")
        wanted += [i for i in ids if i not in wanted]
    if not wanted:
        raise UserError("--tasks is empty")
    order = [t for g in GROUPS.values() for t in g]
    order += [t for t in TASKS if t not in order]  # variants outside Table 3 (commonsense_qa_letters)
    return sorted(wanted, key=order.index)
