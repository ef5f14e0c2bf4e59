"""The import rules of the layout (docs/ARCHITECTURE.md): what each entry point may pull in."""

from __future__ import annotations

import subprocess
import sys

import pytest

from lmforge.cli import COMMANDS
from lmforge.tasks import TASKS


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


def test_the_server_imports_no_training_code() -> None:
    loaded = _modules_after("import lmforge.serve.app, lmforge.serve.models")
    assert not {m for m in loaded if m.startswith("lmforge.train")}
    assert not {m for m in loaded if m.startswith("lmforge.commands")}


def test_library_code_imports_no_command_module() -> None:
    loaded = _modules_after("import lmforge.runs.finetune, lmforge.runs.demo, lmforge.runs.compare, lmforge.nas.run")
    assert not {m for m in loaded if m.startswith("lmforge.commands")}


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
    else:
        for hook in ("collate", "loss", "metrics", "flops"):
            assert callable(getattr(cls, hook, None)), f"{name}: {cls.__name__} has no {hook}"
