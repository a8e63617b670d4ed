"""Why documents are dropped, and the accounting that counts them.

Every reason a stage may give is defined here once; the strings are the keys of the manifest's
``dropped`` and ``bad_record_locations`` tables. ``Stats`` is the accounting of one input file (a
unit), of a source and of the total: each document read is either kept or dropped for exactly one
reason, which ``Stats.check`` enforces.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from .pii import KINDS as PII_KINDS

# Bad input, found by the readers (``sources.iter_records``); ``--strict`` stops at the first one.
UNREADABLE_FILE = "unreadable_file"
EMPTY_FILE = "empty_file"
BINARY_FILE = "binary_file"
CORRUPT_FILE = "corrupt_file"
BINARY_DATA = "binary_data"
INVALID_UTF8 = "invalid_utf8"
MALFORMED_JSON = "malformed_json"
MISSING_TEXT_FIELD = "missing_text_field"
TEXT_NOT_A_STRING = "text_not_a_string"
TOO_LONG = "too_long"  # a record over ``limits.MAX_RECORD_BYTES``
BAD_INPUT = frozenset({UNREADABLE_FILE, EMPTY_FILE, BINARY_FILE, CORRUPT_FILE, BINARY_DATA, INVALID_UTF8,
                       MALFORMED_JSON, MISSING_TEXT_FIELD, TEXT_NOT_A_STRING, TOO_LONG})

# Per-document stages of phase 1 (``prepare``).
EMPTY_TEXT = "empty_text"
BLOCKLISTED_DOMAIN = "blocklisted_domain"

# Quality rules (``filters``).
GOPHER_TOO_FEW_WORDS = "gopher_too_few_words"
GOPHER_TOO_MANY_WORDS = "gopher_too_many_words"
GOPHER_MEAN_WORD_LENGTH = "gopher_mean_word_length"
GOPHER_SYMBOL_RATIO = "gopher_symbol_ratio"
GOPHER_BULLET_LINES = "gopher_bullet_lines"
GOPHER_ELLIPSIS_LINES = "gopher_ellipsis_lines"
GOPHER_ALPHA_WORDS = "gopher_alpha_words"
GOPHER_STOP_WORDS = "gopher_stop_words"
GOPHER_DUP_LINES = "gopher_dup_lines"
GOPHER_DUP_PARAGRAPHS = "gopher_dup_paragraphs"
GOPHER_DUP_LINE_CHARS = "gopher_dup_line_chars"
GOPHER_DUP_PARAGRAPH_CHARS = "gopher_dup_paragraph_chars"
GOPHER_TOP_NGRAM = "gopher_top_ngram"
GOPHER_DUP_NGRAMS = "gopher_dup_ngrams"
C4_LOREM_IPSUM = "c4_lorem_ipsum"
C4_CURLY_BRACKET = "c4_curly_bracket"
C4_TOO_FEW_SENTENCES = "c4_too_few_sentences"

# Dedup (phase 2).
EXACT_DUPLICATE = "exact_duplicate"
NEAR_DUPLICATE = "near_duplicate"

# Every reason above (the string constants of this module), so a stage cannot invent one.
REASONS = frozenset(v for k, v in list(globals().items()) if k.isupper() and isinstance(v, str))

MAX_LOCATIONS = 5  # example file:line locations kept per reason


class AccountingError(RuntimeError):
    """The documents in do not equal the documents kept plus dropped: a bug, never bad input."""


@dataclass
class Stats:
    """Documents in, kept (with their tokens) and dropped by reason (with example locations).

    A unit's stats count what phase 1 kept; dedup then moves duplicates to dropped
    (``drop_kept``). The split and mixing fields are filled in for sources and the total."""

    documents_in: int = 0
    documents_kept: int = 0
    tokens: int = 0  # of the kept documents
    dropped: dict[str, int] = field(default_factory=dict)
    locations: dict[str, list[str]] = field(default_factory=dict)  # the first MAX_LOCATIONS per reason
    pii_replacements: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PII_KINDS, 0))
    files: int = 0
    val_documents: int = 0
    val_tokens: int = 0
    tokens_after_mixing: int = 0
    train_documents_after_mixing: int = 0

    def keep(self, documents: int, tokens: int) -> None:
        self.documents_kept += documents
        self.tokens += tokens

    def drop(self, reason: str, n: int = 1, locations: Sequence[str] = ()) -> None:
        if reason not in REASONS:  # a new reason belongs in this module, with the others
            raise ValueError(f"unknown drop reason {reason!r}")
        self.dropped[reason] = self.dropped.get(reason, 0) + n
        if locations:
            have = self.locations.setdefault(reason, [])
            have.extend(locations[:MAX_LOCATIONS - len(have)])

    def drop_kept(self, reason: str, tokens: int) -> None:
        """A document counted as kept (with ``tokens`` tokens) is dropped after all (a duplicate)."""
        self.keep(-1, -tokens)
        self.drop(reason)

    def add(self, other: Stats) -> None:
        for name in _SUMMED:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for reason, n in other.dropped.items():
            self.drop(reason, n, other.locations.get(reason, []))
        for kind, n in other.pii_replacements.items():
            self.pii_replacements[kind] += n

    def check(self, where: str) -> None:
        dropped = sum(self.dropped.values())
        if self.documents_in != self.documents_kept + dropped:
            raise AccountingError(f"{where}: {self.documents_in} documents in, but {self.documents_kept} "
                                  f"kept + {dropped} dropped")

    # -- on disk: a unit's stats.json, a manifest entry ----------------------------------------

    def unit_dict(self) -> dict:
        return {"documents_in": self.documents_in, "documents_passed": self.documents_kept,
                "tokens": self.tokens, "dropped": self.dropped, "locations": self.locations,
                "pii_replacements": self.pii_replacements, "files": self.files}

    @classmethod
    def from_unit_dict(cls, d: dict) -> Stats:
        return cls(documents_in=d["documents_in"], documents_kept=d["documents_passed"], tokens=d["tokens"],
                   dropped=dict(d["dropped"]), locations={r: list(v) for r, v in d["locations"].items()},
                   pii_replacements=dict(d["pii_replacements"]),
                   files=d.get("files", 1))  # a file read in parts counts in its first one

    def manifest_dict(self, total: Stats, weight: float | None = None) -> dict:
        """This source's (or, with ``total`` itself, the total's) entry in the manifest."""
        d = {"documents_in": self.documents_in, "documents_kept": self.documents_kept, "tokens": self.tokens,
             "dropped": dict(sorted(self.dropped.items())),
             "bad_record_locations": {r: v for r, v in sorted(self.locations.items()) if r in BAD_INPUT}}
        if weight is not None:
            d["weight"] = weight
        return d | {
            "files": self.files, "pii_replacements": dict(self.pii_replacements),
            "val_documents": self.val_documents, "val_tokens": self.val_tokens,
            "tokens_before_mixing": self.tokens_before_mixing, "tokens_after_mixing": self.tokens_after_mixing,
            "train_documents_after_mixing": self.train_documents_after_mixing,
            "effective_share": _share(self.tokens_after_mixing, total.tokens_after_mixing),
            "natural_share": _share(self.tokens_before_mixing, total.tokens_before_mixing),
        }

    @property
    def tokens_before_mixing(self) -> int:
        return self.tokens - self.val_tokens


_SUMMED = ("documents_in", "documents_kept", "tokens", "files", "val_documents", "val_tokens",
           "tokens_after_mixing", "train_documents_after_mixing")


def _share(part: int, whole: int) -> float:
    return round(part / whole, 6) if whole else 0.0


def top_reasons(dropped: dict[str, int], k: int = 4) -> str:
    """The ``k`` commonest drop reasons with their counts, for messages."""
    top = sorted(dropped.items(), key=lambda kv: -kv[1])[:k]
    return ", ".join(f"{r}: {n}" for r, n in top)
