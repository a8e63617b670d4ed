"""Document filters: site blocklist, Gopher quality and repetition rules, C4 line rules.

Each check returns ``None`` to keep a document or a reason from ``drops`` (recorded in the manifest)
to drop it. Thresholds are the datatrove defaults (see ``sources.STAGE_DEFAULTS``), with the
Gopher paper's definitions: words are whitespace-separated tokens, "symbol" words contain no
letter or digit, repetition shares are measured in characters.
"""

from __future__ import annotations

import re
from collections import Counter
from functools import lru_cache
from importlib import resources
from pathlib import Path
from urllib.parse import urlsplit

from ..errors import UserError
from . import drops

# ---------------------------------------------------------------------------------------------
# Site blocklist


def _parse_domains(lines, where: str) -> set[str]:
    out = set()
    for n, line in enumerate(lines, 1):
        line = line.split("#", 1)[0].strip().lower()
        if not line:
            continue
        if line.startswith(("http://", "https://")):
            line = urlsplit(line).hostname or ""
        line = line.strip(".")
        if line.startswith("www."):
            line = line[4:]
        if not line or " " in line or "." not in line:
            raise UserError(f"{where}:{n}: {line!r} is not a domain name")
        out.add(line)
    return out


@lru_cache(maxsize=1)
def default_blocklist() -> frozenset[str]:
    text = resources.files("llama_pretrain.data").joinpath("blocklists/default.txt").read_text("utf-8")
    return frozenset(_parse_domains(text.splitlines(), "blocklists/default.txt"))


class Blocklist:
    """Domains to drop; a domain blocks its subdomains too."""

    def __init__(self, default_list: bool = True, domains: list[str] = (), files: list[str] = ()):
        self.domains = set(default_blocklist()) if default_list else set()
        self.domains |= _parse_domains(domains, "blocklist.domains")
        for f in files:
            try:
                self.domains |= _parse_domains(Path(f).read_text("utf-8").splitlines(), f)
            except OSError as e:
                raise UserError(f"cannot read blocklist file {f}: {e.strerror or e}") from None

    def blocks(self, url: str | None) -> bool:
        if not url:
            return False
        try:
            host = urlsplit(url if "//" in url else "//" + url).hostname
        except ValueError:
            return False
        if not host:
            return False
        host = host.rstrip(".")
        while True:  # host, then each parent domain
            if host in self.domains:
                return True
            dot = host.find(".")
            if dot < 0:
                return False
            host = host[dot + 1:]


# ---------------------------------------------------------------------------------------------
# Gopher quality

STOP_WORDS = frozenset({"the", "be", "to", "of", "and", "that", "have", "with"})
BULLETS = ("•", "‣", "⁃", "◦", "●", "○", "■", "□", "▪", "-", "*", "–")
_HAS_ALNUM = re.compile(r"\w")
_HAS_ALPHA = re.compile(r"[^\W\d_]")


def gopher_quality(text: str, s: dict) -> str | None:
    words = text.split()
    content = [w for w in words if _HAS_ALNUM.search(w)]  # words that are not pure symbols
    n = len(content)
    if n < s["min_words"]:
        return drops.GOPHER_TOO_FEW_WORDS
    if n > s["max_words"]:
        return drops.GOPHER_TOO_MANY_WORDS
    mean = sum(len(w) for w in content) / n
    if not s["min_mean_word_length"] <= mean <= s["max_mean_word_length"]:
        return drops.GOPHER_MEAN_WORD_LENGTH
    symbols = text.count("#") + text.count("...") + text.count("…")
    if symbols / max(1, len(words)) > s["max_symbol_word_ratio"]:
        return drops.GOPHER_SYMBOL_RATIO
    lines = [ln for ln in text.split("\n") if ln.strip()]
    if lines:
        if sum(ln.lstrip().startswith(BULLETS) for ln in lines) / len(lines) > s["max_bullet_lines_ratio"]:
            return drops.GOPHER_BULLET_LINES
        if sum(ln.rstrip().endswith(("...", "…")) for ln in lines) / len(lines) > s["max_ellipsis_lines_ratio"]:
            return drops.GOPHER_ELLIPSIS_LINES
    if sum(bool(_HAS_ALPHA.search(w)) for w in words) / max(1, len(words)) < s["min_alpha_words_ratio"]:
        return drops.GOPHER_ALPHA_WORDS
    if sum(w.lower().strip(".,;:!?\"'()") in STOP_WORDS for w in words) < s["min_stop_words"]:
        return drops.GOPHER_STOP_WORDS
    return None


# ---------------------------------------------------------------------------------------------
# Gopher repetition


def _dup_stats(items: list[str]) -> tuple[float, float]:
    """(fraction of items that repeat an earlier one, fraction of characters in those items)."""
    seen: set[str] = set()
    dup_n = dup_chars = total_chars = 0
    for it in items:
        total_chars += len(it)
        if it in seen:
            dup_n += 1
            dup_chars += len(it)
        else:
            seen.add(it)
    return dup_n / max(1, len(items)), dup_chars / max(1, total_chars)


def _top_ngram_char_frac(words: list[str], n: int, total_chars: int) -> float:
    if len(words) < n:
        return 0.0
    counts = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
    gram, c = counts.most_common(1)[0]
    if c < 2:
        return 0.0
    return sum(len(w) for w in gram) * c / total_chars


def _dup_ngram_char_frac(words: list[str], n: int, total_chars: int) -> float:
    """Share of characters in words covered by an n-gram that occurred earlier in the text."""
    if len(words) < n:
        return 0.0
    seen: set[tuple[str, ...]] = set()
    covered = bytearray(len(words))
    for i in range(len(words) - n + 1):
        g = tuple(words[i:i + n])
        if g in seen:
            covered[i:i + n] = b"\x01" * n
        else:
            seen.add(g)
    return sum(len(w) for w, c in zip(words, covered) if c) / total_chars


def gopher_repetition(text: str, s: dict) -> str | None:
    lines = [ln for ln in text.split("\n") if ln.strip()]
    paras = [p for p in re.split(r"\n\s*\n", text) if p.strip()]
    line_frac, line_chars = _dup_stats(lines)
    para_frac, para_chars = _dup_stats(paras)
    if line_frac > s["dup_line_frac"]:
        return drops.GOPHER_DUP_LINES
    if para_frac > s["dup_para_frac"]:
        return drops.GOPHER_DUP_PARAGRAPHS
    if line_chars > s["dup_line_char_frac"]:
        return drops.GOPHER_DUP_LINE_CHARS
    if para_chars > s["dup_para_char_frac"]:
        return drops.GOPHER_DUP_PARAGRAPH_CHARS
    words = text.lower().split()
    total = sum(len(w) for w in words)
    if not total:
        return None
    for n, limit in s["top_ngram_char_frac"]:
        if _top_ngram_char_frac(words, int(n), total) > limit:
            return drops.GOPHER_TOP_NGRAM
    rules = sorted((int(n), limit) for n, limit in s["dup_ngram_char_frac"])
    if rules:
        # Coverage by repeated n-grams can only shrink as n grows (a repeated (n+1)-gram holds two
        # repeated n-grams), so if the shortest n is under every limit, all longer n are too.
        first = _dup_ngram_char_frac(words, rules[0][0], total)
        if first > rules[0][1]:
            return drops.GOPHER_DUP_NGRAMS
        if first > min(limit for _, limit in rules):
            for n, limit in rules[1:]:
                if _dup_ngram_char_frac(words, n, total) > limit:
                    return drops.GOPHER_DUP_NGRAMS
    return None


# ---------------------------------------------------------------------------------------------
# C4 line rules

TERMINAL_PUNCT = (".", "?", "!", '"', "'", "”", "’")
POLICY_PHRASES = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies",
                  "use cookies")
_CITATION = re.compile(r"\[\d+\]|\[edit\]|\[citation needed\]", re.IGNORECASE)
_SENTENCE_END = re.compile(r"[.?!][\"'”’)]*(?:\s|$)")


def c4_filter(text: str, s: dict) -> tuple[str | None, str | None]:
    """C4's rules: drop lines without terminal punctuation, short lines, lines mentioning
    javascript or cookie/privacy policies, lines with absurdly long words; drop the document if
    it has lorem ipsum (or a curly bracket, when enabled) or too few sentences remain.
    Returns (cleaned text, None) or (None, reason)."""
    low = text.lower()
    if s["lorem_ipsum"] and "lorem ipsum" in low:
        return None, drops.C4_LOREM_IPSUM
    if s["curly_bracket"] and "{" in text:
        return None, drops.C4_CURLY_BRACKET
    kept = []
    for line in text.split("\n"):
        line = _CITATION.sub("", line).strip()
        if not line:
            kept.append("")  # keep paragraph breaks
            continue
        words = line.split()
        if len(words) < s["min_words_per_line"]:
            continue
        if any(len(w) > s["max_word_length"] for w in words):
            continue
        if s["terminal_punct"] and (not line.endswith(TERMINAL_PUNCT) or line.endswith("...")):
            continue
        lline = line.lower()
        if s["javascript"] and "javascript" in lline:
            continue
        if s["policy"] and any(p in lline for p in POLICY_PHRASES):
            continue
        kept.append(line)
    out = re.sub(r"\n{3,}", "\n\n", "\n".join(kept)).strip()
    if len(_SENTENCE_END.findall(out)) < s["min_sentences"]:
        return None, drops.C4_TOO_FEW_SENTENCES
    return out, None
