"""Commonsense Reasoning (Table 3): PIQA, SIQA, HellaSwag, WinoGrande, ARC easy/challenge,
OpenBookQA, CommonsenseQA. Zero-shot except CommonsenseQA (7-shot); prompts as lm-eval-harness."""

from __future__ import annotations

import re
from dataclasses import dataclass

from .base import BadRecord, MultipleChoiceTask, int_label

GROUP = "Commonsense Reasoning"


def _letter_gold(doc: dict) -> int:
    """Index of ``answerKey`` among ``choices.label`` (ARC, OpenBookQA, CommonsenseQA)."""
    choices = doc["choices"]
    if not isinstance(choices, dict) or not isinstance(choices.get("label"), list) \
            or not isinstance(choices.get("text"), list):
        raise BadRecord("field 'choices' is not an object with 'label' and 'text' lists")
    labels = choices["label"]
    if len(labels) != len(choices["text"]):  # which text is which answer would be a guess
        raise BadRecord(f"choices.label has {len(labels)} entries, choices.text {len(choices['text'])}")
    key = doc["answerKey"]
    if not isinstance(key, (str, int)) or isinstance(key, bool):
        raise BadRecord(f"field 'answerKey' is {key!r}, not a label")
    key = str(key).strip()
    if key in labels:
        return labels.index(key)
    if key.isdigit() and labels and str(labels[0]).isalpha():  # a few ARC records use 1-4
        return int(key) - 1
    raise BadRecord(f"answerKey {key!r} is not among choices.label {labels}")


@dataclass
class PIQA(MultipleChoiceTask):
    def text(self, d): return f"Question: {d['goal']}\nAnswer:"
    def choices(self, d): return [d["sol1"], d["sol2"]]
    def gold(self, d): return int_label(d, "label")


@dataclass
class SIQA(MultipleChoiceTask):
    def text(self, d): return f"Q: {d['context']} {d['question']}\nA:"
    def choices(self, d): return [d["answerA"], d["answerB"], d["answerC"]]
    def gold(self, d): return int_label(d, "label") - 1


def _hellaswag_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


@dataclass
class HellaSwag(MultipleChoiceTask):
    def text(self, d):
        ctx = d["ctx_a"] + " " + d["ctx_b"].capitalize()
        return _hellaswag_clean(d["activity_label"] + ": " + ctx)
    def choices(self, d):
        if not isinstance(d["endings"], list) or not all(isinstance(e, str) for e in d["endings"]):
            raise BadRecord(f"field 'endings' is {d['endings']!r}, not a list of strings")
        return [_hellaswag_clean(e) for e in d["endings"]]
    def gold(self, d): return int_label(d, "label")


@dataclass
class WinoGrande(MultipleChoiceTask):
    """Partial evaluation: each option fills the blank in the context; the text after the blank is
    the scored continuation, identical for both options."""
    ANSWER_FIELD = "answer"
    FORMAT = "partial"

    def _split(self, d):
        if not isinstance(d["sentence"], str) or "_" not in d["sentence"]:
            raise BadRecord("field 'sentence' has no '_' blank for the options")
        i = d["sentence"].index("_")
        return d["sentence"][:i], " " + d["sentence"][i + 1:].strip()

    def text(self, d): return self._split(d)[0] + self.choices(d)[self.gold(d)]
    def choices(self, d): return [d["option1"], d["option2"]]
    def gold(self, d): return int_label(d, "answer") - 1
    def problem(self, d):
        try:
            self._split(d)
        except BadRecord as e:
            return str(e)
        return super().problem(d)
    def example(self, d): return self.text(d) + self._split(d)[1]

    def requests(self, d, prefix):
        head, tail = self._split(d)
        return [(prefix + head + opt, tail) for opt in self.choices(d)]

    def char_lengths(self, d):
        return [len(self._split(d)[1])] * 2


@dataclass
class ARC(MultipleChoiceTask):
    ANSWER_FIELD = "answerKey"
    def text(self, d): return f"Question: {d['question']}\nAnswer:"
    def choices(self, d): return list(d["choices"]["text"])
    def gold(self, d): return _letter_gold(d)


@dataclass
class OpenBookQA(MultipleChoiceTask):
    ANSWER_FIELD = "answerKey"
    def text(self, d): return d["question_stem"]
    def choices(self, d): return list(d["choices"]["text"])
    def gold(self, d): return _letter_gold(d)


@dataclass
class CommonsenseQALetters(MultipleChoiceTask):
    """lm-eval-harness's ``commonsense_qa`` prompt: the question, its lettered options, "Answer:",
    and the letters scored (the default ``commonsense_qa`` scores the answer texts, as LLaMA)."""
    ANSWER_FIELD = "answerKey"
    FORMAT = "lettered"

    def text(self, d):
        opts = "".join(f"{lab}. {t}\n" for lab, t in zip(d["choices"]["label"], d["choices"]["text"]))
        return f"Question: {d['question'].strip()}\n{opts}Answer:"
    def choices(self, d): return [str(lab) for lab in d["choices"]["label"]]
    def gold(self, d): return _letter_gold(d)


_ARC_FIELDS = ("question", "choices", "answerKey")

TASKS = [
    PIQA("piqa", "PIQA", GROUP, "ybisk/piqa", ("goal", "sol1", "sol2", "label"), "validation", "train",
         0, "acc_norm"),
    SIQA("siqa", "SIQA", GROUP, "allenai/social_i_qa",
         ("context", "question", "answerA", "answerB", "answerC", "label"), "validation", "train", 0,
         "acc_norm"),
    HellaSwag("hellaswag", "HellaSwag", GROUP, "Rowan/hellaswag",
              ("ctx_a", "ctx_b", "activity_label", "endings", "label"), "validation", "train", 0, "acc_norm"),
    WinoGrande("winogrande", "WinoGrande", GROUP, "allenai/winogrande:winogrande_xl",
               ("sentence", "option1", "option2", "answer"), "validation", "train", 0, "acc",
               sep="\n\n"),
    ARC("arc_easy", "ARC-e", GROUP, "allenai/ai2_arc:ARC-Easy", _ARC_FIELDS, "test", "train", 0, "acc_norm"),
    ARC("arc_challenge", "ARC-c", GROUP, "allenai/ai2_arc:ARC-Challenge", _ARC_FIELDS, "test", "train", 0,
        "acc_norm"),
    OpenBookQA("openbookqa", "OpenBookQA", GROUP, "allenai/openbookqa:main",
               ("question_stem", "choices", "answerKey"), "test", "train", 0, "acc_uncond", uncond=True,
               notes="acc_uncond: choice log-likelihood minus its log-likelihood after 'Answer:' "
                     "(Brown et al. 2020, as the LLaMA paper does for OpenBookQA and BoolQ)"),
    ARC("commonsense_qa", "CommonsenseQA", GROUP, "tau/commonsense_qa", _ARC_FIELDS, "validation", "train",
        7, "acc_norm"),
    CommonsenseQALetters("commonsense_qa_letters", "CommonsenseQA (lettered)", GROUP, "tau/commonsense_qa",
                         _ARC_FIELDS, "validation", "train", 7, "acc",
                         notes="lm-eval-harness's prompt (lettered options, the letter scored); not in "
                               "Table 3's average; lm-eval's default is 0-shot: --shots 0 to match"),
]
