"""Token shards: what prepare writes, reuse, windows, whole-word starts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lmforge.data.readers import read_text_lines
from lmforge.data.shards import PrepareConfig, TokenWindows, prepare
from lmforge.data.tokenizer import load_tokenizer


def _stream(shards: Path, split: str) -> np.ndarray:
    meta = json.loads((shards / "meta.json").read_text())
    return np.concatenate(
        [np.fromfile(shards / split / s["tokens"], dtype=meta["dtype"]) for s in meta["splits"][split]["shards"]]
    )


def test_every_document_is_written_once_with_a_separator(mlm_shards: Path, review_corpus: Path, review_wordpiece: Path):
    meta = json.loads((mlm_shards / "meta.json").read_text())
    tok = load_tokenizer(review_wordpiece)
    assert meta["dtype"] == "uint16" and meta["separator"] == tok.token_id("sep")
    docs = list(read_text_lines(review_corpus))
    assert meta["splits"]["train"]["n_docs"] + meta["splits"]["val"]["n_docs"] == len(docs)
    assert 0.005 < meta["splits"]["val"]["n_docs"] / len(docs) < 0.05  # val_fraction 0.02, hashed
    train = _stream(mlm_shards, "train")
    starts = np.load(mlm_shards / "train" / "doc_starts-00000.npy")
    assert len(starts) == meta["splits"]["train"]["n_docs"] and starts[0] == 0
    assert (train[starts[1:] - 1] == tok.token_id("sep")).all()  # each document ends in [SEP]
    first = train[: starts[1] - 1].tolist()
    assert first in [tok.encode(d, special_tokens=False) for d in docs[:50]]


def test_prepare_reuses_identical_shards_and_rebuilds_changed_ones(
    mlm_shards: Path, review_corpus: Path, review_wordpiece: Path, tmp_path: Path
):
    meta = mlm_shards / "meta.json"
    before = meta.stat().st_mtime_ns
    cfg = PrepareConfig(
        tokenizer=str(review_wordpiece), out=str(mlm_shards), input=[str(review_corpus)], val_fraction=0.02
    )
    prepare(cfg, progress=False)
    assert meta.stat().st_mtime_ns == before  # reused
    copy = tmp_path / "copy"
    import shutil

    shutil.copytree(mlm_shards, copy)
    cfg.out, cfg.val_fraction = str(copy), 0.1
    prepare(cfg, progress=False)
    assert json.loads((copy / "meta.json").read_text())["splits"]["val"]["n_docs"] > 100  # rebuilt


def test_windows_are_slices_of_the_stream(mlm_shards: Path) -> None:
    stream = _stream(mlm_shards, "train")
    windows = TokenWindows(mlm_shards, "train", length=65, stride=64)
    assert len(windows) == (len(stream) - 65) // 64 + 1
    for i in (0, 1, len(windows) - 1):
        assert windows[i].tolist() == stream[i * 64 : i * 64 + 65].tolist()
    assert windows[0][-1] == windows[1][0]  # causal-LM windows share one token
    with pytest.raises(IndexError):
        windows[len(windows)]


def test_whole_word_starts_follow_jieba(tmp_path: Path, review_wordpiece: Path) -> None:
    import jieba

    text = "我爱北京天安门，今天天气很好"
    corpus = tmp_path / "c.txt"
    corpus.write_text(text + "\n", encoding="utf-8")
    out = prepare(
        PrepareConfig(
            tokenizer=str(review_wordpiece),
            out=str(tmp_path / "s"),
            input=[str(corpus)],
            val_fraction=0.0,
            whole_word=True,
        ),
        progress=False,
    )
    starts = np.fromfile(out / "train" / "word_starts-00000.bin", dtype=np.uint8).tolist()
    expected = []
    for word in jieba.cut(text):
        expected += [1] + [0] * (len(word) - 1)
    assert starts == [*expected, 1]  # the trailing [SEP] is a word of its own


def test_missing_shards_name_the_command(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="lmforge prepare"):
        TokenWindows(tmp_path, "train", length=8)
