"""Typed configuration: YAML recipes and JSON configs into dataclasses, strictly validated.

Dataclasses are the schema (their field docstrings become ``--help`` through tyro in ``cli.py``).
``from_dict`` builds one from plain data with dacite in strict mode, so an unknown key or a value
of the wrong type fails at start-up with the key, the value and what is allowed; ``load_yaml``
does that for a recipe file and names the file. Reading and writing files is ``files.py``'s.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from typing import Any, TypeVar

import dacite

from lmforge.errors import UserError
from lmforge.files import read_yaml

T = TypeVar("T")


def _int_to_float(value: Any) -> Any:
    # YAML and JSON write 1e-4 as a float but 0 or 1 as an int; a float field accepts both.
    return float(value) if isinstance(value, int) and not isinstance(value, bool) else value


_DACITE = dacite.Config(strict=True, type_hooks={float: _int_to_float})


def _allowed(cls: type, path: str) -> str:
    """Describe what the field at dotted ``path`` of ``cls`` accepts."""
    hints = typing.get_type_hints(cls)
    head, _, rest = path.partition(".")
    if head not in hints:
        return "one of: " + ", ".join(f.name for f in dataclasses.fields(cls))
    hint = hints[head]
    if rest and dataclasses.is_dataclass(hint):
        return _allowed(hint, rest)
    if typing.get_origin(hint) is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    return f"a value of type {getattr(hint, '__name__', hint)}"


def from_dict(cls: type[T], data: Any, *, where: str = "config") -> T:
    """Build dataclass ``cls`` from ``data``; any problem raises ValueError naming ``where`` and the key."""
    if not isinstance(data, dict):
        raise UserError(f"{where}: expected a mapping of {cls.__name__} fields, got {type(data).__name__}")
    try:
        return dacite.from_dict(cls, data, config=_DACITE)
    except dacite.UnexpectedDataError as e:
        keys = ", ".join(sorted(e.keys))
        fields = ", ".join(f.name for f in dataclasses.fields(cls))
        raise UserError(f"{where}: unknown key(s) {keys}; allowed keys of {cls.__name__}: {fields}") from None
    except dacite.WrongTypeError as e:
        raise UserError(
            f"{where}: key {e.field_path!r} has value {e.value!r}; expected {_allowed(cls, e.field_path)}"
        ) from None
    except dacite.MissingValueError as e:
        raise UserError(f"{where}: required key {e.field_path!r} is missing") from None
    except dacite.DaciteError as e:
        raise UserError(f"{where}: {e}") from None
    except (TypeError, ValueError) as e:  # raised by a dataclass's own __post_init__ checks
        raise UserError(f"{where}: {e}") from None


def check_range(key: str, value: float | None, *, at_least: float | None = None, below: float | None = None) -> None:
    """ValueError naming ``key`` when ``value`` (None passes) is under ``at_least`` or not under ``below``."""
    if value is None:
        return
    if (at_least is not None and value < at_least) or (below is not None and value >= below):
        bounds = " and ".join(
            b
            for b in (f">= {at_least:g}" if at_least is not None else "", f"< {below:g}" if below is not None else "")
            if b
        )
        raise UserError(f"{key}={value!r} must be {bounds}")


def load_yaml(cls: type[T], path: str | os.PathLike) -> T:
    """Read a YAML recipe into ``cls``; errors name the file."""
    return from_dict(cls, read_yaml(path), where=str(path))
