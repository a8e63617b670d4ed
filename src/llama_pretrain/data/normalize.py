"""Text normalisation: repair broken encodings (mojibake, via ftfy), normalise line endings, strip
control characters and lone surrogates, NFC-normalise, trim trailing spaces."""

from __future__ import annotations

import re

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ufeff]")  # keeps \t and \n
_SURROGATE = re.compile(r"[\ud800-\udfff]")
_TRAILING_WS = re.compile(r"[ \t]+\n")
_MANY_BLANK = re.compile(r"\n{3,}")
_ASCII_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")

_ftfy_config = None


def _fix_encoding(text: str) -> str:
    global _ftfy_config
    import ftfy

    if _ftfy_config is None:
        # Only encoding repairs: HTML entities, quotes, ligatures and widths are left as written.
        _ftfy_config = ftfy.TextFixerConfig(
            unescape_html=False, fix_latin_ligatures=False, fix_character_width=False,
            uncurl_quotes=False, normalization="NFC", explain=False)
    return ftfy.fix_text(text, _ftfy_config)


def normalize_text(text: str, fix_encoding: bool = True) -> str:
    """The cleaned text (possibly empty)."""
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    if text.isascii() and not _ASCII_CONTROL.search(text):
        pass  # printable ASCII (with tabs and newlines): no surrogates or control characters, and
        # ftfy and NFC leave it as it is
    else:
        text = _SURROGATE.sub("\ufffd", text)  # lone surrogates cannot be encoded as UTF-8
        text = text.replace("\u2028", "\n").replace("\u2029", "\n\n")
        if fix_encoding:
            text = _fix_encoding(text)
        else:
            import unicodedata

            text = unicodedata.normalize("NFC", text)
        text = _CONTROL.sub("", text)
    if " \n" in text or "\t\n" in text:  # the only ways _TRAILING_WS can match
        text = _TRAILING_WS.sub("\n", text)
    if "\n\n\n" in text:
        text = _MANY_BLANK.sub("\n\n", text)
    return text.strip()
