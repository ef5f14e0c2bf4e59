"""The learner's path through the tutorial, run as written: every shell and Python block of the pages in
``LEARNER_PATH`` runs, in page order, in one fresh directory, as a reader on a fresh clone would run them
(issue 35). ``test_docs_commands`` only parses command lines; this module executes them.

Opt-in, because it takes minutes: ``make docs-run`` (``LMFORGE_DOCS_RUN=1``) runs it, and ``.ci/run`` calls that
after ``make test``. Without the variable every test here is skipped except the checks that the English pages
run the same commands with the same markers as the Chinese ones, which are cheap and always run.

A page shows the real command; where the test must change how it runs, an HTML comment on the line(s) right
before the block says so (the rendered page does not show it):

- ``<!-- run skip: REASON -->``: not run (installs, a 15-minute original run elsewhere, the network);
- ``<!-- run add: FLAGS -->``: FLAGS appended to every ``lmforge pretrain / finetune / demo / nas / compare /
  distill`` line of the block (``torchrun ... -m lmforge pretrain`` included), the tiny budget
  (``--training.max-steps 2``, ``--limit 60``), less the flags a line already gives (a ``replace`` sets those);
  ``run add: nas: FLAGS`` to the ``lmforge nas`` lines only;
- ``<!-- run replace: OLD => NEW -->``: the text OLD in the block read as NEW (``make demo`` as the command it
  runs, so that ``add`` reaches it; ``\\n`` in NEW is a line break; ``$DOCS_RUN_PORT`` is a free port);
- ``<!-- run stdin: TEXT -->``: TEXT (with ``\\n`` for line breaks) is the block's standard input (``lmforge chat``);
- ``<!-- run parallel: WHY -->``: the block's commands run at the same time (two machines' commands, shown one
  per machine), and the block fails if any of them does;
- ``<!-- run file: NAME -->`` on a ``json`` / ``text`` block: the block is the file NAME of the reader's directory
  (the example file the page's commands read), written before the page's commands run.

A ``lmforge serve`` line runs in the background on a free port (the block's ``localhost:8000`` and ``--port
8000`` follow it) until the block ends; the rest of the block runs once the server answers ``/healthz``.

What a page claims from its runs is checked against them where ``CLAIMS`` names a check (the tutorial's 30-row
run learns, its default run is warned about and does not; SmolLM2's greedy answers are the ones shown).

The blocks run with ``bash -euo pipefail`` (Python blocks with the project's interpreter) and the ``configs/``
of this checkout; a block that fails fails its page with the page, line, command and output.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable
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
    "concepts/objectives.md",
    "concepts/nas.md",
    "applications/llms.md",
    "applications/finetune-llm.md",
    "applications/evaluate-llm.md",
    "applications/serving.md",
    "scaling.md",
    "future.md",
)
"""Every page with commands: the pages a learner follows from the home page, in order, then the concept pages that
build on them, the real LLMs, serving, scaling and the future; each later page may use the runs of earlier ones."""

RUN = os.environ.get("LMFORGE_DOCS_RUN") == "1"
_BLOCK = re.compile(
    r"((?:^<!-- run [a-z]+:[^\n]*-->\n)*)^```(bash|sh|console|python|json|text)[^\n]*\n(.*?)^```", re.M | re.S
)
_MARKER = re.compile(r"^<!-- run ([a-z]+):\s*(.*?)\s*-->$", re.M)
_BUDGETED = re.compile(r"^\s*(?:\$\s+)?(?:torchrun\s.*?-m\s+)?lmforge\s+(pretrain|finetune|demo|nas|compare|distill)\b")
_SERVE = re.compile(r"^\s*lmforge\s+serve\b")
_RUNNABLE = ("bash", "sh", "console", "python")
_COMMENT = re.compile(r"\s+#[^'\"]*$")
MARKERS = ("skip", "add", "replace", "stdin", "parallel", "file")


@dataclass
class Block:
    page: str
    line: int
    language: str
    text: str
    markers: dict[str, list[str]] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"docs/zh/{self.page}:{self.line}"

    def script(self, port: int = 8000) -> str:
        """The block as it runs: continuation lines joined, replacements made, the budget flags added, a server
        started in the background on ``port``, parallel commands started together."""
        text = self.text
        for rule in self.markers.get("replace", []):
            old, new = (part.strip() for part in rule.split("=>"))
            assert old in text, f"{self}: `run replace: {rule}` but the block has no {old!r}"
            text = text.replace(old, new.replace("\\n", "\n"))
        if self.language == "python":
            return text
        text = text.replace("\\\n", " ")
        adds = [re.match(r"(?:([a-z]+):\s+)?(.*)", rule).groups() for rule in self.markers.get("add", [])]
        parallel = "parallel" in self.markers
        lines = []
        for line in text.splitlines():
            line = re.sub(r"^\s*\$\s+", "", line)
            budgeted = _BUDGETED.match(line)
            flags = " ".join(
                flag
                for command, given in adds
                if command in (None, budgeted and budgeted.group(1))
                for flag in re.findall(r"--\S+(?:\s+(?!--)\S+)*", given)
                if not re.search(rf"\s{re.escape(flag.split()[0])}(\s|$)", line)  # the line's own value stays
            )
            if flags and budgeted:
                comment = _COMMENT.search(line)
                cut = comment.start() if comment else len(line)
                line = f"{line[:cut]} {flags}{line[cut:]}"
            if _SERVE.match(line):
                lines += _server(line, port)
            elif parallel and line.strip() and not line.lstrip().startswith("#"):
                comment = _COMMENT.search(line)
                lines += [f"{line[: comment.start()] if comment else line} &", "_pids+=($!)"]
            else:
                lines.append(line)
        if parallel:
            lines = ["_pids=()", *lines, 'for _pid in "${_pids[@]}"; do wait "$_pid"; done']
        script = "\n".join(lines) + "\n"
        return re.sub(r"(localhost|127\.0\.0\.1):8000\b", rf"\g<1>:{port}", script)


def _server(line: str, port: int) -> list[str]:
    """``lmforge serve`` in the background on ``port`` (stopped when the block ends), then a wait for /healthz."""
    comment = _COMMENT.search(line)
    line = line[: comment.start()] if comment else line
    line = re.sub(r"--port\s+\d+", f"--port {port}", line) if "--port" in line else f"{line} --port {port}"
    return [
        f"{line} &",
        "_server=$!",
        "trap 'kill $_server 2>/dev/null || true; wait $_server 2>/dev/null || true' EXIT",
        f"for _ in $(seq 2400); do curl -sf localhost:{port}/healthz > /dev/null && break; "
        "kill -0 $_server 2>/dev/null || exit 1; sleep 0.25; done",
        f"curl -sf localhost:{port}/healthz > /dev/null",
    ]


def blocks(page: Path, name: str) -> list[Block]:
    """The runnable blocks of ``page`` and its example files (``run file:``), with the markers right above each."""
    text = page.read_text(encoding="utf-8")
    found = []
    for match in _BLOCK.finditer(text):
        markers: dict[str, list[str]] = {}
        for key, value in _MARKER.findall(match.group(1)):
            assert key in MARKERS, f"{page}: unknown marker `run {key}:`; markers: {', '.join(MARKERS)}"
            markers.setdefault(key, []).append(value)
        language = match.group(2)
        if ("file" in markers) != (language not in _RUNNABLE):
            assert language not in _RUNNABLE, f"{page}: `run file:` on a {language} block; it marks json / text"
            continue  # an example of a format that no command reads
        line = text.count("\n", 0, match.start(2)) + 1
        found.append(Block(name, line, language, match.group(3), markers))
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
        "torchrun --nproc-per-node 2 -m lmforge pretrain -c p.yaml\n"
        "lmforge pretrain --resume r --training.max-steps 4\n"
        "```\n"
        "text\n\n"
        "<!-- run skip: needs the network -->\n"
        "```bash\nlmforge data fetch tang-poems\n```\n"
        "```python\nprint(1)\n```\n"
        '```json\n{"an": "example nothing reads"}\n```\n'
        "<!-- run file: pairs.jsonl -->\n"
        '```json\n{"prompt": "p"}\n```\n'
        "<!-- run parallel: two machines -->\n"
        "<!-- run add: --limit 5 -->\n"
        "<!-- run add: nas: --trials.n-trials 1 --space.d-model 16 32 -->\n"
        "```bash\nlmforge nas --out a   # on one\nlmforge finetune ner --out b\n```\n"
        "```bash\nlmforge serve --model m=runs/c   # a server\n"
        "curl -s localhost:8000/v1/classify -d '{}'\n```\n",
        encoding="utf-8",
    )
    first, second, third, example, parallel, serve = blocks(page, "page.md")
    assert first.script() == (
        "lmforge demo --out runs/demo --training.max-steps 2\n"
        "lmforge finetune classify --model m      --out runs/c --training.max-steps 2   # a comment\n"
        "lmforge predict --model runs/c --input t.txt\n"
        "torchrun --nproc-per-node 2 -m lmforge pretrain -c p.yaml --training.max-steps 2\n"
        "lmforge pretrain --resume r --training.max-steps 4\n"
    )
    assert second.markers == {"skip": ["needs the network"]} and second.line == 14
    assert (third.language, third.markers, third.script()) == ("python", {}, "print(1)\n")
    assert (example.markers, example.text) == ({"file": ["pairs.jsonl"]}, '{"prompt": "p"}\n')
    assert parallel.script().splitlines() == [
        "_pids=()",
        "lmforge nas --out a --limit 5 --trials.n-trials 1 --space.d-model 16 32 &",
        "_pids+=($!)",
        "lmforge finetune ner --out b --limit 5 &",
        "_pids+=($!)",
        'for _pid in "${_pids[@]}"; do wait "$_pid"; done',
    ]
    lines = serve.script(port=8123).splitlines()
    assert lines[0] == "lmforge serve --model m=runs/c --port 8123 &" and "kill $_server" in lines[2]
    assert lines[-1] == "curl -s localhost:8123/v1/classify -d '{}'"
    assert "curl -sf localhost:8123/healthz" in lines[-2]
    page.write_text("<!-- run file: x.json -->\n```bash\nls\n```\n", encoding="utf-8")
    with pytest.raises(AssertionError, match="marks json / text"):
        blocks(page, "page.md")


def test_a_served_block_stops_its_server_and_fails_when_the_server_does(tmp_path: Path) -> None:
    """The server line's process is stopped when the block ends; a server that exits fails the block quickly."""
    page = tmp_path / "page.md"
    page.write_text("```bash\nlmforge serve --model nothing=no/such/run\n```\n", encoding="utf-8")
    (block,) = blocks(page, "page.md")
    with pytest.raises(AssertionError, match="exit 1"):
        _run(block, tmp_path)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reader's directory: a fresh one, with this checkout's recipes."""
    where = tmp_path_factory.mktemp("reader")
    (where / "configs").symlink_to(ROOT / "configs")
    return where


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    """The reader's shell: this interpreter's environment first on PATH (its ``lmforge``)."""
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}


def _run(block: Block, where: Path) -> None:
    env = {**_env(), "DOCS_RUN_PORT": str(_free_port())}  # for a replacement's rendezvous endpoint
    stdin = "\n".join(block.markers.get("stdin", [])).replace("\\n", "\n")
    script = block.script(port=_free_port())
    if block.language == "python":
        command = [sys.executable, "-c", script]
    else:
        command = [shutil.which("bash") or "bash", "-euo", "pipefail", "-c", script]
    done = subprocess.run(command, cwd=where, env=env, input=stdin, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, (
        f"{block}: exit {done.returncode}\n--- ran\n{script}--- output\n{(done.stdout + done.stderr)[-4000:]}"
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


_SHOWN = re.compile(r"^```text\n(.*?)^```", re.M | re.S)


def _greedy_outputs_shown(page: str, model: str) -> Callable[[Path], None]:
    """The page's unedited greedy generations by ``model`` (a ``$ lmforge generate --model MODEL ...
    --generation.no-do-sample`` line in a ``text`` block, then its output up to the next ``$`` line): each command,
    run again, prints what is shown. Only the model whose outputs are the same on every CPU kind tried: gemma's
    48-token continuations pass near-ties that an AMD Zen 4 and an AMX Xeon resolve differently (the page says so)."""

    def check(where: Path) -> None:
        text = (ROOT / "docs" / "zh" / page).read_text(encoding="utf-8")
        shown = [
            (command, output)
            for block in _SHOWN.findall(text)
            for command, output in re.findall(r"^\$ (lmforge generate .*?)\n(.*?)(?=^\$ |\Z)", block, re.M | re.S)
            if "--generation.no-do-sample" in command and f"--model {model} " in command
        ]
        assert shown, f"docs/zh/{page}: no greedy generation shown"
        for command, output in shown:
            done = subprocess.run(
                [shutil.which("bash") or "bash", "-c", command],
                cwd=where,
                env=_env(),
                capture_output=True,
                text=True,
                timeout=600,
            )
            assert done.returncode == 0, done.stderr[-2000:]
            assert done.stdout.strip() == output.strip(), f"docs/zh/{page}: {command}\n{done.stdout}"

    return check


CLAIMS = {
    "tutorial.md": _small_data_claims,
    "applications/llms.md": _greedy_outputs_shown("applications/llms.md", "runs/smollm2"),
}
"""Checks of what a page says its runs give, run after the page."""


@pytest.mark.skipif(not RUN, reason="opt-in: make docs-run (LMFORGE_DOCS_RUN=1)")
@pytest.mark.parametrize("name", LEARNER_PATH)
def test_the_page_runs_as_written(name: str, workspace: Path) -> None:
    page_blocks = _path_blocks("zh")[name]
    for example in (b for b in page_blocks if "file" in b.markers):
        (workspace / example.markers["file"][0]).write_text(example.text, encoding="utf-8")
    ran = [b for b in page_blocks if not {"skip", "file"} & b.markers.keys()]
    assert ran or name == "getting-started.md", f"docs/zh/{name}: every block is skipped"
    for block in ran:
        _run(block, workspace)
    if name in CLAIMS:
        CLAIMS[name](workspace)
