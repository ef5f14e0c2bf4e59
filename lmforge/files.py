"""Files on disk: reading what a user brings (errors name the file, line and column) and writing atomically.

Every file lmforge writes goes through ``atomic_write``: the content is written to a temporary file beside the
target, whose name is unique to this process and thread, and renamed over the target only when it is complete,
so a crash, a kill or a full disk never leaves half a file, and two writers of one file (the processes of a
torchrun job preparing one run directory) never share a temporary file. ``write_text``, ``write_json``,
``write_yaml`` and ``write_lines`` are its common uses; binary formats (safetensors, ONNX, NumPy, matplotlib's PNGs)
write into the path it yields (with ``suffix`` where the writer picks the format by the extension). Two things are
made atomic one level up instead: checkpoint directories (``train/checkpoint.py``: a ``.tmp-step-N`` directory,
fsynced, then renamed) and token shards (``data/shards.py``: streamed, with the meta file written last), and
``metrics.jsonl`` is appended to as the loop runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import yaml

from lmforge.errors import UserError


def temporary_name(path: Path, *, suffix: str = "") -> Path:
    """A temporary file beside ``path``, its name unique to this process and thread (``suffix`` for writers that
    choose a format by the extension: ``.npy``, ``.onnx``). Its name contains ``.tmp``."""
    return path.with_name(f"{path.name}.{os.getpid()}-{threading.get_ident()}.tmp{suffix}")


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, *, suffix: str = "") -> Iterator[Path]:
    """``with atomic_write(path) as tmp: write(tmp)``: ``path`` gets the file only when the block finishes; on
    an exception the temporary file is removed and ``path`` keeps what it had. The parent directory is made."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path, suffix=suffix)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | os.PathLike, text: str) -> None:
    """UTF-8 text, atomically."""
    with atomic_write(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_lines(path: str | os.PathLike, lines: Iterable[str]) -> int:
    """Lines (each with its own newline) streamed into ``path`` atomically; returns how many were written."""
    n = 0
    with atomic_write(path) as tmp, tmp.open("w", encoding="utf-8") as f:
        for line in lines:
            f.write(line)
            n += 1
    return n


def write_json(path: str | os.PathLike, data: Any) -> None:
    """JSON (indented, UTF-8), atomically."""
    write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def to_dict(cfg: Any) -> dict[str, Any]:
    """A dataclass (or a dict) as plain data, ready for YAML or JSON."""
    return cfg if isinstance(cfg, dict) else dataclasses.asdict(cfg)


def write_yaml(path: str | os.PathLike, cfg: Any) -> None:
    """The resolved config of a run (a dataclass or a dict) as YAML, atomically."""
    write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True))


def read_text_file(path: str | os.PathLike, *, what: str) -> str:
    """The UTF-8 text of ``path``; missing, a directory or not UTF-8 raises a UserError naming it as ``what``."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: {what} not found") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a directory, expected a {what}") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: {what} is not UTF-8 text (byte offset {e.start})") from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml's safe loader, but a key given twice in one mapping is an error naming both lines (PyYAML keeps the
    last silently: a recipe would run with a value its author did not see)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"key {key!r} is given twice (lines {seen[key] + 1} and {key_node.start_mark.line + 1})",
                    key_node.start_mark,
                )
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | os.PathLike) -> dict:
    """A YAML mapping from ``path``; a missing file, bad YAML (file:line:column) or a non-mapping raises a
    UserError naming it."""
    text = read_text_file(path, what="config file")
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
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
    """The JSON value in ``path``; a missing, unreadable or malformed file raises a UserError naming it (and the
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
