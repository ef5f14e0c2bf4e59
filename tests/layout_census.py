"""A census of the layout rules of docs/ARCHITECTURE.md, read from the source with ``ast`` (nothing is imported).

- ``comparisons``: task names compared outside ``lmforge/tasks/`` (``name == "classify"``, ``kind in ("ner", ...)``);
  dispatch goes through the capabilities a TASKS entry declares instead;
- ``name_lists``: tuples, lists, sets or dicts (keys or values) written out with two or more task names and nothing
  else, outside ``lmforge/tasks/`` (a list that mixes in other names, such as the comparison's objectives
  ``("mlm", "electra", "electra-adversarial")`` or the command table, is a list of those, not of tasks);
- ``long_functions``: functions over 60 lines;
- ``upward_imports``: imports (module-level or inside a function) from a lower room to a higher one in ``LAYERS``;
- ``feature_probes``: ``hasattr`` / ``getattr(..., default)`` on a task, a config, a model or a run in the
  training loop and the recipes (optional features are protocols checked with ``isinstance``).

Run ``python tests/layout_census.py`` for the counts and every place; ``tests/test_layout.py`` holds the limits.
"""

from __future__ import annotations

import ast
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "lmforge"
TASK_NAMES = {"mlm", "wwm-mlm", "electra", "clm", "classify", "ner", "translate", "chat", "embed"}
TASK_NAMES |= {"distill-classify", "distill-ner"}
FUNCTION_LINES = 60

# rooms from the bottom up: a module may import its own room and the rooms below it
LAYERS = [
    {"errors", "files", "config", "ops", "metrics", "baselines"},
    {"data"},
    {"models"},
    {"inference"},
    {"tasks"},
    {"explain", "rundir"},
    {"evals"},
    {"train"},
    {"runs", "nas", "serve"},
    {"commands"},
    {"cli", "__main__", "__init__"},
]


def _room(module: str) -> str:
    """``lmforge.runs.finetune`` -> ``runs``; ``lmforge.config`` -> ``config``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _rank(room: str) -> int | None:
    return next((i for i, rooms in enumerate(LAYERS) if room in rooms), None)


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def _names_in(node: ast.AST) -> list[str]:
    """The task names that ``node`` (a constant, or a literal collection of constants) spells out."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in TASK_NAMES:
        return [node.value]
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return [n for e in node.elts for n in _names_in(e) if isinstance(e, ast.Constant)]
    return []


def _only_task_names(nodes: list[ast.AST]) -> bool:
    """Two or more string constants among ``nodes``, every one a task name."""
    strings = [n.value for n in nodes if isinstance(n, ast.Constant) and isinstance(n.value, str)]
    return len(strings) >= 2 and all(s in TASK_NAMES for s in strings)


def _files() -> list[Path]:
    return sorted(p for p in ROOT.rglob("*.py"))


def census() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {
        "comparisons": [],
        "name_lists": [],
        "long_functions": [],
        "upward_imports": [],
        "feature_probes": [],
    }
    for path in _files():
        rel = str(path.relative_to(ROOT.parent))
        in_tasks = rel.startswith("lmforge/tasks/")
        tree = ast.parse(path.read_text(encoding="utf-8"))
        module = _module_name(path)
        for node in ast.walk(tree):
            where = f"{rel}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.Compare) and not in_tasks:
                names = [n for part in (node.left, *node.comparators) for n in _names_in(part)]
                if names:
                    found["comparisons"].append(f"{where} {ast.unparse(node)}")
            if isinstance(node, (ast.Tuple, ast.List, ast.Set)) and not in_tasks and _only_task_names(node.elts):
                found["name_lists"].append(f"{where} {ast.unparse(node)[:80]}")
            if isinstance(node, ast.Dict) and not in_tasks:
                keys = [k for k in node.keys if k is not None]
                if _only_task_names(keys) or _only_task_names(node.values):
                    found["name_lists"].append(f"{where} {ast.unparse(node)[:80]}")
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > FUNCTION_LINES:
                    found["long_functions"].append(f"{where} {node.name} ({lines} lines)")
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                targets = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                for target in targets:
                    if not target.startswith("lmforge.") or module == "lmforge":
                        continue
                    src, dst = _rank(_room(module)), _rank(_room(target))
                    if src is not None and dst is not None and dst > src:
                        found["upward_imports"].append(f"{where} {module} -> {target}")
            probes = rel.startswith(("lmforge/train/loop.py", "lmforge/runs/"))
            if probes and isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.args:
                default = node.func.id == "getattr" and len(node.args) == 3
                probed = isinstance(node.args[0], ast.Name) and node.args[0].id in {"task", "cfg", "model", "run"}
                if probed and (node.func.id == "hasattr" or default):
                    found["feature_probes"].append(f"{where} {ast.unparse(node)[:80]}")
    return found


def main() -> int:
    found = census()
    if "--json" in sys.argv:
        print(json.dumps(found, indent=1))
        return 0
    for key, places in found.items():
        print(f"{key}: {len(places)}")
        for place in places:
            print(f"  {place}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
