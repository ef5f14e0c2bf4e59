"""Metrics equal hand-computed values; baselines behave as documented."""

from __future__ import annotations

import pytest

from lmforge.baselines import EntityDictionary, dictionary_ner, tfidf_svm
from lmforge.metrics import classification_metrics, entity_metrics, entity_spans, plot_confusion


def test_classification_metrics_by_hand(tmp_path) -> None:
    labels = ["a", "b", "c"]
    gold = [0, 0, 0, 1, 1, 2]
    pred = [0, 0, 1, 1, 2, 2]
    m = classification_metrics(gold, pred, labels)
    assert m["accuracy"] == pytest.approx(4 / 6)
    # a: P 2/2 R 2/3; b: P 1/2 R 1/2; c: P 1/2 R 1/1
    f1 = {"a": 2 * 1 * (2 / 3) / (1 + 2 / 3), "b": 0.5, "c": 2 * 0.5 * 1 / 1.5}
    for name, value in f1.items():
        assert m["per_class"][name]["f1"] == pytest.approx(value)
    assert m["macro_f1"] == pytest.approx(sum(f1.values()) / 3)
    assert m["macro_precision"] == pytest.approx((1 + 0.5 + 0.5) / 3)
    assert m["confusion_matrix"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert [m["per_class"][n]["support"] for n in labels] == [3, 2, 1]
    assert plot_confusion(m["confusion_matrix"], labels, tmp_path / "cm.png").stat().st_size > 1000


def test_entity_metrics_are_strict_and_match_hand_counts() -> None:
    gold = [["B-PER", "I-PER", "O", "B-LOC", "O"], ["B-ORG", "O", "B-LOC", "I-LOC"]]
    pred = [["B-PER", "I-PER", "O", "B-ORG", "O"], ["B-ORG", "I-ORG", "O", "I-LOC"]]
    m = entity_metrics(gold, pred, "BIO")
    # gold: PER(0,2) LOC(3,4) | ORG(0,1) LOC(2,4); predicted: PER(0,2) ORG(3,4) | ORG(0,2); the lone I-LOC is
    # not an entity under strict matching. Correct: PER only -> P 1/3, R 1/4.
    assert m["precision"] == pytest.approx(1 / 3)
    assert m["recall"] == pytest.approx(1 / 4)
    assert m["f1"] == pytest.approx(2 * (1 / 3) * (1 / 4) / (1 / 3 + 1 / 4))
    assert m["per_type"]["PER"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 1}
    assert m["per_type"]["LOC"]["recall"] == 0.0 and m["per_type"]["LOC"]["support"] == 2
    assert m["errors"]["PER"]["correct"] == 1
    assert m["errors"]["LOC"] == {"correct": 0, "wrong_type": 1, "wrong_span": 0, "missed": 1, "spurious": 0}
    assert m["errors"]["ORG"] == {"correct": 0, "wrong_type": 0, "wrong_span": 1, "missed": 0, "spurious": 0}


def test_bioes_spans() -> None:
    assert entity_spans(["S-PER", "B-LOC", "I-LOC", "E-LOC", "O"], "BIOES") == [("PER", 0, 1), ("LOC", 1, 4)]


def test_dictionary_tags_the_longest_training_entity() -> None:
    train = [
        {"tokens": list("北京市长"), "tags": ["B-LOC", "I-LOC", "I-LOC", "O"]},
        {"tokens": list("北京大学"), "tags": ["B-ORG", "I-ORG", "I-ORG", "I-ORG"]},
        {"tokens": list("去北京"), "tags": ["O", "B-LOC", "I-LOC"]},
    ]
    tagger = EntityDictionary(train)
    assert tagger.tag(list("在北京大学和北京市")) == [
        "O",
        "B-ORG",
        "I-ORG",
        "I-ORG",
        "I-ORG",
        "O",
        "B-LOC",
        "I-LOC",
        "I-LOC",
    ]
    test = [{"tokens": list("北京大学"), "tags": ["B-ORG", "I-ORG", "I-ORG", "I-ORG"]}]
    assert dictionary_ner(train, test)["f1"] == 1.0


def test_tfidf_svm_separates_an_easy_task() -> None:
    train = [{"text": t, "label": "pos"} for t in ("很好", "好极了", "非常好")] + [
        {"text": t, "label": "neg"} for t in ("很差", "差极了", "非常差")
    ]
    test = [{"text": "好好", "label": "pos"}, {"text": "差差", "label": "neg"}]
    m = tfidf_svm(train, test)
    assert m["accuracy"] == 1.0 and m["labels"] == ["neg", "pos"]
