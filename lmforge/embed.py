"""The ``lmforge finetune embed`` and ``lmforge embed`` commands (SimCSE sentence embeddings, ``tasks/embedding.py``).

``finetune embed`` trains a pretrained lmforge BERT with SimCSE through ``train.loop.fit`` and
keeps the checkpoint with the best dev score (k-NN accuracy on labelled dev texts, Spearman on
scored pairs, else alignment + uniformity); it evaluates before and after, so what SimCSE buys is
in results.json. With ``--data builtin:reviews-sentiment`` the training texts are the reviews
without their labels (unsupervised), the dev reviews are scored by k-NN sentiment accuracy
against 2,000 labelled training reviews.

```
RUN_DIR/config.json + model.safetensors + tokenizer   the encoder (a normal lmforge BERT)
RUN_DIR/task.json                                      pooling, max_len: how to turn it into vectors
RUN_DIR/results.json, report.md, loss.png
```

``embed`` writes ``OUT.npy`` (float32, one L2-normalised row per input) and ``OUT.ids.txt`` (each
row's ``id`` field, else its file:line).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from lmforge.config import check_range, read_json_object, write_json, write_yaml
from lmforge.data.readers import check_output_file, read_labelled
from lmforge.data.tokenizer import copy_tokenizer_files, load_tokenizer
from lmforge.finetune import TASK_FILE, load_encoder_weights, load_splits, skipped_rows, training_for_epochs
from lmforge.metrics import DEFINITIONS
from lmforge.models.bert import Bert, BertConfig
from lmforge.models.registry import load_model, read_config, save_model
from lmforge.tasks.embedding import EmbeddingTask
from lmforge.train import checkpoint
from lmforge.train.config import TrainConfig
from lmforge.train.loop import fit
from lmforge.train.optim import OptimConfig
from lmforge.train.rundir import run_session

INDEX_SIZE = 2000  # labelled training texts that k-NN evaluation searches


def _embed_training() -> TrainConfig:
    return TrainConfig(
        max_steps=500, global_batch_size=64, micro_batch_size=64, eval_every=100, save_every=100, log_every=10,
        optim=OptimConfig(lr=3e-5, warmup_steps=0, schedule="linear", min_lr_ratio=0.0, weight_decay=0.0),
    )  # fmt: skip


@dataclass
class EmbedTrainConfig:
    """Fine-tune a BERT into a sentence embedder with SimCSE (unsupervised: texts; supervised: text pairs)."""

    out: str
    """Run directory."""
    model: str
    """Pretrained lmforge BERT directory."""
    data: str | None = None
    """builtin:reviews-sentiment (labels unused in training; dev scored by k-NN sentiment accuracy)."""
    train: str | None = None
    """.txt (one sentence per line), or .jsonl / .csv / .tsv with text[, text_pair, negative]."""
    dev: str | None = None
    """Dev file: text + label (k-NN accuracy), or text + text_pair + score (Spearman)."""
    test: str | None = None
    """Test file like --dev, evaluated once at the end."""
    skip_bad_rows: bool = False
    """Skip malformed rows instead of stopping at the first."""
    mode: Literal["unsup", "sup"] = "unsup"
    """unsup: each text against itself under dropout; sup: text against text_pair (and negative)."""
    pooling: Literal["cls", "mean"] = "cls"
    """Sentence vector: the first token's hidden state, or the mean over real tokens."""
    temperature: float = 0.05
    """InfoNCE temperature."""
    max_len: int = 64
    """Longest text in tokens, with [CLS] and [SEP]."""
    dropout: float = 0.1
    """Encoder dropout: the noise that makes unsupervised SimCSE's two views differ."""
    epochs: float = 0.0
    """Training epochs (sets training.max_steps); 0 = use training.max_steps."""
    training: TrainConfig = field(default_factory=_embed_training)
    resume: str | None = None
    """Continue the run in this directory from its last checkpoint."""

    def __post_init__(self) -> None:
        check_range("epochs", self.epochs, at_least=0)
        check_range("max_len", self.max_len, at_least=3)  # [CLS], at least one token, [SEP]
        check_range("dropout", self.dropout, at_least=0, below=1)


def _read(path: str, *, skip_bad_rows: bool):
    return read_labelled(path, skip_bad_rows=skip_bad_rows, need_label=False)


def _splits(cfg: EmbedTrainConfig) -> tuple[dict[str, list[dict]], list, list[dict]]:
    """(splits, read reports, k-NN index examples: labelled training texts)."""
    splits, reports = load_splits(cfg, "classify", _read)
    index = [ex for ex in splits["train"] if "label" in ex][:INDEX_SIZE]
    if cfg.data:  # a built-in labelled corpus: SimCSE trains on its texts, never on their labels
        splits = {**splits, "train": [{"text": ex["text"]} for ex in splits["train"]]}
    return splits, reports, index


def finetune_embed(cfg: EmbedTrainConfig) -> dict:
    """Evaluate, fine-tune with SimCSE, keep the best dev checkpoint, evaluate again; returns results.json."""
    started = time.perf_counter()
    run_dir = Path(cfg.out)
    with run_session(run_dir, resume=bool(cfg.resume), device=cfg.training.device) as d:
        splits, reports, index = _splits(cfg)
        base = read_config(cfg.model)
        if not isinstance(base, BertConfig):
            raise ValueError(f"--model {cfg.model}: sentence embeddings need a BERT-family model")
        if cfg.max_len > base.max_seq_len:
            raise ValueError(f"max_len={cfg.max_len} exceeds the model's max_seq_len={base.max_seq_len}")
        encoder = Bert(dataclasses.replace(base, mlm_head=False, pooler=False, dropout=cfg.dropout,
                                           attn_dropout=cfg.dropout))  # fmt: skip
        load_encoder_weights(encoder, cfg.model)
        task = EmbeddingTask(
            load_tokenizer(cfg.model), mode=cfg.mode, pooling=cfg.pooling, temperature=cfg.temperature,
            max_len=cfg.max_len, train_examples=splits["train"], dev_examples=splits["dev"], index_examples=index,
        )  # fmt: skip
        training = training_for_epochs(cfg.training, cfg.epochs, len(task.train_items))
        if d.is_main:
            write_yaml(run_dir / "config.yaml", cfg)
        before = {
            s: task.evaluate(encoder, device=d.device, examples=splits[s]) for s in ("dev", "test") if splits.get(s)
        }
        summary = fit(encoder, task, training, run_dir=run_dir, resume=bool(cfg.resume))
        results: dict = {}
        if d.is_main:
            chosen = checkpoint.load_best(encoder, run_dir, summary.get("best_step"))
            save_model(encoder, run_dir)
            copy_tokenizer_files(cfg.model, run_dir)
            write_json(run_dir / TASK_FILE, task.settings())
            results = {s: task.evaluate(encoder, device=d.device, examples=splits[s]) for s in before}
            results.update(
                task="embed", model=cfg.model, before_finetuning=before, selection=task.selection[0],
                weights=f"{checkpoint.STATE_DIR}/{chosen.name}",
                data={"source": cfg.data or {s: getattr(cfg, s) for s in ("train", "dev", "test") if getattr(cfg, s)},
                      "examples": {s: len(v) for s, v in splits.items()}, "knn_index": len(index),
                      "truncated": dict(task.truncated), "skipped_rows": skipped_rows(reports)},
                training=summary, definitions=DEFINITIONS, wall_seconds=round(time.perf_counter() - started, 2),
            )  # fmt: skip
            write_json(run_dir / "results.json", results)
            _write_report(run_dir, results)
    return results


def _write_report(run_dir: Path, r: dict) -> None:
    keys = [k for k in ("knn_accuracy", "spearman", "alignment", "uniformity") if k in r.get("dev", {})]
    lines = [f"# SimCSE run `{run_dir.name}` (from {r['model']})", "",
             "| split | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]  # fmt: skip
    for split in ("dev", "test"):
        for label, m in ((f"{split}, before", r["before_finetuning"].get(split)), (split, r.get(split))):
            if m:
                lines.append(f"| {label} | " + " | ".join(f"{m[k]:.4f}" for k in keys) + " |")
    t = r["training"]
    lines += ["", f"Training: {t['steps']} steps in {t['seconds'] / 60:.1f} min; weights: {r['weights']}; "
              f"checkpoint chosen by dev {r['selection']}.", "", "![loss](loss.png)", ""]  # fmt: skip
    (run_dir / "report.md").write_text("\n".join(lines), encoding="utf-8")


@dataclass
class EmbedConfig:
    """Embed texts with a run directory from `lmforge finetune embed` (or any lmforge BERT: first-token vectors)."""

    model: str
    """Run directory (or a BERT model directory)."""
    input: str
    """.txt (one text per line), or .jsonl / .csv / .tsv with a 'text' field (and optionally 'id')."""
    output: str
    """Output prefix: writes OUTPUT.npy (float32, L2-normalised rows) and OUTPUT.ids.txt."""
    batch_size: int = 64
    """Texts per forward pass."""
    skip_bad_rows: bool = False
    """Skip malformed rows instead of stopping at the first."""


def load_embedder(model_dir: str | Path, *, batch_size: int = 64) -> tuple[EmbeddingTask, Bert]:
    """(task, model) that embed texts: a SimCSE run directory (its pooling and max_len) or any lmforge BERT
    (first-token vectors); the model in eval mode on the CPU."""
    model = load_model(model_dir)
    if not isinstance(model, Bert):
        raise ValueError(f"{model_dir}: embeddings come from a BERT-family model directory")
    settings_path = Path(model_dir) / TASK_FILE
    settings = read_json_object(settings_path, what="task file") if settings_path.is_file() else {}
    if settings and settings.get("task") != "embed":
        raise ValueError(f"{settings_path}: task {settings.get('task')!r} is not 'embed'")
    task = EmbeddingTask(load_tokenizer(model_dir), pooling=settings.get("pooling", "cls"),
                         max_len=settings.get("max_len", min(128, model.cfg.max_seq_len)),
                         eval_batch_size=batch_size)  # fmt: skip
    return task, model.eval()


def embed_command(cfg: EmbedConfig) -> tuple[Path, int]:
    """Write the vectors and ids; returns the .npy path and the number of rows."""
    for suffix in (".npy", ".ids.txt"):
        check_output_file(cfg.output + suffix, inputs=[cfg.input])
    task, model = load_embedder(cfg.model, batch_size=cfg.batch_size)
    examples, _ = _read(cfg.input, skip_bad_rows=cfg.skip_bad_rows)
    vectors = task.vectors(model, [ex["text"] for ex in examples], device=torch.device("cpu"))
    out = Path(cfg.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    target = out.with_name(out.name + ".npy")
    tmp = out.with_name(out.name + ".tmp.npy")
    np.save(tmp, vectors)
    tmp.replace(target)
    ids = [ex.get("id", ex["source"]) for ex in examples]
    out.with_name(out.name + ".ids.txt").write_text("\n".join(ids) + "\n", encoding="utf-8")
    return target, len(examples)
