"""Document filters: site blocklist, Gopher quality and repetition rules, C4 line rules.

Each check returns ``None`` to keep a document or a reason from ``drops`` (recorded in the manifest)
to drop it. Thresholds are the datatrove defaults (see ``sources.STAGE_DEFAULTS``), with the
Gopher paper's definitions: words are whitespace-separated tokens, "symbol" words contain no
letter or digit, repetition shares are measured in characters.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from functools import lru_cache
from itertools import compress, filterfalse, islice, repeat
from operator import mul
from importlib import resources
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np

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

    def __init__(self, default_list: bool = True, domains: Sequence[str] = (), files: Sequence[str] = ()):
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
_STOP_STRIP = ".,;:!?\"'()"


class TextSplit:
    """The splits of one text that the Gopher rules share, each made once, when first needed."""

    def __init__(self, text: str):
        self.text = text
        self._lines: list[str] | None = None
        self._lower: list[str] | None = None
        self._lower_counts: Counter[str] | None = None
        self._chars: int | None = None

    @property
    def lines(self) -> list[str]:  # the non-blank lines
        if self._lines is None:
            self._lines = [ln for ln in self.text.split("\n") if ln.strip()]
        return self._lines

    @property
    def lower_words(self) -> list[str]:
        if self._lower is None:
            self._lower = self.text.lower().split()
        return self._lower

    def chars(self, counts: Counter) -> int:
        """The characters in the words ``counts`` counts (cached for the lowercase words)."""
        if counts is not self._lower_counts:
            return sum(map(mul, map(len, counts), counts.values()))
        if self._chars is None:
            self._chars = sum(map(mul, map(len, counts), counts.values()))
        return self._chars

    def lower_words_if_made(self) -> list[str] | None:
        return self._lower

    @property
    def lower_counts(self) -> Counter:
        if self._lower_counts is None:
            self._lower_counts = Counter(self.lower_words)
        return self._lower_counts

    def word_counts(self) -> tuple[int, Counter]:
        """How many words (as written), and the count of each."""
        if self.text.isascii():  # lowercasing ASCII changes no word's length or character classes
            return len(self.lower_words), self.lower_counts
        words = self.text.split()
        return len(words), Counter(words)


def gopher_quality(text: str, s: dict) -> str | None:
    return _gopher_quality(TextSplit(text), s)


def _gopher_quality(sp: TextSplit, s: dict) -> str | None:
    text = sp.text
    n_words, counts = sp.word_counts()
    # Each rule is a sum over words of a property of the word alone: computed once per distinct
    # word, weighted by its count (Counter counts in C). str.isalpha (all letters) settles most
    # words without a regex; of the rest, those without a letter or without any alphanumeric are
    # counted (filterfalse runs the searches in C) and subtracted.
    rest = list(filterfalse(str.isalpha, counts))
    symbols = list(filterfalse(_HAS_ALNUM.search, rest))  # pure-symbol words
    n = n_words - sum(map(counts.__getitem__, symbols))
    chars = sp.chars(counts) - sum(len(w) * counts[w] for w in symbols)
    alpha = n_words - sum(map(counts.__getitem__, filterfalse(_HAS_ALPHA.search, rest)))
    if text.isascii():
        # The keys are lowercase; an all-letter key strips to itself, so it is a stop word only
        # as itself: look those up, and strip only the others.
        stop = sum(map(counts.get, STOP_WORDS, repeat(0)))
        stop += sum(compress(map(counts.__getitem__, rest),
                             map(STOP_WORDS.__contains__, map(str.strip, rest, repeat(_STOP_STRIP)))))
    else:
        stop = sum(compress(counts.values(), map(STOP_WORDS.__contains__,
                                                 map(str.strip, map(str.lower, counts), repeat(_STOP_STRIP)))))
    if n < s["min_words"]:
        return drops.GOPHER_TOO_FEW_WORDS
    if n > s["max_words"]:
        return drops.GOPHER_TOO_MANY_WORDS
    mean = chars / n
    if not s["min_mean_word_length"] <= mean <= s["max_mean_word_length"]:
        return drops.GOPHER_MEAN_WORD_LENGTH
    n_symbols = text.count("#") + text.count("...") + text.count("…")
    if n_symbols / max(1, n_words) > s["max_symbol_word_ratio"]:
        return drops.GOPHER_SYMBOL_RATIO
    lines = sp.lines
    if lines:
        if sum(ln.lstrip().startswith(BULLETS) for ln in lines) / len(lines) > s["max_bullet_lines_ratio"]:
            return drops.GOPHER_BULLET_LINES
        if sum(ln.rstrip().endswith(("...", "…")) for ln in lines) / len(lines) > s["max_ellipsis_lines_ratio"]:
            return drops.GOPHER_ELLIPSIS_LINES
    if alpha / max(1, n_words) < s["min_alpha_words_ratio"]:
        return drops.GOPHER_ALPHA_WORDS
    if stop < s["min_stop_words"]:
        return drops.GOPHER_STOP_WORDS
    return None


def gopher(text: str, quality: dict | None, repetition: dict | None, split: TextSplit | None = None) -> str | None:
    """The quality rules, then the repetition rules (either None: skipped), sharing the text's
    splits (``split``: one the caller keeps, to reuse); the same reason as ``gopher_quality`` then
    ``gopher_repetition``."""
    sp = TextSplit(text) if split is None else split
    reason = _gopher_quality(sp, quality) if quality is not None else None
    if reason is None and repetition is not None:
        reason = _gopher_repetition(sp, repetition)
    return reason


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


def _ngrams(words: list[str], n: int):
    """The n-grams of ``words`` as tuples, made in C (zip of shifted lists)."""
    return zip(*(words[k:] for k in range(n)))


def _top_ngram_char_frac(words: list[str], n: int, total_chars: int, counts: Counter | None = None,
                         _ids: dict | None = None) -> float:
    if len(words) < n:
        return 0.0
    keys = _ngram_keys(*_word_ids(words, counts, _ids), n) if n >= 1 else None
    if keys is not None:
        # The n-grams' keys sorted (stably: each run of equal ones starts at its earliest
        # occurrence); the top one is the longest run, ties to the earliest first occurrence,
        # which is what Counter.most_common picks below.
        order = np.argsort(keys, kind="stable")
        ks = keys[order]
        new = np.ones(len(ks), dtype=bool)
        new[1:] = ks[1:] != ks[:-1]
        runs = np.flatnonzero(new)
        cnt = np.diff(np.append(runs, len(ks)))
        c = int(cnt.max())
        if c < 2:
            return 0.0
        first = int(order[runs[cnt == c]].min())
        return sum(len(w) for w in words[first:first + n]) * c / total_chars
    # most_common breaks ties by first occurrence, as the rule is defined
    gram, c = Counter(_ngrams(words, n)).most_common(1)[0]
    if c < 2:
        return 0.0
    return sum(len(w) for w in gram) * c / total_chars


def _top_ngram_bound(counts: Counter) -> int:
    """An upper bound, times ``total_chars / n``, of every n-gram's top-n-gram share: an n-gram
    seen c times has each of its n words at least c times, so its characters times c are at most
    n * max over words of len(word) * count(word)."""
    return max(map(mul, map(len, counts), counts.values()), default=0)


def _ngram_keys(ids: np.ndarray, vocab: int, n: int) -> np.ndarray | None:
    """One int64 per n-gram of word ids, equal exactly when the n-grams are (None if
    ``vocab ** n`` does not fit)."""
    if vocab ** n >= 1 << 63:
        return None
    # the n ids as the digits of a base-vocab number, for all windows in one (exact, int64) call
    return np.convolve(ids, vocab ** np.arange(n, dtype=np.int64), mode="valid")


def _word_ids(words: list[str], counts: Counter | None, _ids: dict | None) -> tuple[np.ndarray, int]:
    """Each word's id (its index among the distinct words) and how many ids there are, cached in
    ``_ids`` (a dict the caller keeps for one text's words) when given."""
    if _ids is not None and "ids" in _ids:
        return _ids["ids"], _ids["vocab"]
    counts = Counter(words) if counts is None else counts
    index = dict(zip(counts, range(len(counts))))
    ids = np.fromiter(map(index.__getitem__, words), dtype=np.int64, count=len(words))
    if _ids is not None:
        _ids.update(ids=ids, vocab=len(index))
    return ids, len(index)


def _dup_ngram_char_frac(words: list[str], n: int, total_chars: int, counts: Counter | None = None,
                         _ids: dict | None = None) -> float:
    """Share of characters in words covered by an n-gram that occurred earlier in the text."""
    if len(words) < n:
        return 0.0
    keys = _ngram_keys(*_word_ids(words, counts, _ids), n) if n >= 1 else None
    if keys is None:  # n-grams as tuples
        grams = list(_ngrams(words, n))
        first = dict(zip(reversed(grams), range(len(grams) - 1, -1, -1)))  # the earliest index wins
        if len(first) == len(grams):
            return 0.0  # no n-gram repeats
        starts = [i for i, g in enumerate(grams) if first[g] != i]
    else:
        ks = np.sort(keys)
        if not (ks[1:] == ks[:-1]).any():
            return 0.0  # no n-gram repeats (the common case: checked with the cheaper sort)
        order = np.argsort(keys, kind="stable")  # equal n-grams together, earliest first
        ks = keys[order]
        starts = order[1:][ks[1:] == ks[:-1]].tolist()
    covered = bytearray(len(words))
    for i in starts:
        covered[i:i + n] = b"\x01" * n
    return sum(map(len, compress(words, covered))) / total_chars


def gopher_repetition(text: str, s: dict) -> str | None:
    return _gopher_repetition(TextSplit(text), s)


def _gopher_repetition(sp: TextSplit, s: dict) -> str | None:
    text, lines = sp.text, sp.lines
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
    words = sp.lower_words
    total = sp.chars(sp.lower_counts)
    if not total:
        return None
    bound = None
    ids: dict = {}  # the word ids, made once for all rules and n
    for n, limit in s["top_ngram_char_frac"]:
        if bound is None:
            bound = _top_ngram_bound(sp.lower_counts)
        if int(n) * bound / total <= limit:
            continue  # exact: no n-gram can exceed the limit (float division is monotonic)
        if _top_ngram_char_frac(words, int(n), total, sp.lower_counts, ids) > limit:
            return drops.GOPHER_TOP_NGRAM
    rules = sorted((int(n), limit) for n, limit in s["dup_ngram_char_frac"])
    if rules:
        # Coverage by repeated n-grams can only shrink as n grows (a repeated (n+1)-gram holds two
        # repeated n-grams), so if the shortest n is under every limit, all longer n are too.
        first = _dup_ngram_char_frac(words, rules[0][0], total, sp.lower_counts, ids)
        if first > rules[0][1]:
            return drops.GOPHER_DUP_NGRAMS
        if first > min(limit for _, limit in rules):
            for n, limit in rules[1:]:
                if _dup_ngram_char_frac(words, n, total, sp.lower_counts, ids) > limit:
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
    max_len, min_words = s["max_word_length"], s["min_words_per_line"]
    # no citation mark spans a line break: as if line by line; each begins with "["
    cleaned = _CITATION.sub("", text) if "[" in text else text
    # A phrase is in some line only if it is in the whole (lowercased) text: look per line only then.
    cl = cleaned.lower()
    js = s["javascript"] and "javascript" in cl
    policy = s["policy"] and any(p in cl for p in POLICY_PHRASES)
    for line in cleaned.split("\n"):
        line = line.strip()
        if not line:
            kept.append("")  # keep paragraph breaks
            continue
        if len(line) > max_len:
            words = line.split()
            if len(words) < min_words:
                continue
            if max(map(len, words)) > max_len:
                continue
        elif min_words > 0 and len(line.split(None, min_words - 1)) < min_words:
            continue  # (only the first min_words words are split off)
        if s["terminal_punct"] and (not line.endswith(TERMINAL_PUNCT) or line.endswith("...")):
            continue
        if js or policy:
            lline = line.lower()
            if js and "javascript" in lline:
                continue
            if policy and any(p in lline for p in POLICY_PHRASES):
                continue
        kept.append(line)
    out = "\n".join(kept)
    if "\n\n\n" in out:
        out = re.sub(r"\n{3,}", "\n\n", out)
    out = out.strip()
    need = s["min_sentences"]  # enough sentence ends found: stop looking
    if need > 0 and next(islice(_SENTENCE_END.finditer(out), need - 1, None), None) is None:
        return None, drops.C4_TOO_FEW_SENTENCES
    return out, None
