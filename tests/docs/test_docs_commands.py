"""The documentation cannot drift from the code: every ``lmforge ...`` command line in the docs parses against the
current CLI, and every recipe path and built-in corpus the docs name exists.

Command lines are read from the fenced ``bash`` / ``sh`` / ``console`` blocks of ``README.md`` and every page
under ``docs/``: continuation backslashes are joined, ``$`` prompts and comments dropped, ``&&`` / ``;`` / ``|``
chains split, and a line counts when it runs ``lmforge``, ``python -m lmforge`` or ``torchrun ... -m lmforge``.
Each is parsed by ``lmforge.cli.parse`` (the parser ``lmforge`` itself uses, recipes read and validated
strictly) without running anything. ``--resume RUN_DIR`` needs the run's ``config.yaml``: the test writes the
recipe of the command in the same file that made ``RUN_DIR`` (``--out RUN_DIR``) there first. A recipe under
``runs/`` is one an earlier command writes (NAS's ``finetune.yaml``): such a line is checked for its command
name only.
"""

from __future__ import annotations

import re
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from lmforge.cli import COMMANDS, command_name, parse
from lmforge.data.builtin import BUILTINS

ROOT = Path(__file__).parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
_FENCE = re.compile(r"^```(bash|sh|shell|console)[^\n]*\n(.*?)^```", re.M | re.S)
_RECIPE = re.compile(r"(?<![\w/.-])configs/[\w/.-]+\.ya?ml")
_BUILTIN = re.compile(r"builtin:([a-z0-9][\w-]*)")


@dataclass(frozen=True)
class CommandLine:
    page: Path
    line: int
    text: str
    args: tuple[str, ...]
    """The arguments after ``lmforge``."""

    def __str__(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}: {self.text}"


def _lmforge_args(words: list[str]) -> list[str] | None:
    if words and words[0] == "lmforge":
        return words[1:]
    for i in range(len(words) - 1):
        if (
            words[i] == "-m"
            and words[i + 1] == "lmforge"
            and any(w in ("python", "python3", "torchrun") or w.endswith(("/python", "/torchrun")) for w in words[:i])
        ):
            return words[i + 2 :]
    return None


def _words(line: str) -> list[str]:
    """A shell line's words as the shell splits them, with ``&&``, ``;`` and ``|`` as words of their own."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    return list(lexer)


def command_lines(page: Path) -> list[CommandLine]:
    """The lmforge command lines of ``page``'s shell blocks, as the module docstring says."""
    text = page.read_text(encoding="utf-8")
    found = []
    for block in _FENCE.finditer(text):
        first_line = text.count("\n", 0, block.start(2)) + 1
        pending, start = "", 0
        for offset, raw in enumerate(block.group(2).splitlines()):
            if not pending:
                start = first_line + offset
            line = raw.rstrip()
            if line.endswith("\\"):
                pending += line[:-1] + " "
                continue
            pending += line
            try:  # a quoted argument may span lines (python -c "..."): read on until it closes
                words = _words(re.sub(r"^\s*\$\s+", "", pending))
            except ValueError:
                pending += "\n"
                continue
            line, pending = pending, ""
            chain: list[list[str]] = [[]]
            for w in words:
                if w in ("&&", "||", ";", "|"):
                    chain.append([])
                else:
                    chain[-1].append(w)
            for part in chain:
                args = _lmforge_args(part)
                if args is not None:
                    found.append(CommandLine(page, start, line.strip(), tuple(args)))
    return found


ALL_LINES = [c for page in PAGES for c in command_lines(page)]


def test_the_docs_have_command_lines_to_check() -> None:
    pages = {c.page for c in ALL_LINES}
    assert ROOT / "README.md" in pages
    assert len(pages) >= 10, sorted(str(p) for p in pages)  # the tutorial pages, both languages
    # every command of the CLI is shown at least once somewhere in the docs
    shown = {command_name(list(c.args)) for c in ALL_LINES}
    assert set(COMMANDS) <= shown, sorted(set(COMMANDS) - shown)


def _run_dirs_made(page: Path) -> dict[str, str]:
    """``--out DIR`` -> the recipe of the command that made it, for the commands of ``page``."""
    made = {}
    for c in command_lines(page):
        args = list(c.args)
        out = args[args.index("--out") + 1] if "--out" in args[:-1] else None
        flag = next((f for f in ("-c", "--config") if f in args[:-1]), None)
        if out and flag:
            made[out] = args[args.index(flag) + 1]
    return made


@pytest.mark.parametrize("command", ALL_LINES, ids=str)
def test_command_line_parses_against_the_cli(
    command: CommandLine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    args = list(command.args)
    if args in ([], ["--help"], ["-h"]):
        return  # `lmforge` / `lmforge --help` prints the command list
    name = command_name(args)
    assert name is not None, f"{command}: no such lmforge command; commands: {', '.join(COMMANDS)}"
    if "--help" in args or "-h" in args:
        return
    recipe_flag = next((f for f in ("-c", "--config") if f in args[:-1]), None)
    if recipe_flag and args[args.index(recipe_flag) + 1].startswith("runs/"):
        return  # a recipe an earlier command writes: only the command name is checked
    # Relative paths are read from the repository (recipes) or from a scratch copy of runs/ (--resume).
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    monkeypatch.chdir(tmp_path)
    if "--resume" in args[:-1]:
        run_dir = args[args.index("--resume") + 1]
        recipe = _run_dirs_made(command.page).get(run_dir)
        assert recipe, f"{command}: no command in {command.page.name} makes {run_dir} (--out {run_dir}) to resume"
        Path(run_dir).mkdir(parents=True)
        shutil.copy(ROOT / recipe, Path(run_dir) / "config.yaml")
    try:
        parsed_name, cfg = parse(args)
    except SystemExit as e:
        pytest.fail(f"{command}\ndoes not parse (exit {e.code}):\n{capsys.readouterr().err[-2000:]}")
    assert parsed_name == name and cfg is not None


def test_recipe_paths_and_builtin_corpora_named_in_the_docs_exist() -> None:
    missing = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for path in set(_RECIPE.findall(text)):
            if not (ROOT / path).is_file():
                missing.append(f"{page.relative_to(ROOT)}: {path} (no such recipe)")
        for name in set(_BUILTIN.findall(text)):
            if name not in BUILTINS:
                missing.append(f"{page.relative_to(ROOT)}: builtin:{name} (built-ins: {', '.join(BUILTINS)})")
    assert not missing, "\n".join(missing)


def test_the_command_line_reader_on_a_known_block(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "text `lmforge not-read` outside blocks\n"
        "```bash\n"
        "$ lmforge pretrain -c configs/pretrain/gpt-tiny-zh.yaml \\\n"
        "      --out runs/gpt   # a comment\n"
        "make demo && lmforge data list | head\n"
        "torchrun --nproc-per-node 2 -m lmforge pretrain --resume runs/gpt\n"
        "echo lmforge\n"
        "```\n"
        "```python\nlmforge = 1\n```\n",
        encoding="utf-8",
    )
    lines = command_lines(page)
    assert [(c.line, c.args) for c in lines] == [
        (3, ("pretrain", "-c", "configs/pretrain/gpt-tiny-zh.yaml", "--out", "runs/gpt")),
        (5, ("data", "list")),
        (6, ("pretrain", "--resume", "runs/gpt")),
    ]


def test_a_wrong_flag_or_a_missing_recipe_fails_the_parse(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lmforge.errors import UserError

    with pytest.raises(SystemExit):
        parse(["pretrain", "-c", str(ROOT / "configs/pretrain/gpt-tiny-zh.yaml"), "--out", "x", "--no-such-flag"])
    with pytest.raises((UserError, FileNotFoundError)):
        parse(["pretrain", "-c", str(tmp_path / "missing.yaml"), "--out", "x"])
    with pytest.raises(UserError):
        parse(["pretrian", "--out", "x"])
