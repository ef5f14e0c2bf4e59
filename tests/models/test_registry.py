"""Model directories: save / load round trip and errors that name what is wrong."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lmforge.models.bert import Bert, BertConfig
from lmforge.models.gpt import GPT
from lmforge.models.registry import load_model, read_safetensors, save_model
from lmforge.models.sizes import model_size


def _tiny_bert() -> Bert:
    return Bert(BertConfig(vocab_size=50, n_layers=1, n_heads=2, d_model=16, d_ff=32)).eval()


@pytest.mark.parametrize("size", ["gpt-tiny", "llama-tiny"])
def test_gpt_round_trip(tmp_path: Path, size: str) -> None:
    model = GPT(model_size(size, vocab_size=60)).eval()
    save_model(model, tmp_path)
    loaded = load_model(tmp_path).eval()
    ids = torch.randint(0, 60, (2, 5))
    torch.testing.assert_close(loaded(ids), model(ids), atol=0, rtol=0)
    assert json.loads((tmp_path / "config.json").read_text())["lmforge_model"] == "gpt"


def test_bert_round_trip(tmp_path: Path) -> None:
    model = _tiny_bert()
    save_model(model, tmp_path)
    ids = torch.randint(0, 50, (2, 5))
    torch.testing.assert_close(load_model(tmp_path)(ids), model(ids), atol=0, rtol=0)


def test_missing_unexpected_and_misshaped_tensors_are_named(tmp_path: Path) -> None:
    save_model(_tiny_bert(), tmp_path)
    tensors = read_safetensors(tmp_path / "model.safetensors")
    del tensors["pooler.dense.bias"]
    tensors["extra.weight"] = torch.zeros(2)
    tensors["embed.word.weight"] = torch.zeros(51, 16)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError) as err:
        load_model(tmp_path)
    text = str(err.value)
    assert "missing tensors: pooler.dense.bias" in text
    assert "unexpected tensors: extra.weight" in text
    assert "embed.word.weight: file (51, 16) vs model (50, 16)" in text


def test_unknown_config_key_is_named(tmp_path: Path) -> None:
    save_model(_tiny_bert(), tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["hidden_size"] = 16
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unknown key\\(s\\) hidden_size"):
        load_model(tmp_path)


def test_hugging_face_directory_points_to_convert(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 16}))
    with pytest.raises(ValueError, match="Hugging Face 'bert' model directory.*lmforge convert"):
        load_model(tmp_path)


def test_missing_directory_says_what_it_needs(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="model directory not found"):
        load_model(tmp_path / "nothing")
    with pytest.raises(ValueError, match="no config.json"):
        load_model(tmp_path)


def test_weights_are_safetensors_only(tmp_path: Path) -> None:
    save_model(_tiny_bert(), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
