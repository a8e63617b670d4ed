"""Typed config fields: one way to turn TOML, JSON and command-line values into dataclass fields.

A config is a plain dataclass. A field's type says what it holds (``bool``, ``int``, ``float``,
``str``, ``list[...]``, ``tuple[...]``, a nested config dataclass, ``X | None``, ``X | Y``: the
first that fits) and ``setting``
declares its constraint once::

    dim: int = setting(4096, POSITIVE)

``update`` merges a table (TOML or JSON, already typed) into a config, ``parse_cli`` first turns a
command-line string into the value a TOML file would hold, and ``check`` coerces every field and
enforces its constraint after all layers are merged. Every problem is a one-line ``UserError``
that starts with the key's name: ``model.dim must be an integer, got 'x'``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from .errors import UserError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

# TOML has no null: for an optional field these words stand for None.
_NONE_WORDS = ("none", "null")
_BOOL_WORDS = {"true": True, "false": False, "on": True, "off": False, "yes": True, "no": False}


# -- constraints -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Rule:
    """A constraint on a field's value; ``says`` completes "<key> ..." when it fails."""

    holds: Callable[[Any], bool]
    says: str


POSITIVE = Rule(lambda v: v > 0, "must be positive")


def at_least(low: float) -> Rule:
    return Rule(lambda v: v >= low, f"must be >= {low}")


NON_NEGATIVE = at_least(0)


def between(low: float, high: float, bounds: str = "[]") -> Rule:
    """``low <= v <= high``; a "(" or ")" in ``bounds`` opens that end: ``between(0, 1, "[)")``."""
    def holds(v: float) -> bool:
        above = low < v if bounds[0] == "(" else low <= v
        below = v < high if bounds[1] == ")" else v <= high
        return above and below
    return Rule(holds, f"must be in {bounds[0]}{low}, {high}{bounds[1]}")


def one_of(*choices: str) -> Rule:
    return Rule(lambda v: v in choices, f"must be one of {', '.join(choices)}")


def setting(default: Any, rule: Rule) -> Any:
    """A dataclass field with a default and a constraint (enforced by ``check``)."""
    return dataclasses.field(default=default, metadata={"rule": rule})


# -- one value ---------------------------------------------------------------------------------
class _Mismatch(Exception):
    """The value does not fit the type; an argument replaces the "must be <type>" wording."""


def coerce(value: Any, hint: Any, name: str, rule: Rule | None = None) -> Any:
    """``value`` as type ``hint`` (an int becomes a float for a float field), checked by ``rule``."""
    optional, kind = _unwrap_optional(hint)
    if optional and (value is None or value in _NONE_WORDS):
        return None
    try:
        value = _convert(value, kind)
    except _Mismatch as e:
        says = e.args[0] if e.args else f"must be {describe(hint)}"
        raise UserError(f"{name} {says}, got {value!r}") from None
    if rule is not None and not rule.holds(value):
        raise UserError(f"{name} {rule.says}, got {value!r}")
    return value


def _convert(value: Any, kind: Any) -> Any:
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if _is_union(kind):
        for arg in args:
            try:
                return _convert(value, arg)
            except _Mismatch:
                pass
        raise _Mismatch
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise _Mismatch
        return [_convert(v, args[0]) for v in value]
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise _Mismatch
        return tuple(_convert(v, a) for v, a in zip(value, args))
    if kind in (int, float) and isinstance(value, bool):  # bool is an int subclass, not a number here
        raise _Mismatch
    if kind is float and isinstance(value, int):
        return float(value)
    if kind is float and isinstance(value, float) and not math.isfinite(value):
        raise _Mismatch("must be finite")
    if not isinstance(value, kind):
        raise _Mismatch
    return value


def parse_cli(raw: str, hint: Any) -> Any:
    """A command-line string as the value a TOML file would hold: numbers, booleans (also on/off,
    yes/no), arrays and quoted strings; for a string field the text itself, so paths need no quotes."""
    raw = raw.strip()
    kind = _unwrap_optional(hint)[1]
    if kind is str and raw[:1] not in ('"', "'"):
        return raw
    if _is_union(kind) and list[str] in typing.get_args(kind) and raw[:1] not in ('"', "'", "["):
        return raw  # a string or an array of them: only an array is parsed
    if kind is bool and raw.lower() in _BOOL_WORDS:
        return _BOOL_WORDS[raw.lower()]
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw  # a bare word: coerce says whether the field takes it


def describe(hint: Any) -> str:
    """What a field of type ``hint`` must be, for messages: "an integer", "a list of strings"."""
    optional, kind = _unwrap_optional(hint)
    if _is_union(kind):
        text = " or ".join(describe(a) for a in typing.get_args(kind))
    elif kind is bool:
        text = "true or false"
    else:
        noun = _noun(kind)
        text = ("an " if noun[0] in "aeiou" else "a ") + noun
    return text + (" or none" if optional else "")


_NOUNS = {bool: "boolean", int: "integer", float: "number", str: "string"}


def _noun(kind: Any, plural: bool = False) -> str:
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is list:
        return ("lists of " if plural else "list of ") + _noun(args[0], plural=True)
    if origin is tuple:
        noun = f"[{', '.join(_noun(a) for a in args)}] {'pair' if len(args) == 2 else 'tuple'}"
    else:
        noun = _NOUNS.get(kind, getattr(kind, "__name__", str(kind)))
    return noun + ("s" if plural else "")


def _is_union(kind: Any) -> bool:
    return typing.get_origin(kind) in (typing.Union, types.UnionType)


def _unwrap_optional(hint: Any) -> tuple[bool, Any]:
    """(whether ``hint`` is ``X | None``, X)."""
    args = typing.get_args(hint)
    if type(None) in args:
        return True, next(a for a in args if a is not type(None))
    return False, hint


# -- whole configs -----------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _settable(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls) if f.init}


def field_type(cls: type, key: str, name: str) -> Any:
    """The type of field ``key`` of ``cls``; a UserError naming ``name`` when there is no such key."""
    fields = _settable(cls)
    if key not in fields:
        raise UserError(f"{name}: unknown key; known: {', '.join(fields)}")
    return _hints(cls)[key]


def update(obj: Any, table: Mapping[str, Any], prefix: str = "") -> Any:
    """Merge ``table`` into the config ``obj`` (in place, returned): each value coerced to its field's
    type, a sub-table merged into a nested config. Constraints wait for ``check``, so a later layer
    may still fix a value. ``prefix`` starts every key's name in messages ("run.toml: training.")."""
    for key, value in table.items():
        name = prefix + key
        hint = field_type(type(obj), key, name)
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, Mapping):
                raise UserError(f"{name} must be a table, got {value!r}")
            update(getattr(obj, key), value, name + ".")
        else:
            setattr(obj, key, coerce(value, hint, name))
    return obj


def check(obj: Any, prefix: str = "") -> Any:
    """Coerce every field of the config ``obj`` in place and enforce its constraint (nested configs
    too); returns ``obj``. For values set in code as much as for merged ones."""
    cls: type = type(obj)
    for key, f in _settable(cls).items():
        name = prefix + key
        hint = _hints(cls)[key]
        value = getattr(obj, key)
        if isinstance(hint, type) and dataclasses.is_dataclass(hint) and isinstance(value, hint):
            check(value, name + ".")
        else:
            setattr(obj, key, coerce(value, hint, name, f.metadata.get("rule")))
    return obj
