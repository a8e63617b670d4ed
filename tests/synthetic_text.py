"""English-like synthetic prose for data tests and benchmarks: passes the quality filters, never
repeats itself, and is reproducible from a random generator."""

from __future__ import annotations

import random

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
