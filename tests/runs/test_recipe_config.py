"""runs/config.py: what a fine-tuning task is given of its recipe's config."""

from __future__ import annotations

import dataclasses

import pytest

from lmforge.runs.config import RECIPE_FIELDS, FinetuneConfig
from lmforge.tasks import TASKS


@pytest.mark.parametrize("name", [n for n, e in TASKS.items() if e.kind == "finetune"])
def test_a_task_is_given_its_own_settings_not_the_recipes(name: str) -> None:
    cls = TASKS[name].load_config()
    missing = dataclasses.MISSING
    required = {f.name: "x" for f in dataclasses.fields(cls) if f.default is missing and f.default_factory is missing}
    required.pop("out", None)
    cfg = cls(out="runs/x", **required)
    assert isinstance(cfg, FinetuneConfig)
    settings = vars(cfg.task_settings())
    assert not set(RECIPE_FIELDS) & set(settings), "the run directory, the files and the loop stay with the recipe"
    own = {f.name for f in dataclasses.fields(cls)} - set(RECIPE_FIELDS)
    assert set(settings) == own | {"seed"} and settings["seed"] == cfg.training.seed
