"""The pretraining recipe (``lmforge pretrain``): tokenizer, shards, model, fit, model directory.

Objectives: ``mlm`` / ``wwm-mlm`` (BERT), ``clm`` (GPT) and ``electra`` (a BERT discriminator trained
with a small generator, ``tasks/electra.py``; the discriminator is what the model directory holds).

``pretrain`` runs the whole pretraining pipeline into one run directory: it trains a tokenizer
when none is given (WordPiece for BERT objectives, byte-level BPE for GPT), prepares or reuses the
token shards, builds the model from a named size plus overrides, calls ``train.loop.fit`` and
finally writes the chosen weights (best validation loss) as a normal lmforge model directory
(config.json + model.safetensors + tokenizer files) with a report.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from lmforge.data.shards import PrepareConfig, prepare
from lmforge.data.tokenizer import copy_tokenizer_files, load_tokenizer, save_tokenizer, train_tokenizer
from lmforge.errors import UserError
from lmforge.files import atomic_write, write_json, write_text, write_yaml
from lmforge.models.bert import Bert, BertConfig
from lmforge.models.electra import Electra
from lmforge.models.registry import WEIGHTS_FILE, config_json, read_safetensors, save_model
from lmforge.models.sizes import model_size
from lmforge.rundir.layout import check_output_dir, is_training_run
from lmforge.runs.config import PretrainConfig
from lmforge.runs.session import run_session
from lmforge.tasks import task_entry
from lmforge.train import checkpoint, distributed
from lmforge.train.logging import read_metrics
from lmforge.train.loop import fit


def _tokenizer_dir(cfg: PretrainConfig, run_dir: Path, d: distributed.Dist) -> Path:
    if cfg.data.tokenizer:
        return Path(cfg.data.tokenizer)
    target = run_dir / "tokenizer"
    if d.is_main and not (target / "tokenizer.json").is_file():
        from lmforge.data.readers import corpus_texts

        kind = "bpe" if task_entry(cfg.task).model == "gpt" else "wordpiece"
        tok = train_tokenizer(
            lambda: corpus_texts(cfg.data.input, jsonl_field=cfg.data.jsonl_field),
            kind=kind,
            vocab_size=cfg.data.vocab_size,
            cjk_characters=cfg.data.cjk_characters,
        )
        save_tokenizer(tok, target, model_max_length=cfg.data.seq_len)
    distributed.barrier(d)
    return target


def prepare_corpus(cfg: PretrainConfig, run_dir: Path, d: distributed.Dist) -> tuple[Path, Path]:
    """The tokenizer directory and the token shards of ``cfg`` (trained / prepared when missing)."""
    tok_dir = _tokenizer_dir(cfg, run_dir, d)
    shards = Path(cfg.data.shards or run_dir / "data")
    if d.is_main:
        prepare(
            PrepareConfig(
                input=cfg.data.input,
                tokenizer=str(tok_dir),
                out=str(shards),
                jsonl_field=cfg.data.jsonl_field,
                val_fraction=cfg.data.val_fraction,
                whole_word=task_entry(cfg.task).whole_word,
            ),
            progress=cfg.training.progress,
        )
    distributed.barrier(d)
    return tok_dir, shards


def build_objective(cfg: PretrainConfig, tok, shards: Path):
    """The freshly initialised model (seeded by ``train.seed``) and the task of ``cfg``'s objective."""
    model_cfg = cfg.model.build(tok.vocab_size)
    if model_cfg.max_seq_len < cfg.data.seq_len:
        raise UserError(f"data.seq_len={cfg.data.seq_len} exceeds the model's max_seq_len={model_cfg.max_seq_len}")
    torch.manual_seed(cfg.training.seed)
    entry = task_entry(cfg.task, kind="pretrain")
    task_cls = entry.load()
    model = task_cls.pretraining_model(model_cfg, cfg.electra)
    if isinstance(model, Bert) and model.pooler is not None:
        # MLM without next-sentence prediction never uses the pooler: freeze it so DDP does not wait for
        # gradients that never come (it stays at its initialisation, as in RoBERTa-style pretraining).
        model.pooler.requires_grad_(False)
    task = task_cls.for_pretraining(cfg, tok, shards, entry)
    return model, task


def pretrain(cfg: PretrainConfig) -> dict:
    run_dir = check_output_dir(cfg.out, reusable=is_training_run)
    wants_gpt = task_entry(cfg.task, kind="pretrain", where="task").model == "gpt"
    if wants_gpt != (not isinstance(model_size(cfg.model.size), BertConfig)):
        raise UserError(
            f"task={cfg.task!r} needs a {'GPT' if wants_gpt else 'BERT'} size; model.size={cfg.model.size!r}"
        )
    with run_session(run_dir, resume=cfg.resume, device=cfg.training.device) as d:
        if d.is_main:
            write_yaml(run_dir / "config.yaml", cfg)
        tok_dir, shards = prepare_corpus(cfg, run_dir, d)
        model, task = build_objective(cfg, load_tokenizer(tok_dir), shards)
        summary = fit(model, task, cfg.training, run_dir=run_dir, resume=cfg.resume, write_results=False)
        if d.is_main:
            _write_model_dir(run_dir, model, summary, tok_dir)
    return summary


def _write_model_dir(run_dir: Path, model, summary: dict, tok_dir: Path) -> None:
    """The best (else last) checkpoint's weights as the run directory's model directory (for ELECTRA:
    the discriminator, a normal BERT that `lmforge finetune` loads)."""
    # From the checkpoint file, not the live model: under FSDP its parameters are sharded DTensors.
    chosen = checkpoint.best_or_last(run_dir, summary.get("best_step"))
    if isinstance(model, Electra):
        tensors = read_safetensors(chosen / WEIGHTS_FILE)
        discriminator = Bert(model.cfg)
        prefix = "discriminator."
        discriminator.load_state_dict({k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)})
        save_model(discriminator, run_dir)
    else:
        with atomic_write(run_dir / WEIGHTS_FILE) as tmp:
            shutil.copyfile(chosen / WEIGHTS_FILE, tmp)
        write_json(run_dir / "config.json", config_json(model.cfg))
    copy_tokenizer_files(tok_dir, run_dir)
    summary = {**summary, "model_weights": f"{checkpoint.STATE_DIR}/{chosen.name}"}
    write_json(run_dir / "results.json", summary)
    _write_report(run_dir, summary)


def _write_report(run_dir: Path, s: dict) -> None:
    best = "-" if s["best_val_loss"] is None else f"{s['best_val_loss']:.4f} (step {s['best_step']})"
    evals = [r for r in read_metrics(run_dir) if r["kind"] == "eval"]
    last_eval = "-"
    if evals:
        shown = {k: v for k, v in evals[-1].items() if k not in ("kind", "step")}
        last_eval = f"step {evals[-1]['step']}: " + ", ".join(f"{k} {v:.4g}" for k, v in shown.items())
    lines = [
        f"# Pretraining run `{run_dir.name}`",
        "",
        "| measure | value |",
        "|---|---|",
        f"| steps | {s['steps']:,} |",
        f"| tokens seen | {s['tokens']:,} |",
        f"| wall time | {s['seconds'] / 60:.1f} min |",
        f"| tokens/s | {s['tokens_per_s']:,.0f} |",
        f"| training FLOPs | {s['train_flops']:.3g} |",
        f"| MFU | {100 * s['mfu']:.1f}% of {s['peak_flops_per_s'] / 1e9:,.0f} GFLOP/s measured peak |",
        f"| best validation loss | {best} |",
        f"| last evaluation | {last_eval} |",
        f"| skipped non-finite steps | {s['skipped_steps']} |",
        f"| weights in this directory | {s['model_weights']} |",
        "",
        "![loss](loss.png)",
        "",
        "![learning rate](lr.png)",
        "",
        "Definitions: loss is the mean cross-entropy in nats per predicted token (masked tokens for MLM, next",
        "tokens for CLM); perplexity = exp(loss); training FLOPs count forward + backward (3x forward) matmul FLOPs",
        "including attention scores; MFU = FLOPs per second / measured peak matmul FLOPs per second.",
    ]
    write_text(run_dir / "report.md", "\n".join(lines) + "\n")
