"""Every fine-tuning task takes adapters (--lora.rank): NER with its CRF and the embedding task train LoRA on a
frozen BERT like classify does (tests/commands/test_finetune.py): the run holds PEFT's files and the merged model,
whose unadapted weights are the pretrained ones; translation's encoder-decoder is refused before any work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lmforge.cli import main
from lmforge.data.builtin import load_builtin
from lmforge.data.readers import write_conll, write_jsonl
from lmforge.models.registry import read_safetensors

FAST = ["--training.no-progress", "--training.peak-tflops", "1", "--max-len", "32", "--epochs", "0"]
LORA = ["--lora.rank", "4", "--training.max-steps", "3", "--training.optim.lr", "1e-3"]


def _files(task: str, root: Path) -> list[str]:
    if task == "ner":
        ner = load_builtin("peoples-daily-ner")
        write_conll(root / "train.conll", ner["train"][:40])
        write_conll(root / "dev.conll", ner["dev"][:10])
        return ["--train", str(root / "train.conll"), "--dev", str(root / "dev.conll")]
    reviews = load_builtin("reviews-sentiment")
    (root / "train.txt").write_text("\n".join(ex["text"] for ex in reviews["train"][:48]) + "\n", encoding="utf-8")
    write_jsonl(root / "dev.jsonl", reviews["dev"][:16])
    return ["--train", str(root / "train.txt"), "--dev", str(root / "dev.jsonl")]


@pytest.mark.parametrize("task", ["ner", "embed"])
def test_adapters_train_on_every_encoder_task(task: str, tmp_path: Path, tiny_bert: Path) -> None:
    out = tmp_path / "run"
    args = ["finetune", task, "--model", str(tiny_bert), *_files(task, tmp_path), "--out", str(out)]
    assert main([*args, *LORA, *FAST]) == 0
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4
    base, run = read_safetensors(tiny_bert / "model.safetensors"), read_safetensors(out / "model.safetensors")
    assert torch.equal(run["embed.word.weight"], base["embed.word.weight"])  # frozen, not adapted
    assert not torch.equal(run["layers.0.attn.qkv.weight"], base["layers.0.attn.qkv.weight"])  # adapted, merged


def test_adapters_on_an_encoder_decoder_are_refused_before_training(tmp_path: Path, tiny_bert: Path, capsys) -> None:
    pairs = tmp_path / "pairs.tsv"
    pairs.write_text("".join(f"你好{i}\thello {i}\n" for i in range(20)), encoding="utf-8")
    args = ["finetune", "translate", "--model", str(tiny_bert), "--data", "None", "--train", str(pairs)]
    assert main([*args, "--out", str(tmp_path / "run"), *LORA, *FAST]) == 2
    reply = capsys.readouterr()
    assert "PEFT's format, which needs a Hugging Face export" in reply.out + reply.err
    assert not list((tmp_path / "run").glob("trainer_state/*"))
