"""Validate a TOML table into frozen dataclasses, reporting every problem at once.

A field's type annotation says what it accepts (bool, int, float, str, Path, SecretStr,
Literal[...], X | None, list[X], a nested dataclass); `rules(...)` in its metadata adds
the constraints (bounds, pattern, minimum length, a final check). Each problem names the
key as written in the file: "transfer.workers: must be >= 1", "sources[0].foo: unknown
key". Coercions stay those natural to TOML: an integer where a float is wanted, a string
for a path. A bool is not an integer, a string is not a number, and no message repeats
the value it refuses (it may be a password).
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import math
import re
import types
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Final, Literal, TypeVar, get_args, get_origin

from nbia_sync.secret import SecretStr

T = TypeVar("T")

# A check turns one raw value into the field's value, or appends its problems
# ("key: what is wrong") and returns INVALID.
Check = Callable[[object, str, list[str]], object]
INVALID: Final = object()
_RULES: Final = "nbia_sync.rules"


class SchemaError(ValueError):
    """The raw settings break the schema; `problems` holds one line per problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


@dataclasses.dataclass(frozen=True, slots=True)
class Rules:
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    pattern: str | None = None
    min_length: int = 0
    # Run on the converted value; a ValueError it raises is the key's problem.
    after: Callable[[Any], object] | None = None


def rules(**kwargs: Any) -> dict[str, Rules]:
    """Field metadata: `field(default=8, metadata=rules(ge=1, le=256))`."""
    return {_RULES: Rules(**kwargs)}


def parse(cls: type[T], raw: Mapping[str, object]) -> T:
    """`cls` built from `raw`, or SchemaError listing every problem found."""
    problems: list[str] = []
    value = _table(typing.cast(type, cls))(raw, "", problems)
    if value is INVALID:
        raise SchemaError(problems)
    return typing.cast(T, value)


def _kind(value: object) -> str:
    """The TOML name of a value's type, for "must be X, not Y"."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a float"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list | tuple):
        return "an array"
    if isinstance(value, Mapping):
        return "a table"
    if isinstance(value, datetime.date | datetime.time):
        return "a date/time"
    return "nothing" if value is None else f"a {type(value).__name__}"


def _scalar(convert: Callable[[object], object]) -> Check:
    def check(value: object, key: str, problems: list[str]) -> object:
        try:
            return convert(value)
        except ValueError as exc:
            problems.append(f"{key}: {exc}")
            return INVALID

    return check


def _bounded(number: float, r: Rules) -> None:
    if r.ge is not None and number < r.ge:
        raise ValueError(f"must be >= {r.ge}")
    if r.gt is not None and number <= r.gt:
        raise ValueError(f"must be > {r.gt}")
    if r.le is not None and number > r.le:
        raise ValueError(f"must be <= {r.le}")
    if r.lt is not None and number >= r.lt:
        raise ValueError(f"must be < {r.lt}")


def _int(r: Rules) -> Check:
    def convert(value: object) -> object:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"must be an integer, not {_kind(value)}")
        _bounded(value, r)
        return value

    return _scalar(convert)


def _float(r: Rules) -> Check:
    def convert(value: object) -> object:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"must be a number, not {_kind(value)}")
        if not math.isfinite(value):
            raise ValueError("must be a finite number")
        _bounded(value, r)
        return float(value)

    return _scalar(convert)


def _str(r: Rules) -> Check:
    def convert(value: object) -> object:
        if not isinstance(value, str):
            raise ValueError(f"must be a string, not {_kind(value)}")
        if r.pattern is not None and not re.fullmatch(r.pattern, value):
            raise ValueError(f"must match the pattern {r.pattern}")
        return value

    return _scalar(convert)


def _typed(kind: type | tuple[type, ...], expected: str, make: Callable[[Any], object]) -> Check:
    def convert(value: object) -> object:
        if not isinstance(value, kind):
            raise ValueError(f"must be {expected}, not {_kind(value)}")
        return make(value)

    return _scalar(convert)


def _one_of(choices: tuple[object, ...]) -> Check:
    def convert(value: object) -> object:
        if not isinstance(value, str) or value not in choices:
            raise ValueError("must be one of " + ", ".join(f'"{c}"' for c in choices))
        return value

    return _scalar(convert)


def _nullable(inner: Check) -> Check:
    return lambda value, key, problems: None if value is None else inner(value, key, problems)


def _list(item: Check, r: Rules) -> Check:
    def check(value: object, key: str, problems: list[str]) -> object:
        if not isinstance(value, list | tuple):
            problems.append(f"{key}: must be an array, not {_kind(value)}")
            return INVALID
        if len(value) < r.min_length:
            entries = "entry" if r.min_length == 1 else "entries"
            problems.append(f"{key}: must have at least {r.min_length} {entries}")
            return INVALID
        items = [item(v, f"{key}[{i}]", problems) for i, v in enumerate(value)]
        return INVALID if any(v is INVALID for v in items) else items

    return check


def _then(inner: Check, after: Callable[[Any], object]) -> Check:
    finish = _scalar(after)

    def check(value: object, key: str, problems: list[str]) -> object:
        result = inner(value, key, problems)
        return result if result is INVALID else finish(result, key, problems)

    return check


def _check_for(tp: Any, r: Rules) -> Check:
    """The check of a field annotated `tp`."""
    origin, args = get_origin(tp), get_args(tp)
    if origin is Literal:
        return _one_of(args)
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        (inner,) = (a for a in args if a is not type(None))
        return _nullable(_check_for(inner, r))
    if origin is list:
        return _list(_check_for(args[0], Rules()), r)
    if tp is bool:
        return _typed(bool, "true or false", bool)
    if tp is int:
        return _int(r)
    if tp is float:
        return _float(r)
    if tp is str:
        return _str(r)
    if tp is Path:
        return _typed((str, Path), "a string", Path)
    if tp is SecretStr:
        return _typed((str, SecretStr), "a string", _secret)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _table(tp)
    raise TypeError(f"no check for fields of type {tp!r}")


def _secret(value: str | SecretStr) -> SecretStr:
    return value if isinstance(value, SecretStr) else SecretStr(value)


@functools.cache
def _table(cls: type) -> Check:
    """The check of a table read into the dataclass `cls` (built once per class)."""
    hints = typing.get_type_hints(cls)
    fields: list[tuple[str, Check, bool]] = []
    for f in dataclasses.fields(cls):
        r: Rules = f.metadata.get(_RULES, Rules())
        of_type = _check_for(hints[f.name], r)
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        fields.append((f.name, of_type if r.after is None else _then(of_type, r.after), required))
    known = {name for name, _, _ in fields}

    def check(value: object, key: str, problems: list[str]) -> object:
        if not isinstance(value, Mapping):
            problems.append(f"{key or '(top level)'}: must be a table, not {_kind(value)}")
            return INVALID
        values: dict[str, object] = {}
        found = len(problems)
        for name, field_check, required in fields:
            where = f"{key}.{name}" if key else name
            if name in value:
                values[name] = field_check(value[name], where, problems)
            elif required:
                problems.append(f"{where}: required key is missing")
        for name in value:
            if name not in known:
                problems.append(f"{key}.{name}: unknown key" if key else f"{name}: unknown key")
        return cls(**values) if len(problems) == found else INVALID

    return check
