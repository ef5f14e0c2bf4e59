"""``lmforge evaluate``: score a fine-tuned run on labelled data with the task's own ``evaluate`` (``--data``), or
a decoder on language-model tasks (``--task`` / ``--suite``: perplexity, multiple choice, generation; ``evals/``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from lmforge.commands._console import console, print_table
from lmforge.errors import UserError


@dataclass
class Config:
    """Evaluate a fine-tuned run on labelled data (--data), or a decoder on language-model tasks (--task, --suite).

    The fields from ``shots`` to ``chat_template`` are ``evals.run.EvalSettings``' own, passed on by name."""

    model: str
    """Run directory written by `lmforge finetune`, or (for --task) any decoder model directory or translate run."""
    data: str | None = None
    """classify / NER runs: a labelled file (CSV / TSV / JSONL, or CoNLL for NER), or builtin:NAME[:SPLIT]
    (default split: test)."""
    task: tuple[str, ...] = ()
    """Decoders: built-in tasks (tang-next-line, tatoeba-zh-en-choice, reviews-sentiment-prompt, tatoeba-zh-en,
    tatoeba-en-zh, peoples-daily-text:test, tang-verse:test, chatterbot-zh:test) or files: JSONL rows of
    {question, choices, answer} (multiple choice), {prompt, reference} (generation) or {text} (perplexity), or a
    .txt document (perplexity)."""
    suite: bool = False
    """Decoders: every built-in task; a translate run (an encoder-decoder): the built-in translation tasks in its
    direction."""
    shots: int = 0
    """Choice and generation tasks (perplexity takes none): solved examples before each row (from the train / dev
    split, or a file's other rows); in a chat model's template, earlier turns of the conversation."""
    shots_file: str | None = None
    """Tasks from a file: draw the k shots from this JSONL of the same shape instead of the file's other rows."""
    seed: int = 1234
    """Seed of the k-shot draw."""
    limit: int | None = None
    """Score only the first N rows of each task (a quick check; the count is in the results)."""
    window: int | None = None
    """Tokens a request may span before it is cut or slid (default: the model's max_seq_len, at most 2048)."""
    stride: int | None = None
    """Perplexity of long texts: tokens scored per window after the first (default: the window, disjoint)."""
    batch_size: int = 16
    """Requests scored (or prompts decoded) together."""
    max_new_tokens: int = 64
    """Generation tasks: most tokens generated per prompt (greedy)."""
    chat_template: Literal["auto", "on", "off"] = "auto"
    """Render prompts and conversations in the model's chat template: auto = for chat fine-tunes and imported
    instruct models (as `lmforge chat` decides)."""
    choice_format: Literal["letters", "text"] = "letters"
    """Choice files: letters = the choices listed with letters after the question, the letter scored (as the
    harness's mmlu / ceval); text = each choice's own text scored after the question."""
    output: str | None = None
    """Write the metrics here as JSON (and, for classification, a confusion-matrix PNG beside it)."""
    skip_bad_rows: bool = False
    """Skip malformed rows instead of stopping at the first."""


def evaluate(cfg: Config) -> dict:
    """--data: a classify / NER run's metrics on labelled data."""
    import torch

    from lmforge.data.builtin import BUILTINS, load_builtin
    from lmforge.files import write_json
    from lmforge.metrics import DEFINITIONS, plot_confusion
    from lmforge.rundir import load_run, require_capability
    from lmforge.rundir.layout import check_output_files
    from lmforge.tasks import resolve

    entry = require_capability(cfg.model, "files", command="lmforge evaluate")
    if cfg.output:
        check_output_files([cfg.output, Path(cfg.output).with_suffix(".png")], inputs=[cfg.data])
    run = load_run(cfg.model)
    if cfg.data.startswith("builtin:"):
        name, _, split = cfg.data.removeprefix("builtin:").partition(":")
        corpus = BUILTINS.get(name)
        if corpus is not None and corpus.task != entry.builtin:
            fits = [f"builtin:{n}" for n, b in BUILTINS.items() if b.task == entry.builtin]
            raise UserError(f"--data {cfg.data}: a {corpus.task} corpus; a {entry.name} run takes {', '.join(fits)}")
        examples = load_builtin(name).get(split or "test")
        if examples is None:
            raise UserError(f"--data {cfg.data}: split {split!r} is not train, dev or test")
    else:
        examples, _ = resolve(entry.files.reader)(cfg.data, skip_bad_rows=cfg.skip_bad_rows)
    if not examples:
        raise UserError(f"--data {cfg.data}: no examples to evaluate on")
    examples = examples[: cfg.limit or None]
    metrics = run.task.evaluate(run.model, examples, device=torch.device("cpu"))
    if cfg.output:
        limited = {"limit": cfg.limit, "rows": len(examples)} if cfg.limit else {}
        write_json(cfg.output, {"data": cfg.data, "model": cfg.model, **limited, **metrics, "definitions": DEFINITIONS})
        if "confusion_matrix" in metrics:
            plot_confusion(metrics["confusion_matrix"], metrics["labels"], Path(cfg.output).with_suffix(".png"))
    return metrics


def _task_names(cfg: Config) -> tuple[list[str], tuple[str, str] | None]:
    """The tasks to score (--task, or --suite: every built-in one, or a translator's in its direction) and, for an
    encoder-decoder, its direction; a model that is neither a decoder nor a translator refused."""
    from lmforge.evals.run import translator_tasks
    from lmforge.evals.tasks import BUILTIN_EVALS
    from lmforge.rundir.layout import model_family, task_name_of, task_settings
    from lmforge.tasks import task_entry, with_capability

    entry = task_entry(task_name_of(cfg.model), kind="finetune", where=f"{cfg.model}: task")
    if not entry.language_model and not entry.translator:
        hint = "; score it on labelled data with --data" if entry.files else ""
        raise UserError(
            f"--model {cfg.model}: language-model tasks score a decoder (a GPT-family model directory, or a run of "
            f"{', '.join(with_capability('language_model'))} or a preference tuning that writes one) or an "
            f"encoder-decoder ({', '.join(with_capability('translator'))}); this is a {model_family(cfg.model)} "
            f"model in a {entry.name!r} directory{hint}"
        )
    if not entry.translator:
        return (list(BUILTIN_EVALS) if cfg.suite else list(cfg.task)), None
    saved = task_settings(cfg.model) or {}
    source, target = saved.get("src"), saved.get("tgt")
    if not cfg.suite:
        return list(cfg.task), (source, target)
    names = translator_tasks(source, target)
    if not names:
        raise UserError(f"--suite: no built-in task translates {source} -> {target}, as this model does")
    return names, (source, target)


def _not_fetched(names: list[str]) -> dict[str, str]:
    """--suite: the built-in tasks whose data ``lmforge data fetch`` has not downloaded yet -> that corpus; refused
    when that is every task."""
    from lmforge.data.poems import is_fetched
    from lmforge.evals.tasks import BUILTIN_EVALS

    fetch = {n: BUILTIN_EVALS[n].fetch for n in names if BUILTIN_EVALS[n].fetch}
    skipped = {n: corpus for n, corpus in fetch.items() if not is_fetched(corpus)}
    if len(skipped) == len(names):
        raise UserError(
            f"--suite: every task's data is still to fetch: lmforge data fetch {' '.join(set(skipped.values()))}"
        )
    return skipped


def evaluate_lm(cfg: Config) -> list[dict]:
    """--task / --suite: each task's metrics for a decoder or a translator, every task and setting checked before
    any weight loads."""
    from lmforge.data.readers import check_output_file
    from lmforge.evals.run import (
        DEFINITIONS,
        EvalSettings,
        check,
        check_shots,
        check_translation_direction,
        check_translator,
        evaluate_task,
    )
    from lmforge.evals.tasks import BUILTIN_EVALS, load_task, read_task_file
    from lmforge.files import write_json
    from lmforge.models.registry import read_config
    from lmforge.rundir import load_run

    names, direction = _task_names(cfg)
    skipped = _not_fetched(names) if cfg.suite else {}  # said, not scored
    names = [n for n in names if n not in skipped]
    if cfg.output:
        check_output_file(cfg.output, inputs=[n for n in names if Path(n).exists()])
    settings = EvalSettings(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(EvalSettings)})
    max_seq_len = read_config(cfg.model).max_seq_len
    for name in names if direction else ():  # a built-in task a translator cannot take, refused before its data loads
        if name in BUILTIN_EVALS:
            builtin = BUILTIN_EVALS[name]
            check_translation_direction(name, builtin.kind, builtin.translation, src=direction[0], tgt=direction[1])
    tasks = [load_task(n, choice_format=cfg.choice_format, skip_bad_rows=cfg.skip_bad_rows) for n in names]
    if cfg.shots_file:
        if not cfg.shots:
            raise UserError(f"--shots-file {cfg.shots_file}: give --shots K, the number of shots to draw from it")
        pool = read_task_file(cfg.shots_file, choice_format=cfg.choice_format)
        for task in [pool, *tasks]:
            if task.kind == "perplexity" or task.kind != pool.kind:
                raise UserError(
                    f"--shots-file {cfg.shots_file}: {pool.kind} rows; shots are for choice and generation tasks of "
                    f"the same kind, and {task.name} is a {task.kind} task"
                )
        for task in tasks:
            task.shots = pool.items
    check_shots(tasks, cfg.shots)
    for task in tasks:
        if direction:
            check_translator(task, settings, src=direction[0], tgt=direction[1])
        check(task, settings, max_seq_len=max_seq_len, translator=direction is not None)
    run = load_run(cfg.model)
    for name, corpus in skipped.items():
        console.print(f"[yellow]skipped[/yellow] {name}: {corpus} is not fetched yet (`lmforge data fetch {corpus}`)")
    results = []
    for task in tasks:
        console.print(f"[bold]{task.name}[/bold]: {len(task.items[: cfg.limit or None])} rows ({task.source})")
        results.append(evaluate_task(run, task, settings))
    if cfg.output:
        skips = {"skipped": {name: f"{corpus} is not fetched" for name, corpus in skipped.items()}} if skipped else {}
        write_json(cfg.output, {"model": cfg.model, "results": results, **skips, "definitions": DEFINITIONS})
    return results


def _lm_table(cfg: Config, results: list[dict]) -> None:
    keys = ("perplexity", "perplexity_per_char", "acc", "acc_norm", "chance", "bleu", "chrf", "exact_match")
    rows = []
    for result in results:
        for key in keys:
            if key in result:
                err = result.get(f"{key}_stderr")
                value = f"{result[key]:.4f}" + (f" ± {err:.4f}" if err is not None and err == err else "")
                rows.append([result["task"], key, value, str(result["rows"]), f"{result['seconds']:.1f}"])
    print_table(f"{cfg.model}", ["task", "metric", "score", "rows", "seconds"], rows)


LM_ONLY = (
    "shots",
    "shots_file",
    "seed",
    "window",
    "stride",
    "batch_size",
    "max_new_tokens",
    "chat_template",
    "choice_format",
)
"""The settings of language-model tasks, which --data (a classify / NER run on labelled rows) has no use for."""


def run(cfg: Config) -> None:
    chosen = [flag for flag, given in (("--data", cfg.data), ("--task", cfg.task), ("--suite", cfg.suite)) if given]
    if len(chosen) != 1:
        raise UserError(
            "give exactly one of --data (a classify / NER run's labelled file), --task (language-model tasks) or "
            f"--suite (every built-in language-model task); got {' and '.join(chosen) or 'none'}"
        )
    if cfg.data and cfg.limit is not None and cfg.limit < 1:  # --task / --suite: checked with their settings
        raise UserError(f"--limit {cfg.limit}: must be 1 or more")
    defaults = {f.name: f.default for f in dataclasses.fields(Config)}
    ignored = [f"--{name.replace('_', '-')}" for name in LM_ONLY if cfg.data and getattr(cfg, name) != defaults[name]]
    if ignored:
        raise UserError(
            f"{', '.join(ignored)}: settings of language-model tasks (--task, --suite); --data scores a classify / "
            "NER run on labelled rows and takes --limit, --output and --skip-bad-rows"
        )
    if cfg.data is None:
        results = evaluate_lm(cfg)
        _lm_table(cfg, results)
        if cfg.output:
            console.print(f"[green]wrote[/green] {cfg.output}")
        return
    metrics = evaluate(cfg)
    scalars = [[k, f"{v:.4f}"] for k, v in metrics.items() if isinstance(v, float)]
    print_table(f"{cfg.model} on {cfg.data}", ["metric", "score"], scalars)
    if cfg.output:
        console.print(f"[green]wrote[/green] {cfg.output}")
