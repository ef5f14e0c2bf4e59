"""Plain-text, JSONL, TSV and CoNLL files <-> examples, with errors that name file:line.

The formats users already have: JSONL with named fields, TSV/CSV columns, CoNLL (one token and
its tag per line, a blank line between sentences) and plain text (one document per line). The
writers produce the same formats, so ``lmforge data export`` output reads back unchanged.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from lmforge.errors import UserError, unicode_problem
from lmforge.files import write_lines

logger = logging.getLogger(__name__)


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    try:
        with path.open(encoding="utf-8-sig") as f:
            for lineno, line in enumerate(f, 1):
                yield lineno, line.rstrip("\n").rstrip("\r")
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a directory; give a file") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte offset {e.start}: {e.reason})") from None


def read_text_lines(path: str | os.PathLike) -> Iterator[str]:
    """Non-empty lines of a UTF-8 text file, streamed."""
    for _, line in _lines(Path(path)):
        if line.strip():
            yield line


def _jsonl_objects(lines: Iterable[tuple[int, str]]) -> Iterator[tuple[int, dict | None, str | None]]:
    """(line number, object, problem) for every non-blank JSONL line; exactly one of object / problem is set."""
    for lineno, line in lines:
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            yield lineno, None, f"malformed JSON ({e.msg})"
            continue
        if not isinstance(obj, dict):
            yield lineno, None, f"expected a JSON object, got {type(obj).__name__}"
            continue
        surrogate = _lone_surrogate(obj)
        if surrogate is not None:
            yield lineno, None, surrogate
        else:
            yield lineno, obj, None


def _lone_surrogate(value, where: str = "") -> str | None:
    """Where a JSON escape such as \\ud800 left half a UTF-16 pair in a string (no tokenizer can read it), or None.
    Files in UTF-8 cannot hold one; only JSON's escapes can."""
    if isinstance(value, str):
        problem = unicode_problem(value)
        return None if problem is None else f"{where or 'a value'} is not valid Unicode: {problem}"
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        found = _lone_surrogate(item, f"{where}.{key}" if where else str(key))
        if found is not None:
            return found
    return None


def read_jsonl(path: str | os.PathLike) -> Iterator[dict]:
    """Objects of a JSONL file, streamed; a malformed line raises ValueError with file:line."""
    path = Path(path)
    for lineno, obj, problem in _jsonl_objects(_lines(path)):
        if problem:
            raise UserError(f"{path}:{lineno}: {problem}")
        yield obj


def read_jsonl_field(path: str | os.PathLike, field: str) -> Iterator[str]:
    """The string ``field`` of every JSONL object; a missing or non-string field names file:line."""
    path = Path(path)
    for lineno, obj, problem in _jsonl_objects(_lines(path)):
        if problem:
            raise UserError(f"{path}:{lineno}: {problem}")
        value = obj.get(field)
        if not isinstance(value, str):
            raise UserError(f"{path}:{lineno}: no string field {field!r} (fields: {sorted(obj)})")
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
            raise UserError(f"{path}:{lineno}: expected 'TOKEN TAG', got {line!r}")
        tokens.append(cols[0])
        tags.append(cols[-1])
    if tokens:
        yield {"tokens": tokens, "tags": tags}


def write_jsonl(path: str | os.PathLike, examples: Iterable[dict]) -> int:
    return write_lines(Path(path), (json.dumps(ex, ensure_ascii=False) + "\n" for ex in examples))


def write_conll(path: str | os.PathLike, examples: Iterable[dict]) -> int:
    def blocks():
        for ex in examples:
            if any(not t or t.isspace() for t in ex["tokens"]):
                raise UserError(f"{path}: CoNLL cannot hold an empty or whitespace token: {ex['tokens']!r}")
            yield "".join(f"{t} {g}\n" for t, g in zip(ex["tokens"], ex["tags"], strict=True)) + "\n"

    return write_lines(Path(path), blocks())


def write_tsv(path: str | os.PathLike, rows: Iterable[tuple[str, ...]]) -> int:
    def lines():
        for row in rows:
            if any("\t" in c or "\n" in c for c in row):
                raise UserError(f"{path}: a field contains a tab or newline: {row!r}")
            yield "\t".join(row) + "\n"

    return write_lines(Path(path), lines())


def check_output_file(output: str | os.PathLike, *, inputs: Iterable[str | os.PathLike] = (), flag: str = "--output"):
    """Refuse, before any work, an output path that is a directory, is one of the inputs (it would be
    overwritten), or lies under something that is not a directory."""
    out = Path(output)
    if out.is_dir():
        raise UserError(f"{flag} {out}: is a directory; name a file to write (e.g. {out / 'out.jsonl'})")
    for given in inputs:
        if Path(given).exists() and out.exists() and out.resolve() == Path(given).resolve():
            raise UserError(f"{flag} {out}: is the input file {given}; writing there would overwrite it")
    parent = next((p for p in (out.parent, *out.parent.parents) if p.exists()), Path("."))
    if not parent.is_dir():
        raise UserError(f"{flag} {out}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK):
        raise UserError(f"{flag} {out}: {parent} is not writable")
    return out


def corpus_texts(inputs: Iterable[str], *, jsonl_field: str = "text", split: str = "train") -> Iterator[str]:
    """Stream the texts of each input: ``builtin:NAME`` (its ``split``), a ``.jsonl`` file (its
    ``jsonl_field``) or a plain text file (one document per line)."""
    from lmforge.data.builtin import BUILTINS, example_texts, load_builtin

    for spec in inputs:
        if spec.startswith("builtin:"):
            name = spec.removeprefix("builtin:")
            if name not in BUILTINS:
                raise UserError(f"{spec}: unknown built-in corpus; available: {', '.join(BUILTINS)}")
            for example in load_builtin(name)[split]:
                yield from example_texts(name, example)
        elif spec.endswith(".jsonl"):
            yield from read_jsonl_field(spec, jsonl_field)
        else:
            yield from read_text_lines(spec)


@dataclass
class ReadReport:
    """What reading a labelled file kept and skipped (with --skip-bad-rows), for the run's report."""

    path: str
    kept: int = 0
    skipped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    """How the file was read where it differs from its face value (e.g. IOB1 tags read as IOB2)."""

    def reject(self, lineno: int, problem: str, *, skip: bool, unit: str = "rows") -> None:
        """Record a bad row with --skip-bad-rows, else raise naming file:line."""
        message = f"{self.path}:{lineno}: {problem}"
        if not skip:
            raise UserError(f"{message} (pass --skip-bad-rows to skip such {unit})")
        self.skipped.append(message)


def _decoded_lines(path: Path, report: ReadReport, skip_bad_rows: bool) -> list[tuple[int, str]]:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a directory; give a file") from None
    out = []
    for lineno, chunk in enumerate(raw.split(b"\n"), 1):
        try:
            line = chunk.decode("utf-8-sig" if lineno == 1 else "utf-8").rstrip("\r")
        except UnicodeDecodeError as e:
            problem = f"{path}:{lineno}: undecodable bytes (not UTF-8) at column {e.start + 1}"
            if not skip_bad_rows:
                raise UserError(problem + "; re-save the file as UTF-8 or pass --skip-bad-rows") from None
            report.skipped.append(problem)
            continue
        out.append((lineno, line))
    return out


def read_labelled(
    path: str | os.PathLike, *, skip_bad_rows: bool = False, need_label: bool = True
) -> tuple[list[dict], ReadReport]:
    """Labelled examples ``{"text", "label"[, "text_pair", "negative", "score", "id"], "source"}`` from a .csv,
    .tsv or .jsonl file (classification; pairs with scores or hard negatives for sentence embeddings).

    CSV and TSV need a header naming ``text`` and ``label`` (``text_pair`` optional); JSONL objects
    need the same fields. Every bad row (malformed, missing field, empty text) raises a ValueError
    naming file:line, or with ``skip_bad_rows`` is skipped and listed in the report. ``source`` is
    the row's ``file:line``. With ``need_label=False`` (prediction) the label is optional, and a
    .txt file is read as one text per non-blank line.
    """
    path = Path(path)
    report = ReadReport(str(path))
    lines = _decoded_lines(path, report, skip_bad_rows)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows = ((n, obj or {}, problem) for n, obj, problem in _jsonl_objects(lines))
    elif suffix in (".csv", ".tsv"):
        rows = _delimited_rows(path, lines, "\t" if suffix == ".tsv" else ",", need_label=need_label)
    elif suffix == ".txt" and not need_label:
        rows = ((n, {"text": line}, None) for n, line in lines if line.strip())
    else:
        formats = ".csv, .tsv or .jsonl" + ("" if need_label else " (or .txt, one text per line)")
        raise UserError(f"{path}: unknown format {suffix!r}; use {formats}")
    examples = []
    for lineno, row, problem in rows:
        problem = problem or _row_problem(row, need_label)
        if problem:
            report.reject(lineno, problem, skip=skip_bad_rows)
            continue
        example = {"text": row["text"], "source": f"{path}:{lineno}"}
        if row.get("label") not in (None, ""):
            example["label"] = _label_text(row["label"])
        if row.get("text_pair") not in (None, ""):
            example["text_pair"] = row["text_pair"]
        for key in ("negative", "id"):  # sentence-embedding data: a hard negative; any file: the row's id
            if row.get(key) not in (None, ""):
                example[key] = str(row[key])
        if row.get("score") not in (None, ""):
            try:
                example["score"] = float(row["score"])
            except (TypeError, ValueError):
                report.reject(lineno, f"score {row['score']!r} is not a number", skip=skip_bad_rows)
                continue
        examples.append(example)
    report.kept = len(examples)
    return examples, report


def _label_text(value) -> str:
    """A label as text. A whole number is written without its fraction, so JSON's 1 and 1.0 (and "1.0" next to "1"
    in a CSV) are one label, not two; other text (e.g. "007") is kept as written."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    text = str(value).strip()
    return text.split(".")[0] if re.fullmatch(r"-?\d+\.0+", text) else text


def _row_problem(row: dict, need_label: bool = True) -> str | None:
    for key in ("text", "label") if need_label else ("text",):
        if key not in row or row[key] is None:
            return f"missing field {key!r}"
    if not isinstance(row["text"], str):
        return f"text must be a string, not {type(row['text']).__name__} ({json.dumps(row['text'])[:40]})"
    if not row["text"].strip():
        return "empty text"
    if need_label and (isinstance(row["label"], (dict, list)) or str(row["label"]).strip() == ""):
        return f"bad label {row['label']!r}"
    if "text_pair" in row and row["text_pair"] is not None and not isinstance(row["text_pair"], str):
        return "text_pair is not a string"
    return None


def _delimited_rows(
    path: Path, lines: list[tuple[int, str]], delimiter: str, *, need_label: bool = True
) -> Iterator[tuple[int, dict, str | None]]:
    if not any(line.strip() for _, line in lines):
        raise UserError(f"{path}: empty file; expected a header line naming the columns, then one row per line")
    csv.field_size_limit(2**31 - 1)  # the default 128 KiB per field is a csv-module guard, not a property of the data
    numbers = [n for n, _ in lines]
    reader = csv.reader(io.StringIO("\n".join(line for _, line in lines)), delimiter=delimiter)
    header = _next_row(path, reader, numbers) or []
    if "text" not in header or (need_label and "label" not in header):
        needed = "'text' and 'label'" if need_label else "'text'"
        raise UserError(f"{path}:1: header has columns {header}; it needs {needed} ('text_pair' optional)")
    while (values := _next_row(path, reader, numbers)) is not None:
        lineno = numbers[min(reader.line_num - 1, len(numbers) - 1)]
        if not values or all(not v.strip() for v in values):
            continue
        if len(values) != len(header):
            yield lineno, {}, f"{len(values)} columns where the header has {len(header)}"
            continue
        yield lineno, dict(zip(header, values, strict=True)), None


def _next_row(path: Path, reader, numbers: list[int]) -> list[str] | None:
    """The next CSV/TSV row, or None at the end; a csv-module error names file:line."""
    try:
        return next(reader)
    except StopIteration:
        return None
    except csv.Error as e:
        raise UserError(f"{path}:{numbers[min(reader.line_num, len(numbers)) - 1]}: malformed row ({e})") from None


def read_tagged(path: str | os.PathLike, *, skip_bad_rows: bool = False) -> tuple[list[dict], ReadReport]:
    """NER sentences ``{"tokens", "tags", "source"}`` from a CoNLL file (token first, tag last column,
    blank line between sentences) or a .jsonl file of ``{"tokens": [...], "tags": [...]}`` objects.

    A malformed line, a tag that is not ``O`` or ``B-/I-/E-/S-TYPE``, or a token/tag count mismatch
    raises a ValueError naming file:line; with ``skip_bad_rows`` the whole sentence is skipped and
    listed in the report. ``source`` is the file:line where the sentence starts.
    """
    path = Path(path)
    report = ReadReport(str(path))
    lines = _decoded_lines(path, report, skip_bad_rows)
    examples: list[dict] = []

    def keep(lineno: int, tokens: list, tags: list, problem: str | None) -> None:
        problem = problem or tags_problem(tokens, tags)
        if problem:
            report.reject(lineno, problem, skip=skip_bad_rows, unit="sentences")
        elif tokens:
            examples.append({"tokens": tokens, "tags": tags, "source": f"{path}:{lineno}"})

    if path.suffix.lower() == ".jsonl":
        for lineno, obj, problem in _jsonl_objects(lines):
            obj = obj or {}
            if not problem and not (isinstance(obj.get("tokens"), list) and isinstance(obj.get("tags"), list)):
                problem = "needs list fields 'tokens' and 'tags'"
            keep(lineno, obj.get("tokens", []), obj.get("tags", []), problem)
    else:
        tokens, tags, first, problem = [], [], 0, None
        for lineno, line in [*lines, (len(lines) + 1, "")]:
            if not line.strip():
                if tokens or problem:
                    keep(first, tokens, tags, problem)
                tokens, tags, first, problem = [], [], 0, None
                continue
            first = first or lineno
            cols = line.split()
            if len(cols) < 2:
                problem = problem or f"line {lineno}: expected 'TOKEN TAG', got {line!r}"
                continue
            tokens.append(cols[0])
            tags.append(cols[-1])
    _read_as_iob2(examples, report)
    report.kept = len(examples)
    return examples, report


def iob1_to_iob2(tags: list[str]) -> list[str]:
    """IOB1 (or IO) tags as IOB2: an ``I-X`` that does not continue an ``X`` entity starts one, ``B-X``."""
    out = list(tags)
    for i, t in enumerate(tags):
        if t.startswith("I-") and (i == 0 or tags[i - 1] == "O" or tags[i - 1][2:] != t[2:]):
            out[i] = "B-" + t[2:]
    return out


def _read_as_iob2(examples: list[dict], report: ReadReport) -> None:
    """A BIO file whose entities start with ``I-`` (IOB1, as the original CoNLL-2003 files, or IO with no
    ``B-`` at all) is read as IOB2, the scheme training and strict evaluation use; otherwise every such
    entity would count as malformed and vanish from training and scoring. Reading ``I-X`` after ``O`` as an
    entity's start is also how conlleval scores it. BIOES files are left as they are. Said in the report."""
    if any(t[:2] in ("E-", "S-") for ex in examples for t in ex["tags"]):
        return
    starts = 0
    for ex in examples:
        converted = iob1_to_iob2(ex["tags"])
        starts += sum(a != b for a, b in zip(ex["tags"], converted, strict=True))
        ex["tags"] = converted
    if starts:
        report.notes.append(
            f"{report.path}: {starts} entit{'y' if starts == 1 else 'ies'} began with I- (the IOB1 or IO scheme); "
            "read as IOB2, with B- at each entity's start"
        )
        logger.warning(report.notes[-1])


def tags_problem(tokens: list, tags: list) -> str | None:
    """Why a NER sentence is malformed (count mismatch, bad tag, empty token), or None."""
    if len(tokens) != len(tags):
        return f"{len(tokens)} tokens but {len(tags)} tags"
    for t in tags:
        prefix, dash, kind = str(t).partition("-")
        if t != "O" and (not dash or not kind or prefix not in ("B", "I", "E", "S")):
            return f"tag {t!r} is not 'O' or B-/I-/E-/S- followed by an entity type"
    if any(not isinstance(x, str) or not x.strip() for x in tokens):
        return "empty token"
    return None


def read_pairs(
    path: str | os.PathLike, *, src: str, tgt: str, skip_bad_rows: bool = False, need_target: bool = True
) -> tuple[list[dict], ReadReport]:
    """Translation pairs ``{"src", "tgt", "source"}``.

    .tsv / .txt with tabs: source TAB target on each line (further columns, e.g. attribution, are
    ignored); .jsonl: objects with the language codes as keys (``{"zh": ..., "en": ...}``) or
    ``src`` / ``tgt``. With ``need_target=False`` (translating) a .txt file is one source per line.
    """
    path = Path(path)
    report = ReadReport(str(path))
    lines = _decoded_lines(path, report, skip_bad_rows)
    suffix = path.suffix.lower()
    if suffix not in (".tsv", ".jsonl", ".txt"):
        raise UserError(f"{path}: unknown format {suffix!r}; use .tsv (source TAB target), .jsonl or .txt")
    examples = []
    rows = _jsonl_objects(lines) if suffix == ".jsonl" else ((n, line, None) for n, line in lines)
    for lineno, row, problem in rows:
        if problem is None and suffix == ".jsonl":
            s, t = row.get(src, row.get("src")), row.get(tgt, row.get("tgt"))
            if not isinstance(s, str) or not s.strip():
                problem = f"missing or empty source field {src!r} (or 'src')"
            elif need_target and (not isinstance(t, str) or not t.strip()):
                problem = f"missing or empty target field {tgt!r} (or 'tgt')"
        elif problem is None:
            if not row.strip():
                continue
            cols = row.split("\t")
            s, t = cols[0], cols[1] if len(cols) > 1 else None
            if not s.strip():
                problem = "empty source (expected source TAB target)"
            elif need_target and (t is None or not t.strip()):
                problem = "no target after a tab (expected source TAB target)"
        if problem:
            report.reject(lineno, problem, skip=skip_bad_rows)
            continue
        example = {"src": s.strip(), "source": f"{path}:{lineno}"}
        if isinstance(t, str) and t.strip():
            example["tgt"] = t.strip()
        examples.append(example)
    report.kept = len(examples)
    return examples, report


CHAT_ROLES = ("system", "user", "assistant")


def conversation_problem(obj: object) -> str | None:
    """Why ``obj`` is not a ``{"messages": [{"role", "content"}, ...]}`` conversation with an assistant turn."""
    messages = obj.get("messages") if isinstance(obj, dict) else None
    if not isinstance(messages, list) or not messages:
        return "expected {'messages': [{'role': ..., 'content': ...}, ...]}"
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in CHAT_ROLES:
            return f"messages[{i}]: role must be one of {', '.join(CHAT_ROLES)}"
        if not isinstance(m.get("content"), str):
            return f"messages[{i}]: content must be a string"
    if not any(m["role"] == "assistant" for m in messages):
        return "no assistant message to learn from"
    return None


def alpaca_messages(obj: object) -> list[dict] | None:
    """An Alpaca-style row ``{"instruction", "input"?, "output", "system"?}`` as chat messages (Taori et al. 2023's
    data: the instruction, then the input after a blank line, is what the user says; the output is the reply);
    None for a row of another shape."""
    if not isinstance(obj, dict) or "messages" in obj or "instruction" not in obj or "output" not in obj:
        return None
    fields = {k: obj.get(k, "") for k in ("instruction", "input", "output", "system")}
    if not all(isinstance(v, str) for v in fields.values()):
        return None
    user = fields["instruction"] + (f"\n\n{fields['input']}" if fields["input"].strip() else "")
    system = [{"role": "system", "content": fields["system"]}] if fields["system"].strip() else []
    return [*system, {"role": "user", "content": user}, {"role": "assistant", "content": fields["output"]}]


def read_conversations(path: str | os.PathLike, *, skip_bad_rows: bool = False) -> tuple[list[dict], ReadReport]:
    """Chat conversations from JSONL, one ``{"messages": [{"role", "content"}, ...]}`` per line
    (the format of OpenAI's and transformers' chat data; roles system / user / assistant), or one Alpaca-style
    ``{"instruction", "input", "output"}`` row per line (``alpaca_messages``; noted in the report)."""
    path = Path(path)
    if path.suffix.lower() != ".jsonl":
        raise UserError(f"{path}: conversations are read from .jsonl (one {{'messages': [...]}} per line)")
    report = ReadReport(str(path))
    examples = []
    alpaca = 0
    for lineno, obj, problem in _jsonl_objects(_decoded_lines(path, report, skip_bad_rows)):
        messages = alpaca_messages(obj) if problem is None else None
        if messages is not None:
            obj, alpaca = {"messages": messages}, alpaca + 1
        problem = problem or conversation_problem(obj)
        if problem:
            if isinstance(obj, dict) and "instruction" in obj and "messages" not in obj:
                problem = "an Alpaca row needs string 'instruction' and 'output' (and optional 'input', 'system')"
            report.reject(lineno, problem, skip=skip_bad_rows)
            continue
        examples.append({"messages": obj["messages"], "source": f"{path}:{lineno}"})
    if alpaca:
        report.notes.append(
            f"{path}: {alpaca} Alpaca-style rows read as conversations: instruction (+ a blank line + input) as the "
            "user's turn, output as the assistant's"
        )
        logger.warning(report.notes[-1])
    report.kept = len(examples)
    return examples, report


def _reply_text(value: object, what: str) -> tuple[list[dict] | None, str | None, str | None]:
    """A preference row's ``chosen`` or ``rejected``: (the messages before the reply, when given as a conversation;
    the reply's text; a problem)."""
    if isinstance(value, str):
        return None, value, None if value.strip() else f"{what!r} is empty"
    if isinstance(value, list) and value:
        problem = conversation_problem({"messages": value})
        if problem is not None:
            return None, None, f"{what!r}: {problem}"
        if value[-1]["role"] != "assistant":
            return None, None, f"{what!r}: the last message must be the assistant's reply"
        if not value[-1]["content"].strip():
            return None, None, f"{what!r}: the assistant's reply is empty"
        return value[:-1], value[-1]["content"], None
    return None, None, f"{what!r} must be the reply's text or a list of messages ending with the assistant's"


def preference_example(obj: object) -> tuple[dict | None, str | None]:
    """A preference row as ``{"messages": the conversation before the reply, "chosen", "rejected"}`` (texts), or why
    it is not one. Accepted (TRL's formats): ``{"prompt": text or messages, "chosen", "rejected"}``,
    ``{"messages": [...], "chosen", "rejected"}``, and ``{"chosen": messages, "rejected": messages}`` whose shared
    first messages are the prompt; ``chosen`` / ``rejected`` are texts or messages ending with the assistant's."""
    if not isinstance(obj, dict):
        return None, "expected a JSON object"
    missing = [k for k in ("chosen", "rejected") if k not in obj]
    if missing:
        return None, f"a preference row needs 'chosen' and 'rejected'; missing {' and '.join(map(repr, missing))} " + (
            f"(its keys: {', '.join(sorted(obj))})"
        )
    before_c, chosen, problem = _reply_text(obj["chosen"], "chosen")
    before_r, rejected, problem_r = _reply_text(obj["rejected"], "rejected")
    if problem or problem_r:
        return None, problem or problem_r
    prompt = obj.get("prompt", obj.get("messages"))
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    if prompt is None:
        if before_c is None or before_c != before_r or not before_c:
            return None, (
                "no prompt: give 'prompt' (text or messages) or 'messages', or 'chosen' and 'rejected' as "
                "conversations that share their first messages"
            )
        prompt = before_c
    elif before_c:  # a conversation in chosen after a prompt: its own earlier messages follow the prompt
        prompt = [*prompt, *before_c]
    if not isinstance(prompt, list) or not prompt:
        return None, "'prompt' must be a text or a non-empty list of messages"
    for i, m in enumerate(prompt):
        if not isinstance(m, dict) or m.get("role") not in CHAT_ROLES or not isinstance(m.get("content"), str):
            return None, f"prompt message {i}: needs a role ({', '.join(CHAT_ROLES)}) and a string content"
    if chosen == rejected:
        return None, "'chosen' and 'rejected' are the same reply: the pair prefers nothing"
    return {"messages": prompt, "chosen": chosen, "rejected": rejected}, None


def read_preferences(path: str | os.PathLike, *, skip_bad_rows: bool = False) -> tuple[list[dict], ReadReport]:
    """Preference pairs from JSONL, one row per line (``preference_example``: a prompt, the preferred reply and the
    rejected one), for DPO and ORPO."""
    path = Path(path)
    if path.suffix.lower() != ".jsonl":
        raise UserError(
            f"{path}: preference pairs are read from .jsonl (one {{'prompt', 'chosen', 'rejected'}} per line)"
        )
    report = ReadReport(str(path))
    examples = []
    for lineno, obj, problem in _jsonl_objects(_decoded_lines(path, report, skip_bad_rows)):
        example, problem = (None, problem) if problem else preference_example(obj)
        if example is None:
            report.reject(lineno, problem, skip=skip_bad_rows)
            continue
        examples.append({**example, "source": f"{path}:{lineno}"})
    report.kept = len(examples)
    return examples, report
