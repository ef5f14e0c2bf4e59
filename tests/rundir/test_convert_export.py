"""`lmforge convert` / `lmforge export`: transformers loads the export unchanged and agrees with lmforge."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import transformers

from lmforge.cli import main
from lmforge.data.tokenizer import load_tokenizer
from lmforge.models.registry import build_model, load_model, save_model
from lmforge.models.sizes import model_size

TEXTS = ["我爱北京天安门", "Hello World! 价格：１２８元", "自然语言处理"]


def _model_dir(tmp_path: Path, size: str, tokenizer_dir: Path) -> Path:
    tok = load_tokenizer(tokenizer_dir)
    cfg = model_size(size, vocab_size=tok.vocab_size)
    run = tmp_path / "run"
    save_model(build_model(cfg), run)
    for f in tokenizer_dir.iterdir():
        shutil.copyfile(f, run / f.name)
    return run


def test_bert_export_reloads_in_transformers(tmp_path: Path, wordpiece_dir: Path) -> None:
    run = _model_dir(tmp_path, "bert-tiny", wordpiece_dir)
    out = tmp_path / "hf"
    assert main(["export", str(run), "--to", "hf", "--out", str(out)]) == 0
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    hf = transformers.AutoModelForMaskedLM.from_pretrained(out).eval()
    ours, tok = load_model(run), load_tokenizer(run)
    batch = hf_tok(TEXTS, padding=True, return_tensors="pt")
    assert batch["input_ids"][0][batch["attention_mask"][0].bool()].tolist() == tok.encode(TEXTS[0])
    with torch.no_grad():
        ref = hf(**batch).logits
        logits = ours.mlm_logits(ours(batch["input_ids"], attention_mask=batch["attention_mask"]))
    valid = batch["attention_mask"].bool()
    torch.testing.assert_close(logits[valid], ref[valid], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("size", ["gpt-tiny", "llama-tiny", "qwen2-tiny"])
def test_gpt_export_reloads_in_transformers(tmp_path: Path, bpe_dir: Path, size: str) -> None:
    run = _model_dir(tmp_path, size, bpe_dir)
    out = tmp_path / "hf"
    assert main(["export", str(run), "--out", str(out)]) == 0
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    tok = load_tokenizer(run)
    assert hf_tok(TEXTS[1])["input_ids"] == tok.encode(TEXTS[1])
    chat = hf_tok.apply_chat_template([{"role": "user", "content": "你好"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n"
    ids = torch.tensor([tok.encode(TEXTS[0])])
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
        logits = load_model(run)(ids)
    torch.testing.assert_close(logits, ref, atol=1e-4, rtol=1e-4)


def test_convert_round_trip_from_transformers(tmp_path: Path) -> None:
    hf_cfg = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=48,
    )
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    hf.save_pretrained(tmp_path / "hf")
    assert main(["convert", "--from-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "ours")]) == 0
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(load_model(tmp_path / "ours")(ids), hf(ids).logits, atol=1e-4, rtol=1e-4)


def test_convert_refuses_pickled_weights(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    assert main(["convert", "--from-hf", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert "pickled weights are never loaded" in " ".join(capsys.readouterr().out.split())


def test_convert_names_unsupported_model_types(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=10, n_embd=8, n_layer=1, n_head=2))
    hf.save_pretrained(tmp_path)
    cfg = (tmp_path / "config.json").read_text().replace('"gpt2"', '"t5"')
    (tmp_path / "config.json").write_text(cfg)
    assert main(["convert", "--from-hf", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert "model_type='t5' is not supported" in " ".join(capsys.readouterr().out.split())


def test_a_translation_model_is_refused_by_the_hugging_face_export_before_writing(tmp_path: Path, capsys) -> None:
    seq2seq = Path(__file__).parents[1] / "fixtures" / "generation" / "seq2seq"
    assert main(["export", str(seq2seq), "--to", "hf", "--out", str(tmp_path / "hf")]) == 2
    assert "has no Hugging Face export here" in capsys.readouterr().out
    assert not (tmp_path / "hf").exists()
