"""config_fields: typed dataclass fields from TOML / JSON / command-line values, and its users."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict, dataclass, field

import pytest

from llama_pretrain.config import ModelConfig
from llama_pretrain.config_fields import (NON_NEGATIVE, POSITIVE, at_least, between, check, coerce, describe,
                                          field_type, one_of, parse_cli, setting, update)
from llama_pretrain.errors import UserError


def error(fn, *args) -> str:
    with pytest.raises(UserError) as e:
        fn(*args)
    assert "\n" not in str(e.value)
    return str(e.value)


# -- one value: types --------------------------------------------------------------------------

@pytest.mark.parametrize("hint, value, want", [
    (bool, True, True),
    (int, 3, 3),
    (float, 3, 3.0),  # an int is a float field's value, stored as a float
    (float, 2.5, 2.5),
    (str, "x", "x"),
    (list[str], ["a", "b"], ["a", "b"]),
    (list[str], ("a",), ["a"]),
    (list[tuple[int, float]], [[2, 0.2], [3, 1]], [(2, 0.2), (3, 1.0)]),
    (int | None, 4, 4),
])
def test_coerce_accepts_each_type(hint, value, want):
    got = coerce(value, hint, "k")
    assert got == want and type(got) is type(want)


@pytest.mark.parametrize("hint, value, message", [
    (bool, 1, "k must be true or false, got 1"),
    (bool, "yes", "k must be true or false, got 'yes'"),  # words are for the command line only
    (int, True, "k must be an integer, got True"),
    (int, 2.0, "k must be an integer, got 2.0"),
    (int, "3", "k must be an integer, got '3'"),
    (int, None, "k must be an integer, got None"),
    (float, False, "k must be a number, got False"),
    (float, "x", "k must be a number, got 'x'"),
    (float, float("inf"), "k must be finite, got inf"),
    (float, float("nan"), "k must be finite, got nan"),
    (str, 3, "k must be a string, got 3"),
    (list[str], "a", "k must be a list of strings, got 'a'"),
    (list[str], ["a", 1], "k must be a list of strings, got ['a', 1]"),
    (list[tuple[int, float]], [[2]], "k must be a list of [integer, number] pairs, got [[2]]"),
    (list[tuple[int, float]], [[2.5, 0.1]], "k must be a list of [integer, number] pairs"),
    (int | None, "x", "k must be an integer or none, got 'x'"),
    (bool | None, "no", "k must be true or false or none, got 'no'"),
])
def test_coerce_rejects_with_one_line_naming_the_key(hint, value, message):
    assert message in error(coerce, value, hint, "k")


@pytest.mark.parametrize("value", [None, "none", "null"])
def test_none_words_mean_none_for_optional_fields_only(value):
    assert coerce(value, int | None, "k", POSITIVE) is None  # a constraint does not apply to None
    assert coerce(value, float | None, "k") is None
    if value is not None:
        assert "k must be an integer" in error(coerce, value, int, "k")


def test_describe():
    assert describe(bool) == "true or false"
    assert describe(int) == "an integer"
    assert describe(float | None) == "a number or none"
    assert describe(list[list[str]]) == "a list of lists of strings"
    assert describe(tuple[int, float]) == "a [integer, number] pair"


# -- one value: constraints --------------------------------------------------------------------

@pytest.mark.parametrize("rule, ok, bad, message", [
    (POSITIVE, [1, 0.5], [0, -1], "k must be positive, got 0"),
    (NON_NEGATIVE, [0, 2], [-1], "k must be >= 0, got -1"),
    (at_least(1024), [1024], [1023], "k must be >= 1024, got 1023"),
    (between(0, 1), [0, 1], [-0.1, 1.5], "k must be in [0, 1], got -0.1"),
    (between(0, 1, "[)"), [0, 0.99], [1], "k must be in [0, 1), got 1"),
    (between(0, 1000, "(]"), [1000], [0], "k must be in (0, 1000], got 0"),
    (one_of("auto", "on", "off"), ["on"], ["yes"], "k must be one of auto, on, off, got 'yes'"),
])
def test_each_constraint_and_its_message(rule, ok, bad, message):
    hint = str if isinstance(ok[0], str) else int if all(isinstance(v, int) for v in ok + bad) else float
    for v in ok:
        assert coerce(v, hint, "k", rule) == v
    for v in bad:
        assert error(coerce, v, hint, "k", rule).startswith("k must")
    assert message in error(coerce, bad[0], hint, "k", rule)


# -- command-line strings --------------------------------------------------------------------

@pytest.mark.parametrize("raw, hint, want", [
    ("3", int, 3),
    (" 3 ", int, 3),
    ("1e-3", float, 1e-3),
    ("2", float, 2),
    ("true", bool, True),
    ("Off", bool, False),
    ("yes", bool, True),
    ("runs/x", str, "runs/x"),       # a string field takes the text: paths need no quotes
    ("123", str, "123"),
    ('"quoted"', str, "quoted"),
    ("none", int | None, "none"),    # left for coerce, which makes it None
    ('["a", "b"]', list[str], ["a", "b"]),
    ("abc", int, "abc"),             # not TOML: left as text, for coerce to refuse
])
def test_parse_cli_reads_a_value_as_toml_would(raw, hint, want):
    assert parse_cli(raw, hint) == want


def test_cli_value_through_coerce():
    assert coerce(parse_cli("none", int | None), int | None, "--model.n_kv_heads") is None
    assert coerce(parse_cli("2", float), float, "--x") == 2.0
    assert error(coerce, parse_cli("abc", int), int, "--training.max_steps") == \
        "--training.max_steps must be an integer, got 'abc'"


# -- whole configs -----------------------------------------------------------------------------

@dataclass
class Inner:
    n: int = setting(1, POSITIVE)
    names: list[str] = field(default_factory=list)


@dataclass
class Outer:
    rate: float = setting(0.5, between(0, 1))
    mode: str = setting("a", one_of("a", "b"))
    limit: int | None = setting(None, NON_NEGATIVE)
    inner: Inner = field(default_factory=Inner)


def test_update_types_values_and_merges_nested_tables():
    cfg = update(Outer(), {"rate": 1, "inner": {"n": 3, "names": ["x"]}, "limit": "none"})
    assert cfg == Outer(rate=1.0, inner=Inner(n=3, names=["x"]))
    assert type(cfg.rate) is float
    assert update(cfg, {"inner": {"names": []}}).inner == Inner(n=3)  # only the keys given change


def test_update_errors_name_the_key_with_its_prefix():
    assert error(update, Outer(), {"rat": 1}, "f.toml: ") == \
        "f.toml: rat: unknown key; known: rate, mode, limit, inner"
    assert error(update, Outer(), {"inner": {"m": 1}}, "f.toml: ").startswith("f.toml: inner.m: unknown key")
    assert error(update, Outer(), {"inner": 3}) == "inner must be a table, got 3"
    assert error(update, Outer(), {"inner": {"n": "x"}}, "s.") == "s.inner.n must be an integer, got 'x'"


def test_constraints_wait_for_check_so_a_later_layer_can_fix_a_value():
    cfg = update(Outer(), {"rate": 2.0, "inner": {"n": 0}})
    assert error(check, cfg, "s.") == "s.rate must be in [0, 1], got 2.0"
    update(cfg, {"rate": 0.1})
    assert error(check, cfg, "s.") == "s.inner.n must be positive, got 0"
    update(cfg, {"inner": {"n": 1}})
    assert check(cfg) is cfg


def test_check_coerces_values_set_in_code():
    cfg = check(Outer(rate=1, mode="b", limit=0))
    assert type(cfg.rate) is float and cfg.limit == 0
    assert error(check, Outer(mode="c")) == "mode must be one of a, b, got 'c'"
    assert error(check, Outer(limit=-1)) == "limit must be >= 0, got -1"


def test_field_type():
    assert field_type(Outer, "limit", "x") == int | None
    assert field_type(Outer, "inner", "x") is Inner
    assert error(field_type, Outer, "nope", "--s.nope") == "--s.nope: unknown key; known: rate, mode, limit, inner"


# -- the configs built on it ---------------------------------------------------------------------

def test_model_config_constraints_are_declared_and_shape_rules_remain():
    assert ModelConfig(rope_theta=10000).rope_theta == 10000.0
    assert ModelConfig(n_kv_heads="none").n_kv_heads is None  # TOML's word for null
    assert "model.n_kv_heads must be positive, got 0" in error(ModelConfig, 64, 2, 4, 0)
    assert "model.max_seq_len must be positive" in error(lambda: ModelConfig(max_seq_len=0))
    assert "model.peak_lr must be finite" in error(lambda: ModelConfig(peak_lr=float("inf")))
    assert "must be divisible by model.n_heads" in error(lambda: ModelConfig(dim=100, n_heads=3))
    assert error(ModelConfig.from_dict, {"dims": 1}, "x.json").startswith(
        "x.json: model.dims: unknown key; known: dim,")


def test_run_config_model_section_is_resolved_once_and_typed_as_set(tmp_path):
    from llama_pretrain.train.config import load_run_config

    cfg = load_run_config(None, ["model.preset=llama2-debug", "model.rope_theta=500000", "model.n_kv_heads=none"])
    assert cfg.model_config() is cfg.model_config()
    assert cfg.model == {"preset": "llama2-debug", "rope_theta": 500000.0, "n_kv_heads": None}
    assert cfg.seq_len == 128 and cfg.peak_lr == 1e-3 and cfg.model_config().kv_heads == 4
    bad = tmp_path / "run.toml"
    bad.write_text('[model]\ndim = "wide"\n')
    assert error(load_run_config, bad) == f"{bad}: model.dim must be an integer, got 'wide'"
    bad.write_text("[trainin]\nmax_steps = 1\n")
    assert error(load_run_config, bad).startswith(f"{bad}: [trainin]: unknown section; known: model, data")
    bad.write_text('[parallel]\ncompile = "yes"\n')  # on/off words are for the command line
    assert error(load_run_config, bad) == f"{bad}: parallel.compile must be true or false, got 'yes'"
    assert load_run_config(None, ["parallel.compile=yes"]).parallel.compile is True


def test_data_stages_are_typed_and_serialise_as_the_old_dicts():
    from llama_pretrain.data.sources import STAGE_DEFAULTS, DataConfig, SourceConfig, data_config_from_dict

    # The defaults before the stages were dataclasses: asdict must give the same JSON (unit
    # fingerprints and manifests stay byte-identical).
    before = {
        "normalize": {"enabled": True, "fix_encoding": True},
        "blocklist": {"enabled": True, "default_list": True, "domains": [], "files": []},
        "pii": {"enabled": False, "emails": True, "phones": True, "ips": True},
        "gopher_quality": {"enabled": True, "min_words": 50, "max_words": 100_000, "min_mean_word_length": 3.0,
                           "max_mean_word_length": 10.0, "max_symbol_word_ratio": 0.1,
                           "max_bullet_lines_ratio": 0.9, "max_ellipsis_lines_ratio": 0.3,
                           "min_alpha_words_ratio": 0.8, "min_stop_words": 2},
        "gopher_repetition": {"enabled": True, "dup_line_frac": 0.3, "dup_para_frac": 0.3,
                              "dup_line_char_frac": 0.2, "dup_para_char_frac": 0.2,
                              "top_ngram_char_frac": [[2, 0.20], [3, 0.18], [4, 0.16]],
                              "dup_ngram_char_frac": [[5, 0.15], [6, 0.14], [7, 0.13], [8, 0.12], [9, 0.11],
                                                      [10, 0.10]]},
        "c4": {"enabled": True, "min_words_per_line": 3, "min_sentences": 5, "max_word_length": 1000,
               "terminal_punct": True, "lorem_ipsum": True, "javascript": True, "curly_bracket": False,
               "policy": True},
        "exact_dedup": {"enabled": True},
        "near_dedup": {"enabled": True, "ngram": 5, "bands": 14, "rows": 8, "seed": 1},
    }
    assert json.dumps(STAGE_DEFAULTS) == json.dumps(before)
    cfg = data_config_from_dict({"sources": [{"name": "a", "paths": "x.jsonl"}],
                                 "stages": {"c4": {"curly_bracket": True}, "near_dedup": {"bands": 4}}})
    assert cfg.stages.c4.curly_bracket is True and cfg.stages.near_dedup.bands == 4
    again = data_config_from_dict(json.loads(json.dumps(cfg.to_dict())))  # as `data merge` reads a manifest
    assert again.to_dict() == cfg.to_dict() and again.stages == cfg.stages
    assert asdict(DataConfig([SourceConfig("a", ["x"])]).stages) == STAGE_DEFAULTS


@pytest.mark.parametrize("table, message", [
    ({"stages": {"c5": {}}}, "d.toml: stages.c5: unknown key; known: normalize, blocklist,"),
    ({"stages": {"c4": {"min_sentences": "x"}}}, "d.toml: stages.c4.min_sentences must be an integer, got 'x'"),
    ({"stages": {"blocklist": {"domains": "a.com"}}}, "stages.blocklist.domains must be a list of strings"),
    ({"seed": 1.5}, "d.toml: seed must be an integer, got 1.5"),
    ({"val_fraction": 0.5}, "val_fraction must be in [0, 0.5), got 0.5"),
    ({"shard_tokens": 10}, "shard_tokens must be >= 1024, got 10"),
    ({"sources": [{"name": "a", "paths": ["x"], "weight": 2000}]}, "source a: weight must be in (0, 1000], got 2000"),
    ({"sources": [{"name": "a", "paths": ["x"], "wieght": 2}]}, "d.toml: source a: wieght: unknown key"),
])
def test_data_config_messages(table, message):
    from llama_pretrain.data.sources import data_config_from_dict

    assert message in error(data_config_from_dict, {"sources": [{"name": "a", "paths": ["x"]}], **table},
                            None, "d.toml")


def test_config_module_imports_nothing_from_the_packages_above_it():
    code = ("import sys, llama_pretrain.config; "
            "print([m for m in sys.modules if m.split('.')[:2] in "
            "[['llama_pretrain', p] for p in ('interop', 'train', 'eval', 'data')]])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
