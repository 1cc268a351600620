"""Dataclasses to JSON and back, by their type hints: how typed results are saved and read.

``to_json`` turns (nested) dataclasses, tuples, enums and paths into plain JSON values;
``from_json(T, value)`` rebuilds a ``T`` from them, following the field types (nested
dataclasses, ``X | None``, ``list[X]``, ``tuple[X, ...]``, ``dict[str, X]``). Unknown keys are an
error, so a record written by another version of a type says so instead of being half read.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import types
import typing
from pathlib import Path
from typing import Any


class RecordError(ValueError):
    """A JSON value that does not fit the type asked for."""


def to_json(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_json(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (list, tuple)):
        return [to_json(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): to_json(v) for k, v in obj.items()}
    return obj


@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def from_json(tp: Any, value: Any) -> Any:
    """``value`` (plain JSON) as an instance of the type ``tp``."""
    origin = typing.get_origin(tp)
    if tp is Any or tp is object:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return from_json(arg, value)
            except (RecordError, TypeError, ValueError) as exc:
                errors.append(str(exc))
        raise RecordError(f"{value!r} fits none of {tp}: {'; '.join(errors)}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise RecordError(f"{tp.__name__} needs an object, got {type(value).__name__}")
        hints = _hints(tp)
        names = {f.name for f in dataclasses.fields(tp)}
        unknown = sorted(set(value) - names)
        if unknown:
            raise RecordError(f"{tp.__name__} has no field(s) {', '.join(unknown)}")
        return tp(**{k: from_json(hints[k], v) for k, v in value.items()})
    if origin in (list, tuple) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise RecordError(f"{tp} needs a list, got {type(value).__name__}")
        args = typing.get_args(tp)
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            return tuple(from_json(a, v) for a, v in zip(args, value))
        item = args[0] if args else Any
        out = [from_json(item, v) for v in value]
        return tuple(out) if (origin or tp) is tuple else out
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise RecordError(f"{tp} needs an object, got {type(value).__name__}")
        args = typing.get_args(tp)
        item = args[1] if args else Any
        return {k: from_json(item, v) for k, v in value.items()}
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return tp(value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is Path:
        return Path(value)
    if isinstance(tp, type) and not isinstance(value, tp):
        raise RecordError(f"expected {tp.__name__}, got {value!r}")
    return value
