"""Popular aggregated benchmarks (Table 3): MMLU (5-shot), BIG-Bench Hard (3-shot), AGIEval
English (3-shot by default; the paper says 3-5).

MMLU asks for the answer letter after the lettered options, with the dev split's examples of the
same subject. BBH and AGIEval ship only a test split; their examples are the first k other
records of the same sub-task (the ``_subset`` / ``task`` field)."""

from __future__ import annotations

from dataclasses import dataclass

from .base import BadRecord, GenerativeTask, MultipleChoiceTask, int_label

LETTERS = "ABCDEFGHIJ"


def _subset(s) -> str:
    return str(s.doc.get("_subset", s.doc.get("task", s.doc.get("subject", ""))))


class _SameSubsetShots:
    def fewshot(self, i, sample, pool, k, same_split):
        key = _subset(sample)
        return [s for j, s in enumerate(pool) if _subset(s) == key and not (same_split and j == i)][:k]


@dataclass
class MMLU(_SameSubsetShots, MultipleChoiceTask):
    def describe(self, s):
        subject = str(s.doc.get("subject", "")).replace("_", " ").strip()
        return f"The following are multiple choice questions (with answers) about {subject}.\n\n" if subject \
            else "The following are multiple choice questions (with answers).\n\n"

    def text(self, d):
        opts = "".join(f"\n{LETTERS[i]}. {c}" for i, c in enumerate(d["choices"]))
        return f"{d['question'].strip()}{opts}\nAnswer:"

    ANSWER_FIELD = "answer"
    FORMAT = "lettered"

    def choices(self, d):
        if not isinstance(d["choices"], list) or not 0 < len(d["choices"]) <= len(LETTERS):
            raise BadRecord(f"field 'choices' is not a list of 1 to {len(LETTERS)} options")
        return list(LETTERS[:len(d["choices"])])

    def gold(self, d):
        a = d["answer"]
        if isinstance(a, str) and len(a.strip()) == 1 and a.strip() in LETTERS:
            return LETTERS.index(a.strip())
        return int_label(d, "answer")


@dataclass
class BBH(_SameSubsetShots, GenerativeTask):
    def text(self, d): return f"Q: {d['input']}\nA:"
    def target(self, d): return f" {d['target']}"

    def score(self, d, completion):
        pred = completion.strip().split("\n")[0].strip()
        return {"exact_match": float(pred == str(d["target"]).strip()), "prediction": pred}


@dataclass
class AGIEval(_SameSubsetShots, MultipleChoiceTask):
    ANSWER_FIELD = "gold"

    def text(self, d): return d["query"]
    def choices(self, d):
        if not isinstance(d["choices"], list):
            raise BadRecord(f"field 'choices' is {d['choices']!r}, not a list")
        return list(d["choices"])

    def gold(self, d):
        g = d["gold"]
        if isinstance(g, (list, tuple)):  # one answer per record: a list of several is ambiguous
            if len(g) != 1:
                raise BadRecord(f"field 'gold' is {g!r}, not one answer index")
            return int_label({"gold": g[0]}, "gold")
        return int_label(d, "gold")


AGIEVAL_EN = ("aqua-rat", "logiqa-en", "lsat-ar", "lsat-lr", "lsat-rc", "sat-en", "sat-en-without-passage",
              "sat-math")

TASKS = [
    MMLU("mmlu", "MMLU", "MMLU", "cais/mmlu:all", ("question", "subject", "choices", "answer"), "test", "dev",
         5, "acc", sep="\n\n"),
    BBH("bbh", "BBH", "BBH", "lukaemon/bbh", ("input", "target"), "test", None, 3, "exact_match",
        until=("\n\n", "\nQ:"), max_new_tokens=64,
        notes="answer-only exemplars (Q:/A:); sub-task from DATA_DIR/bbh/<task>/test.jsonl or a 'task' field"),
    AGIEval("agieval", "AGIEval (English)", "AGI Eval", "hails/agieval-<task> (" + ", ".join(AGIEVAL_EN) + ")",
            ("query", "choices", "gold"), "test", None, 3, "acc",
            notes="multiple choice over the 'choices' of each English sub-task; sub-task from "
                  "DATA_DIR/agieval/<task>/test.jsonl or a 'task' field"),
]
