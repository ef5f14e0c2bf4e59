"""Typed configuration: YAML recipes and JSON configs into dataclasses, strictly validated.

Dataclasses are the schema (their field docstrings become ``--help`` through tyro in ``cli.py``).
``from_dict`` builds one from plain data with dacite in strict mode, so an unknown key or a value
of the wrong type fails at start-up with the key, the value and what is allowed; ``load_yaml``
does that for a recipe file and names the file.
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
import typing
from pathlib import Path
from typing import Any, TypeVar

import dacite
import yaml

from lmforge.errors import UserError

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


def read_text_file(path: str | os.PathLike, *, what: str) -> str:
    """The UTF-8 text of ``path``; missing, a directory or not UTF-8 raises ValueError naming it as ``what``."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: {what} not found") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a directory, expected a {what}") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: {what} is not UTF-8 text (byte offset {e.start})") from None


def read_yaml(path: str | os.PathLike) -> dict:
    """A YAML mapping from ``path``; a missing file, bad YAML (file:line:column) or a non-mapping raises ValueError
    naming it."""
    text = read_text_file(path, what="config file")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        problem = getattr(e, "problem", None) or str(e)
        context = getattr(e, "context", None)
        raise UserError(f"{where}: not valid YAML: {problem}" + (f" ({context})" if context else "")) from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise UserError(f"{path}: a recipe is a mapping of keys to values, not {type(data).__name__}")
    return data


def read_json(path: str | os.PathLike, *, what: str = "JSON file") -> Any:
    """The JSON value in ``path``; a missing, unreadable or malformed file raises ValueError naming it (and the
    line and column of a syntax error)."""
    text = read_text_file(path, what=what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}:{e.colno}: not valid JSON ({e.msg}) in this {what}") from None


def read_json_object(path: str | os.PathLike, *, what: str = "JSON file") -> dict:
    """``read_json`` for a file that must hold a JSON object."""
    data = read_json(path, what=what)
    if not isinstance(data, dict):
        raise UserError(f"{path}: this {what} must hold a JSON object, not {type(data).__name__}")
    return data


def load_yaml(cls: type[T], path: str | os.PathLike) -> T:
    """Read a YAML recipe into ``cls``; errors name the file."""
    return from_dict(cls, read_yaml(path), where=str(path))


def to_dict(cfg: Any) -> dict[str, Any]:
    """A dataclass (or a dict) as plain data, ready for YAML or JSON."""
    return cfg if isinstance(cfg, dict) else dataclasses.asdict(cfg)


def temporary_name(path: Path) -> Path:
    """A temporary file beside ``path``, its name unique to this process and thread, to write then ``os.replace``.

    A shared name would let two writers of the same file (the processes of a torchrun job preparing one run
    directory) write into one temporary file, and a reader then see it half written after the rename.
    """
    return path.with_name(f"{path.name}.{os.getpid()}-{threading.get_ident()}.tmp")


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write JSON atomically (temporary file + rename), so a crash never leaves half a file."""
    path = Path(path)
    tmp = temporary_name(path)
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def write_yaml(path: str | os.PathLike, cfg: Any) -> None:
    """Write the resolved config of a run (a dataclass or a dict) as YAML, atomically."""
    path = Path(path)
    tmp = temporary_name(path)
    tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True), encoding="utf-8")
    os.replace(tmp, path)
