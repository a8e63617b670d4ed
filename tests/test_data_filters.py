"""Each pipeline stage on crafted documents: kept, and dropped with the expected reason."""

from __future__ import annotations

import random

import numpy as np
import pytest

from llama_pretrain.data.dedup import MinHasher, NearDedup, exact_key
from llama_pretrain.data.filters import Blocklist, c4_filter, default_blocklist, gopher_quality, gopher_repetition
from llama_pretrain.data.mixture import copy_masks, split_validation
from llama_pretrain.data.normalize import normalize_text
from llama_pretrain.data.pii import EMAIL_TOKEN, IP_TOKEN, PHONE_TOKEN, scrub_pii
from llama_pretrain.data.sources import STAGE_DEFAULTS
from llama_pretrain.errors import UserError

from helpers.synthetic_text import WORDS, prose as synthetic_prose



GQ, GR, C4 = STAGE_DEFAULTS["gopher_quality"], STAGE_DEFAULTS["gopher_repetition"], STAGE_DEFAULTS["c4"]


def prose(seed: int, sentences: int = 12, per_para: int = 4) -> str:
    return synthetic_prose(random.Random(seed), sentences, per_para)


# -- normalisation -------------------------------------------------------------------------------

def test_normalize_fixes_mojibake_line_endings_and_controls():
    broken = "The cafÃ© was open.\r\nSecond\x00 line\x07.\rThird line.\ud800"
    assert normalize_text(broken) == "The café was open.\nSecond line.\nThird line.\ufffd"
    assert normalize_text("a  \n\n\n\n\nb") == "a\n\nb"
    assert normalize_text(" \x00\x01 ") == ""


# -- blocklist -----------------------------------------------------------------------------------

def test_blocklist_default_and_user_domains(tmp_path):
    assert "spokeo.com" in default_blocklist() and len(default_blocklist()) >= 30
    f = tmp_path / "mine.txt"
    f.write_text("# my list\nbad.example.org\n")
    bl = Blocklist(True, ["https://www.evil.net/"], [str(f)])
    assert bl.blocks("https://www.spokeo.com/John-Smith")
    assert bl.blocks("http://people.whitepages.com:8080/x?q=1")
    assert bl.blocks("evil.net/page") and bl.blocks("https://a.b.bad.example.org/")
    assert not bl.blocks("https://notspokeo.com/") and not bl.blocks("https://example.org/")
    assert not bl.blocks(None) and not bl.blocks("")
    assert not Blocklist(False).blocks("https://spokeo.com/")
    with pytest.raises(UserError, match="not a domain"):
        Blocklist(False, ["not a domain"])


# -- PII -----------------------------------------------------------------------------------------

def test_pii_scrubbing():
    text = ("Mail jane.doe+news@example.co.uk or call +1 (555) 123-4567 or 555.987.6543. "
            "Server 192.168.1.20 and 2001:db8::8a2e:370:7334. Version 1.2.3, 10.0.0.300 and year 2023-2024.")
    out, counts = scrub_pii(text)
    assert counts == {"email": 1, "phone": 2, "ip": 2}
    assert EMAIL_TOKEN in out and PHONE_TOKEN in out and IP_TOKEN in out
    for kept in ("Version 1.2.3", "10.0.0.300", "2023-2024"):
        assert kept in out
    assert "jane.doe" not in out and "192.168" not in out
    out2, c2 = scrub_pii(text, emails=False, phones=False, ips=False)
    assert out2 == text and sum(c2.values()) == 0


# -- Gopher quality --------------------------------------------------------------------------------

def test_gopher_quality_keeps_prose_and_drops_each_rule():
    good = prose(1)
    assert gopher_quality(good, GQ) is None
    assert gopher_quality("The cat sat on the mat with the dog.", GQ) == "gopher_too_few_words"
    assert gopher_quality(" ".join(["extraordinarilylongwords"] * 60) + " the and", GQ) == "gopher_mean_word_length"
    assert gopher_quality(good + " #tag" * 40, GQ) == "gopher_symbol_ratio"
    bullets = "\n".join(f"- {line}" for line in good.replace("\n\n", " ").split(". "))
    assert gopher_quality(bullets, GQ) == "gopher_bullet_lines"
    ell = "\n".join(s + "..." for s in good.replace("\n\n", " ").split(". "))
    assert gopher_quality(ell, {**GQ, "max_symbol_word_ratio": 1.0}) == "gopher_ellipsis_lines"
    numbers = good + " " + " ".join(str(i) for i in range(100))
    assert gopher_quality(numbers, GQ) == "gopher_alpha_words"
    no_stop = " ".join(w for w in good.split() if w.lower().strip(".") not in
                       {"the", "be", "to", "of", "and", "that", "have", "with"})
    assert gopher_quality(no_stop + " the", GQ) == "gopher_stop_words"


def test_gopher_repetition_rules():
    assert gopher_repetition(prose(2), GR) is None
    line = "This exact line repeats in the page many times over."
    assert gopher_repetition("\n".join([line] * 5 + [prose(3)]), GR) == "gopher_dup_lines"
    para = prose(4, sentences=4)
    assert gopher_repetition("\n\n".join([para, prose(5, 8), para]), GR) in (
        "gopher_dup_paragraphs", "gopher_dup_paragraph_chars", "gopher_dup_line_chars")
    spam = prose(6) + " " + "buy now " * 80
    assert gopher_repetition(spam, GR) == "gopher_top_ngram"
    chunk = " ".join(prose(7, 3).split()[:20])
    rep = prose(8) + " " + " ".join(f"{chunk} number{i}" for i in range(6))
    assert gopher_repetition(rep, GR) == "gopher_dup_ngrams"


# -- C4 ------------------------------------------------------------------------------------------

def test_c4_line_rules():
    body = prose(9)
    noisy = ("Home | About | Contact\n" + body + "\nPlease enable JavaScript to view the comments.\n"
             "Read our privacy policy and terms of use.\nShort line.\nSee the chart[1] below for details today.")
    out, reason = c4_filter(noisy, C4)
    assert reason is None
    assert "Home |" not in out and "JavaScript" not in out and "privacy" not in out and "Short line" not in out
    assert "See the chart below for details today." in out and body.split("\n")[0] in out
    assert c4_filter(body + "\nLorem ipsum dolor sit amet.", C4) == (None, "c4_lorem_ipsum")
    assert c4_filter("One sentence only here.\nAnd another one here.", C4) == (None, "c4_too_few_sentences")
    assert c4_filter(body + "\nint main() { return 0; }.", {**C4, "curly_bracket": True}) == (None, "c4_curly_bracket")


# -- dedup ---------------------------------------------------------------------------------------

def test_exact_key_ignores_case_and_whitespace():
    assert exact_key("Hello   world\n") == exact_key("hello world")
    assert exact_key("hello world") != exact_key("hello world!")


def _article(seed: int, n: int = 500) -> list[str]:
    rng = random.Random(seed)
    return [rng.choice(WORDS) + str(rng.randint(0, 50)) for _ in range(n)]


def test_near_dedup_catches_edits_and_keeps_shared_boilerplate():
    mh = MinHasher(14 * 8, seed=1, ngram=5)
    nd = NearDedup(14, 8, seed=1)
    base = _article(0)
    rng = random.Random(1)
    edited = list(base)
    for i in rng.sample(range(len(base)), 10):  # 2% of the words changed
        edited[i] = "changed"
    boiler_head = " ".join(_article(100, 60))
    boiler_tail = " ".join(_article(101, 60))
    distinct = [f"{boiler_head} {' '.join(_article(200 + k, 300))} {boiler_tail}" for k in range(20)]
    assert not nd.is_duplicate(mh.signature(" ".join(base)))
    assert nd.is_duplicate(mh.signature(" ".join(edited)))
    assert not any(nd.is_duplicate(mh.signature(d)) for d in distinct)
    # signatures estimate Jaccard similarity (independent check against exact shingle sets)
    a, b = mh.signature(" ".join(base)), mh.signature(" ".join(edited))
    sa = {tuple(base[i:i + 5]) for i in range(len(base) - 4)}
    sb = {tuple(edited[i:i + 5]) for i in range(len(edited) - 4)}
    assert abs((a == b).mean() - len(sa & sb) / len(sa | sb)) < 0.12


# -- mixture -------------------------------------------------------------------------------------

def test_split_and_weights():
    rng = np.random.default_rng(0)
    hashes = rng.integers(0, 2**63, size=1000, dtype=np.uint64)
    lengths = rng.integers(50, 150, size=1000).astype(np.uint32)
    val = split_validation(hashes, 0.05, seed=0)
    assert 20 < val.sum() < 80
    assert np.array_equal(val, split_validation(hashes, 0.05, seed=0))
    tiny = split_validation(hashes[:3], 0.001, seed=0)
    assert tiny.sum() == 1  # never empty for tiny corpora
    assert split_validation(hashes[:1], 0.5, seed=0).sum() == 0  # a single document trains
    assert copy_masks(hashes, lengths, 2.0, 0) == [None, None]
    (half,) = copy_masks(hashes, lengths, 0.5, 0)
    assert abs(lengths[half].sum() / lengths.sum() - 0.5) < 0.01
    full, part = copy_masks(hashes, lengths, 1.3, 0)
    assert full is None and abs(lengths[part].sum() / lengths.sum() - 0.3) < 0.01


def test_dup_ngram_coverage_shrinks_with_n():
    """The shortcut in gopher_repetition relies on this monotonicity."""
    from llama_pretrain.data.filters import _dup_ngram_char_frac

    rng = random.Random(11)
    for _ in range(30):
        words = [rng.choice(WORDS[:12]) for _ in range(rng.randint(20, 200))]
        total = sum(map(len, words))
        fr = [_dup_ngram_char_frac(words, n, total) for n in range(5, 11)]
        assert all(a >= b for a, b in zip(fr, fr[1:]))


# -- accounting ----------------------------------------------------------------------------------

def test_stats_add_up_cap_locations_and_refuse_unknown_reasons():
    from llama_pretrain.data import drops

    assert drops.BAD_INPUT < drops.REASONS and {drops.EXACT_DUPLICATE, drops.C4_LOREM_IPSUM} < drops.REASONS
    unit = drops.Stats(documents_in=9, files=1)
    unit.keep(2, 30)
    for i in range(7):
        unit.drop(drops.MALFORMED_JSON, locations=[f"f:{i}"])
    unit.check("unit")
    assert unit.locations[drops.MALFORMED_JSON] == [f"f:{i}" for i in range(drops.MAX_LOCATIONS)]
    source = drops.Stats()
    source.add(unit)
    source.drop_kept(drops.EXACT_DUPLICATE, 12)  # dedup moves a kept document to dropped
    source.check("source")
    assert (source.documents_kept, source.tokens, source.files) == (1, 18, 1)
    assert source.dropped == {drops.MALFORMED_JSON: 7, drops.EXACT_DUPLICATE: 1}
    with pytest.raises(ValueError, match="unknown drop reason"):
        source.drop("typo_reason")
    source.documents_in += 1
    with pytest.raises(drops.AccountingError, match="10 documents in"):
        source.check("source")
