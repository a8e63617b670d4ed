"""Math (Table 3): GSM8K (8-shot) and MATH (4-shot), greedy, maj1@1 (one sample, its answer).

Exemplars are the first k records of the few-shot split (the same for every question), written as
worked solutions ending in a stated final answer, which is what the model's output is parsed for."""

from __future__ import annotations

import re
from dataclasses import dataclass

from .. import metrics as M
from .base import GenerativeTask

GROUP = "Math"


class _FixedShots:
    def fewshot(self, i, sample, pool, k, same_split):
        return [s for j, s in enumerate(pool) if not (same_split and j == i)][:k]


@dataclass
class GSM8K(_FixedShots, GenerativeTask):
    def text(self, d): return f"Question: {d['question']}\nAnswer:"

    def target(self, d):
        body, _, final = d["answer"].rpartition("####")
        body = re.sub(r"<<[^>]*>>", "", body).strip()  # calculator annotations
        return f" {body} The answer is {final.strip()}."

    def score(self, d, completion):
        pred = M.gsm8k_extract(completion)
        ok = float(pred is not None and pred == M.gsm8k_gold(d["answer"]))
        return {"maj1@1": ok, "prediction": pred}


@dataclass
class MATH(_FixedShots, GenerativeTask):
    def text(self, d): return f"Problem:\n{d['problem']}\n\nSolution:"

    def target(self, d):
        ans = M.last_boxed(d["solution"]) or ""
        return f"\n{d['solution'].strip()}\nFinal Answer: The final answer is {ans}. I hope it is correct."

    def score(self, d, completion):
        pred = M.math_extract(completion)
        gold = M.normalize_math(M.last_boxed(d["solution"]))
        return {"maj1@1": float(pred is not None and M.normalize_math(pred) == gold), "prediction": pred}


TASKS = [
    GSM8K("gsm8k", "GSM8K", GROUP, "openai/gsm8k:main", ("question", "answer"), "test", "train", 8, "maj1@1",
          until=("\n\n", "Question:"), max_new_tokens=256, metrics=("maj1@1",)),
    MATH("math", "MATH", GROUP, "hendrycks/competition_math", ("problem", "solution"), "test", "train", 4,
         "maj1@1", until=("\n\nProblem:", "I hope it is correct"), max_new_tokens=384, metrics=("maj1@1",)),
]
