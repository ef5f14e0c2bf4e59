"""lmforge/files.py: atomic writes leave either the old file or the whole new one, never a part or a stray temporary."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from lmforge.errors import UserError
from lmforge.files import atomic_write, read_json_object, temporary_name, write_json, write_lines, write_text


def test_a_failed_write_keeps_the_previous_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "results.json"
    write_json(target, {"before": 1})
    with pytest.raises(RuntimeError), atomic_write(target) as tmp:
        tmp.write_text('{"half": ', encoding="utf-8")
        raise RuntimeError("the disk filled up")
    assert json.loads(target.read_text(encoding="utf-8")) == {"before": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


def test_writes_replace_whole_files_and_make_the_directory(tmp_path: Path) -> None:
    target = tmp_path / "new" / "dir" / "report.md"
    write_text(target, "# one\n")
    write_text(target, "# two\n")
    assert target.read_text(encoding="utf-8") == "# two\n"
    assert write_lines(tmp_path / "rows.jsonl", (f"{i}\n" for i in range(3))) == 3
    assert (tmp_path / "rows.jsonl").read_text(encoding="utf-8") == "0\n1\n2\n"
    assert sorted(p.name for p in (tmp_path / "new" / "dir").iterdir()) == ["report.md"]


def test_temporary_names_differ_between_live_threads_and_keep_a_suffix(tmp_path: Path) -> None:
    """Two writers alive at once (a barrier holds both) never share a temporary file."""
    names: list[Path] = []
    both_alive = threading.Barrier(2)

    def name() -> None:
        names.append(temporary_name(tmp_path / "x.npy", suffix=".npy"))
        both_alive.wait(timeout=60)

    threads = [threading.Thread(target=name) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert names[0] != names[1] and all(n.suffix == ".npy" and ".tmp" in n.name for n in names)


def test_a_json_file_that_is_not_an_object_is_named(tmp_path: Path) -> None:
    (tmp_path / "task.json").write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(UserError, match=r"task.json: this task file must hold a JSON object, not list"):
        read_json_object(tmp_path / "task.json", what="task file")
