"""Scoring a decoder on an ``EvalTask`` (``tasks.py``): the three runners and the checks made before any work.

``check`` refuses, before a weight is read, what cannot be scored: a model that is not a decoder, a k-shot pool
smaller than k, a window longer than the model's. ``evaluate_task`` then renders each item's context (the chat
template where the model is a chat model, as ``lmforge chat`` decides: a chat fine-tune or an imported instruct
model; one line per turn otherwise), says how many requests are longer than the window and how they are cut, and
returns the task's metrics with their definitions. Log-likelihoods come from ``scoring.py``, greedy decoding from
``inference/generate.py``, BLEU and chrF from ``metrics.translation_metrics`` (sacreBLEU).
"""

from __future__ import annotations

import functools
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from lmforge.errors import UserError
from lmforge.evals.tasks import (
    SHOT_DELIMITER,
    ChoiceItem,
    EvalTask,
    GenerationItem,
    TextItem,
    chance,
    mean_and_stderr,
)

log = logging.getLogger(__name__)
SHOT_KINDS = ("choice", "generation")  # the task kinds that take k solved examples before each row

DEFINITIONS = {
    "perplexity": "exp(-(sum of the scored tokens' log-probabilities) / scored tokens)",
    "perplexity_per_char": "exp(-(the same sum) / characters of the scored texts): comparable across tokenizers",
    "acc": "share of rows whose answer has the highest summed log-likelihood (lm-evaluation-harness acc)",
    "acc_norm": "the same, each log-likelihood divided by its continuation's length in characters (harness acc_norm)",
    "stderr": "sample standard deviation / sqrt(n) of the per-row scores",
    "bleu": "sacreBLEU corpus BLEU (13a tokenization; zh for Chinese references)",
    "chrf": "sacreBLEU chrF",
    "exact_match": "share of outputs equal to the reference after stripping surrounding whitespace",
}


@dataclass
class EvalSettings:
    """How to score: the k-shot count and its seed, the first N rows, the window and stride, the batch, the
    generation length, and whether to use the chat template."""

    shots: int = 0
    seed: int = 1234
    limit: int | None = None
    window: int | None = None
    stride: int | None = None
    batch_size: int = 16
    max_new_tokens: int = 64
    chat_template: Literal["auto", "on", "off"] = "auto"


def check(task: EvalTask, settings: EvalSettings, *, max_seq_len: int, translator: bool = False) -> None:
    """What makes this task unscorable with these settings, refused before any work (k shots are drawn for choice
    and generation tasks; ``check_shots`` refuses them for a list with neither). ``translator``: an
    encoder-decoder, whose prompt (the source sentence) does not share the decoder's window with what it writes."""
    if settings.shots < 0:
        raise UserError(f"--shots {settings.shots}: must be 0 or more")
    if settings.shots and task.kind in SHOT_KINDS:
        pool = len(task.shots) if task.shots else len(task.items) - 1
        if settings.shots > pool:
            where = "its shot pool" if task.shots else "the file's other rows (pass --shots-file for more)"
            raise UserError(f"--shots {settings.shots}: {task.name} has only {pool} examples in {where}")
    if settings.window is not None and not 1 < settings.window <= max_seq_len:
        raise UserError(f"--window {settings.window}: must be 2..{max_seq_len} (the model's max_seq_len)")
    window = settings.window or min(max_seq_len, 2048)
    if settings.stride is not None and not 0 < settings.stride <= window:
        raise UserError(f"--stride {settings.stride}: must be 1..{window} (the window)")
    if settings.limit is not None and settings.limit < 1:
        raise UserError(f"--limit {settings.limit}: must be 1 or more")
    if settings.batch_size < 1 or settings.max_new_tokens < 1:
        sizes = f"--batch-size {settings.batch_size} / --max-new-tokens {settings.max_new_tokens}"
        raise UserError(f"{sizes}: must be 1 or more")
    if task.kind == "generation" and not translator and settings.max_new_tokens >= window:
        raise UserError(
            f"--max-new-tokens {settings.max_new_tokens}: leaves no room for {task.name}'s prompts in the "
            f"{window}-token window (the model's max_seq_len {max_seq_len}); give fewer"
        )


def check_shots(tasks: list[EvalTask], shots: int) -> None:
    """k-shot examples asked for tasks none of which takes them (perplexity): refused, not ignored."""
    if shots and not any(task.kind in SHOT_KINDS for task in tasks):
        kinds = ", ".join(f"{task.name} ({task.kind})" for task in tasks)
        raise UserError(f"--shots {shots}: k-shot examples are for choice and generation tasks; none of {kinds} is one")


def is_chat(run, settings: EvalSettings) -> bool:
    """Whether contexts are rendered in the model's chat template."""
    from lmforge.rundir.convert import converted_chat_model
    from lmforge.tasks import task_entry

    if settings.chat_template != "auto":
        return settings.chat_template == "on"
    return (run.finetuned and task_entry(run.task_name).language_model) or converted_chat_model(run.directory)


def check_translator(task: EvalTask, settings: EvalSettings, *, src: str, tgt: str) -> None:
    """What an encoder-decoder translating ``src`` into ``tgt`` cannot be scored on, refused before any work: a
    task that is not a translation (perplexity, a choice file), a translation the other way, k shots (it reads one
    source sentence, with no room for examples)."""
    check_translation_direction(task.name, task.kind, task.translation, src=src, tgt=tgt)
    if settings.shots:
        raise UserError(f"--shots {settings.shots}: an encoder-decoder reads the source sentence alone; give 0")


def check_translation_direction(
    name: str, kind: str, translation: tuple[str, str] | None, *, src: str, tgt: str
) -> None:
    """``check_translator``'s test of a task's kind and direction, which a built-in task passes or fails before its
    data is read (``BuiltinEval.kind`` / ``translation``)."""
    direction = f"{src} -> {tgt}"
    if kind == "perplexity" or (kind == "choice" and translation is None):
        raise UserError(
            f"--task {name}: a {kind} task; an encoder-decoder ({direction}) is scored on translation tasks: "
            "the built-in ones in its direction, or a JSONL of {prompt, reference} rows whose prompt is the source"
        )
    if translation is not None and translation != (src, tgt):
        source, target = translation
        raise UserError(f"--task {name}: translates {source} -> {target}; this model translates {direction}")


def translator_tasks(src: str, tgt: str) -> list[str]:
    """The built-in tasks an encoder-decoder translating ``src`` into ``tgt`` is scored on (``--suite``)."""
    from lmforge.evals.tasks import BUILTIN_EVALS

    return [name for name, builtin in BUILTIN_EVALS.items() if builtin.translation == (src, tgt)]


def evaluate_task(run, task: EvalTask, settings: EvalSettings) -> dict:
    """Score ``run`` (a loaded decoder or encoder-decoder run, ``rundir.load_run``) on ``task``: its metrics, counts
    and seconds."""
    import torch

    from lmforge.tasks import task_entry

    translator = task_entry(run.task_name).translator
    if translator:
        check_translator(task, settings, src=run.task.src_lang, tgt=run.task.tgt_lang)
    check(task, settings, max_seq_len=run.model.cfg.max_seq_len, translator=translator)
    items = task.items[: settings.limit] if settings.limit else task.items
    chat = not translator and is_chat(run, settings)
    started = time.perf_counter()
    with torch.inference_mode():
        if translator:
            metrics = (
                _translator_choice(run, items)
                if task.kind == "choice"
                else _translator_generation(run, task, items, settings)
            )
        elif task.kind == "perplexity":
            metrics = _perplexity(run, items, settings, chat)
        elif task.kind == "choice":
            metrics = _choice(run, task, items, settings)
        else:
            metrics = _generation(run, task, items, settings, chat)
    return {
        "task": task.name,
        "kind": task.kind,
        "source": task.source,
        "rows": len(items),
        **({"chance": chance(items)} if task.kind == "choice" else {}),
        **metrics,
        "chat_template": chat if task.kind != "choice" else False,
        "seconds": round(time.perf_counter() - started, 1),
    }


def _window(run, settings: EvalSettings) -> tuple[int, int]:
    window = settings.window or min(run.model.cfg.max_seq_len, 2048)
    return window, settings.stride or window


def _score(run, requests: list, settings: EvalSettings, what: str) -> list:
    from lmforge.evals.scoring import score

    window, stride = _window(run, settings)
    long = sum(len(c) + len(x) - 1 > window for c, x in requests)
    if long:
        log.warning(
            "%d of %d %s are longer than the %d-token window: a continuation that fits keeps the last tokens before "
            "it (its context cut from the left, as lm-evaluation-harness cuts); a longer one is scored in pieces "
            "of a sliding window (stride %d)",
            long,
            len(requests),
            what,
            window,
            stride,
        )
    pad = run.task.tokenizer.token_id("pad") or 0
    return score(run.model, requests, window=window, stride=stride, batch_size=settings.batch_size, pad_id=pad)


def _rendered_history(run, history: tuple[dict, ...], chat: bool) -> str:
    from lmforge.inference.chat import render_chat

    if not history:
        return ""
    if chat:
        return render_chat(run.task.tokenizer, history, add_generation_prompt=True)
    return "".join(m["content"] + "\n" for m in history)


def _perplexity(run, items: list[TextItem], settings: EvalSettings, chat: bool) -> dict:
    from lmforge.evals.scoring import encode_pair

    tok = run.task.tokenizer
    requests = [encode_pair(tok, _rendered_history(run, item.history, chat), item.text) for item in items]
    scored = _score(run, requests, settings, "texts")
    logprob = sum(s.logprob for s in scored)
    tokens, chars = sum(s.tokens for s in scored), sum(len(item.text) for item in items)
    window, stride = _window(run, settings)
    return {
        "perplexity": math.exp(-logprob / tokens),
        "perplexity_per_char": math.exp(-logprob / chars),
        "tokens": tokens,
        "characters": chars,
        "window": window,
        "stride": stride,
        "contexts_cut": sum(s.cut > 0 for s in scored),
    }


def draw_shots(task: EvalTask, rows: int, k: int, seed: int) -> list[list]:
    """Each of the first ``rows`` rows' k solved examples: drawn from the task's pool (or, without one, the other
    rows) with ``random.Random(seed + row)``, so a row's shots do not depend on the limit or the batch."""
    if not k:
        return [[] for _ in range(rows)]
    drawn = []
    for row in range(rows):
        pool = task.shots or [other for i, other in enumerate(task.items) if i != row]
        drawn.append(random.Random(seed + row).sample(pool, k))
    return drawn


def shot_examples(task: EvalTask, items: list[ChoiceItem], k: int, seed: int) -> list[str]:
    """Each choice row's k-shot prefix: its shots (``draw_shots``), each its context and right answer, then the
    delimiter (the harness's ``fewshot_delimiter``)."""
    return [
        "".join(s.context + s.delimiter + s.choices[s.answer] + SHOT_DELIMITER for s in shots)
        for shots in draw_shots(task, len(items), k, seed)
    ]


def plain_prompt(item: GenerationItem, shots: list[GenerationItem]) -> str:
    """A generation row as plain text: its shots as prompt, newline, reference and the delimiter, then its own
    prompt and a newline, after which the model answers until the next newline."""
    return "".join(s.prompt + "\n" + s.reference + SHOT_DELIMITER for s in shots) + item.prompt + "\n"


def chat_messages(item: GenerationItem, shots: list[GenerationItem]) -> list[dict]:
    """A generation row as a conversation: its shots as earlier user / assistant turns (the harness's
    ``fewshot_as_multiturn``), then its prompt as the user's message."""
    messages = []
    for shot in shots:
        messages += [{"role": "user", "content": shot.prompt}, {"role": "assistant", "content": shot.reference}]
    return [*messages, {"role": "user", "content": item.prompt}]


def fit_shots(render: Callable[[list], list[int]], shots: list, limit: int) -> tuple[list[int] | None, int]:
    """The ids of ``render(shots)`` with the oldest shots dropped, a whole example at a time, until at most
    ``limit`` tokens remain; None if the row alone does not fit. Also the number of shots dropped."""
    for dropped in range(len(shots) + 1):
        ids = render(shots[dropped:])
        if len(ids) <= limit:
            return ids, dropped
    return None, len(shots)


def choice_scores(items: list[ChoiceItem], loglikelihoods: list[list[float]]) -> tuple[list[float], list[float]]:
    """Per row, 1.0 where the answer has the highest log-likelihood (acc), and the highest log-likelihood per
    character of its continuation (acc_norm), else 0.0; ties go to the first choice, as numpy's argmax."""
    acc, acc_norm = [], []
    for item, lls in zip(items, loglikelihoods, strict=True):
        normed = [ll / len(choice) for ll, choice in zip(lls, item.choices, strict=True)]
        acc.append(float(max(range(len(lls)), key=lls.__getitem__) == item.answer))
        acc_norm.append(float(max(range(len(normed)), key=normed.__getitem__) == item.answer))
    return acc, acc_norm


def _choice(run, task: EvalTask, items: list[ChoiceItem], settings: EvalSettings) -> dict:
    from lmforge.evals.scoring import encode_pair

    tok = run.task.tokenizer
    prefixes = shot_examples(task, items, settings.shots, settings.seed)
    requests, owners = [], []
    for row, (item, prefix) in enumerate(zip(items, prefixes, strict=True)):
        for choice in item.choices:
            requests.append(encode_pair(tok, prefix + item.context, item.delimiter + choice))
            owners.append(row)
    scored = _score(run, requests, settings, "context + choice requests")
    per_row: list[list[float]] = [[] for _ in items]
    for row, result in zip(owners, scored, strict=True):
        per_row[row].append(result.logprob)
    return {
        **_choice_metrics(items, per_row),
        "shots": settings.shots,
        "seed": settings.seed,
        "contexts_cut": sum(s.cut > 0 for s in scored),
    }


def _choice_metrics(items: list[ChoiceItem], loglikelihoods: list[list[float]]) -> dict:
    acc, acc_norm = choice_scores(items, loglikelihoods)
    (a, a_err), (n, n_err) = mean_and_stderr(acc), mean_and_stderr(acc_norm)
    return {"acc": a, "acc_stderr": a_err, "acc_norm": n, "acc_norm_stderr": n_err}


def _translator_choice(run, items: list[ChoiceItem]) -> dict:
    """Each candidate's log-likelihood as the translation of the row's source: the sum of the log-probabilities
    of its tokens and the end token, read by the decoder after the encoded source (teacher forcing); sources
    and candidates longer than the task's ``max_len`` are cut as fine-tuning cuts them, and counted."""
    import torch

    from lmforge.tasks.base import IGNORE

    task = run.task
    examples = [{"src": item.source or item.context, "tgt": c} for item in items for c in item.choices]
    encoded = task.encode(examples, split="evaluate")
    loglikelihoods: list[float] = []
    for start in range(0, len(encoded), task.eval_batch_size):
        batch = task.collate(encoded[start : start + task.eval_batch_size])
        logits = run.model(batch["input_ids"], batch["decoder_input_ids"], src_mask=batch["src_mask"])
        labels = batch["labels"].long()
        scored = labels != IGNORE
        logprobs = torch.log_softmax(logits.float(), dim=-1).gather(-1, labels.clamp(min=0).unsqueeze(-1))[..., 0]
        loglikelihoods += (logprobs * scored).sum(-1).tolist()
    per_row, position = [], 0
    for item in items:
        per_row.append(loglikelihoods[position : position + len(item.choices)])
        position += len(item.choices)
    return {**_choice_metrics(items, per_row), "shots": 0, "contexts_cut": task.truncated["evaluate"]}


def _translator_generation(run, task: EvalTask, items: list[GenerationItem], settings: EvalSettings) -> dict:
    """Greedy translations of the rows' sources (``TranslationTask.translate``: length-sorted batches), scored
    against the references as the decoders' generation tasks are."""
    import torch

    from lmforge.inference.config import GenerationConfig

    sources = [item.source or item.prompt for item in items]
    greedy = GenerationConfig(max_new_tokens=settings.max_new_tokens)
    outputs = run.task.translate(run.model, sources, device=torch.device("cpu"), generation=greedy)
    _, cut = run.task.encode_sources(sources)
    return {**_generation_metrics(task, items, outputs), "shots": 0, "prompts_cut": cut}


def _generation(run, task: EvalTask, items: list[GenerationItem], settings: EvalSettings, chat: bool) -> dict:
    from lmforge.evals.scoring import prefix_ids
    from lmforge.inference.chat import render_chat
    from lmforge.inference.config import GenerationConfig
    from lmforge.inference.generate import Generator

    tok = run.task.tokenizer
    window = _window(run, settings)[0]
    limit = window - settings.max_new_tokens
    if limit < 1:
        raise UserError(f"--max-new-tokens {settings.max_new_tokens}: leaves no room for a prompt in {window} tokens")
    if chat:
        stops = [i for i in (tok.token_id("eot"), tok.token_id("im_end")) if i is not None]
        config = GenerationConfig(max_new_tokens=settings.max_new_tokens, stop_token_ids=stops)

        def render(item: GenerationItem, shots: list) -> list[int]:
            text = render_chat(tok, chat_messages(item, shots), add_generation_prompt=True)
            return tok.encode(text, special_tokens=False)
    else:
        config = GenerationConfig(max_new_tokens=settings.max_new_tokens, stop_strings=["\n"])

        def render(item: GenerationItem, shots: list) -> list[int]:
            return prefix_ids(tok) + tok.encode(plain_prompt(item, shots), special_tokens=False)

    ids, shots_dropped = [], 0
    for item, shots in zip(items, draw_shots(task, len(items), settings.shots, settings.seed), strict=True):
        row_ids, dropped = fit_shots(functools.partial(render, item), shots, limit)
        ids.append(row_ids)
        shots_dropped += dropped
    if shots_dropped:
        log.warning("%d shots dropped (the oldest first) to fit prompts in %d tokens", shots_dropped, limit)
    too_long = [i for i, x in enumerate(ids) if x is None]
    if too_long:
        log.warning(
            "%d of %d prompts are longer than %d tokens (the window less --max-new-tokens): cut from the left",
            len(too_long),
            len(ids),
            limit,
        )
        for i in too_long:
            ids[i] = render(items[i], [])[-limit:]
    generator = Generator(run.model, tok)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    outputs = [""] * len(ids)
    for start in range(0, len(order), settings.batch_size):
        chunk = order[start : start + settings.batch_size]
        for i, reply in zip(chunk, generator.generate([ids[i] for i in chunk], config), strict=True):
            outputs[i] = reply.text.strip()
    return {
        **_generation_metrics(task, items, outputs),
        "shots": settings.shots,
        "seed": settings.seed,
        "shots_dropped": shots_dropped,
        "prompts_cut": len(too_long),
    }


def _generation_metrics(task: EvalTask, items: list[GenerationItem], outputs: list[str]) -> dict:
    """sacreBLEU, chrF and exact match of ``outputs`` against the rows' references, and the first five rows."""
    from lmforge.metrics import translation_metrics

    references = [it.reference.strip() for it in items]
    metrics = translation_metrics(outputs, references, target_lang=task.target_lang)
    exact, exact_err = mean_and_stderr([float(o == r) for o, r in zip(outputs, references, strict=True)])
    triples = zip(items[:5], references, outputs, strict=False)
    return {
        "bleu": metrics["bleu"],
        "chrf": metrics["chrf"],
        "exact_match": exact,
        "exact_match_stderr": exact_err,
        "bleu_signature": metrics["bleu_signature"],
        "chrf_signature": metrics["chrf_signature"],
        "samples": [{"prompt": it.prompt, "reference": r, "output": o} for it, r, o in triples],
    }
