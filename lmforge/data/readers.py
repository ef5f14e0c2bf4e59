"""Plain-text, JSONL, TSV and CoNLL files <-> examples, with errors that name file:line.

The formats users already have: JSONL with named fields, TSV/CSV columns, CoNLL (one token and
its tag per line, a blank line between sentences) and plain text (one document per line). The
writers produce the same formats, so ``lmforge data export`` output reads back unchanged.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    try:
        with path.open(encoding="utf-8-sig") as f:
            for lineno, line in enumerate(f, 1):
                yield lineno, line.rstrip("\n").rstrip("\r")
    except FileNotFoundError:
        raise ValueError(f"{path}: file not found") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte offset {e.start}: {e.reason})") from None


def read_text_lines(path: str | os.PathLike) -> Iterator[str]:
    """Non-empty lines of a UTF-8 text file, streamed."""
    for _, line in _lines(Path(path)):
        if line.strip():
            yield line


def read_jsonl(path: str | os.PathLike) -> Iterator[dict]:
    """Objects of a JSONL file, streamed; a malformed line raises ValueError with file:line."""
    path = Path(path)
    for lineno, line in _lines(path):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: malformed JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
        yield obj


def read_jsonl_field(path: str | os.PathLike, field: str) -> Iterator[str]:
    """The string ``field`` of every JSONL object; a missing or non-string field names file:line."""
    path = Path(path)
    for lineno, (_, line) in enumerate(_lines(path), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: malformed JSON ({e.msg})") from None
        value = obj.get(field) if isinstance(obj, dict) else None
        if not isinstance(value, str):
            raise ValueError(
                f"{path}:{lineno}: no string field {field!r} (fields: {sorted(obj) if isinstance(obj, dict) else '-'})"
            )
        yield value


def read_conll(path: str | os.PathLike) -> Iterator[dict]:
    """Sentences of a CoNLL file as {"tokens": [...], "tags": [...]} (token first, tag last column)."""
    path = Path(path)
    tokens: list[str] = []
    tags: list[str] = []
    for lineno, line in _lines(path):
        if not line.strip():
            if tokens:
                yield {"tokens": tokens, "tags": tags}
                tokens, tags = [], []
            continue
        cols = line.split()
        if len(cols) < 2:
            raise ValueError(f"{path}:{lineno}: expected 'TOKEN TAG', got {line!r}")
        tokens.append(cols[0])
        tags.append(cols[-1])
    if tokens:
        yield {"tokens": tokens, "tags": tags}


def _atomic_write(path: Path, lines: Iterable[str]) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    n = 0
    with tmp.open("w", encoding="utf-8") as f:
        for line in lines:
            f.write(line)
            n += 1
    os.replace(tmp, path)
    return n


def write_jsonl(path: str | os.PathLike, examples: Iterable[dict]) -> int:
    return _atomic_write(Path(path), (json.dumps(ex, ensure_ascii=False) + "\n" for ex in examples))


def write_conll(path: str | os.PathLike, examples: Iterable[dict]) -> int:
    def blocks():
        for ex in examples:
            if any(not t or t.isspace() for t in ex["tokens"]):
                raise ValueError(f"{path}: CoNLL cannot hold an empty or whitespace token: {ex['tokens']!r}")
            yield "".join(f"{t} {g}\n" for t, g in zip(ex["tokens"], ex["tags"], strict=True)) + "\n"

    return _atomic_write(Path(path), blocks())


def write_tsv(path: str | os.PathLike, rows: Iterable[tuple[str, ...]]) -> int:
    def lines():
        for row in rows:
            if any("\t" in c or "\n" in c for c in row):
                raise ValueError(f"{path}: a field contains a tab or newline: {row!r}")
            yield "\t".join(row) + "\n"

    return _atomic_write(Path(path), lines())


def corpus_texts(inputs: Iterable[str], *, jsonl_field: str = "text", split: str = "train") -> Iterator[str]:
    """Stream the texts of each input: ``builtin:NAME`` (its ``split``), a ``.jsonl`` file (its
    ``jsonl_field``) or a plain text file (one document per line)."""
    from lmforge.data.builtin import BUILTINS, example_texts, load_builtin

    for spec in inputs:
        if spec.startswith("builtin:"):
            name = spec.removeprefix("builtin:")
            if name not in BUILTINS:
                raise ValueError(f"{spec}: unknown built-in corpus; available: {', '.join(BUILTINS)}")
            for example in load_builtin(name)[split]:
                yield from example_texts(name, example)
        elif spec.endswith(".jsonl"):
            yield from read_jsonl_field(spec, jsonl_field)
        else:
            yield from read_text_lines(spec)
