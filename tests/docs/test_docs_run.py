"""The learner's path through the tutorial, run as written: every shell and Python block of the pages in
``LEARNER_PATH`` runs, in page order, in one fresh directory, as a reader on a fresh clone would run them
(issue 35). ``test_docs_commands`` only parses command lines; this module executes them.

Opt-in, because it takes minutes: ``make docs-run`` (``LMFORGE_DOCS_RUN=1``) runs it, and ``.ci/run`` calls that
after ``make test``. Without the variable every test here is skipped except the checks that the English pages
run the same commands with the same markers as the Chinese ones, which are cheap and always run.

A page shows the real command; where the test must change how it runs, an HTML comment on the line(s) right
before the block says so (the rendered page does not show it):

- ``<!-- run skip: REASON -->``: not run (installs, a 15-minute original run elsewhere, the network);
- ``<!-- run add: FLAGS -->``: FLAGS appended to every ``lmforge pretrain / finetune / demo / nas`` line of the
  block, the tiny budget (``--training.max-steps 2``, ``--limit 60``);
- ``<!-- run replace: OLD => NEW -->``: the text OLD in the block read as NEW (``make demo`` as the command it
  runs, so that ``add`` reaches it);
- ``<!-- run stdin: TEXT -->``: TEXT (with ``\\n`` for line breaks) is the block's standard input (``lmforge chat``).

What a page claims from its runs is checked against them where ``CLAIMS`` names a check (the tutorial's 30-row
run learns, its default run is warned about and does not).

The blocks run with ``bash -euo pipefail`` (Python blocks with the project's interpreter) and the ``configs/``
of this checkout; a block that fails fails its page with the page, line, command and output.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
LEARNER_PATH = (
    "concepts/basics.md",
    "getting-started.md",
    "tutorial.md",
    "applications/classification.md",
    "applications/ner.md",
    "applications/translation.md",
    "applications/dialogue.md",
    "applications/embeddings.md",
    "concepts/tokenization.md",
    "concepts/models.md",
    "concepts/contrastive.md",
    "concepts/math.md",
)
"""The pages a learner follows from the home page, in order, then the concept pages that build on them; each later
page may use the runs of earlier ones."""

RUN = os.environ.get("LMFORGE_DOCS_RUN") == "1"
_BLOCK = re.compile(r"((?:^<!-- run [a-z]+:[^\n]*-->\n)*)^```(bash|sh|console|python)[^\n]*\n(.*?)^```", re.M | re.S)
_MARKER = re.compile(r"^<!-- run ([a-z]+):\s*(.*?)\s*-->$", re.M)
_BUDGETED = re.compile(r"^\s*(?:\$\s+)?lmforge\s+(pretrain|finetune|demo|nas)\b")
_COMMENT = re.compile(r"\s+#[^'\"]*$")
MARKERS = ("skip", "add", "replace", "stdin")


@dataclass
class Block:
    page: str
    line: int
    language: str
    text: str
    markers: dict[str, list[str]] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"docs/zh/{self.page}:{self.line}"

    def script(self) -> str:
        """The block as it runs: continuation lines joined, replacements made, the budget flags added."""
        text = self.text
        for rule in self.markers.get("replace", []):
            old, new = (part.strip() for part in rule.split("=>"))
            assert old in text, f"{self}: `run replace: {rule}` but the block has no {old!r}"
            text = text.replace(old, new)
        if self.language == "python":
            return text
        text = text.replace("\\\n", " ")
        flags = " ".join(self.markers.get("add", []))
        lines = []
        for line in text.splitlines():
            line = re.sub(r"^\s*\$\s+", "", line)
            if flags and _BUDGETED.match(line):
                comment = _COMMENT.search(line)
                cut = comment.start() if comment else len(line)
                line = f"{line[:cut]} {flags}{line[cut:]}"
            lines.append(line)
        return "\n".join(lines) + "\n"


def blocks(page: Path, name: str) -> list[Block]:
    """The runnable blocks of ``page`` with the markers right above each."""
    text = page.read_text(encoding="utf-8")
    found = []
    for match in _BLOCK.finditer(text):
        markers: dict[str, list[str]] = {}
        for key, value in _MARKER.findall(match.group(1)):
            assert key in MARKERS, f"{page}: unknown marker `run {key}:`; markers: {', '.join(MARKERS)}"
            markers.setdefault(key, []).append(value)
        line = text.count("\n", 0, match.start(2)) + 1
        found.append(Block(name, line, match.group(2), match.group(3), markers))
    return found


def _path_blocks(language: str) -> dict[str, list[Block]]:
    return {name: blocks(ROOT / "docs" / language / name, name) for name in LEARNER_PATH}


@pytest.mark.parametrize("name", LEARNER_PATH)
def test_the_english_page_runs_what_the_chinese_page_runs(name: str) -> None:
    """The English pages are not run separately: they must show the same blocks with the same markers."""
    zh, en = (blocks(ROOT / "docs" / lang / name, name) for lang in ("zh", "en"))
    strip = re.compile(r"\s+#.*$", re.M)  # comments are translated
    assert [(b.language, b.markers, strip.sub("", b.text)) for b in en] == [
        (b.language, b.markers, strip.sub("", b.text)) for b in zh
    ]


def test_the_block_reader_and_the_budget_flags(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "<!-- run add: --training.max-steps 2 -->\n"
        "<!-- run replace: make demo => lmforge demo --out runs/demo -->\n"
        "```bash\n"
        "make demo\n"
        "$ lmforge finetune classify --model m \\\n"
        "    --out runs/c   # a comment\n"
        "lmforge predict --model runs/c --input t.txt\n"
        "```\n"
        "text\n\n"
        "<!-- run skip: needs the network -->\n"
        "```bash\nlmforge data fetch tang-poems\n```\n"
        "```python\nprint(1)\n```\n",
        encoding="utf-8",
    )
    first, second, third = blocks(page, "page.md")
    assert first.script() == (
        "lmforge demo --out runs/demo --training.max-steps 2\n"
        "lmforge finetune classify --model m      --out runs/c --training.max-steps 2   # a comment\n"
        "lmforge predict --model runs/c --input t.txt\n"
    )
    assert second.markers == {"skip": ["needs the network"]} and second.line == 12
    assert (third.language, third.markers, third.script()) == ("python", {}, "print(1)\n")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reader's directory: a fresh one, with this checkout's recipes."""
    where = tmp_path_factory.mktemp("reader")
    (where / "configs").symlink_to(ROOT / "configs")
    return where


def _run(block: Block, where: Path) -> None:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    stdin = "\n".join(block.markers.get("stdin", [])).replace("\\n", "\n")
    if block.language == "python":
        command = [sys.executable, "-c", block.script()]
    else:
        command = [shutil.which("bash") or "bash", "-euo", "pipefail", "-c", block.script()]
    done = subprocess.run(command, cwd=where, env=env, input=stdin, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, (
        f"{block}: exit {done.returncode}\n--- ran\n{block.script()}--- output\n{(done.stdout + done.stderr)[-4000:]}"
    )


def _small_data_claims(where: Path) -> None:
    """The tutorial's "a few dozen rows" table: the default run (3 steps) is warned about and predicts one class
    (test accuracy at the majority share, 0.542), the small-data settings (75 steps) learn (0.726 on the page)."""
    default, small = (
        json.loads((where / "runs" / run / "results.json").read_text()) for run in ("tiny-defaults", "tiny")
    )
    assert default["training"]["steps"] == 3 and "only 3 optimizer step(s)" in default["training"]["warnings"][0]
    assert small["training"]["steps"] == 75 and small["training"]["warnings"] == []
    matrix = default["test"]["confusion_matrix"]  # rows: the true classes
    majority = max(sum(row) for row in matrix) / default["test"]["n"]
    assert default["test"]["accuracy"] <= majority + 0.02, (default["test"]["accuracy"], majority)
    assert small["test"]["accuracy"] >= majority + 0.1, (small["test"]["accuracy"], majority)


CLAIMS = {"tutorial.md": _small_data_claims}
"""Checks of what a page says its runs give, run after the page."""


@pytest.mark.skipif(not RUN, reason="opt-in: make docs-run (LMFORGE_DOCS_RUN=1)")
@pytest.mark.parametrize("name", LEARNER_PATH)
def test_the_page_runs_as_written(name: str, workspace: Path) -> None:
    page_blocks = _path_blocks("zh")[name]
    ran = [b for b in page_blocks if "skip" not in b.markers]
    assert ran or name == "getting-started.md", f"docs/zh/{name}: every block is skipped"
    for block in ran:
        _run(block, workspace)
    if name in CLAIMS:
        CLAIMS[name](workspace)
