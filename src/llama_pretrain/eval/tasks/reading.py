"""Reading Comprehension (Table 3): SQuAD (EM), QuAC (F1) and BoolQ, all zero-shot.

QuAC records are dialogues; each turn becomes one sample whose prompt holds the section text and
the earlier turns with their original answers."""

from __future__ import annotations

from dataclasses import dataclass

from .base import BadRecord, MultipleChoiceTask, QATask, Sample

GROUP = "Reading Comprehension"


@dataclass
class SQuAD(QATask):
    def text(self, d):
        return f"Title: {d['title']}\n\nBackground: {d['context']}\n\nQuestion: {d['question']}\n\nAnswer:"
    def target(self, d): return " " + (self.golds(d) or ["unanswerable"])[0]
    def golds(self, d): return [t for t in d["answers"]["text"]]


@dataclass
class QuAC(QATask):
    def samples(self, records):
        out = []
        for i, r in enumerate(records):
            texts = r["answers"]["texts"]
            orig = r.get("orig_answers", r["answers"])["texts"]
            for t, q in enumerate(r["questions"]):
                doc = {"title": r["wikipedia_page_title"], "section": r["section_title"],
                       "context": r["context"], "history": [(r["questions"][j], _first(orig[j]))
                                                           for j in range(t)],
                       "question": q, "golds": list(texts[t])}
                out.append(Sample(f"{r.get('dialogue_id', i)}#{t}", doc))
        return out

    def text(self, d):
        turns = "".join(f"Q: {q}\nA: {a}\n\n" for q, a in d["history"])
        return f"Title: {d['title']}: {d['section']}\n\n{d['context']}\n\n{turns}Q: {d['question']}\nA:"
    def target(self, d): return " " + _first(d["golds"])
    def golds(self, d): return d["golds"]


def _first(xs) -> str:
    return xs[0] if isinstance(xs, (list, tuple)) and xs else (xs if isinstance(xs, str) else "")


_BOOL_WORDS = {"true": 1, "yes": 1, "1": 1, "false": 0, "no": 0, "0": 0}


@dataclass
class BoolQ(MultipleChoiceTask):
    def text(self, d): return f"{d['passage']}\nQuestion: {d['question']}?\nAnswer:"
    ANSWER_FIELD = "answer|label"

    def choices(self, d): return ["no", "yes"]
    def gold(self, d):
        v = d["answer"] if "answer" in d else d["label"]
        if isinstance(v, str) and v.strip().lower() in _BOOL_WORDS:
            return _BOOL_WORDS[v.strip().lower()]
        if isinstance(v, int):  # bool included
            return int(v)
        raise BadRecord(f"field 'answer|label' is {v!r}, not true/false")


TASKS = [
    SQuAD("squad", "SQuAD", GROUP, "rajpurkar/squad_v2", ("title", "context", "question", "answers"),
          "validation", "train", 0, "exact_match", until=("\n",), max_new_tokens=32,
          notes="unanswerable questions (empty answers) count an empty prediction as correct"),
    QuAC("quac", "QuAC", GROUP, "allenai/quac",
         ("wikipedia_page_title", "section_title", "context", "questions", "answers"), "validation", "train",
         0, "f1", until=("\n",), max_new_tokens=48),
    BoolQ("boolq", "BoolQ", GROUP, "google/boolq", ("passage", "question", "answer|label"), "validation",
          "train", 0, "acc_uncond", uncond=True,
          notes="acc_uncond as for OpenBookQA (LLaMA's choice for BoolQ)"),
]
