"""Tokenizers: round trips, determinism, coverage of the built-in tasks, transformers compatibility."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import transformers

from lmforge.data.builtin import example_texts, load_builtin
from lmforge.data.readers import corpus_texts, read_text_lines
from lmforge.data.tokenizer import load_tokenizer, save_tokenizer, train_tokenizer

MIXED = [
    "我爱北京天安门，天安门上太阳升。",
    "价格：１２８元，质量很好，下次还会再来😀",
    "2024年3月15日，ＧＤＰ增长了5.2%。",
    "数字123和字母ABC混在一起：abc-123_XYZ",
    "Transformers are neural networks; BERT and GPT are transformers.",
]


@pytest.mark.parametrize("text", MIXED)
def test_bpe_round_trip_is_exact(bpe_dir: Path, text: str) -> None:
    tok = load_tokenizer(bpe_dir)
    assert tok.decode(tok.encode(text)) == text


@pytest.mark.parametrize("text", MIXED)
def test_wordpiece_round_trip_up_to_case_and_spacing(wordpiece_dir: Path, text: str) -> None:
    tok = load_tokenizer(wordpiece_dir)
    ids = tok.encode(text)
    assert tok.token_id("unk") not in ids
    # WordPiece lower-cases (bert-base-chinese convention) and does not record spaces between words.
    assert re.sub(r"\s", "", tok.decode(ids)) == re.sub(r"\s", "", text.lower())


def test_wordpiece_keeps_chinese_text_unspaced(wordpiece_dir: Path) -> None:
    tok = load_tokenizer(wordpiece_dir)
    assert tok.decode(tok.encode("我爱北京天安门，天安门上太阳升。")) == "我爱北京天安门，天安门上太阳升。"


def test_every_cjk_character_is_its_own_token(wordpiece_dir: Path) -> None:
    tok = load_tokenizer(wordpiece_dir)
    pieces = tok.tokenizer.encode("天安门上太阳升", add_special_tokens=False).tokens
    assert pieces == list("天安门上太阳升")


def test_wordpiece_adds_cls_and_sep(wordpiece_dir: Path) -> None:
    tok = load_tokenizer(wordpiece_dir)
    ids = tok.encode("你好", "世界")
    assert ids[0] == tok.token_id("cls") and ids.count(tok.token_id("sep")) == 2
    types = tok.tokenizer.encode("你好", "世界").type_ids
    assert types == [0, 0, 0, 0, 1, 1, 1]


@pytest.mark.parametrize("kind", ["wordpiece", "bpe"])
def test_training_twice_gives_the_same_vocabulary(mixed_corpus: Path, kind: str) -> None:
    a = train_tokenizer(lambda: read_text_lines(mixed_corpus), kind=kind, vocab_size=350)
    b = train_tokenizer(lambda: read_text_lines(mixed_corpus), kind=kind, vocab_size=350)
    assert a.tokenizer.get_vocab() == b.tokenizer.get_vocab()
    assert a.tokenizer.to_str() == b.tokenizer.to_str()


def test_bpe_has_end_of_text_and_chat_tokens(bpe_dir: Path) -> None:
    tok = load_tokenizer(bpe_dir)
    for role in ("eos", "pad", "im_start", "im_end"):
        assert tok.token_id(role) is not None
    ids = tok.encode("<|im_start|>user\n你好<|im_end|>")
    assert ids[0] == tok.token_id("im_start") and ids[-1] == tok.token_id("im_end")


@pytest.mark.parametrize("fixture", ["wordpiece_dir", "bpe_dir"])
def test_transformers_loads_the_directory_with_the_same_ids(fixture: str, request: pytest.FixtureRequest) -> None:
    directory = request.getfixturevalue(fixture)
    ours = load_tokenizer(directory)
    theirs = transformers.AutoTokenizer.from_pretrained(directory)
    for text in MIXED:
        assert theirs(text)["input_ids"] == ours.encode(text)
    assert theirs.pad_token_id == ours.token_id("pad")
    cfg = json.loads((directory / "tokenizer_config.json").read_text())
    assert cfg["lmforge_kind"] == ours.kind


def test_save_and_load_round_trip(tmp_path: Path, wordpiece_dir: Path) -> None:
    tok = load_tokenizer(wordpiece_dir)
    save_tokenizer(tok, tmp_path / "copy")
    again = load_tokenizer(tmp_path / "copy")
    assert again.tokenizer.to_str() == tok.tokenizer.to_str() and again.specials == tok.specials


def test_tokenizer_json_is_written_last(tmp_path: Path, bpe_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Resumed runs (and other processes of a distributed one) take tokenizer.json to mean the directory is
    complete: a save stopped before the configs are written must leave no tokenizer.json behind."""
    import lmforge.data.tokenizer as tokenizer_module

    tok = load_tokenizer(bpe_dir)

    def stopped(path, data):
        raise OSError("disk full")

    monkeypatch.setattr(tokenizer_module, "write_json", stopped)
    with pytest.raises(OSError, match="disk full"):
        save_tokenizer(tok, tmp_path / "copy")
    assert not (tmp_path / "copy" / "tokenizer.json").exists()
    monkeypatch.undo()
    save_tokenizer(tok, tmp_path / "copy")
    assert load_tokenizer(tmp_path / "copy").token_id("eos") == tok.token_id("eos") is not None


def test_missing_tokenizer_names_the_command(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="lmforge tokenizer train"):
        load_tokenizer(tmp_path)


@pytest.fixture(scope="module")
def pretrain_wordpiece():
    return train_tokenizer(lambda: corpus_texts(["builtin:pretrain-zh"]), kind="wordpiece", vocab_size=21128)


TASKS = ["reviews-sentiment", "peoples-daily-ner", "chatterbot-zh"]


def _unk_counts(tok, name: str) -> tuple[int, int]:
    unk, total = tok.token_id("unk"), 0
    unknown = 0
    splits = load_builtin(name)
    for split in ("dev", "test"):
        for example in splits[split]:
            for text in example_texts(name, example):
                ids = tok.encode(text, special_tokens=False)
                total += len(ids)
                unknown += sum(i == unk for i in ids)
    return unknown, total


def test_pretrain_wordpiece_covers_the_builtin_tasks(pretrain_wordpiece) -> None:
    counts = {name: _unk_counts(pretrain_wordpiece, name) for name in TASKS}
    unknown = sum(u for u, _ in counts.values())
    total = sum(t for _, t in counts.values())
    assert unknown / total <= 0.001, counts
    # The classification and NER texts come from the same sources as the pretraining corpus.
    for name in ("reviews-sentiment", "peoples-daily-ner"):
        u, t = counts[name]
        assert u / t <= 0.001, (name, u, t)
    assert pretrain_wordpiece.vocab_size > 5000  # thousands of CJK characters, not the 1,000 default


def test_bpe_with_cjk_characters_never_merges_two_of_them(mixed_corpus: Path, tmp_path: Path) -> None:
    """cjk_characters: every CJK character and full-width punctuation mark is its own token (a poem's line is as
    many tokens as characters), Latin text still merges, round trips stay exact, and transformers agrees."""
    corpus = [*read_text_lines(mixed_corpus), "床前明月光，疑是地上霜。举头望明月，低头思故乡。"] * 3
    tok = train_tokenizer(lambda: iter(corpus), kind="bpe", vocab_size=600, cjk_characters=True)
    text = "床前明月光，疑是地上霜。the model 学习"
    ids = tok.tokenizer.encode(text).ids
    pieces = [tok.tokenizer.decode([i]) for i in ids]
    assert pieces[:12] == list("床前明月光，疑是地上霜。")
    assert tok.decode(ids) == text
    merged = train_tokenizer(lambda: iter(corpus), kind="bpe", vocab_size=600)
    assert len(merged.tokenizer.encode("床前明月光").ids) < 5  # the default keeps CJK runs whole for merges
    save_tokenizer(tok, tmp_path / "tok")
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    assert hf(text, add_special_tokens=False)["input_ids"] == ids


def test_a_tokenizer_is_not_trained_on_no_text(tmp_path: Path, capsys) -> None:
    from lmforge.cli import main

    (tmp_path / "empty.txt").write_text("\n  \n", encoding="utf-8")
    args = ["tokenizer", "train", "--input", str(tmp_path / "empty.txt"), "--out", str(tmp_path / "tok")]
    assert main(args) == 2
    assert "no text to learn a vocabulary from" in capsys.readouterr().out
    assert not (tmp_path / "tok").exists()
