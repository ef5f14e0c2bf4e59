"""Classification on a decoder (tasks/classification.py with a GPT backbone): the head reads the last real token as
transformers' ``*ForSequenceClassification`` does (same logits on a right-padded batch), and ``lmforge finetune
classify`` trains it, with adapters, into a run that evaluate / predict / serve load; what it cannot do (an int8
copy, explanations, a BERT pooling) is refused by name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers

from lmforge.cli import main
from lmforge.data.readers import write_jsonl
from lmforge.data.tokenizer import load_tokenizer, save_tokenizer
from lmforge.models.convert import to_hf
from lmforge.models.gpt import GPT, GPTConfig
from lmforge.models.registry import load_model, read_safetensors, save_model
from lmforge.tasks.classification import ClassificationTask
from tests.models.families import DECODER_FAMILIES

FAST = ["--training.no-progress", "--training.peak-tflops", "1", "--max-len", "24", "--epochs", "0"]


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory, review_bpe: Path) -> Path:
    """A randomly initialised Llama-shaped decoder with the review BPE tokenizer."""
    directory = tmp_path_factory.mktemp("tiny-llama")
    tok = load_tokenizer(review_bpe)
    cfg = GPTConfig(
        vocab_size=tok.vocab_size, max_seq_len=64, n_layers=2, n_heads=4, d_model=32, d_ff=64,
        **DECODER_FAMILIES["llama"],
    )  # fmt: skip
    torch.manual_seed(0)
    save_model(GPT(cfg), directory)
    save_tokenizer(tok, directory)
    return directory


def test_the_head_reads_the_last_real_token_as_transformers_does(tiny_llama: Path) -> None:
    task = ClassificationTask(load_tokenizer(tiny_llama), ["neg", "pos"], max_len=24, backbone="gpt")
    assert task.pooling == "last"
    gpt = load_model(tiny_llama)
    model = task.build_model(gpt).eval()
    with torch.no_grad():
        model.head.out.weight.normal_(0, 1.0)
        model.head.out.bias.zero_()  # transformers' score layer has no bias
    texts = [{"text": "房间很干净"}, {"text": "位置交通都很方便，早餐也不错"}, {"text": "差"}]
    items = task.encode(texts, split="test", need_labels=False)
    batch = task.collate(items)
    assert batch["input_ids"].shape[0] == 3 and int(batch["attention_mask"].sum(1).min()) < batch["input_ids"].shape[1]
    with torch.no_grad():
        ours = task.logits(model, batch)
        alone = torch.cat([task.logits(model, task.collate([it])) for it in items])
    torch.testing.assert_close(ours, alone, atol=1e-5, rtol=1e-5)  # padding changes nothing

    hf_cfg, tensors = to_hf(gpt.cfg, gpt.state_dict(), token_ids={"pad": task.pad_id, "bos": 1, "eos": 1})
    hf_cfg.pop("model_type")
    config = transformers.LlamaConfig(**{k: v for k, v in hf_cfg.items() if k != "architectures"}, num_labels=2)
    assert config.pad_token_id == task.pad_id  # where transformers finds the last real token
    hf = transformers.LlamaForSequenceClassification(config).eval()
    hf.model.load_state_dict({k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")})
    hf.score.weight.data.copy_(model.head.out.weight)
    with torch.no_grad():
        theirs = hf(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_finetune_classify_on_a_decoder_with_adapters_learns_and_loads(
    tmp_path: Path, tiny_llama: Path, cue_texts, capsys
) -> None:
    write_jsonl(tmp_path / "train.jsonl", cue_texts(160, 1))
    write_jsonl(tmp_path / "dev.jsonl", cue_texts(40, 2))
    write_jsonl(tmp_path / "test.jsonl", cue_texts(40, 3))
    out = tmp_path / "run"
    files = ["--train", str(tmp_path / "train.jsonl"), "--dev", str(tmp_path / "dev.jsonl")]
    args = ["finetune", "classify", "--model", str(tiny_llama), *files, "--test", str(tmp_path / "test.jsonl")]
    lora = [
        "--lora.rank",
        "8",
        "--lora.alpha",
        "16",
        "--training.optim.lr",
        "3e-3",
        "--training.global-batch-size",
        "16",
        "--training.micro-batch-size",
        "16",
    ]
    steps = ["--training.max-steps", "150", "--training.eval-every", "50", "--training.optim.warmup-steps", "5"]
    assert main([*args, "--out", str(out), *lora, *steps, *FAST]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["test"]["accuracy"] >= 0.8  # one planted character decides the label (chance 0.5; 0.95 measured)
    assert json.loads((out / "task.json").read_text())["backbone"] == "gpt"
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert set(read_safetensors(out / "head.safetensors")) == {"head.out.weight", "head.out.bias"}
    base, run = read_safetensors(tiny_llama / "model.safetensors"), read_safetensors(out / "model.safetensors")
    assert torch.equal(run["embed.word.weight"], base["embed.word.weight"])  # frozen under the adapters

    evaluate = ["evaluate", "--model", str(out), "--data", str(tmp_path / "test.jsonl")]
    assert main([*evaluate, "--output", str(tmp_path / "e.json")]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["accuracy"] == pytest.approx(results["test"]["accuracy"])
    (tmp_path / "in.txt").write_text("房间好干净\n房间干净\n", encoding="utf-8")
    predict = ["predict", "--model", str(out), "--input", str(tmp_path / "in.txt")]
    assert main([*predict, "--output", str(tmp_path / "p.jsonl")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert [r["label"] for r in rows] == ["pos", "neg"]

    capsys.readouterr()
    assert main(["quantize", "--model", str(out), "--out", str(tmp_path / "int8")]) == 2
    assert "holds a BERT encoder; this run's model is a gpt" in "".join(capsys.readouterr())
    assert main(["explain", "--model", str(out), "--text", "房间好干净", "--output", str(tmp_path / "x.jsonl")]) == 2
    assert "not for a decoder's last token" in "".join(capsys.readouterr())


def test_a_bert_pooling_on_a_decoder_is_refused_before_training(tmp_path: Path, tiny_llama: Path, cue_texts, capsys):
    write_jsonl(tmp_path / "train.jsonl", cue_texts(20, 1))
    args = ["finetune", "classify", "--model", str(tiny_llama), "--train", str(tmp_path / "train.jsonl")]
    assert main([*args, "--out", str(tmp_path / "run"), "--pooling", "pooler", *FAST]) == 2
    assert "a gpt classifier pools with last or mean" in "".join(capsys.readouterr())
    assert not (tmp_path / "run" / "trainer_state").exists()
