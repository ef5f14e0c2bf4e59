"""``lmforge demo`` (``make demo``): the whole pipeline on real Chinese data, with baselines side by side.

Train a WordPiece tokenizer and pretrain a tiny BERT (masked LM) on ``pretrain-zh``, fine-tune it
on ``reviews-sentiment`` and ``peoples-daily-ner``, fine-tune the same architecture from random
initialisation (what pretraining buys), run the TF-IDF + SVM and dictionary baselines, and
score everything on the test splits with the same metric code. Every stage is the public
command's function (``pretrain``, ``finetune``), so the demo exercises exactly what users run.

The demo is deterministic: every stage's budget is steps or epochs, never wall time, so two runs
give the same metrics and a slower machine takes longer instead of stopping early. The budgets were
chosen to finish within ``Budget.planned_minutes`` on the slower of the 2-core machines we have seen;
the demo records its wall time and warns when it ran slower than planned (``slower_than_planned``).
Output: ``OUT/results.json`` (every metric, wall times, tokens/s), ``OUT/report.md`` and each
stage's own run directory.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from lmforge.data.builtin import first_examples, load_builtin
from lmforge.files import write_json, write_text
from lmforge.metrics import DEFINITIONS
from lmforge.rundir.convert import convert_builtin
from lmforge.runs.config import BUILTIN_FINETUNES, DemoConfig, ModelSpec, PretrainConfig, PretrainData
from lmforge.runs.finetune import finetune
from lmforge.runs.pretrain import pretrain
from lmforge.runs.session import holds_out_dir
from lmforge.tasks import TASKS, FileFormat, resolve
from lmforge.train.config import TrainConfig, loop_defaults
from lmforge.train.optim import OptimConfig

STAGE_DIRS = ("pretrain", *BUILTIN_FINETUNES, "e5-small")
E5 = "e5-small"  # the system name of the built-in multilingual-e5-small rows


@dataclass(frozen=True)
class Budget:
    """Steps and epochs of each stage; the result depends on these only, never on the machine's speed."""

    size: str
    pretrain_steps: int
    classify_epochs: float
    ner_epochs: float
    planned_minutes: float
    """The planned wall time of the whole demo on the slower machine kind we have seen (2-core AMD EPYC, ~24k MLM
    tokens/s for bert-tiny with the bigram table): the demo warns when it runs longer."""
    seq_len: int = 128


@dataclass(frozen=True)
class PretrainRecipe:
    """How the demo pretrains its BERT: the model's options and the masked LM's settings (the ablation's arms,
    ``bench/pretrain_ablation.py``)."""

    model: ModelSpec
    mask_prob: float = 0.15
    lr: float = 2e-3
    warmup_steps: int = 100
    schedule: str = "cosine"
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    batch: int = 64


# The recipe before the ablation: post-LN BERT, 15% masking, lr 2e-3 with a cosine decay to 10%, clipping at 1.0.
BASELINE_RECIPE = PretrainRecipe(model=ModelSpec(size="bert-tiny", dropout=0.0))
# The demo's: the baseline plus hashed character-bigram input embeddings, the one change of the ablation that paid
# off (bench/pretrain_ablation.py; docs/FINDINGS.md "From-scratch pretraining"): it lifts the masked LM off its
# unigram plateau (masked accuracy 24% vs 14% at step 1,000) and NER dev F1 from 0.775 to 0.891 (sentiment dev
# 0.836 -> 0.846). Pre-LN, GEGLU, no biases and the decay-to-0 schedule on top of it ("all-mask15") tied with it on
# dev (1.7375 vs 1.7363 summed over both tasks, within the seed-to-seed spread), and the ablation's rule then takes
# the recipe with fewer changes; 30% masking cost 1.6x per pretraining step and gave nothing on dev.
DEMO_RECIPE = dataclasses.replace(
    BASELINE_RECIPE, model=dataclasses.replace(BASELINE_RECIPE.model, bigram_buckets=16384)
)

# bert-tiny (2 x 128): on 2 cores it trains ~5x faster than bert-mini (54k vs 11k tokens/s in MLM), and
# within minutes more epochs beat more capacity (shared/FINDINGS.md "Fine-tuning on 2 cores"). The ablation
# pretrained for 1,500 steps; with them the demo took 16.0 min on the slower 2-core machine (tokenizer +
# pretraining 8.6, four fine-tunings 7.0), so the default pretrains for 1,200 (14.6 min measured there) and NER
# gets 2 epochs (the ablation's fine-tuning had 3).
BUDGETS = {
    "default": Budget("bert-tiny", 1200, 3.0, 2.0, planned_minutes=15.0),
    # 400 steps, not fewer: an MLM stopped in its first ~200 steps has collapsed representations (every token
    # state nearly the same) and fine-tunes worse than random initialisation (FINDINGS.md).
    "quick": Budget("bert-tiny", 400, 0.3, 0.15, planned_minutes=3.0, seq_len=64),
}


def training(*, lr: float, batch: int, seed: int, progress: bool) -> TrainConfig:
    """The demo's training settings for a stage (linear schedule, 30 warm-up steps, no mid-run checkpoints)."""
    return loop_defaults(
        batch=batch,
        every=0,
        log_every=10,
        lr=lr,
        warmup=30,
        schedule="linear",
        keep_last=1,
        seed=seed,
        progress=progress,
    )


def pretrain_config(
    recipe: PretrainRecipe,
    *,
    out: Path,
    steps: int,
    seq_len: int,
    seed: int,
    inputs: list[str],
    progress: bool,
    tokenizer: str | None = None,
    shards: str | None = None,
    eval_every: int = 0,
) -> PretrainConfig:
    """Masked-LM pretraining of ``recipe`` for ``steps`` steps of ``recipe.batch`` x ``seq_len`` tokens.

    ``eval_every``: validation every N steps (0 = at the end only). Evaluation draws no training randomness, so
    it changes the weights only when an earlier evaluation beats the last (the best checkpoint is kept); the demo
    evaluates at the end only (each evaluation reads 1,600 validation sequences).
    """
    optim = OptimConfig(
        lr=recipe.lr,
        warmup_steps=recipe.warmup_steps,
        warmup_share=0.2,  # a short --pretrain-steps run warms up for a fifth of its steps
        schedule=recipe.schedule,  # type: ignore[arg-type]
        min_lr_ratio=recipe.min_lr_ratio,
    )
    train = dataclasses.replace(
        training(lr=recipe.lr, batch=recipe.batch, seed=seed, progress=progress),
        max_steps=steps,
        micro_batch_size=min(32, recipe.batch),
        eval_every=eval_every,
        grad_clip=recipe.grad_clip,
        optim=optim,
    )
    return PretrainConfig(
        out=str(out),
        task="mlm",
        model=recipe.model,
        data=PretrainData(input=inputs, seq_len=seq_len, vocab_size=21128, tokenizer=tokenizer, shards=shards),
        training=train,
        mask_prob=recipe.mask_prob,
    )


@holds_out_dir
def run_demo(cfg: DemoConfig) -> dict:
    """Run every stage; returns (and writes) results.json's content."""
    budget = BUDGETS["quick" if cfg.quick else "default"]
    if cfg.pretrain_steps:
        budget = dataclasses.replace(budget, pretrain_steps=cfg.pretrain_steps)
    out = Path(cfg.out)
    for name in STAGE_DIRS:
        shutil.rmtree(out / name, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    wall: dict[str, float] = {}
    speed: dict[str, float] = {}

    t = time.perf_counter()
    pre = pretrain(
        pretrain_config(
            DEMO_RECIPE,
            out=out / "pretrain",
            steps=budget.pretrain_steps,
            seq_len=budget.seq_len,
            seed=cfg.seed,
            inputs=pretrain_inputs(out, cfg.limit),
            progress=cfg.progress,
        )
    )
    wall["tokenizer+pretrain"] = round(time.perf_counter() - t, 1)
    speed["pretrain"] = pre["tokens_per_s"]
    if cfg.with_e5:
        t = time.perf_counter()
        convert_builtin("multilingual-e5-small", out / E5 / "model", trim_inputs=pretrain_inputs(out, cfg.limit))
        wall[f"{E5}/convert"] = round(time.perf_counter() - t, 1)
    tasks = {data: _finetune_corpus(cfg, budget, out, data, wall, speed) for data in BUILTIN_FINETUNES}
    wall["total"] = round(time.perf_counter() - started, 1)
    summary = {
        "tasks": tasks,
        "pretraining": {k: pre[k] for k in ("steps", "tokens", "tokens_per_s", "best_val_loss", "mfu", "seconds")},
        "wall_seconds": wall,
        "tokens_per_s": speed,
        "budget": {**dataclasses.asdict(budget), "mode": "quick" if cfg.quick else "default", "limit": cfg.limit},
        "recipe": dataclasses.asdict(DEMO_RECIPE),
        "slower_than_planned": wall["total"] > 60 * budget.planned_minutes,
        "definitions": DEFINITIONS,
    }
    write_json(out / "results.json", summary)
    write_text(out / "report.md", report(summary))
    return summary


def _finetune_corpus(
    cfg: DemoConfig, budget: Budget, out: Path, data: str, wall: dict[str, float], speed: dict[str, float]
) -> dict[str, dict]:
    """The demo's systems on one built-in corpus: the pretrained BERT, the same from scratch, e5-small (with
    ``--with-e5``) and the baseline; their scores, with wall times and speeds added to ``wall`` / ``speed``."""
    plan = BUILTIN_FINETUNES[data]
    splits = first_examples(load_builtin(data), cfg.limit)
    configs = {init: _finetune_config(cfg, budget, out, data, init, splits) for init in ("pretrained", "scratch")}
    if cfg.with_e5:
        configs[E5] = _e5_finetune_config(cfg, out, data, splits)
    results: dict[str, dict] = {}
    for system, config in configs.items():
        t = time.perf_counter()
        run = finetune(config, plan.task).to_json()
        wall[f"{data}/{system}"] = round(time.perf_counter() - t, 1)
        speed[f"{data}/{system}"] = run["training"]["tokens_per_s"]
        results[system] = {"dev": run["dev"], "test": run["test"], "steps": run["training"]["steps"]}
    t = time.perf_counter()
    results[plan.baseline] = {"test": resolve(plan.baseline_fn)(splits["train"], splits["test"])}
    wall[f"{data}/{plan.baseline}"] = round(time.perf_counter() - t, 1)
    return results


def pretrain_inputs(out: Path, limit: int) -> list[str]:
    """The pretraining corpus: ``pretrain-zh``, or for smoke tests (``limit``) a small sample file in ``out``."""
    if not limit:
        return ["builtin:pretrain-zh"]
    texts = [ex["text"] for ex in load_builtin("pretrain-zh")["train"][: limit * 10]]
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "pretrain-sample.txt", "\n".join(texts) + "\n")
    return [str(out / "pretrain-sample.txt")]


def _finetune_config(cfg: DemoConfig, budget: Budget, out: Path, data: str, init: str, splits: dict):
    return finetune_config(
        out=out / data / init,
        model=str(out / "pretrain"),
        data=data,
        init=init,
        epochs=getattr(budget, BUILTIN_FINETUNES[data].epochs),
        max_len=budget.seq_len,
        seed=cfg.seed,
        progress=cfg.progress,
        splits=splits if cfg.limit else None,
    )


def _e5_finetune_config(cfg: DemoConfig, out: Path, data: str, splits: dict):
    """multilingual-e5-small fine-tuned as configs/classify/e5-small-reviews.yaml and configs/ner/e5-small-peoples-
    daily.yaml do (precision auto, lr 1e-4, mean pooling / CRF), one epoch each, dropout at the checkpoint's 0.1."""
    config = finetune_config(
        out=out / E5 / data,
        model=str(out / E5 / "model"),
        data=data,
        init="pretrained",
        epochs=1.0,
        max_len=128,
        seed=cfg.seed,
        progress=cfg.progress,
        splits=splits if cfg.limit else None,
        lr=1e-4,
    )
    training = dataclasses.replace(config.training, precision="auto")
    extra = dict(BUILTIN_FINETUNES[data].e5)
    return dataclasses.replace(config, dropout=None, training=training, **extra)


def finetune_config(
    *,
    out: Path,
    model: str,
    data: str,
    init: str,
    epochs: float,
    max_len: int,
    seed: int,
    progress: bool,
    splits: dict | None = None,
    lr: float | None = None,
):
    """The demo's fine-tuning of ``model`` on the built-in corpus ``data`` (classify: lr 1e-3, ner: 2e-3 unless
    ``lr``; batch 32, no dropout). ``splits`` (limited copies, for smoke tests) go through files, as a user's would."""
    entry = TASKS[BUILTIN_FINETUNES[data].task]
    lr = lr or BUILTIN_FINETUNES[data].lr
    common = dict(
        out=str(out),
        model=model,
        init=init,
        epochs=epochs,
        dropout=0.0,
        max_len=max_len,
        training=training(lr=lr, batch=32, seed=seed, progress=progress),
    )
    if splits is not None:
        common.update(_write_splits(out.parent / "data", splits, entry.files))
    else:
        common["data"] = f"builtin:{data}"
    return entry.load_config()(**common)


def _write_splits(directory: Path, splits: dict, files: FileFormat) -> dict[str, str]:
    """The splits as the files a user would bring, in the task's format."""
    written = {}
    for split, examples in splits.items():
        path = directory / f"{split}{files.suffix}"
        resolve(files.writer)(path, examples)
        written[split] = str(path)
    return written


def report(summary: dict) -> str:
    """report.md: the side-by-side table, wall times, and the stages' plots."""
    sent, ner = summary["tasks"]["reviews-sentiment"], summary["tasks"]["peoples-daily-ner"]
    e5 = [E5] if E5 in sent else []
    lines = ["# lmforge demo", "", "Test-split scores (same metric code for every system).", ""]
    header = [
        "task",
        "metric",
        "pretrained BERT",
        "same BERT from scratch",
        *(["multilingual-e5-small"] if e5 else []),
        "baseline",
    ]
    lines += ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for key in ("accuracy", "macro_f1"):
        row = [sent[s]["test"][key] for s in ("pretrained", "scratch", *e5, "tfidf-svm")]
        lines.append(f"| reviews-sentiment | {key} | " + " | ".join(f"{v:.4f}" for v in row) + " (TF-IDF + SVM) |")
    for key in ("f1", "precision", "recall"):
        row = [ner[s]["test"][key] for s in ("pretrained", "scratch", *e5, "dictionary")]
        lines.append(f"| peoples-daily-ner | entity {key} | " + " | ".join(f"{v:.4f}" for v in row) + " (dictionary) |")
    for kind in ner["pretrained"]["test"]["per_type"]:
        systems = ("pretrained", "scratch", *e5, "dictionary")
        row = [ner[s]["test"]["per_type"].get(kind, {}).get("f1", 0.0) for s in systems]
        lines.append(f"| peoples-daily-ner | {kind} F1 | " + " | ".join(f"{v:.4f}" for v in row) + " (dictionary) |")
    p = summary["pretraining"]
    loss = "-" if p["best_val_loss"] is None else f"{p['best_val_loss']:.4f}"
    lines += [
        "",
        f"Pretraining: {p['steps']} steps, {p['tokens']:,} tokens at {p['tokens_per_s']:,.0f} tokens/s, "
        f"best validation MLM loss {loss} (see pretrain/report.md).",
        "",
    ]
    total, planned = summary["wall_seconds"]["total"] / 60, summary["budget"]["planned_minutes"]
    lines.append(f"Wall time {total:.1f} min (planned: at most {planned:g} min on a 2-core CPU).")
    if summary["slower_than_planned"]:
        lines.append("This machine ran slower than planned; the metrics are the same (budgets are steps and epochs).")
    lines += ["", "| stage | wall seconds | tokens/s |", "|---|---|---|"]
    speed = summary["tokens_per_s"]
    for stage, seconds in summary["wall_seconds"].items():
        rate = speed.get(stage, speed.get("pretrain") if stage == "tokenizer+pretrain" else None)
        lines.append(f"| {stage} | {seconds} | {'-' if rate is None else f'{rate:,.0f}'} |")
    lines += ["", "## Curves and errors", "", "![pretraining loss](pretrain/loss.png)", ""]
    for data in BUILTIN_FINETUNES:
        lines += [f"![{data} loss](./{data}/pretrained/loss.png)", ""]
    lines += ["![sentiment confusion matrix](reviews-sentiment/pretrained/confusion.png)", ""]
    lines += ["NER error table (pretrained, test): see peoples-daily-ner/pretrained/report.md.", ""]
    lines += ["Definitions of every metric: `definitions` in results.json."]
    return "\n".join(lines) + "\n"
