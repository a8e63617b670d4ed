"""Scoring functions: exact match and F1 (SQuAD rules), multiple choice, pass@k, math answers."""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from typing import Iterable, Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalize_answer(s: str) -> str:
    """Lowercase, drop punctuation and articles, squeeze whitespace (the SQuAD / LLaMA rule)."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", s).split())


def exact_match(prediction: str, golds: Iterable[str]) -> float:
    p = normalize_answer(prediction)
    return float(any(p == normalize_answer(g) for g in golds))


def f1(prediction: str, golds: Iterable[str]) -> float:
    """Best token-overlap F1 against any gold answer."""
    best = 0.0
    pred = normalize_answer(prediction).split()
    for g in golds:
        gold = normalize_answer(g).split()
        if not pred or not gold:
            best = max(best, float(pred == gold))
            continue
        common = sum((Counter(pred) & Counter(gold)).values())
        if common:
            prec, rec = common / len(pred), common / len(gold)
            best = max(best, 2 * prec * rec / (prec + rec))
    return best


def cut_answer(text: str) -> str:
    """LLaMA's generative QA rule: keep text up to the first newline, final dot or comma."""
    text = text.split("\n", 1)[0]
    m = re.search(r"[.,]", text)
    return (text[:m.start()] if m else text).strip()


def choice_metrics(logprobs: Sequence[float], lengths: Sequence[int], gold: int,
                   uncond: Sequence[float] | None = None) -> dict[str, float]:
    """acc: argmax of summed log-prob; acc_norm: of log-prob per character of the choice
    (lm-evaluation-harness); acc_uncond: of log p(choice|ctx) - log p(choice|"Answer:") (Brown et al.)."""
    def argmax(xs):
        return max(range(len(xs)), key=lambda i: xs[i])

    out = {"acc": float(argmax(logprobs) == gold),
           "acc_norm": float(argmax([lp / max(1, n) for lp, n in zip(logprobs, lengths)]) == gold)}
    if uncond is not None:
        out["acc_uncond"] = float(argmax([a - b for a, b in zip(logprobs, uncond)]) == gold)
    return out


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of Chen et al. (2021): 1 - C(n-c, k) / C(n, k), as a stable product."""
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def stderr(xs: Sequence[float]) -> float:
    n = len(xs)
    if n < 2:
        return float("nan")
    m = mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1) / n)


# -- math answers -----------------------------------------------------------------------------
_NUM = re.compile(r"-?[\d,]*\.?\d+")


def gsm8k_gold(answer: str) -> str:
    """The number after '####' in a GSM8K solution."""
    return _clean_number(answer.split("####")[-1])


def gsm8k_extract(text: str) -> str | None:
    """The model's final number: after '####' or 'answer is' if present, else the last number."""
    for marker in ("####", "answer is"):
        if marker in text:
            nums = _NUM.findall(text.split(marker)[-1])
            if nums:
                return _clean_number(nums[0])
    nums = _NUM.findall(text)
    return _clean_number(nums[-1]) if nums else None


def _clean_number(s: str) -> str:
    s = s.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        v = float(s)
    except ValueError:
        return s
    return str(int(v)) if v == int(v) else str(v)


def last_boxed(text: str) -> str | None:
    """Contents of the last \\boxed{...} (or \\fbox{...}) with balanced braces."""
    i = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if i < 0:
        return None
    j = text.find("{", i)
    if j < 0:
        return None
    depth = 0
    for k in range(j, len(text)):
        if text[k] == "{":
            depth += 1
        elif text[k] == "}":
            depth -= 1
            if depth == 0:
                return text[j + 1:k]
    return None


def math_extract(text: str) -> str | None:
    """A MATH answer: 'The final answer is X' (Minerva's format), else the last \\boxed{}."""
    m = re.findall(r"[Tt]he final answer is\s*(.+?)(?:\.\s*I hope|\.?\s*$|\n)", text)
    if m:
        return m[-1].strip().strip("$").strip()
    return last_boxed(text)


_REMOVE = ["\\left", "\\right", "\\!", "\\,", "\\;", "\\:", "$", "\\%", "%", "^\\circ", "^{\\circ}",
           "\\displaystyle", "\\text{ }"]
_UNITS = ["degrees", "degree", "cm", "centimeters", "meters", "inches", "feet", "units", "sq"]


def normalize_math(ans: str | None) -> str:
    """Minerva-style normalisation of a final answer for string comparison."""
    if ans is None:
        return ""
    s = ans.strip()
    s = re.sub(r"\\text\{\s*([^}]*)\}", r"\1", s)
    s = re.sub(r"\\mbox\{\s*([^}]*)\}", r"\1", s)
    for r in _REMOVE:
        s = s.replace(r, "")
    s = s.replace("dfrac", "frac").replace("tfrac", "frac")
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac\{([^}]*)\}(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\sqrt(\d)", r"\\sqrt{\1}", s)
    for u in _UNITS:
        s = re.sub(rf"\s*\b{u}\b\s*$", "", s)
    s = s.replace(" ", "").rstrip(".")
    if "=" in s and len(s.split("=")[0]) <= 2:  # "x=5" -> "5"
        s = s.split("=", 1)[1]
    s = re.sub(r"(\d),(\d\d\d)($|\D)", r"\1\2\3", s)
    if re.fullmatch(r"-?\d+\.0+", s):
        s = s.split(".")[0]
    if s.startswith("0.") is False and re.fullmatch(r"-?\.\d+", s):
        s = s.replace(".", "0.", 1)
    return s
