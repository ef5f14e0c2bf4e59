"""`lmforge finetune translate / translate` and `lmforge finetune chat / generate / chat` end to end
on tiny models, plus the data formats and metrics they rest on."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from lmforge.cli import main
from lmforge.data.builtin import load_builtin
from lmforge.data.readers import read_conversations, read_pairs, write_jsonl
from lmforge.data.tokenizer import load_tokenizer, save_tokenizer, train_tokenizer
from lmforge.inference.chat import render_chat
from lmforge.metrics import distinct_n, translation_metrics
from lmforge.models.gpt import GPT, GPTConfig
from lmforge.models.registry import save_model
from lmforge.tasks.base import IGNORE
from lmforge.tasks.dialogue import DialogueTask
from lmforge.tasks.translation import TranslationTask

FAST = ["--training.no-progress", "--training.peak-tflops", "1", "--training.log-every", "1"]
TINY_MT = ["--vocab-size", "400", "--max-len", "24"]  # with the tiny_seq2seq_flags fixture


SAMPLE = Path(__file__).parents[1] / "fixtures" / "tatoeba-sample.tsv"  # English TAB Chinese TAB attribution


def _pairs(path: Path, start: int, n: int) -> Path:
    """Pairs start..start+n of the Tatoeba sample as a zh TAB en TSV with an extra column (ignored)."""
    lines = SAMPLE.read_text(encoding="utf-8-sig").splitlines()[start : start + n]
    path.write_text("".join(f"{ln.split(chr(9))[1]}\t{ln.split(chr(9))[0]}\textra\n" for ln in lines), encoding="utf-8")
    return path


def test_translate_finetune_then_translate_a_file(tmp_path: Path, tiny_seq2seq_flags: list[str]) -> None:
    train = _pairs(tmp_path / "train.tsv", 0, 120)
    dev = _pairs(tmp_path / "dev.tsv", 120, 16)
    out = tmp_path / "run"
    args = [
        "finetune",
        "translate",
        "--out",
        str(out),
        "--train",
        str(train),
        "--dev",
        str(dev),
        "--test",
        str(dev),
        *tiny_seq2seq_flags,
        *TINY_MT,
        "--training.max-steps",
        "12",
        "--training.eval-every",
        "6",
        "--training.save-every",
        "4",
        "--training.global-batch-size",
        "16",
        "--training.micro-batch-size",
        "8",
        "--average-last",
        "2",
        "--num-beams",
        "2",
        *FAST,
    ]
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["data"]["examples"] == {"train": 120, "dev": 16, "test": 16}
    assert results["dev"]["bleu_signature"].startswith("nrefs:1|case:mixed|eff:no|tok:13a")
    assert results["test"]["decoding"]["num_beams"] == 2 and "chrf" in results["test"]
    assert results["training"]["steps"] == 12 and "bleu" in results["definitions"]
    assert "average of" in results["weights"] or "average_rejected" in results["dev"]
    for name in ("config.json", "model.safetensors", "tokenizer.json", "task.json", "report.md", "loss.png"):
        assert (out / name).is_file(), name
    sources = tmp_path / "in.txt"
    sources.write_text("我会游泳。\n\n你好吗？\n", encoding="utf-8")
    assert (
        main(
            [
                "translate",
                "--model",
                str(out),
                "--input",
                str(sources),
                "--output",
                str(tmp_path / "o.jsonl"),
                "--num-beams",
                "1",
            ]
        )
        == 0
    )
    rows = [json.loads(line) for line in (tmp_path / "o.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["src"] for r in rows] == ["我会游泳。", "你好吗？"] and all(
        isinstance(r["translation"], str) for r in rows
    )


def test_translate_with_encoder_warm_started_from_a_pretrained_bert(tmp_path: Path, review_wordpiece: Path) -> None:
    """The encoder keeps the BERT's WordPiece vocabulary and weights; the target side gets its own BPE."""
    from lmforge.data.tokenizer import copy_tokenizer_files
    from lmforge.models.bert import Bert, BertConfig
    from lmforge.models.registry import read_safetensors
    from lmforge.rundir import load_run

    bert_dir = tmp_path / "bert"
    cfg = BertConfig(
        vocab_size=load_tokenizer(review_wordpiece).vocab_size,
        d_model=32,
        n_layers=1,
        n_heads=2,
        d_ff=64,
        max_seq_len=64,
    )
    save_model(Bert(cfg), bert_dir)
    copy_tokenizer_files(review_wordpiece, bert_dir)
    train = _pairs(tmp_path / "train.tsv", 0, 64)
    out = tmp_path / "run"
    args = [
        "finetune",
        "translate",
        "--out",
        str(out),
        "--train",
        str(train),
        "--model",
        str(bert_dir),
        "--seq2seq.n-decoder-layers",
        "1",
        "--seq2seq.n-heads",
        "2",
        "--seq2seq.d-ff",
        "64",
        "--vocab-size",
        "400",
        "--max-len",
        "24",
        "--training.max-steps",
        "1",
        "--training.eval-every",
        "0",
        "--num-beams",
        "1",
        "--training.optim.lr",
        "1e-12",
        *FAST,
    ]
    assert main(args) == 0
    run = load_run(out, task="translate")
    task, model = run.task, run.model
    assert model.cfg.tgt_vocab_size == load_tokenizer(out).vocab_size != model.cfg.encoder.vocab_size
    assert (out / "source_tokenizer" / "tokenizer.json").is_file() and task.source_special_tokens
    pretrained = read_safetensors(bert_dir / "model.safetensors")["layers.0.ffn.up.weight"]
    assert torch.allclose(model.encoder.layers[0].ffn.up.weight, pretrained, atol=1e-6)
    assert task.translate(model, ["我会游泳。"], device=torch.device("cpu"))[0] is not None


def test_translation_collate_aligns_decoder_inputs_and_labels(bpe_dir: Path) -> None:
    tok = load_tokenizer(bpe_dir)
    examples = [{"src": "我爱北京", "tgt": "I love Beijing"}, {"src": "你好", "tgt": "Hi"}]
    task = TranslationTask(tok, tok, src_lang="zh", tgt_lang="en", max_len=32, train_examples=examples)
    batch = task.collate(task.train_items)
    eos = tok.token_id("eos")
    for row, ex in enumerate(examples):
        target = tok.encode(ex["tgt"], special_tokens=False)
        n = len(target) + 1
        assert batch["decoder_input_ids"][row, :n].tolist() == [eos, *target]
        assert batch["labels"][row, :n].tolist() == [*target, eos]
        assert (batch["labels"][row, n:] == IGNORE).all()
        source = [*tok.encode(ex["src"], special_tokens=False), eos]
        assert batch["input_ids"][row, : len(source)].tolist() == source
        assert batch["src_mask"][row].sum() == len(source)
    assert batch["n_targets"] == sum(len(tok.encode(ex["tgt"], special_tokens=False)) + 1 for ex in examples)


def test_read_pairs_formats_and_errors(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_text(
        '{"zh": "你好", "en": "Hello"}\n{"src": "再见", "tgt": "Bye"}\n', encoding="utf-8"
    )
    pairs, _ = read_pairs(tmp_path / "a.jsonl", src="zh", tgt="en")
    assert [(p["src"], p["tgt"]) for p in pairs] == [("你好", "Hello"), ("再见", "Bye")]
    (tmp_path / "b.tsv").write_text("你好\tHello\n只有一列\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"b\.tsv:2: no target after a tab"):
        read_pairs(tmp_path / "b.tsv", src="zh", tgt="en")
    kept, report = read_pairs(tmp_path / "b.tsv", src="zh", tgt="en", skip_bad_rows=True)
    assert len(kept) == 1 and len(report.skipped) == 1
    (tmp_path / "c.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}]}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"c\.jsonl:1: no assistant message"):
        read_conversations(tmp_path / "c.jsonl")


def test_translation_and_generation_metrics_by_hand() -> None:
    same = translation_metrics(["The cat sat on the mat."], ["The cat sat on the mat."], target_lang="en")
    assert same["bleu"] == pytest.approx(100.0) and same["chrf"] == pytest.approx(100.0)
    zh = translation_metrics(["我爱北京"], ["我爱北京天安门"], target_lang="zh")
    assert "tok:zh" in zh["bleu_signature"] and 0 < zh["bleu"] < 100
    assert distinct_n([[1, 2, 1], [2, 2]], 1) == pytest.approx(2 / 5)
    assert distinct_n([[1, 2, 1], [2, 2]], 2) == pytest.approx(3 / 3)


# --- dialogue ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chat_bpe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    texts = [m["content"] for c in load_builtin("chatterbot-zh")["train"] for m in c["messages"]]
    return save_tokenizer(
        train_tokenizer(lambda: iter(texts), kind="bpe", vocab_size=600), tmp_path_factory.mktemp("chat-bpe")
    )


@pytest.fixture(scope="module")
def tiny_gpt(tmp_path_factory: pytest.TempPathFactory, chat_bpe: Path) -> Path:
    directory = tmp_path_factory.mktemp("tiny-gpt")
    torch.manual_seed(0)
    cfg = GPTConfig(
        vocab_size=load_tokenizer(chat_bpe).vocab_size, n_layers=2, n_heads=2, d_model=32, d_ff=64, max_seq_len=96
    )
    save_model(GPT(cfg), directory)
    save_tokenizer(load_tokenizer(chat_bpe), directory)
    return directory


CONVERSATION = {
    "messages": [
        {"role": "system", "content": "你是助手。"},
        {"role": "user", "content": "你好"},
        {"role": "assistant", "content": "你好！有什么可以帮你？"},
        {"role": "user", "content": "讲个笑话"},
        {"role": "assistant", "content": "好的：为什么电脑很冷？因为它开着Windows。"},
    ]
}


def test_chat_template_matches_transformers_and_loss_covers_only_assistant_turns(chat_bpe: Path) -> None:
    tok = load_tokenizer(chat_bpe)
    hf = transformers.AutoTokenizer.from_pretrained(str(chat_bpe))
    messages = CONVERSATION["messages"]
    for gen_prompt in (False, True):
        assert render_chat(tok, messages, add_generation_prompt=gen_prompt) == hf.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=gen_prompt
        )
    task = DialogueTask(tok, max_len=200, train_examples=[CONVERSATION])
    ids, flags = task.train_items[0]
    hf_ids = hf.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    assert ids.tolist() == list(hf_ids)
    im_end = tok.specials["im_end"]
    targets = tok.decode(ids[flags].tolist(), skip_special_tokens=False)
    assert targets == "".join(m["content"] + im_end for m in messages if m["role"] == "assistant")
    batch = task.collate(task.train_items)
    shifted = batch["labels"][0]
    assert shifted[:-1][torch.from_numpy(flags[1:])].tolist() == ids[1:][flags[1:]].tolist()
    assert batch["n_targets"] == int(np.sum(flags[1:]))


def test_chat_finetune_generate_and_interactive_chat(
    tmp_path: Path, tiny_gpt: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    convs = load_builtin("chatterbot-zh")
    write_jsonl(tmp_path / "train.jsonl", convs["train"][:60])
    write_jsonl(tmp_path / "dev.jsonl", convs["dev"][:10])
    out = tmp_path / "run"
    args = [
        "finetune",
        "chat",
        "--model",
        str(tiny_gpt),
        "--train",
        str(tmp_path / "train.jsonl"),
        "--dev",
        str(tmp_path / "dev.jsonl"),
        "--out",
        str(out),
        "--epochs",
        "2",
        "--training.eval-every",
        "4",
        "--training.global-batch-size",
        "8",
        "--training.micro-batch-size",
        "8",
        *FAST,
    ]
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["dev"]["perplexity"] < results["before_finetuning"]["dev"]["perplexity"]
    assert 0 <= results["dev"]["distinct_2"] <= 1 and results["dev"]["replies"] == 10
    assert results["training"]["steps"] == 15 and json.loads((out / "task.json").read_text())["task"] == "chat"
    capsys.readouterr()
    assert (
        main(
            [
                "generate",
                "--model",
                str(out),
                "--prompt",
                "你好",
                "--generation.max-new-tokens",
                "6",
                "--generation.seed",
                "1",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.strip() != ""
    monkeypatch.setattr(sys, "stdin", io.StringIO("你好\n/reset\n/nonsense\n再见\n/quit\n"))
    assert main(["chat", "--model", str(out), "--generation.max-new-tokens", "5"]) == 0
    shown = capsys.readouterr().out
    assert shown.count("assistant: ") == 2 and "(history cleared)" in shown and "unknown command" in shown


def test_chat_finetune_rejects_a_tokenizer_without_chat_tokens(tmp_path: Path, wordpiece_dir: Path) -> None:
    from lmforge.data.tokenizer import copy_tokenizer_files

    save_model(GPT(GPTConfig(vocab_size=400, n_layers=1, n_heads=2, d_model=16, d_ff=32, max_seq_len=32)), tmp_path)
    copy_tokenizer_files(wordpiece_dir, tmp_path)
    code = main(
        [
            "finetune",
            "chat",
            "--model",
            str(tmp_path),
            "--data",
            "builtin:chatterbot-zh",
            "--out",
            str(tmp_path / "run"),
            *FAST,
        ]
    )
    assert code == 2


def test_token_budget_buckets_hold_similar_lengths_within_the_budget(bpe_dir: Path) -> None:
    from lmforge.data.batching import token_buckets

    lengths = [5, 1, 9, 3, 3, 7, 2, 30]
    buckets = token_buckets(lengths, 12)
    assert sorted(i for b in buckets for i in b) == list(range(len(lengths)))
    for b in buckets:
        assert len(b) * max(lengths[i] for i in b) <= 12 or len(b) == 1
    assert [7] in buckets  # longer than the budget: alone
    tok = load_tokenizer(bpe_dir)
    examples = [{"src": "我爱北京" * k, "tgt": "I love Beijing " * k} for k in range(1, 7)]
    task = TranslationTask(tok, tok, src_lang="zh", tgt_lang="en", max_len=64, train_examples=examples, batch_tokens=60)
    assert task.train_lengths is None and sum(len(b) for b in task.train_items) == 6
    batch = task.collate(task.train_items[:2])
    assert batch["input_ids"].shape[0] == len(task.train_items[0]) + len(task.train_items[1])
