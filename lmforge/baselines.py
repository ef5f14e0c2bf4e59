"""Non-neural baselines that every fine-tuned model is shown beside.

- Sentiment / text classification: character 1-3-gram TF-IDF (sublinear tf) + a linear SVM
  (scikit-learn ``TfidfVectorizer`` + ``LinearSVC``), the classic strong baseline for short
  Chinese texts (character n-grams need no word segmentation).
- NER: a longest-match dictionary of the training split's entities: scanning left to right, the
  longest training entity that starts at the current token is tagged with its most frequent type.
  Strings that are entities less often than not where the tagger matches them in the training
  text (e.g. the one-character abbreviation 中 for China inside ordinary words) are dropped: the
  dictionary keeps an entry only if its matches on the training split are right at least half the
  time. On one month of one newspaper names recur, so this is a demanding baseline (FINDINGS.md).

Both are scored with the same metric code as the neural models (``lmforge.metrics``).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence

from lmforge.metrics import classification_metrics, entity_metrics, entity_spans, scheme_of


def tfidf_svm(train: Sequence[dict], test: Sequence[dict], *, c: float = 1.0) -> dict:
    """Fit on ``train`` (``{"text", "label"[, "text_pair"]}``), score on ``test``."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.svm import LinearSVC

    def text(ex: dict) -> str:
        return ex["text"] if not ex.get("text_pair") else f"{ex['text']}\n{ex['text_pair']}"

    labels = sorted({ex["label"] for ex in train})
    index = {name: i for i, name in enumerate(labels)}
    vectorizer = TfidfVectorizer(analyzer="char", ngram_range=(1, 3), sublinear_tf=True, min_df=1)
    x_train = vectorizer.fit_transform([text(ex) for ex in train])
    svm = LinearSVC(C=c).fit(x_train, [index[ex["label"]] for ex in train])
    pred = svm.predict(vectorizer.transform([text(ex) for ex in test])).tolist()
    return classification_metrics([index[ex["label"]] for ex in test], pred, labels)


class EntityDictionary:
    """Longest-match tagger over the entities seen in training."""

    def __init__(self, train: Sequence[dict], *, min_precision: float = 0.5) -> None:
        self.scheme = scheme_of([t for ex in train for t in ex["tags"]])
        types: dict[tuple[str, ...], Counter] = defaultdict(Counter)
        for ex in train:
            for kind, s, e in entity_spans(ex["tags"], self.scheme):
                types[tuple(ex["tokens"][s:e])][kind] += 1
        self.entities = {words: counts.most_common(1)[0][0] for words, counts in types.items()}
        self.longest = max((len(w) for w in self.entities), default=0)
        # precision of each entry where it matches the training text; keep the reliable ones
        right: Counter = Counter()
        matched: Counter = Counter()
        for ex in train:
            gold = set(entity_spans(ex["tags"], self.scheme))
            for kind, s, e in entity_spans(self.tag(ex["tokens"]), self.scheme):
                words = tuple(ex["tokens"][s:e])
                matched[words] += 1
                right[words] += (kind, s, e) in gold
        self.entities = {w: k for w, k in self.entities.items() if right[w] >= min_precision * matched[w]}
        self.longest = max((len(w) for w in self.entities), default=0)

    def tag(self, tokens: Sequence[str]) -> list[str]:
        tags, i = ["O"] * len(tokens), 0
        while i < len(tokens):
            for n in range(min(self.longest, len(tokens) - i), 0, -1):
                kind = self.entities.get(tuple(tokens[i : i + n]))
                if kind is not None:
                    if self.scheme == "BIOES" and n == 1:
                        tags[i] = f"S-{kind}"
                    else:
                        tags[i : i + n] = [f"B-{kind}"] + [f"I-{kind}"] * (n - 1)
                        if self.scheme == "BIOES":
                            tags[i + n - 1] = f"E-{kind}"
                    i += n
                    break
            else:
                i += 1
        return tags


def dictionary_ner(train: Sequence[dict], test: Sequence[dict]) -> dict:
    """Strict entity-level scores of the longest-match dictionary of ``train`` on ``test``."""
    tagger = EntityDictionary(train)
    return entity_metrics([ex["tags"] for ex in test], [tagger.tag(ex["tokens"]) for ex in test], tagger.scheme)
