"""What a task is: data fields, prompt format, shots, requests and metrics.

Three kinds share one shape. ``MultipleChoiceTask`` scores each choice by log-likelihood (acc,
acc_norm, and acc_uncond where the LLaMA papers use it); ``GenerativeTask`` generates greedily up
to stop sequences and scores the text (exact match, F1, maj1@1); ``CodeTask`` (in ``code.py``)
generates programs and runs their tests in the sandbox (pass@k).

Few-shot examples come from the task's few-shot split when its file exists, otherwise from the
evaluation split itself, never including the document being scored. Selection is deterministic.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any

from .. import metrics as M

SEED = 1234


class BadRecord(ValueError):
    """A record that cannot be scored; the message names the field."""


def int_label(doc: dict, field: str) -> int:
    """``doc[field]`` as an integer: an int or a string of digits (Hugging Face ships both);
    anything else (null, "B", 1.5, true) is a ``BadRecord``, never a silently wrong score."""
    v = doc.get(field)
    if isinstance(v, str) and re.fullmatch(r"\s*-?[0-9]+\s*", v):
        return int(v)
    if isinstance(v, float) and v.is_integer():
        return int(v)
    if isinstance(v, bool) or not isinstance(v, int):
        raise BadRecord(f"field {field!r} is {v!r}, not an integer label")
    return v


@dataclass
class Sample:
    """One scored unit: a record (or one turn of it), with a stable id."""
    id: str
    doc: dict


@dataclass
class Task:
    id: str
    title: str
    group: str
    hf: str                      # "path[:config,...]" of the Hugging Face dataset the fields follow
    fields: tuple[str, ...]
    split: str
    fewshot_split: str | None
    shots: int
    primary: str
    kind: str = "mc"
    description: str = ""        # text before the examples
    sep: str = "\n\n"            # between examples
    notes: str = ""

    # -- data --------------------------------------------------------------------------------
    def samples(self, records: list[dict]) -> list[Sample]:
        return [Sample(str(r.get("id", r.get("idx", i))) if isinstance(r.get("id", r.get("idx", i)), (str, int))
                       else str(i), r) for i, r in enumerate(records)]

    def fewshot(self, i: int, sample: Sample, pool: list[Sample], k: int, same_split: bool) -> list[Sample]:
        """k examples for sample i: a seeded random draw from the pool (lm-eval's default)."""
        if k <= 0:
            return []
        cands = [s for j, s in enumerate(pool) if not (same_split and j == i)]
        return random.Random(SEED + i).sample(cands, min(k, len(cands)))

    def describe(self, sample: Sample) -> str:
        return self.description

    def problem(self, doc: dict) -> str | None:
        """Why ``doc`` cannot be scored, or None; checked for every record before any scoring."""
        return None

    def settings(self, shots: int, fewshot_source: str | None) -> dict:
        return {"shots": shots, "split": self.split, "fewshot_split": fewshot_source,
                "fewshot_sampler": f"seeded ({SEED})", "example_separator": self.sep,
                "description": self.description, "hf_dataset": self.hf, "primary_metric": self.primary,
                **({"notes": self.notes} if self.notes else {})}


@dataclass
class MultipleChoiceTask(Task):
    kind: str = "mc"
    uncond: bool = False         # also score choices after "Answer:" alone (acc_uncond)
    target_delimiter: str = " "
    ANSWER_FIELD = "label"       # the field ``gold`` reads, for error messages
    # cloze: each answer text is scored after the question; lettered: the options are listed in the
    # prompt and their letters are scored; partial: the options fill a blank (WinoGrande)
    FORMAT = "cloze"

    def settings(self, shots: int, fewshot_source: str | None) -> dict:
        return {**super().settings(shots, fewshot_source), "format": self.FORMAT}

    def problem(self, doc: dict) -> str | None:
        """The answer must be one of the choices: an answer out of range would score as wrong."""
        try:
            choices, gold = self.choices(doc), self.gold(doc)
        except BadRecord as e:
            return str(e)
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
            return f"cannot read its choices and answer ({type(e).__name__}: {e})"
        if not all(isinstance(c, str) for c in choices):
            return f"its choices are not all strings: {choices!r}"[:200]
        if not 0 <= gold < len(choices):
            return (f"field {self.ANSWER_FIELD!r} gives answer index {gold}, out of range for its "
                    f"{len(choices)} choices")
        return None

    def text(self, doc: dict) -> str:
        raise NotImplementedError

    def choices(self, doc: dict) -> list[str]:
        raise NotImplementedError

    def gold(self, doc: dict) -> int:
        raise NotImplementedError

    def example(self, doc: dict) -> str:
        return self.text(doc) + self.target_delimiter + self.choices(doc)[self.gold(doc)]

    def requests(self, doc: dict, prefix: str) -> list[tuple[str, str]]:
        """(context, continuation) per choice; Winogrande varies the context instead."""
        ctx = prefix + self.text(doc)
        return [(ctx, self.target_delimiter + c) for c in self.choices(doc)]

    def char_lengths(self, doc: dict) -> list[int]:
        """Choice lengths for acc_norm: the choice text without the delimiter, as lm-eval counts."""
        return [len(c) for c in self.choices(doc)]

    def evaluate(self, lm, samples, prompts) -> list[dict]:
        reqs: list[tuple[str, str]] = []
        spans: list[tuple[int, int]] = []
        for s, prefix in zip(samples, prompts):
            rs = self.requests(s.doc, prefix)
            if self.uncond:
                rs = rs + [("Answer:", self.target_delimiter + c) for c in self.choices(s.doc)]
            spans.append((len(reqs), len(rs)))
            reqs.extend(rs)
        lls = lm.loglikelihood(reqs)
        out = []
        for s, (a, n) in zip(samples, spans):
            n_choices = n // 2 if self.uncond else n
            lp = [lls[a + j][0] for j in range(n_choices)]
            unc = [lls[a + n_choices + j][0] for j in range(n_choices)] if self.uncond else None
            gold = self.gold(s.doc)
            m = M.choice_metrics(lp, self.char_lengths(s.doc), gold, unc)
            out.append({"id": s.id, **m, "gold": gold, "loglikelihoods": lp})
        return out


@dataclass
class GenerativeTask(Task):
    kind: str = "gen"
    until: tuple[str, ...] = ("\n",)
    max_new_tokens: int = 32
    metrics: tuple[str, ...] = ("exact_match",)

    def text(self, doc: dict) -> str:
        raise NotImplementedError

    def target(self, doc: dict) -> str:
        """What follows ``text`` in a few-shot example."""
        raise NotImplementedError

    def example(self, doc: dict) -> str:
        return self.text(doc) + self.target(doc)

    def score(self, doc: dict, completion: str) -> dict[str, Any]:
        """The metrics (floats), and what a generative task read as its ``prediction``."""
        raise NotImplementedError

    def evaluate(self, lm, samples, prompts) -> list[dict]:
        from ..harness import GenRequest

        gens = lm.generate([GenRequest(p + self.text(s.doc), self.until, self.max_new_tokens)
                            for s, p in zip(samples, prompts)])
        return [{"id": s.id, **self.score(s.doc, g), "completion": g} for s, g in zip(samples, gens)]


@dataclass
class QATask(GenerativeTask):
    """Short-answer QA scored LLaMA's way: cut at newline / dot / comma, normalised exact match."""
    metrics: tuple[str, ...] = ("exact_match", "f1")

    def golds(self, doc: dict) -> list[str]:
        raise NotImplementedError

    def score(self, doc: dict, completion: str) -> dict[str, Any]:
        pred = M.cut_answer(completion)
        golds = self.golds(doc) or [""]
        return {"exact_match": M.exact_match(pred, golds), "f1": M.f1(pred, golds), "prediction": pred}
