"""World Knowledge (Table 3): NaturalQuestions and TriviaQA, 5-shot, greedy, exact match.

The LLaMA prompt: "Answer these questions:" then "Q: ...\\nA: ..." examples, one per line; the
answer is cut at the first newline, final dot or comma and compared after normalisation."""

from __future__ import annotations

from dataclasses import dataclass

from .base import QATask

GROUP = "World Knowledge"


@dataclass
class ClosedBookQA(QATask):
    description: str = "Answer these questions:\n"
    sep: str = "\n"

    def text(self, d): return f"Q: {d['question']}\nA:"
    def target(self, d): return " " + self.golds(d)[0]


@dataclass
class NaturalQuestions(ClosedBookQA):
    def golds(self, d): return [str(a) for a in d["answer"]]


@dataclass
class TriviaQA(ClosedBookQA):
    def golds(self, d):
        a = d["answer"]
        if isinstance(a, str):
            return [a]
        return [a["value"], *a.get("aliases", [])]


TASKS = [
    NaturalQuestions("naturalquestions", "NaturalQuestions", GROUP, "google-research-datasets/nq_open",
                     ("question", "answer"), "validation", "train", 5, "exact_match",
                     until=("\n",), max_new_tokens=32),
    TriviaQA("triviaqa", "TriviaQA", GROUP, "mandarjoshi/trivia_qa:rc.nocontext", ("question", "answer"),
             "validation", "train", 5, "exact_match", until=("\n",), max_new_tokens=32),
]
