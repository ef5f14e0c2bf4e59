"""The import rules of the layout (docs/ARCHITECTURE.md): what each entry point may pull in."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lmforge.cli import COMMANDS
from lmforge.tasks import TASKS

sys.path.insert(0, str(Path(__file__).parent))
from layout_census import census


def _modules_after(code: str) -> set[str]:
    """The modules a fresh interpreter has loaded after running ``code``."""
    out = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport sys\nprint('\\n'.join(sys.modules))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return set(out.split())


def test_lmforge_help_imports_no_torch() -> None:
    loaded = _modules_after("from lmforge.cli import main\nmain(['--help'])")
    assert "torch" not in loaded


@pytest.mark.parametrize("name", [n for n in COMMANDS if n != "nas"])
def test_command_help_imports_no_torch(name: str) -> None:
    code = f"from lmforge.cli import main\ntry:\n    main({name.split()!r} + ['--help'])\nexcept SystemExit:\n    pass"
    loaded = _modules_after(code)
    assert "torch" not in loaded, f"lmforge {name} --help imported torch"


def test_the_server_imports_no_training_code_and_no_recipe() -> None:
    loaded = _modules_after("import lmforge.serve.app, lmforge.serve.models")
    assert not {m for m in loaded if m.startswith(("lmforge.train", "lmforge.commands", "lmforge.runs"))}


def test_loading_a_run_imports_no_recipe() -> None:
    loaded = _modules_after("import lmforge.rundir, lmforge.explain.targets, lmforge.explain.report")
    assert not {m for m in loaded if m.startswith(("lmforge.train", "lmforge.commands", "lmforge.runs"))}


def test_library_code_imports_no_command_module() -> None:
    loaded = _modules_after("import lmforge.runs.finetune, lmforge.runs.demo, lmforge.runs.compare, lmforge.nas.run")
    assert not {m for m in loaded if m.startswith("lmforge.commands")}


def test_the_census_holds() -> None:
    """docs/ARCHITECTURE.md's rules, counted from the source: task names compared outside lmforge/tasks/ at most 5
    (today the one claim of runs/compare.py), no list of task names written out beside it, no upward import, no
    hasattr / getattr probe of a task's features, and every function over 60 lines named in ARCHITECTURE.md."""
    found = census()
    assert len(found["comparisons"]) <= 5, found["comparisons"]
    assert all("runs/compare.py" in place for place in found["name_lists"]), found["name_lists"]
    assert found["upward_imports"] == [], found["upward_imports"]
    assert found["feature_probes"] == [], found["feature_probes"]
    design = (Path(__file__).parents[1] / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
    listed = design[design.index("Longer functions") :]
    unlisted = [place for place in found["long_functions"] if f"`{place.split()[1]}`" not in listed]
    assert not unlisted, f"functions over 60 lines that docs/ARCHITECTURE.md does not explain: {unlisted}"


def test_the_census_sees_what_it_counts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A comparison, a list of names, an upward import, a probe and a long function planted in a copy are found."""
    import layout_census

    root = tmp_path / "lmforge"
    (root / "runs").mkdir(parents=True)
    (root / "data").mkdir()
    long_body = "\n".join(f"    x{i} = {i}" for i in range(61))
    (root / "runs" / "bad.py").write_text(
        'NAMES = ("classify", "ner")\n'
        "def f(task, kind):\n"
        '    if kind == "classify" and hasattr(task, "evaluate"):\n'
        "        return 1\n"
        f"def g():\n{long_body}\n",
        encoding="utf-8",
    )
    (root / "data" / "up.py").write_text("def h():\n    from lmforge.runs import bad\n", encoding="utf-8")
    monkeypatch.setattr(layout_census, "ROOT", root)
    found = layout_census.census()
    assert [len(found[k]) for k in ("comparisons", "name_lists", "upward_imports", "feature_probes")] == [1, 1, 1, 1]
    assert len(found["long_functions"]) == 1


@pytest.mark.parametrize("name", sorted(TASKS))
def test_every_task_entry_resolves_and_implements_its_protocol(name: str) -> None:
    entry = TASKS[name]
    cls = entry.load()
    assert cls.__name__ in entry.cls
    if entry.kind == "finetune":
        for hook in (
            "for_finetuning",
            "from_settings",
            "settings",
            "assemble",
            "split_model",
            "evaluate",
            "evaluate_test",
            "predict",
            "extras",
            "reader",
            "prepare_splits",
        ):
            assert callable(getattr(cls, hook, None)), f"{name}: {cls.__name__} has no {hook}"
        assert cls.report_columns and isinstance(cls.evaluate_before, tuple)
        module, _, config = entry.config.partition(":")
        assert hasattr(__import__(module, fromlist=[config]), config)
        _check_capabilities(entry, cls)
    else:
        for hook in ("collate", "loss", "metrics", "flops", "pretraining_model", "for_pretraining"):
            assert callable(getattr(cls, hook, None)), f"{name}: {cls.__name__} has no {hook}"


def _check_capabilities(entry, cls: type) -> None:
    """What the entry declares, the class (and the modules it names) implement."""
    from lmforge.serve.app import create_app
    from lmforge.serve.models import Served
    from lmforge.tasks import resolve
    from lmforge.tasks.base import ExplainsExamples, OpensPretrained, Searchable

    assert entry.command_name in COMMANDS and COMMANDS[entry.command_name].config == entry.config
    if entry.route is not None:
        routes = {r.path for r in create_app({}).routes}
        assert entry.route in routes, f"{entry.name}: no route {entry.route}"
        served = Served.__new__(Served)
        served.route = entry.route
        assert callable(served.batch_call())
    if entry.explaining is not None:
        assert callable(resolve(entry.explaining.explainer))
        if entry.explaining.in_report:
            assert issubclass(cls, ExplainsExamples), f"{entry.name} is explained in its report"
    if entry.files is not None:
        assert callable(resolve(entry.files.reader)) and callable(resolve(entry.files.writer))
    if entry.searchable:
        assert issubclass(cls, Searchable)
    if entry.opens_pretrained is not None:
        assert issubclass(cls, OpensPretrained)
