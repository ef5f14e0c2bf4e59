"""The ``lmforge finetune translate`` and ``lmforge translate`` commands.

``finetune translate`` trains the encoder-decoder of ``models/seq2seq.py`` on sentence pairs through
``train.loop.fit``: a shared byte-level BPE vocabulary is trained on both sides of the training
pairs (or a tokenizer is given); with ``--encoder BERT_DIR`` the encoder is warm-started from a
pretrained lmforge BERT and keeps its WordPiece vocabulary while the target side gets its own BPE.
Validation BLEU (greedy) picks the best checkpoint; optionally the last N checkpoints are averaged
(Vaswani et al., 2017 average the last 5 or 20) and the average is kept when its dev BLEU is at
least as good. The test set is decoded with beam search and scored with sacreBLEU.

```
RUN_DIR/config.json + model.safetensors   the encoder-decoder (lmforge_model: seq2seq)
RUN_DIR/tokenizer.json ...                target tokenizer (also the source one when shared)
RUN_DIR/source_tokenizer/                 the source tokenizer when the vocabularies are separate
RUN_DIR/task.json, results.json, report.md, loss.png
```
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lmforge.config import check_range, read_json_object, write_json, write_yaml
from lmforge.data.readers import check_output_file, read_pairs, write_jsonl
from lmforge.data.tokenizer import LMTokenizer, copy_tokenizer_files, load_tokenizer, save_tokenizer, train_tokenizer
from lmforge.finetune import TASK_FILE, load_encoder_weights, load_splits, skipped_rows, training_for_epochs
from lmforge.generate import GenerationConfig
from lmforge.metrics import DEFINITIONS
from lmforge.models.bert import BertConfig
from lmforge.models.registry import WEIGHTS_FILE, load_model, read_config, read_safetensors, save_model
from lmforge.models.seq2seq import Seq2Seq, Seq2SeqConfig
from lmforge.tasks.translation import TranslationTask
from lmforge.train import checkpoint
from lmforge.train.config import TrainConfig
from lmforge.train.loop import fit
from lmforge.train.optim import OptimConfig
from lmforge.train.rundir import run_session

SOURCE_TOKENIZER_DIR = "source_tokenizer"


@dataclass
class Seq2SeqSpec:
    """Shape of the encoder-decoder (ignored for the encoder when --encoder names a pretrained BERT)."""

    d_model: int = 256
    """Hidden width."""
    n_encoder_layers: int = 3
    """Encoder layers."""
    n_decoder_layers: int = 3
    """Decoder layers."""
    n_heads: int = 4
    """Attention heads."""
    d_ff: int = 1024
    """Feed-forward width."""
    dropout: float = 0.1
    """Dropout (embeddings, residual branches, attention probabilities)."""


def _translate_training() -> TrainConfig:
    return TrainConfig(
        max_steps=4000, global_batch_size=64, micro_batch_size=64, eval_every=500, save_every=500, log_every=50,
        keep_last=5, optim=OptimConfig(lr=1e-3, warmup_steps=400, schedule="cosine", min_lr_ratio=0.05,
                                       weight_decay=0.01),
    )  # fmt: skip


@dataclass
class TranslateTrainConfig:
    """Train a Transformer encoder-decoder for translation (TSV source TAB target, or JSONL)."""

    out: str
    """Run directory."""
    src: str = "zh"
    """Source language code (JSONL field; 'zh' targets are scored with sacreBLEU's zh tokenizer)."""
    tgt: str = "en"
    """Target language code."""
    data: str | None = None
    """builtin:tatoeba-cmn-en instead of --train/--dev/--test (the TSV comes from --data-path)."""
    data_path: str | None = None
    """The Tatoeba TSV for builtin:tatoeba-cmn-en (else $LMFORGE_TATOEBA)."""
    train: str | None = None
    """Training pairs."""
    dev: str | None = None
    """Dev pairs for validation BLEU; without them, 10% of --train (fixed seed) is held out."""
    test: str | None = None
    """Test pairs, decoded once with beam search at the end."""
    skip_bad_rows: bool = False
    """Skip malformed lines (listed in results.json) instead of stopping at the first."""
    tokenizer: str | None = None
    """Shared tokenizer directory; None = train a byte-level BPE on both sides of --train into the run directory."""
    vocab_size: int = 8000
    """Vocabulary size of a tokenizer trained here."""
    encoder: str | None = None
    """Warm-start the encoder from this pretrained lmforge BERT (its WordPiece vocabulary for the source)."""
    model: Seq2SeqSpec = field(default_factory=Seq2SeqSpec)
    max_len: int = 128
    """Longest source or target in tokens (longer ones are truncated and counted)."""
    label_smoothing: float = 0.1
    """Label smoothing of the cross-entropy."""
    batch_tokens: int = 0
    """Token-budget batching: each item is a bucket of similar pairs, <= N padded tokens; batch sizes count buckets."""
    epochs: float = 0.0
    """Training epochs (sets training.max_steps); 0 = use training.max_steps (and training.max_minutes)."""
    average_last: int = 0
    """Average the weights of the last N checkpoints (training.keep_last must be >= N); 0 = off."""
    num_beams: int = 4
    """Beam size for the test set (validation during training is greedy)."""
    length_penalty: float = 1.0
    """Beam search length penalty for the test set."""
    training: TrainConfig = field(default_factory=_translate_training)
    resume: str | None = None
    """Continue the run in this directory from its last checkpoint."""

    def __post_init__(self) -> None:
        check_range("epochs", self.epochs, at_least=0)
        check_range("max_len", self.max_len, at_least=3)  # [CLS], at least one token, [SEP]


def _splits(cfg: TranslateTrainConfig) -> tuple[dict[str, list[dict]], list]:
    """{"src", "tgt"} pairs per split: from the files, or the built-in corpus's cfg.src / cfg.tgt sides."""

    def read(path: str, *, skip_bad_rows: bool):
        return read_pairs(path, src=cfg.src, tgt=cfg.tgt, skip_bad_rows=skip_bad_rows)

    splits, reports = load_splits(cfg, "translate", read, builtin_path=cfg.data_path)
    if not cfg.data:
        return splits, reports
    for lang in (cfg.src, cfg.tgt):
        if lang not in splits["train"][0]:
            raise ValueError(f"--src/--tgt {lang!r}: {cfg.data} has {', '.join(sorted(splits['train'][0]))}")
    return {s: [{"src": ex[cfg.src], "tgt": ex[cfg.tgt]} for ex in v] for s, v in splits.items()}, reports


def _tokenizers(cfg: TranslateTrainConfig, run_dir: Path, train: list[dict]) -> tuple[LMTokenizer, LMTokenizer]:
    """(source, target) tokenizers, saved into the run directory."""
    if cfg.encoder and cfg.tokenizer:
        raise ValueError("--encoder brings its own source tokenizer; give --tokenizer only without --encoder")
    target_dir = run_dir
    if cfg.tokenizer:
        tgt = load_tokenizer(cfg.tokenizer)
        copy_tokenizer_files(cfg.tokenizer, target_dir)
    elif (target_dir / "tokenizer.json").is_file():  # resuming
        tgt = load_tokenizer(target_dir)
    else:
        sides = ("tgt",) if cfg.encoder else ("src", "tgt")
        tgt = train_tokenizer(lambda: (ex[s] for ex in train for s in sides), kind="bpe", vocab_size=cfg.vocab_size)
        save_tokenizer(tgt, target_dir, model_max_length=cfg.max_len)
    if not cfg.encoder:
        return tgt, tgt
    source_dir = run_dir / SOURCE_TOKENIZER_DIR
    source_dir.mkdir(parents=True, exist_ok=True)
    copy_tokenizer_files(cfg.encoder, source_dir)
    return load_tokenizer(source_dir), tgt


def _build_model(cfg: TranslateTrainConfig, src_tok: LMTokenizer, tgt_tok: LMTokenizer) -> Seq2Seq:
    m = cfg.model
    if cfg.encoder:
        base = read_config(cfg.encoder)
        if not isinstance(base, BertConfig):
            raise ValueError(f"--encoder {cfg.encoder}: not a lmforge BERT directory")
        encoder = dataclasses.replace(base, pooler=False, mlm_head=False)
    else:
        encoder = BertConfig(
            vocab_size=src_tok.vocab_size, max_seq_len=cfg.max_len, n_layers=m.n_encoder_layers, n_heads=m.n_heads,
            d_model=m.d_model, d_ff=m.d_ff, dropout=m.dropout, attn_dropout=m.dropout, type_vocab_size=1,
            pooler=False, mlm_head=False,
        )  # fmt: skip
    model_cfg = Seq2SeqConfig(
        encoder=encoder, tgt_vocab_size=tgt_tok.vocab_size if cfg.encoder else None, n_layers=m.n_decoder_layers,
        n_heads=m.n_heads, d_ff=m.d_ff, max_seq_len=cfg.max_len + 1, dropout=m.dropout,
    )  # fmt: skip
    torch.manual_seed(cfg.training.seed)
    model = Seq2Seq(model_cfg)
    if cfg.encoder:
        load_encoder_weights(model.encoder, cfg.encoder)
    return model


def finetune_translate(cfg: TranslateTrainConfig) -> dict:
    """Train, pick or average checkpoints, evaluate dev (greedy) and test (beam); returns results.json."""
    started = time.perf_counter()
    run_dir = Path(cfg.out)
    with run_session(run_dir, resume=bool(cfg.resume), device=cfg.training.device) as d:
        if cfg.average_last > cfg.training.keep_last:
            raise ValueError(f"average_last={cfg.average_last} needs training.keep_last >= {cfg.average_last}")
        splits, reports = _splits(cfg)
        if d.is_main:
            write_yaml(run_dir / "config.yaml", cfg)
        src_tok, tgt_tok = _tokenizers(cfg, run_dir, splits["train"])
        model = _build_model(cfg, src_tok, tgt_tok)
        task = TranslationTask(
            src_tok, tgt_tok, src_lang=cfg.src, tgt_lang=cfg.tgt, max_len=cfg.max_len,
            label_smoothing=cfg.label_smoothing, source_special_tokens=bool(cfg.encoder),
            train_examples=splits["train"], dev_examples=splits["dev"], batch_tokens=cfg.batch_tokens,
        )  # fmt: skip
        training = training_for_epochs(cfg.training, cfg.epochs, len(task.train_items))
        summary = fit(model, task, training, run_dir=run_dir, resume=bool(cfg.resume))
        results: dict = {}
        if d.is_main:
            chosen, dev = _choose_weights(model, task, run_dir, summary, cfg.average_last, d.device)
            save_model(model, run_dir)
            write_json(run_dir / TASK_FILE, task.settings())
            results = {"dev": dev}
            if splits.get("test"):
                beam = GenerationConfig(max_new_tokens=cfg.max_len, num_beams=cfg.num_beams,
                                        length_penalty=cfg.length_penalty)  # fmt: skip
                t0 = time.perf_counter()
                results["test"] = task.evaluate(model, device=d.device, examples=splits["test"], generation=beam)
                results["test"]["decoding"] = {
                    **dataclasses.asdict(beam),
                    "seconds": round(time.perf_counter() - t0, 2),
                }
            results.update(
                task="translate", src=cfg.src, tgt=cfg.tgt, weights=chosen,
                data={"source": cfg.data or {s: getattr(cfg, s) for s in ("train", "dev", "test") if getattr(cfg, s)},
                      "pairs": {s: len(v) for s, v in splits.items()}, "truncated": dict(task.truncated),
                      "skipped_rows": skipped_rows(reports)},
                model={"parameters": sum(p.numel() for p in model.parameters()), **dataclasses.asdict(model.cfg)},
                training=summary, definitions=DEFINITIONS, wall_seconds=round(time.perf_counter() - started, 2),
            )  # fmt: skip
            write_json(run_dir / "results.json", results)
            _write_report(run_dir, results)
    return results


def _choose_weights(model, task, run_dir: Path, summary: dict, average_last: int, device) -> tuple[str, dict]:
    """Load the best checkpoint, or the average of the last N when its dev BLEU is at least as good."""
    best = checkpoint.load_best(model, run_dir, summary.get("best_step"))
    dev = task.evaluate(model, device=device)
    if average_last < 2:
        return f"{checkpoint.STATE_DIR}/{best.name}", dev
    last = [p for p in checkpoint.checkpoint_dirs(run_dir)][-average_last:]
    states = [read_safetensors(p / WEIGHTS_FILE) for p in last]
    averaged = {k: sum(s[k].float() for s in states) / len(states) for k in states[0]}
    best_state = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(averaged)
    dev_avg = task.evaluate(model, device=device)
    if dev_avg["bleu"] >= dev["bleu"]:
        dev_avg["averaged"] = [p.name for p in last]
        dev_avg["best_single"] = {"checkpoint": best.name, "bleu": dev["bleu"]}
        return "average of " + ", ".join(p.name for p in last), dev_avg
    model.load_state_dict(best_state)
    dev["average_rejected"] = {"checkpoints": [p.name for p in last], "bleu": dev_avg["bleu"]}
    return f"{checkpoint.STATE_DIR}/{best.name}", dev


def _write_report(run_dir: Path, r: dict) -> None:
    lines = [f"# Translation run `{run_dir.name}` ({r['src']} -> {r['tgt']})", "",
             "| split | BLEU | chrF | decoding |", "|---|---|---|---|"]  # fmt: skip
    lines.append(f"| dev | {r['dev']['bleu']:.2f} | {r['dev']['chrf']:.2f} | greedy |")
    if "test" in r:
        dec = r["test"]["decoding"]
        lines.append(f"| test | {r['test']['bleu']:.2f} | {r['test']['chrf']:.2f} | beam {dec['num_beams']}, "
                     f"{dec['seconds']:.1f} s for {r['test']['sentences']} sentences |")  # fmt: skip
    t = r["training"]
    lines += ["", f"Training: {t['steps']} steps, {t['tokens']:,} tokens in {t['seconds'] / 60:.1f} min "
              f"({t['tokens_per_s']:,.0f} tokens/s); weights: {r['weights']}.", "",
              f"Signatures: `{r['dev']['bleu_signature']}`, `{r['dev']['chrf_signature']}`.", "",
              f"Data: {r['data']['source']}; pairs {r['data']['pairs']}; truncated {r['data']['truncated']}.", "",
              "![loss](loss.png)", ""]  # fmt: skip
    (run_dir / "report.md").write_text("\n".join(lines), encoding="utf-8")


def load_translation(run_dir: str | Path) -> tuple[TranslationTask, Seq2Seq]:
    """(task, model) of a translation run directory, the model in eval mode on the CPU."""
    run_dir = Path(run_dir)
    settings_path = run_dir / TASK_FILE
    if not settings_path.is_file():
        raise ValueError(f"{run_dir}: no {TASK_FILE}; pass a run directory written by `lmforge finetune translate`")
    settings = read_json_object(settings_path, what="task file")
    if settings.get("task") != "translate":
        raise ValueError(f"{settings_path}: task {settings.get('task')!r} is not 'translate'")
    model = load_model(run_dir)
    if not isinstance(model, Seq2Seq):
        raise ValueError(f"{run_dir}: config.json is not an encoder-decoder (lmforge_model: seq2seq)")
    tgt = load_tokenizer(run_dir)
    src = load_tokenizer(run_dir / SOURCE_TOKENIZER_DIR) if (run_dir / SOURCE_TOKENIZER_DIR).is_dir() else tgt
    task = TranslationTask(
        src, tgt, src_lang=settings["src"], tgt_lang=settings["tgt"], max_len=settings["max_len"],
        label_smoothing=settings["label_smoothing"], source_special_tokens=settings["source_special_tokens"],
    )  # fmt: skip
    return task, model


@dataclass
class TranslateConfig:
    """Translate a file with a run directory from `lmforge finetune translate`."""

    model: str
    """Run directory."""
    input: str
    """.txt (one source per line), .tsv (first column) or .jsonl (the source language field or 'src')."""
    output: str
    """JSONL, one {"src", "translation"} per input line (plus "tgt" when the input has references)."""
    num_beams: int = 4
    """Beam size; 1 = greedy."""
    length_penalty: float = 1.0
    """Beam search length penalty."""
    max_new_tokens: int | None = None
    """Longest translation in tokens; None = the model's max_len."""
    batch_size: int = 64
    """Sentences x beams decoded together."""
    skip_bad_rows: bool = False
    """Skip malformed lines instead of stopping at the first."""


def translate_command(cfg: TranslateConfig) -> dict:
    """Translate ``cfg.input`` into ``cfg.output``; returns counts, time and (with references) BLEU / chrF."""
    check_output_file(cfg.output, inputs=[cfg.input])
    task, model = load_translation(cfg.model)
    examples, _ = read_pairs(
        cfg.input, src=task.src_lang, tgt=task.tgt_lang, skip_bad_rows=cfg.skip_bad_rows, need_target=False
    )
    if not examples:
        raise ValueError(f"{cfg.input}: nothing to translate")
    task.eval_batch_size = cfg.batch_size
    gen = GenerationConfig(max_new_tokens=cfg.max_new_tokens or task.max_len, num_beams=cfg.num_beams,
                           length_penalty=cfg.length_penalty)  # fmt: skip
    started = time.perf_counter()
    with torch.inference_mode():
        hyps = task.translate(model, [ex["src"] for ex in examples], device=torch.device("cpu"), generation=gen)
    seconds = time.perf_counter() - started
    rows = [
        {**{k: v for k, v in ex.items() if k != "source"}, "translation": h}
        for ex, h in zip(examples, hyps, strict=True)
    ]
    write_jsonl(cfg.output, rows)
    summary = {"sentences": len(rows), "seconds": seconds}
    if all("tgt" in ex for ex in examples):
        from lmforge.metrics import translation_metrics

        summary.update(translation_metrics(hyps, [ex["tgt"] for ex in examples], target_lang=task.tgt_lang))
    return summary
