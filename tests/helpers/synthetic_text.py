"""Synthetic text for data and tokenizer tests and benchmarks, reproducible from a random generator:
English-like prose that passes the quality filters and never repeats itself, text that trips the
filters' rules, and a tokenizer-training corpus."""

from __future__ import annotations

import random
from pathlib import Path

WORDS = ("the be to of and that have with time person year way day thing man world life hand part child "
         "eye woman place work week case point government company number group problem fact river mountain "
         "garden window kitchen teacher student market village history science music letter paper story "
         "water morning evening winter summer table chair doctor engine bridge station library museum forest "
         "island ocean valley harbor castle farmer painter writer soldier sailor merchant builder walked "
         "found carried opened closed painted studied visited repaired described watched").split()


def prose(rng: random.Random, sentences: int = 9, per_para: int = 3) -> str:
    """``sentences`` sentences of 7-13 words, ``per_para`` to a paragraph."""
    sents = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(7, 13))).capitalize() + "."
             for _ in range(sentences)]
    return "\n\n".join(" ".join(sents[i:i + per_para]) for i in range(0, sentences, per_para))


# Characters where per-word and whole-text processing could part ways: case mappings that change
# length or depend on context (İ, final sigma, ﬁ), letters vs digits vs numerics (², ½, Ⅻ, ٣),
# Unicode whitespace that str.split knows (\x1c, \xa0, \u3000, \u2028), combining marks, controls.
ODD = ["İ", "ΣΑΣ", "ſ", "K", "ﬁ", "²", "½", "Ⅻ", "٣", "_", "\x1c", "\xa0", "\u3000", "\u2028", "e\u0301",
       "\x0c", "\x07", "\x1b[0m", "\ufeff", "\r\n", "\t\n", " \n", "\n\n\n", "…", "...", "#", "•", "- ",
       "[1]", "[edit]", "[Citation Needed]", "privacy[2] policy", "JavaScript", "lorem ipsum", "{", "'the'",
       "(of)", "THE", "With,", "Ã©", "â€™", "x" * 1200, "日本語", "город", "12.5", "—"]


def random_text(rng: random.Random) -> str:
    """One of six kinds of text, each aimed at some filter rule (or none): prose, odd characters,
    repeated phrases, repeated lines, a small vocabulary, characters at random."""
    kind = rng.randrange(6)
    base = prose(rng, rng.randint(1, 40), per_para=rng.randint(1, 5))
    if kind == 0:
        return base
    words = base.split(" ")
    if kind == 1:  # odd characters sprinkled in
        for _ in range(rng.randint(1, 25)):
            words.insert(rng.randrange(len(words) + 1), rng.choice(ODD))
        return " ".join(words)
    if kind == 2:  # repeated phrases: n-gram repetition at every n
        phrase = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12)))
        for _ in range(rng.randint(1, 15)):
            words.insert(rng.randrange(len(words) + 1), phrase)
        return " ".join(words)
    if kind == 3:  # repeated lines and paragraphs, bullets, ellipses
        lines = base.split("\n")
        out = [rng.choice(["", "• ", "- ", "  "]) + ln + rng.choice(["", "...", "…", " ", "\t"]) for ln in lines]
        return "\n".join(out + rng.sample(out, rng.randint(0, len(out))))
    if kind == 4:  # small vocabulary
        vocab = rng.sample(WORDS, rng.randint(1, 8))
        return "\n\n".join(" ".join(rng.choice(vocab) for _ in range(rng.randint(3, 14))).capitalize() + "."
                           for _ in range(rng.randint(1, 30)))
    # characters at random
    alphabet = "aAbB zZ_9 .,;:!?'\"()\n\t#…•-[]{}İΣſ²日\xa0\x1c"
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 400)))


def make_corpus(n_docs: int = 400, seed: int = 1) -> list[str]:
    """Documents of pseudo-words, numbers, punctuation, indentation and a little CJK, several
    lines each: enough variety for a few hundred merges, nothing rare enough to matter."""
    rng = random.Random(seed)
    syll = ["ka", "lo", "mi", "ne", "ru", "sa", "ti", "po", "an", "er", "th", "ing", "the", "ou", "qu"]
    words = ["".join(rng.choice(syll) for _ in range(rng.randint(1, 4))) for _ in range(300)]
    words += ["the", "of", "and", "llama", "pretraining", "Tokenizer", "def", "return", "x"]
    docs = []
    for _ in range(n_docs):
        lines = []
        for _ in range(rng.randint(2, 6)):
            parts = []
            for _ in range(rng.randint(4, 16)):
                r = rng.random()
                if r < 0.08:
                    parts.append(str(rng.randint(0, 99999)))
                elif r < 0.11:
                    parts.append(rng.choice("日本語中文字"))
                else:
                    parts.append(rng.choice(words) + rng.choice(["", "", "", ",", ".", "!"]))
            indent = " " * rng.choice([0, 0, 0, 4, 8])
            lines.append(indent + " ".join(parts))
        docs.append("\n".join(lines))
    return docs


def prose_tokenizer(d: Path, vocab_size: int = 600, docs: int = 300, seed: int = 123) -> Path:
    """A SentencePiece model trained on ``docs`` synthetic paragraphs, written to ``d/tok.model``."""
    from llama_pretrain.tokenizer import train_tokenizer

    rng = random.Random(seed)
    train_tokenizer([prose(rng) for _ in range(docs)], d / "tok.model", vocab_size, progress=False)
    return d / "tok.model"
