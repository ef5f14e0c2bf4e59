"""Built-in corpora: sizes, deterministic splits, no leakage, the exported files read back."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from lmforge.data.builtin import BUILTINS, export_builtin, load_builtin
from lmforge.data.readers import read_conll, read_jsonl


def test_reviews_sentiment_has_no_duplicates_or_conflicting_labels() -> None:
    splits = load_builtin("reviews-sentiment")
    examples = [ex for split in splits.values() for ex in split]
    texts = Counter(ex["text"] for ex in examples)
    assert texts.most_common(1)[0][1] == 1
    labels = Counter(ex["label"] for ex in examples)
    assert set(labels) == {"pos", "neg"}
    assert 17_000 <= len(examples) <= 17_600  # ~17.4k unique texts after removing conflicts
    assert [len(splits[s]) for s in ("train", "dev", "test")] == [13890, 1736, 1737]


def test_splits_are_deterministic() -> None:
    from lmforge.data import builtin

    first = [ex["text"] for ex in load_builtin("reviews-sentiment")["test"][:20]]
    builtin.reviews_sentiment.cache_clear()
    assert [ex["text"] for ex in load_builtin("reviews-sentiment")["test"][:20]] == first


def test_peoples_daily_ner_is_valid_bio() -> None:
    splits = load_builtin("peoples-daily-ner")
    entities: Counter = Counter()
    for split in splits.values():
        for ex in split:
            assert len(ex["tokens"]) == len(ex["tags"]) and all(len(t) == 1 for t in ex["tokens"])
            previous = "O"
            for tag in ex["tags"]:
                if tag.startswith("I-"):
                    assert previous[2:] == tag[2:], ex  # I- continues an entity of its own type
                if tag.startswith("B-"):
                    entities[tag[2:]] += 1
                previous = tag
    assert set(entities) == {"PER", "LOC", "ORG"}
    assert entities["LOC"] > entities["PER"] > entities["ORG"] > 3000


def test_person_names_are_merged() -> None:
    from lmforge.data.builtin import _parse_tagged_line

    chars, tags = _parse_tagged_line("国家/n  主席/n  江/nr  泽民/nr  访问/v  北京/ns")
    assert "".join(chars) == "国家主席江泽民访问北京"
    assert tags == ["O"] * 4 + ["B-PER", "I-PER", "I-PER", "O", "O", "B-LOC", "I-LOC"]


def test_text_and_ner_share_splits() -> None:
    ner, text = load_builtin("peoples-daily-ner"), load_builtin("peoples-daily-text")
    for split in ("train", "dev", "test"):
        assert ["".join(ex["tokens"]) for ex in ner[split]] == [ex["text"] for ex in text[split]]


def test_chatterbot_conversations_alternate_roles() -> None:
    splits = load_builtin("chatterbot-zh")
    assert sum(len(v) for v in splits.values()) > 300
    for ex in splits["train"]:
        roles = [m["role"] for m in ex["messages"]]
        assert roles[:2] == ["user", "assistant"] and all(m["content"] for m in ex["messages"])


def test_tatoeba_groups_never_cross_splits(tatoeba_path: Path) -> None:
    splits = load_builtin("tatoeba-cmn-en", path=tatoeba_path)
    assert len(splits["test"]) >= 1000 and len(splits["dev"]) >= 1000
    train_en = {ex["en"] for ex in splits["train"]}
    train_zh = {ex["zh"] for ex in splits["train"]}
    for split in ("dev", "test"):
        assert not {ex["en"] for ex in splits[split]} & train_en
        assert not {ex["zh"] for ex in splits[split]} & train_zh


def test_tatoeba_ships_with_lmforge_each_pair_with_its_attribution(monkeypatch: pytest.MonkeyPatch) -> None:
    import lzma

    from lmforge.data.builtin import TATOEBA_SHIPPED

    monkeypatch.delenv("LMFORGE_TATOEBA", raising=False)
    splits = load_builtin("tatoeba-cmn-en")  # no path, no variable: the shipped pairs
    assert [len(splits[s]) for s in ("test", "dev")] == [1000, 1000] and len(splits["train"]) > 27_000
    with lzma.open(TATOEBA_SHIPPED, "rt", encoding="utf-8-sig") as f:
        lines = [line for line in f.read().splitlines() if line.strip()]
    assert len(lines) == 29_155  # CC-BY 2.0 FR: every line keeps the credit of its two sentences
    assert all(line.split("\t")[2].startswith("CC-BY 2.0 (France) Attribution: tatoeba.org #") for line in lines)
    assert "CC-BY 2.0 FR" in (TATOEBA_SHIPPED.parent / "README.md").read_text(encoding="utf-8")


def test_a_tatoeba_variable_naming_no_file_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LMFORGE_TATOEBA", str(tmp_path / "missing.tsv"))
    with pytest.raises(ValueError, match="missing.tsv: Tatoeba TSV not found \\(LMFORGE_TATOEBA; unset it"):
        load_builtin("tatoeba-cmn-en")


def test_pretrain_zh_never_contains_dev_or_test_text(tatoeba_path: Path) -> None:
    pretrain = {ex["text"] for ex in load_builtin("pretrain-zh")["train"]}
    assert len(pretrain) > 25_000
    held: set[str] = set()
    for name in ("reviews-sentiment", "peoples-daily-text"):
        for split in ("dev", "test"):
            held |= {ex["text"] for ex in load_builtin(name)[split]}
    for split in ("dev", "test"):
        held |= {m["content"] for ex in load_builtin("chatterbot-zh")[split] for m in ex["messages"]}
        held |= {ex["zh"] for ex in load_builtin("tatoeba-cmn-en", path=tatoeba_path)[split]}
    assert not pretrain & held


def test_unknown_corpus_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match="reviews-sentiment"):
        load_builtin("wikipedia")


@pytest.mark.parametrize("name", ["reviews-sentiment", "peoples-daily-ner", "chatterbot-zh"])
def test_export_reads_back_unchanged(tmp_path: Path, name: str) -> None:
    written = export_builtin(name, tmp_path)
    splits = load_builtin(name)
    reader = read_conll if BUILTINS[name].task == "ner" else read_jsonl
    for split, path in written.items():
        assert list(reader(path)) == splits[split]


def test_tatoeba_export_is_source_tab_target(tmp_path: Path, tatoeba_path: Path) -> None:
    written = export_builtin("tatoeba-cmn-en", tmp_path, path=tatoeba_path)
    first = written["test"].read_text(encoding="utf-8").splitlines()[0].split("\t")
    example = load_builtin("tatoeba-cmn-en", path=tatoeba_path)["test"][0]
    assert first == [example["zh"], example["en"]]


def test_splits_do_not_depend_on_the_hash_seed(tatoeba_path: Path) -> None:
    """Set iteration order changes with PYTHONHASHSEED; no split may follow it (the Tatoeba groups once did)."""
    import os
    import subprocess
    import sys

    script = (
        "import hashlib, json; from lmforge.data.builtin import load_builtin; "
        "names = ['reviews-sentiment', 'peoples-daily-ner', 'chatterbot-zh', 'pretrain-zh', 'tatoeba-cmn-en']; "
        f"data = {{n: load_builtin(n, path={str(tatoeba_path)!r}) for n in names}}; "
        "print(hashlib.sha256(json.dumps(data, sort_keys=True, ensure_ascii=False).encode()).hexdigest())"
    )
    digests = {
        subprocess.run(
            [sys.executable, "-c", script],
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            check=True,
            timeout=300,
        ).stdout
        for seed in ("1", "2")
    }
    assert len(digests) == 1
