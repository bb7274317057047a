"""The rules a config value keeps, and the walk that checks a composed config against a schema dataclass.

A field's rule rides on its type: `Annotated[int, Rule(ge=1)]` (aliases below: `Count`, `Fraction`, ...).
`check_schema` reports the type of every value, its range or allowed values, required and unknown keys
(a typo in a YAML file is an error, not a silently ignored key), one line each naming the full key, the
value and what is allowed. Open mappings (`Open`) and entries whose `_target_` has no schema in
`ENTRY_SCHEMAS` keep their keys unchecked.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Annotated, Any, Union

from hydra.errors import CompactHydraException
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lbt.env import env_value


class ConfigError(CompactHydraException, ValueError):
    """Config values that cannot run, one line each: the full key, the value and what is allowed."""

    def __init__(self, errors: list[str]):
        self.errors = list(errors)
        super().__init__("\n".join(f"config error: {e}" for e in self.errors))


class LazyChoices:
    """Allowed values held by a library's registry, read from it only when a value is not among `known` or
    when an error message lists them: reading Lightning's strategy registry imports Lightning (seconds),
    which a config that keeps the default need not pay."""

    def __init__(self, known: tuple[Any, ...], load: Callable[[], tuple[Any, ...]]):
        self.known, self._load, self._values = known, load, None

    def values(self) -> tuple[Any, ...]:
        if self._values is None:
            self._values = tuple(self._load())
        return self._values

    def __contains__(self, value: Any) -> bool:
        return value in self.known or value in self.values()

    def __iter__(self) -> Iterator[Any]:
        return iter(self.values())


@dataclass(frozen=True)
class Rule:
    """What one value of the right type must keep: bounds, allowed values, non-empty, a test (`accepts`, a
    string's, described in words by `named`)."""
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    choices: tuple | LazyChoices | None = None
    nonempty: bool = False
    accepts: Callable[[str], bool] | None = None
    named: str = ""

    def bounds(self) -> list[tuple[str, float]]:
        return [(op, limit) for op, limit in ((">=", self.ge), (">", self.gt), ("<=", self.le), ("<", self.lt))
                if limit is not None]

    def ok(self, value: Any) -> bool:
        if self.choices is not None and value not in self.choices:
            return False
        if self.nonempty and len(value) == 0:
            return False
        if self.accepts is not None and isinstance(value, str) and not self.accepts(value):
            return False
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if math.isnan(value):
                return False
            compare = {">=": float.__ge__, ">": float.__gt__, "<=": float.__le__, "<": float.__lt__}
            return all(compare[op](float(value), float(limit)) for op, limit in self.bounds())
        return True


def one_of(*values: Any) -> Rule:
    return Rule(choices=tuple(values))


# The types fields are made of.
Count = Annotated[int, Rule(ge=1)]                 # 1, 2, ...
Natural = Annotated[int, Rule(ge=0)]               # 0, 1, 2, ...
Fraction = Annotated[float, Rule(ge=0, lt=1)]      # [0, 1)
Name = Annotated[str, Rule(nonempty=True)]
Open = dict[str, Any]                               # a mapping whose keys are not checked


@dataclass
class Entry:
    """An object built from config (`{_target_: ..., key: value}`): its keys are its constructor's. A
    target in ENTRY_SCHEMAS has its keys checked against that schema; any other is open (test and user
    evaluators and callbacks need no schema). Null or empty, it is switched off."""
    _target_: Name


ENTRY_SCHEMAS: dict[str, type[Entry]] = {}   # filled by lbt.config.schema


# -- the schema walk ------------------------------------------------------------------------------------

def check_schema(cfg: DictConfig, schema: type) -> list[str]:
    """Problems of cfg against a schema dataclass: types, rules, required and unknown keys. A key that
    only repeats another (`train.micro_batch: ${hardware.micro_batch}`, or a key inside a section that
    repeats one) is not reported twice."""
    errors: list[str] = []
    _check_node(cfg, schema, "", errors)
    sources = _interpolation_sources(cfg)
    wrong = {_error_key(e) for e in errors}
    raw = OmegaConf.to_container(cfg, resolve=False)
    return [e + _from_environment(raw, _error_key(e)) for e in errors
            if _repeated(_error_key(e), sources) not in wrong]


ENV_INTERPOLATION = re.compile(r"\$\{(?:lbt|oc)\.env:([A-Za-z_]\w*)")


def _from_environment(raw: Any, key: str) -> str:
    """' (set by the environment variable NAME)' when the key's value is read from a variable that is set (by
    a .env file too): the line then names what to fix, not only the key that reads it. Of nested defaults
    (`${lbt.env:A,${lbt.env:B,auto}}`) the first variable that is set is the one read."""
    for part in key.split("."):
        raw = raw.get(part) if isinstance(raw, dict) else None
    names = ENV_INTERPOLATION.findall(raw) if isinstance(raw, str) else []
    read = next((name for name in names if env_value(name) is not None), None)
    return f" (set by the environment variable {read})" if read else ""


def _repeated(key: str, sources: dict[str, str]) -> str | None:
    """The key that `key` repeats, itself or through a section it lies in (`probe.directions: ${directions}`
    makes probe.directions.variant repeat directions.variant); None when it repeats nothing."""
    for prefix, source in sources.items():
        if key == prefix or key.startswith(prefix + "."):
            return source + key[len(prefix):]
    return None


def _interpolation_sources(node: Any, prefix: str = "") -> dict[str, str]:
    """key -> the key it repeats, for values that are exactly `${other.key}`."""
    sources: dict[str, str] = {}
    raw = OmegaConf.to_container(node, resolve=False) if isinstance(node, DictConfig) else node
    for name, value in (raw.items() if isinstance(raw, dict) else []):
        key = _join(prefix, name)
        match = re.fullmatch(r"\$\{([\w.]+)\}", value) if isinstance(value, str) else None
        if match:
            sources[key] = match.group(1)
        elif isinstance(value, dict):
            sources.update(_interpolation_sources(value, key))
    return sources


def _error_key(error: str) -> str:
    """The key an error line is about, list indices dropped: `eval.measures[1]=foo: ...` -> eval.measures."""
    return re.split(r"[=:\[]", error, maxsplit=1)[0]


_UNRESOLVED = object()


def _check_node(node: DictConfig, schema: type, prefix: str, errors: list[str]) -> None:
    if schema is Entry:
        if len(node) == 0:
            return   # an empty entry is switched off (probe=none, intervention=none)
        schema = ENTRY_SCHEMAS.get(str(node.get("_target_")), schema)
    hints = typing.get_type_hints(schema, include_extras=True)
    known = [f.name for f in dataclasses.fields(schema)]
    if schema is not Entry:   # an entry of a target without a schema keeps its keys unchecked
        for key in node:
            if key not in known and key != "hydra":
                errors.append(f"{_join(prefix, key)}: unknown key; known keys here: {', '.join(known)}")
    for f in dataclasses.fields(schema):
        key = _join(prefix, f.name)
        if f.name not in node or OmegaConf.is_missing(node, f.name):
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                errors.append(f"{key}: missing (required)")
            continue
        value = _value(node, f.name, key, errors)
        if value is not _UNRESOLVED:
            _check_value(value, hints[f.name], key, errors)


def _value(node: DictConfig, name: str, key: str, errors: list[str]) -> Any:
    try:
        return node[name]
    except OmegaConfBaseException as err:  # an interpolation that cannot resolve (missing key, variable)
        raw = OmegaConf.to_container(node, resolve=False).get(name)
        errors.append(f"{key}={raw}: cannot be resolved ({str(err).splitlines()[0]})")
        return _UNRESOLVED


def _check_value(value: Any, hint: Any, key: str, errors: list[str]) -> None:
    optional = False
    if typing.get_origin(hint) in (Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = len(options) < len(typing.get_args(hint))
        if value is None and optional:
            return
        hint = next((a for a in options if _is_type(value, _unwrap(a)[0])), options[0])
    hint, rule = _unwrap(hint)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if not _is_type(value, hint):
        errors.append(f"{key}={show(value)}: must be {_allowed(hint, rule, optional)} "
                      f"(got {'null' if value is None else type(value).__name__})")
    elif not rule.ok(value):
        errors.append(f"{key}={show(value)}: must be {_allowed(hint, rule, optional)}")
    elif dataclasses.is_dataclass(hint):
        _check_node(value, hint, key, errors)
    elif origin is list:
        for i, element in enumerate(value):
            _check_value(element, args[0], f"{key}[{i}]", errors)
    elif origin is dict and args[1] is not Any:
        for name in value:
            item = _value(value, name, _join(key, name), errors)
            if item is not _UNRESOLVED:
                _check_value(item, args[1], _join(key, name), errors)


def _unwrap(hint: Any) -> tuple[Any, Rule]:
    """(type, rule) of Annotated[type, Rule]; an empty rule for a plain type."""
    if typing.get_origin(hint) is Annotated:
        base, *extras = typing.get_args(hint)
        return base, next((e for e in extras if isinstance(e, Rule)), Rule())
    return hint, Rule()


def _is_type(value: Any, hint: Any) -> bool:
    if hint is Any:
        return True
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if typing.get_origin(hint) is list:
        return isinstance(value, ListConfig)
    return isinstance(value, DictConfig)   # a dict or a schema dataclass


def _allowed(hint: Any, rule: Rule, optional: bool) -> str:
    """What a key takes, in words: 'null or an integer >= 1', 'one of cosine, linear, constant'."""
    if rule.choices is not None:
        text = "one of " + ", ".join(show(c) for c in rule.choices)
    elif rule.accepts is not None:
        text = rule.named
    elif typing.get_origin(hint) is list:
        text = "a non-empty list" if rule.nonempty else "a list"
    elif dataclasses.is_dataclass(hint):
        text = "a mapping of " + ", ".join(f.name for f in dataclasses.fields(hint))
    elif typing.get_origin(hint) is dict:
        text = "a mapping"
    else:
        text = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}[hint]
        if rule.nonempty:
            text = "a non-empty string"
        text += " and".join(f" {op} {show(limit)}" for op, limit in rule.bounds())
    return ("null or " if optional else "") + text


def _join(prefix: str, key: Any) -> str:
    return f"{prefix}.{key}" if prefix else str(key)


def show(value: Any) -> str:
    """A value as one writes it on the command line: null, true, 0.5, cosine, [0.5, 1.0]."""
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value, resolve=False)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return value if value.strip() and value == value.strip() else repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(show(v) for v in value) + "]"
    return str(value)

