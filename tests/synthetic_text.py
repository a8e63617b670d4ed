"""Moved to helpers.synthetic_text; this name stays until the last module importing it moves."""

from helpers.synthetic_text import WORDS, prose  # noqa: F401
