"""Strict config loading: errors name the source, the key, the value and what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmforge.config import from_dict, load_yaml
from lmforge.files import write_yaml
from lmforge.models.bert import BertConfig
from lmforge.models.gpt import GPTConfig


def test_int_is_accepted_for_a_float_field() -> None:
    assert from_dict(BertConfig, {"dropout": 0}).dropout == 0.0


def test_unknown_key() -> None:
    with pytest.raises(ValueError, match="recipe.yaml: unknown key\\(s\\) hidden_size; allowed keys of BertConfig"):
        from_dict(BertConfig, {"hidden_size": 3}, where="recipe.yaml")


def test_wrong_type() -> None:
    with pytest.raises(ValueError, match="key 'n_layers' has value 'four'; expected a value of type int"):
        from_dict(BertConfig, {"n_layers": "four"})


def test_literal_lists_the_choices() -> None:
    with pytest.raises(ValueError, match="'norm' has value 'batchnorm'; expected one of 'layernorm', 'rmsnorm'"):
        from_dict(GPTConfig, {"norm": "batchnorm"})


def test_post_init_checks_are_reported_with_the_source() -> None:
    with pytest.raises(ValueError, match="m.json: model.d_model=30 must be divisible"):
        from_dict(BertConfig, {"d_model": 30, "n_heads": 4}, where="m.json")


def test_yaml_round_trip(tmp_path: Path) -> None:
    cfg = GPTConfig(n_kv_heads=2, positions="rope")
    write_yaml(tmp_path / "c.yaml", cfg)
    assert load_yaml(GPTConfig, tmp_path / "c.yaml") == cfg


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="config file not found"):
        load_yaml(BertConfig, tmp_path / "none.yaml")
    (tmp_path / "bad.yaml").write_text("a: [1, 2\n")
    with pytest.raises(ValueError, match=r"bad.yaml:2:1: not valid YAML: expected .,. or .\]."):
        load_yaml(BertConfig, tmp_path / "bad.yaml")
