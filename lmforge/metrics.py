"""Evaluation metrics as thin wrappers over scikit-learn, seqeval and sacreBLEU, each with its definition.

Classification: accuracy, macro and per-class precision / recall / F1 (scikit-learn's
``precision_recall_fscore_support``; a class never predicted has precision 0), and the confusion
matrix (rows = gold, columns = predicted). NER: entity-level scores with strict span matching
(seqeval ``mode="strict"`` with the IOB2 or IOBES scheme, as in the CoNLL-2003 evaluation: an
entity counts only when its type, start and end all match; ill-formed spans such as an ``I-`` tag
without its ``B-`` are not entities), overall (micro-averaged) and per type, plus an error table
that sorts every gold and predicted entity into exactly one outcome. Translation: sacreBLEU's corpus
BLEU (Papineni et al., 2002; Post, 2018) and chrF (Popović, 2015) on detokenized text, with their
signatures, so a score can be reproduced exactly. Generation: distinct-n (Li et al., 2016).

``DEFINITIONS`` is written into every ``results.json`` so the numbers can be read without the code.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
from sacrebleu.metrics import BLEU, CHRF
from seqeval.metrics import classification_report
from seqeval.scheme import IOB2, IOBES, Entities
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

from lmforge.errors import UserError
from lmforge.files import atomic_write

DEFINITIONS = {
    "accuracy": "share of examples whose predicted label (argmax of the probabilities) equals the gold label",
    "macro_f1": "unweighted mean over the gold label set of per-class F1 (scikit-learn, zero_division=0)",
    "macro_precision": "unweighted mean of per-class precision = TP / (TP + FP), 0 for a class never predicted",
    "macro_recall": "unweighted mean of per-class recall = TP / (TP + FN)",
    "per_class": "precision, recall, F1 and support (gold count) of each label",
    "confusion_matrix": "counts[gold][predicted] in the order of 'labels'",
    "loss": "mean cross-entropy in nats per target (per example for classification, per word for NER; "
    "for a CRF head the negative log-likelihood of the gold tag sequence divided by its number of words)",
    "precision": "entity level, strict (seqeval mode=strict): correct entities / predicted entities; an entity "
    "is correct only when its type, first and last token all match a gold entity",
    "recall": "entity level, strict: correct entities / gold entities",
    "f1": "entity level, strict: harmonic mean of precision and recall, micro-averaged over all types",
    "per_type": "strict precision, recall, F1 and support (gold entities) of each entity type",
    "errors": "each gold entity is 'correct', 'wrong_type' (same span, other type), 'wrong_span' (overlaps a "
    "predicted entity of the same type with other boundaries) or 'missed'; each predicted entity that "
    "overlaps no gold entity is 'spurious' (counted under its predicted type)",
    "bleu": "sacreBLEU corpus BLEU (0-100) of detokenized hypotheses against one reference each; the "
    "tokenizer is '13a' for English-like targets and 'zh' for Chinese targets (see bleu_signature)",
    "chrf": "sacreBLEU chrF (character n-grams up to 6, beta 2), 0-100 (see chrf_signature)",
    "perplexity": "exp(mean cross-entropy in nats per predicted token); for chat, over assistant tokens only",
    "distinct_1": "distinct unigrams / all unigrams over the sampled replies (tokens of the model's tokenizer)",
    "distinct_2": "distinct bigrams / all bigrams over the sampled replies",
    "truncated": "examples longer than the model window: classification keeps the first max_len tokens; NER "
    "splits them into overlapping windows so every token still gets a prediction",
}


def classification_metrics(gold: list[int], pred: list[int], labels: list[str]) -> dict:
    """Accuracy, macro P/R/F1, per-class scores and the confusion matrix for label indices."""
    index = list(range(len(labels)))
    p, r, f, support = precision_recall_fscore_support(gold, pred, labels=index, zero_division=0)
    return {
        "accuracy": float(accuracy_score(gold, pred)),
        "macro_f1": float(np.mean(f)),
        "macro_precision": float(np.mean(p)),
        "macro_recall": float(np.mean(r)),
        "per_class": {
            name: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(support[i])}
            for i, name in enumerate(labels)
        },
        "confusion_matrix": confusion_matrix(gold, pred, labels=index).tolist(),
        "labels": list(labels),
        "n": len(gold),
    }


def scheme_of(tags: list[str]) -> str:
    """'BIOES' if the tag set uses S- or E- tags, else 'BIO'."""
    return "BIOES" if any(t[:2] in ("S-", "E-") for t in tags) else "BIO"


def _scheme(name: str):
    if name not in ("BIO", "BIOES"):
        raise UserError(f"tag scheme {name!r} must be 'BIO' or 'BIOES'")
    return IOB2 if name == "BIO" else IOBES


def entity_spans(tags: list[str], scheme: str) -> list[tuple[str, int, int]]:
    """Well-formed entities of one tag sequence as (type, start, end) with ``end`` exclusive."""
    found = Entities([list(tags)], _scheme(scheme)).entities[0]
    return [(e.tag, e.start, e.end) for e in found]


def entity_metrics(gold: list[list[str]], pred: list[list[str]], scheme: str) -> dict:
    """Strict entity-level precision / recall / F1, overall and per type, and the error table."""
    if len(gold) != len(pred) or any(len(g) != len(p) for g, p in zip(gold, pred, strict=True)):
        raise UserError("gold and predicted tag sequences differ in number or length")
    report = classification_report(gold, pred, mode="strict", scheme=_scheme(scheme), output_dict=True, zero_division=0)
    micro = report.get("micro avg", {"precision": 0.0, "recall": 0.0, "f1-score": 0.0, "support": 0})
    types = sorted(k for k in report if not k.endswith(" avg"))
    return {
        "precision": float(micro["precision"]),
        "recall": float(micro["recall"]),
        "f1": float(micro["f1-score"]),
        "per_type": {
            t: {
                "precision": float(report[t]["precision"]),
                "recall": float(report[t]["recall"]),
                "f1": float(report[t]["f1-score"]),
                "support": int(report[t]["support"]),
            }
            for t in types
        },
        "errors": error_table(gold, pred, scheme),
        "n": len(gold),
    }


def error_table(gold: list[list[str]], pred: list[list[str]], scheme: str) -> dict[str, dict[str, int]]:
    """Per entity type: counts of correct, wrong_type, wrong_span, missed and spurious entities."""
    table: dict[str, Counter] = {}
    gold_all = Entities([list(t) for t in gold], _scheme(scheme)).entities
    pred_all = Entities([list(t) for t in pred], _scheme(scheme)).entities
    for g_found, p_found in zip(gold_all, pred_all, strict=True):
        g_spans = [(e.tag, e.start, e.end) for e in g_found]
        p_spans = [(e.tag, e.start, e.end) for e in p_found]
        exact = {(s, e): t for t, s, e in p_spans}
        for t, s, e in g_spans:
            row = table.setdefault(t, Counter())
            if exact.get((s, e)) == t:
                row["correct"] += 1
            elif (s, e) in exact:
                row["wrong_type"] += 1
            elif any(pt == t and ps < e and s < pe for pt, ps, pe in p_spans):
                row["wrong_span"] += 1
            else:
                row["missed"] += 1
        for t, s, e in p_spans:
            if not any(gs < e and s < ge for _, gs, ge in g_spans):
                table.setdefault(t, Counter())["spurious"] += 1
    keys = ("correct", "wrong_type", "wrong_span", "missed", "spurious")
    return {t: {k: int(table[t][k]) for k in keys} for t in sorted(table)}


def plot_confusion(matrix: list[list[int]], labels: list[str], path: str | Path, *, title: str = "") -> Path:
    """Confusion matrix PNG: rows gold, columns predicted, each cell its count and row share."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = np.asarray(matrix, dtype=float)
    shares = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    size = max(3.5, 0.6 * len(labels) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    for i in range(len(labels)):
        for j in range(len(labels)):
            color = "white" if shares[i, j] > 0.5 else "black"
            ax.text(j, i, f"{int(counts[i, j])}\n{shares[i, j]:.0%}", ha="center", va="center", color=color)
    ax.set_title(title or "confusion matrix (row share)")
    fig.tight_layout()
    path = Path(path)
    with atomic_write(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
    return path


def translation_metrics(hypotheses: list[str], references: list[str], *, target_lang: str) -> dict:
    """sacreBLEU BLEU and chrF of detokenized ``hypotheses`` against one reference each."""
    if len(hypotheses) != len(references):
        raise UserError(f"{len(hypotheses)} hypotheses for {len(references)} references")
    bleu = BLEU(tokenize="zh" if target_lang.lower().startswith("zh") else "13a")
    chrf = CHRF()
    b, c = bleu.corpus_score(hypotheses, [references]), chrf.corpus_score(hypotheses, [references])
    return {
        "bleu": float(b.score),
        "chrf": float(c.score),
        "bleu_precisions": [float(p) for p in b.precisions],
        "bleu_brevity_penalty": float(b.bp),
        "bleu_signature": str(bleu.get_signature()),
        "chrf_signature": str(chrf.get_signature()),
        "sentences": len(hypotheses),
    }


def distinct_n(token_lists: list[list[int]], n: int) -> float:
    """Distinct n-grams / all n-grams over every sequence (Li et al., 2016); 0 when there are none."""
    grams = [tuple(t[i : i + n]) for t in token_lists for i in range(len(t) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0
