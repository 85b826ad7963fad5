"""Dataclass records to and from JSON, driven by type hints.

Both directions are on the leader's hot path (a burst writes each instance several times):
records are encoded by orjson (dataclasses, enums and nested records natively, ~1 µs an
instance), and each record class gets its decoders built once and cached.
"""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
from collections.abc import Callable
from functools import cache
from typing import Any, TypeVar

import orjson

T = TypeVar("T")
Convert = Callable[[Any], Any]


@cache
def field_names(cls: Any) -> tuple[str, ...]:
    """The names of a dataclass's fields, in order (cached)."""
    return tuple(f.name for f in dataclasses.fields(cls))


def to_dict(record: Any) -> Any:
    """A JSON-ready copy of a dataclass record (nested records, lists and dicts included)."""
    kind = type(record)
    if kind in _SCALARS:
        return record
    if hasattr(kind, "__dataclass_fields__"):
        return {name: to_dict(getattr(record, name)) for name in field_names(kind)}  # type: ignore[arg-type]
    if kind is list or kind is tuple:
        return [to_dict(item) for item in record]
    if kind is dict:
        return {key: to_dict(value) for key, value in record.items()}
    return record


_SCALARS = frozenset({str, int, float, bool, type(None)})


def _same(value: Any) -> Any:
    return value


def _converter(hint: Any) -> Convert:
    """A function turning JSON data into a value of type `hint` (None stays None)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        inner = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        return _converter(inner[0]) if len(inner) == 1 else _same
    if origin is list:
        item = _converter(typing.get_args(hint)[0])
        if item is _same:
            return _same
        return lambda v: None if v is None else [item(x) for x in v]
    if origin is dict:
        value = _converter(typing.get_args(hint)[1])
        if value is _same:
            return _same
        return lambda v: None if v is None else {k: value(x) for k, x in v.items()}
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return lambda v: None if v is None else from_dict(hint, v)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return lambda v: None if v is None else hint(v)
    return _same


_MISSING: Any = dataclasses.MISSING


@cache
def _fields(cls: Any) -> list[tuple[str, Convert | None, Any, Any]]:
    """Per field: its name, its converter (None: the JSON value is the value), its default
    and its default factory."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        convert = _converter(hints[f.name])
        out.append((f.name, None if convert is _same else convert, f.default,
                    f.default_factory))
    return out


def from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Build `cls` from a dict (parsed JSON, which it takes over: its lists and dicts become
    the record's); keys the record does not know are ignored (newer writers), missing ones
    take their defaults. Built without __init__ (records have no __post_init__): decoding
    is on the hot path of every master's cache."""
    record = object.__new__(cls)
    put = object.__setattr__  # (records have slots: no __dict__ to fill)
    for name, convert, default, factory in _fields(cls):  # type: ignore[arg-type]
        if name in data:
            value = data[name]
            put(record, name, value if convert is None else convert(value))
        elif factory is not _MISSING:
            put(record, name, factory())
        elif default is not _MISSING:
            put(record, name, default)
        else:
            raise TypeError(f"{cls.__name__}: the field {name!r} is missing")
    return record


def dumps(record: Any) -> bytes:
    """Compact JSON bytes of a record (fields in their declared order, dict keys sorted)."""
    return orjson.dumps(record, option=orjson.OPT_SORT_KEYS)


def loads(cls: type[T], data: bytes) -> T:
    """A record of type `cls` from JSON bytes."""
    return from_dict(cls, orjson.loads(data))
