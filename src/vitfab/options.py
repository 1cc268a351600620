"""Config fields that are also command-line options: the default and the help text, written once.

A config dataclass declares each field with :func:`option`; ``vitfab.cli`` turns the fields
into typer options (``--field-name``, the field's type and default, this help text), so the
command line and the Python API cannot disagree about a default.
"""

from __future__ import annotations

import dataclasses
from dataclasses import MISSING, dataclass, field
from typing import Any, Callable

import yaml

from .errors import VitfabError

KEY = "vitfab_option"
RECORDED = "recorded"  # a setting meaning: as recorded with the checkpoint (ToMe schedule, precision)


@dataclass(frozen=True)
class Opt:
    help: str
    flag: str | None = None  # the option's name without dashes; default: the field name with - for _
    cli: bool = True  # False: a field of the Python API only
    cli_type: Any = None  # what the command line takes, where it differs from the field's type
    cli_default: Any = None  # its default then (parsed into the field's default)
    parse: Callable[[Any], Any] | None = None  # command-line value -> field value


def option(default: Any = MISSING, *, help: str, flag: str | None = None, cli: bool = True,
           default_factory: Any = MISSING, cli_type: Any = None, cli_default: Any = None,
           parse: Callable[[Any], Any] | None = None) -> Any:
    """A dataclass field with its command-line form (see the module doc)."""
    meta = {KEY: Opt(help, flag, cli, cli_type, cli_default, parse)}
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


def opt_of(f: dataclasses.Field) -> Opt | None:
    return f.metadata.get(KEY)


def parse_key_values(items: list[str] | tuple[str, ...], what: str = "--model-arg") -> dict[str, Any]:
    """``["depth=6", "embed_dim=96"]`` -> ``{"depth": 6, "embed_dim": 96}`` (values read as YAML)."""
    out = {}
    for item in items:
        key, sep, value = str(item).partition("=")
        if not sep or not key.strip():
            raise VitfabError(f"{what} expects KEY=VALUE, got '{item}'")
        out[key.strip().replace("-", "_")] = yaml.safe_load(value)
    return out


def split_list(value: str | None, what: str) -> list[str]:
    """A comma list (``"fp32,bf16"``) as its items; empty is an error."""
    items = [v.strip() for v in str(value or "").split(",") if v.strip()]
    if not items:
        raise VitfabError(f"{what} is empty")
    return items
