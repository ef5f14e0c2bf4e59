"""MkDocs hook: the reference pages are generated from the code at build time, never copied by hand.

A page holding ``<!-- lmforge:commands -->`` gets the command list and every command's ``--help`` exactly as
``lmforge COMMAND --help`` prints it (tyro, from the config dataclasses and their field docstrings; 100
columns, no colour). ``<!-- lmforge:run-directory -->`` becomes the run-directory layout of
``lmforge/rundir/__init__.py``'s docstring, read with ``ast`` so that building the docs imports no torch.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import io
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
COMMANDS_MARK = "<!-- lmforge:commands -->"
RUN_DIR_MARK = "<!-- lmforge:run-directory -->"


def _help(name: str) -> str:
    import tyro

    from lmforge.cli import config_class

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        tyro.cli(config_class(name), args=["--help"], prog=f"lmforge {name}")
    return "\n".join(line.rstrip() for line in out.getvalue().strip().splitlines())


@functools.cache
def commands_reference() -> str:
    from lmforge.cli import COMMANDS

    width = max(len(n) for n in COMMANDS)
    listing = "\n".join(f"lmforge {name:<{width}}  {c.summary}" for name, c in COMMANDS.items())
    parts = ["```text", listing, "```", ""]
    columns = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "100"  # the same layout on every machine and terminal
    try:
        for name, command in COMMANDS.items():
            parts += [f"## lmforge {name}", "", command.summary + ".", "", "```text", _help(name), "```", ""]
    finally:
        if columns is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = columns
    return "\n".join(parts)


@functools.cache
def run_directory_reference() -> str:
    source = (ROOT / "lmforge" / "rundir" / "__init__.py").read_text(encoding="utf-8")
    doc = ast.get_docstring(ast.parse(source)) or ""
    lines, in_fence = [], False
    for line in doc.split("\n", 1)[1].strip().splitlines():
        if line.startswith("```"):  # the layout block stays a code block (reST's ``x`` would turn it inline)
            lines.append("```text" if not in_fence else line)
            in_fence = not in_fence
        else:  # reST literals: `x` in Markdown text, plain inside the code block
            lines.append(line.replace("``", "" if in_fence else "`"))
    return "\n".join(lines)


def on_page_markdown(markdown: str, page, config, files) -> str:
    if COMMANDS_MARK in markdown:
        markdown = markdown.replace(COMMANDS_MARK, commands_reference())
    if RUN_DIR_MARK in markdown:
        markdown = markdown.replace(RUN_DIR_MARK, run_directory_reference())
    return markdown
