"""What ``lmforge evaluate --task`` scores a decoder on: perplexity, multiple choice by log-likelihood, generation.

Three kinds of task, each a list of items:

- ``perplexity``: texts (each optionally after a context that is not scored: the conversation before a reply),
  scored with a sliding window; perplexity per token and per character (so models with different tokenizers
  compare), from one summed log-probability.
- ``choice``: ``{"question", "choices", "answer"}`` rows, the shape C-Eval, CMMLU and MMLU take. Each choice is a
  continuation of the context; ``acc`` is the share of rows whose answer has the highest log-likelihood,
  ``acc_norm`` the same with each log-likelihood divided by its continuation's length in characters, and each has
  the standard error of a mean (sample standard deviation over sqrt(n)): lm-evaluation-harness's definitions
  (``lm_eval.api.metrics``). k-shot: k solved examples, drawn per row with a fixed seed from a pool that never
  holds the row itself, before the row's context, separated by a blank line (the harness's ``fewshot_delimiter``).
- ``generation``: a prompt and a reference; greedy decoding, then sacreBLEU (13a, or ``zh`` for Chinese), chrF and
  exact match of the stripped texts. k-shot: the shots, drawn as for choice, before the prompt as prompt, newline,
  reference and a blank line (plain text), or as earlier user / assistant turns (a chat model's template, the
  harness's ``fewshot_as_multiturn``); the oldest shots are dropped, whole, where a prompt would not fit.

A user's file: JSONL rows of one shape (``text`` -> perplexity; ``question`` / ``choices`` / ``answer`` ->
choice; ``prompt`` / ``reference`` -> generation), or a ``.txt`` file (one document's perplexity). A choice row's
question is followed by its lettered choices and ``答案：`` (or ``Answer:`` when the question has no Chinese) and
the continuations are `` A``, `` B``... as the harness's ``ceval`` / ``mmlu`` tasks format them
(``choice_format="letters"``), or the question then ``答案：`` and each choice's own text (``"text"``).

Built-in tasks are made from the data lmforge ships (``BUILTIN_EVALS``, documented with their chance levels in
docs/en/applications/evaluate-llm.md); each reads its test split, and k-shot examples only from the train or dev split.
"""

from __future__ import annotations

import functools
import math
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from lmforge.errors import UserError

Kind = Literal["perplexity", "choice", "generation"]
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
SHOT_DELIMITER = "\n\n"
# The translation prompts: the same words bench/translation_sft.py fine-tunes the translator with.
ZH_EN_PROMPT = "把下面的中文翻译成英文：\n{zh}"
EN_ZH_PROMPT = "把下面的英文翻译成中文：\n{en}"
SENTIMENT_WORDS = {"pos": "正面", "neg": "负面"}
_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff]")


@dataclass(frozen=True)
class TextItem:
    """A text whose tokens are scored, after the conversation turns before it (none: the start of a document);
    the runner renders them, in a chat model's template or one line per turn."""

    text: str
    history: tuple[dict, ...] = ()


@dataclass(frozen=True)
class ChoiceItem:
    """A context, its candidates and the index of the right one; each candidate is scored as ``delimiter +
    choice`` after the context (the harness's ``target_delimiter``), and acc_norm divides by ``len(choice)``."""

    context: str
    choices: tuple[str, ...]
    answer: int
    delimiter: str = ""
    source: str = ""  # translation tasks: the bare sentence an encoder-decoder reads instead of the context


@dataclass(frozen=True)
class GenerationItem:
    """A prompt (a user message in a chat model's template, else plain text) and its reference answer; an
    encoder-decoder reads ``source`` (translation tasks: the bare sentence; empty: the prompt) instead."""

    prompt: str
    reference: str
    source: str = ""


@dataclass
class EvalTask:
    """One task: its name, kind, items, the k-shot pool (choice and generation; empty: the other rows), the
    answer's language (generation), its translation direction (the tasks an encoder-decoder takes) and a line
    saying where its data comes from."""

    name: str
    kind: Kind
    items: list
    source: str
    shots: list = field(default_factory=list)
    target_lang: str = "en"
    translation: tuple[str, str] | None = None  # a built-in translation task's (source, target) languages


def chance(items: list[ChoiceItem]) -> float:
    """The expected accuracy of a uniform random choice over ``items``."""
    return sum(1 / len(item.choices) for item in items) / len(items)


# ---- a user's file ------------------------------------------------------------------------------------------


def _answer_index(value: object, choices: int) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if 0 <= value < choices else None
    if isinstance(value, str) and len(value.strip()) == 1 and value.strip().upper() in LETTERS[:choices]:
        return LETTERS.index(value.strip().upper())
    return None


def choice_row(row: dict, choice_format: str) -> tuple[ChoiceItem | None, str | None]:
    """A ``{"question", "choices", "answer"}`` row as a ChoiceItem, or what is wrong with it."""
    question, choices, answer = row.get("question"), row.get("choices"), row.get("answer")
    if not isinstance(question, str) or not question.strip():
        return None, "'question' must be a non-empty string"
    if not isinstance(choices, list) or not all(isinstance(c, str) and c.strip() for c in choices):
        return None, "'choices' must be a list of non-empty strings"
    if len(choices) < 2:
        return None, f"'choices' has {len(choices)} item; a choice needs at least 2"
    if len(choices) > len(LETTERS):
        return None, f"'choices' has {len(choices)} items; at most {len(LETTERS)}"
    index = _answer_index(answer, len(choices))
    if index is None:
        valid = f"an index 0..{len(choices) - 1} or a letter {LETTERS[0]}..{LETTERS[len(choices) - 1]}"
        return None, f"'answer' {answer!r} is not {valid} ({len(choices)} choices)"
    cue = "答案：" if _CJK.search(question) else "Answer:"
    if choice_format == "letters":
        listed = "\n".join(f"{LETTERS[i]}. {c.strip()}" for i, c in enumerate(choices))
        context = f"{question.strip()}\n{listed}\n{cue}"
        return ChoiceItem(context, tuple(LETTERS[: len(choices)]), index, delimiter=" "), None
    return ChoiceItem(f"{question.strip()}\n{cue}", tuple(c.strip() for c in choices), index, delimiter=" "), None


_SHAPES: dict[Kind, tuple[str, ...]] = {
    "perplexity": ("text",),
    "choice": ("question", "choices", "answer"),
    "generation": ("prompt", "reference"),
}


def _row_kind(row: dict) -> Kind | None:
    return next((kind for kind, keys in _SHAPES.items() if all(k in row for k in keys)), None)


def read_task_file(path: str | Path, *, choice_format: str = "letters", skip_bad_rows: bool = False) -> EvalTask:
    """A task from a user's file: a ``.txt`` document, or JSONL rows of one shape (see the module docstring)."""
    from lmforge.data.readers import _jsonl_objects, _lines

    path = Path(path)
    if path.suffix == ".txt":
        from lmforge.files import read_text_file

        text = read_text_file(path, what="text file")
        if not text.strip():
            raise UserError(f"{path}: the text file is empty")
        return EvalTask(path.name, "perplexity", [TextItem(text)], source=str(path))
    items, kind, skipped = [], None, 0
    for lineno, row, problem in _jsonl_objects(_lines(path)):
        where = f"{path}:{lineno}"
        if problem is None:
            row_kind = _row_kind(row)
            if row_kind is None:
                shapes = "; ".join(" + ".join(repr(k) for k in keys) for keys in _SHAPES.values())
                problem = f"fields {sorted(row)} are none of the task shapes ({shapes})"
            elif kind is not None and row_kind != kind:
                problem = f"a {row_kind} row in a file whose first row is a {kind} row"
        if problem is None:
            kind = kind or row_kind
            item, problem = _file_item(row, row_kind, choice_format)
        if problem is not None:
            if not skip_bad_rows:
                raise UserError(f"{where}: {problem}")
            skipped += 1
            continue
        items.append(item)
    if not items:
        raise UserError(f"{path}: no rows to evaluate on" + (f" ({skipped} bad rows skipped)" if skipped else ""))
    return EvalTask(path.name, kind, items, source=str(path) + (f" ({skipped} bad rows skipped)" if skipped else ""))


def _file_item(row: dict, kind: Kind, choice_format: str) -> tuple[object | None, str | None]:
    if kind == "choice":
        return choice_row(row, choice_format)
    if kind == "perplexity":
        text = row["text"]
        if not isinstance(text, str) or not text.strip():
            return None, "'text' must be a non-empty string"
        return TextItem(text), None
    prompt, reference = row["prompt"], row["reference"]
    if not isinstance(prompt, str) or not prompt.strip() or not isinstance(reference, str):
        return None, "'prompt' must be a non-empty string and 'reference' a string"
    return GenerationItem(prompt, reference), None


# ---- built-in tasks -----------------------------------------------------------------------------------------


def _choices(rng: random.Random, true: str, others: list[str], k: int) -> tuple[tuple[str, ...], int]:
    """``true`` among ``k - 1`` distinct distractors from ``others``, at a random place."""
    pool = sorted({o for o in others if o != true})
    if len(pool) < k - 1:
        raise UserError(f"{true!r}: {len(pool)} other candidates of its kind in the split; {k - 1} are needed")
    picked = rng.sample(pool, k - 1)
    answer = rng.randrange(k)
    return (*picked[:answer], true, *picked[answer:]), answer


def _poem_lines(body: str) -> list[str]:
    from lmforge.data.poems import poem_lines

    return [text + mark for text, mark in poem_lines(body)]


def _tang_next_line(split: str, seed: int) -> list[ChoiceItem]:
    from lmforge.data.builtin import tang_verse

    poems = [(p["title"], _poem_lines(p["body"])) for p in tang_verse()[split]]
    by_length: dict[int, list[str]] = {}
    for _, lines in poems:
        by_length.setdefault(len(lines[1]), []).append(lines[1])
    rng, items = random.Random(seed), []
    for title, lines in poems:
        choices, answer = _choices(rng, lines[1], by_length[len(lines[1])], 4)
        items.append(ChoiceItem(f"{title}\n{lines[0]}", choices, answer))
    return items


def tang_next_line() -> EvalTask:
    return EvalTask(
        "tang-next-line",
        "choice",
        _tang_next_line("test", 1),
        source="tang-verse test poems: title + first line; the true second line among 4 of the same length",
        shots=_tang_next_line("dev", 2),
    )


def _tatoeba_choice(split: str, seed: int) -> list[ChoiceItem]:
    from lmforge.data.builtin import tatoeba_cmn_en

    pairs = tatoeba_cmn_en()[split]
    rng, items = random.Random(seed), []
    for pair in pairs:  # no distractor shares the sentence: it could be another right translation
        others = [p["en"] for p in pairs if p["zh"] != pair["zh"]]
        choices, answer = _choices(rng, pair["en"], others, 4)
        items.append(ChoiceItem(ZH_EN_PROMPT.format(zh=pair["zh"]) + "\n", choices, answer, source=pair["zh"]))
    return items


def tatoeba_zh_en_choice() -> EvalTask:
    return EvalTask(
        "tatoeba-zh-en-choice",
        "choice",
        _tatoeba_choice("test", 1),
        source="Tatoeba zh-en test pairs: a Chinese sentence; its English among 4 test translations",
        shots=_tatoeba_choice("dev", 2),
    )


def _sentiment(split: str) -> list[ChoiceItem]:
    from lmforge.data.builtin import reviews_sentiment

    words = tuple(SENTIMENT_WORDS.values())
    labels = list(SENTIMENT_WORDS)
    return [
        ChoiceItem(f"评论：{ex['text']}\n情感：", words, labels.index(ex["label"])) for ex in reviews_sentiment()[split]
    ]


def reviews_sentiment_prompt() -> EvalTask:
    return EvalTask(
        "reviews-sentiment-prompt",
        "choice",
        _sentiment("test"),
        source="reviews-sentiment test reviews: 正面 or 负面 after the review (shots from the train split)",
        shots=_sentiment("train"),
    )


def _tatoeba_translation(split: str, source: str, target: str) -> list[GenerationItem]:
    from lmforge.data.builtin import tatoeba_cmn_en

    prompt = ZH_EN_PROMPT if source == "zh" else EN_ZH_PROMPT
    pairs = tatoeba_cmn_en()[split]
    return [GenerationItem(prompt.format(**pair), pair[target], source=pair[source]) for pair in pairs]


def tatoeba_translation(source: str, target: str) -> EvalTask:
    """``tatoeba-SOURCE-TARGET``: the test pairs translated one way, the shots from the dev pairs."""
    return EvalTask(
        f"tatoeba-{source}-{target}",
        "generation",
        _tatoeba_translation("test", source, target),
        source=f"Tatoeba zh-en test pairs, {source} -> {target} (shots from the dev split)",
        shots=_tatoeba_translation("dev", source, target),
        target_lang=target,
    )


def peoples_daily_perplexity() -> EvalTask:
    from lmforge.data.builtin import peoples_daily_text

    items = [TextItem(ex["text"]) for ex in peoples_daily_text()["test"]]
    return EvalTask("peoples-daily-text:test", "perplexity", items, source="People's Daily 1998-01 test sentences")


def tang_verse_perplexity() -> EvalTask:
    from lmforge.data.builtin import tang_verse

    items = [TextItem(p["text"]) for p in tang_verse()["test"]]
    return EvalTask("tang-verse:test", "perplexity", items, source="tang-verse test poems (title, newline, body)")


def chatterbot_replies() -> EvalTask:
    from lmforge.data.builtin import chatterbot_zh

    items = []
    for conversation in chatterbot_zh()["test"]:
        messages = conversation["messages"]
        for i, message in enumerate(messages):
            if message["role"] == "assistant":
                items.append(TextItem(message["content"], history=tuple(messages[:i])))
    return EvalTask(
        "chatterbot-zh:test",
        "perplexity",
        items,
        source="chatterbot-zh test conversations: each reply after the turns before it",
    )


@dataclass(frozen=True)
class BuiltinEval:
    """A built-in task: its loader, its kind, one line for the docs and ``--help``, and its translation direction (an
    encoder-decoder translating that way is scored on it). The kind and direction are known before its data is
    read, so a model that cannot take the task is refused first."""

    build: Callable[[], EvalTask]
    kind: Literal["choice", "generation", "perplexity"]
    summary: str
    translation: tuple[str, str] | None = None
    fetch: str | None = None
    """The corpus ``lmforge data fetch`` downloads for this task (``--suite`` skips the task, saying so, until then)."""


BUILTIN_EVALS: dict[str, BuiltinEval] = {
    "tang-next-line": BuiltinEval(
        tang_next_line, "choice", "choice: a test poem's true second line among 4 (chance 0.25)", fetch="tang-poems"
    ),
    "tatoeba-zh-en-choice": BuiltinEval(
        tatoeba_zh_en_choice,
        "choice",
        "choice: a test sentence's English among 4 test translations (chance 0.25)",
        translation=("zh", "en"),
    ),
    "reviews-sentiment-prompt": BuiltinEval(
        reviews_sentiment_prompt, "choice", "choice: 正面 / 负面 for a test review, zero- or k-shot (chance 0.5)"
    ),
    "tatoeba-zh-en": BuiltinEval(
        functools.partial(tatoeba_translation, "zh", "en"),
        "generation",
        "generation: test sentences zh -> en, sacreBLEU and chrF",
        translation=("zh", "en"),
    ),
    "tatoeba-en-zh": BuiltinEval(
        functools.partial(tatoeba_translation, "en", "zh"),
        "generation",
        "generation: test sentences en -> zh, sacreBLEU (zh) and chrF",
        translation=("en", "zh"),
    ),
    "peoples-daily-text:test": BuiltinEval(
        peoples_daily_perplexity, "perplexity", "perplexity of People's Daily test sentences"
    ),
    "tang-verse:test": BuiltinEval(
        tang_verse_perplexity, "perplexity", "perplexity of tang-verse test poems", fetch="tang-poems"
    ),
    "chatterbot-zh:test": BuiltinEval(
        chatterbot_replies, "perplexity", "perplexity of chatterbot-zh test replies after their turns"
    ),
}


def load_task(name: str, *, choice_format: str = "letters", skip_bad_rows: bool = False) -> EvalTask:
    """A built-in task by name, or a user's file."""
    if name in BUILTIN_EVALS:
        builtin = BUILTIN_EVALS[name]
        try:
            task = builtin.build()
        except UserError as e:  # its data is missing: say which task needs it
            raise UserError(f"task {name}: {e}") from None
        task.translation = builtin.translation
        return task
    if Path(name).exists():
        return read_task_file(name, choice_format=choice_format, skip_bad_rows=skip_bad_rows)
    raise UserError(f"--task {name}: neither a file nor a built-in task ({', '.join(BUILTIN_EVALS)})")


def mean_and_stderr(values: list[float]) -> tuple[float, float]:
    """The mean and its standard error (sample standard deviation / sqrt(n)), as lm-evaluation-harness reports."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    variance = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(variance / n)
