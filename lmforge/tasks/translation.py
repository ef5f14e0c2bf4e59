"""Machine translation with the encoder-decoder of ``models/seq2seq.py`` (Vaswani et al., 2017).

Examples are ``{"src": ..., "tgt": ...}``. A source is its tokens then the end token (or, with a
BERT encoder's WordPiece tokenizer, ``[CLS] ... [SEP]``); the decoder reads the end token then the
target tokens and predicts the target tokens then the end token. Sequences longer than
``max_len`` are truncated and counted. The loss is label-smoothed cross-entropy (Szegedy et al.,
2016; ``label_smoothing`` = 0.1 in the Transformer paper), summed over target tokens. Validation
decodes the whole dev set (greedy, batched by length) and scores it with sacreBLEU; BLEU picks
the best checkpoint. With ``batch_tokens`` each training item is a bucket of similar-length pairs
holding at most that many padded tokens (fairseq's ``--max-tokens``), so the loop's batch sizes
count buckets.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lmforge.data.batching import length_sorted_batches, pad, padding_mask, token_buckets
from lmforge.data.readers import read_pairs
from lmforge.data.tokenizer import LMTokenizer, copy_tokenizer_files, load_tokenizer, save_tokenizer, train_tokenizer
from lmforge.errors import UserError
from lmforge.inference.config import GenerationConfig
from lmforge.inference.generate import Generator
from lmforge.metrics import translation_metrics
from lmforge.models.bert import BertConfig
from lmforge.models.registry import load_encoder_weights, read_config
from lmforge.models.seq2seq import Seq2Seq, Seq2SeqConfig
from lmforge.tasks.base import IGNORE, FinetuneDefaults, LossOutput, flops_d_ff, transformer_train_flops

Encoded = tuple  # (source ids int32 array, target ids int32 array) of one example


SOURCE_TOKENIZER_DIR = "source_tokenizer"  # in a run directory: the source tokenizer when the vocabularies differ


class TranslationTask(FinetuneDefaults):
    """Train an encoder-decoder to translate ``src`` into ``tgt`` texts."""

    name = "translate"

    def __init__(
        self,
        src_tokenizer: LMTokenizer,
        tgt_tokenizer: LMTokenizer,
        *,
        src_lang: str,
        tgt_lang: str,
        max_len: int = 128,
        label_smoothing: float = 0.1,
        source_special_tokens: bool = False,
        train_examples: Sequence[dict] = (),
        dev_examples: Sequence[dict] = (),
        eval_batch_size: int = 64,
        eval_generation: GenerationConfig | None = None,
        batch_tokens: int = 0,
    ) -> None:
        if not 0.0 <= label_smoothing < 1.0:
            raise UserError(f"label_smoothing={label_smoothing} must be in [0, 1)")
        self.src_tok, self.tgt_tok = src_tokenizer, tgt_tokenizer
        self.src_lang, self.tgt_lang = src_lang, tgt_lang
        eos = tgt_tokenizer.token_id("eos")
        if eos is None:
            raise UserError("the target tokenizer needs an end token (a byte-level BPE tokenizer has <|endoftext|>)")
        self.eos_id = eos
        pad_id = tgt_tokenizer.token_id("pad")
        self.tgt_pad = eos if pad_id is None else pad_id
        src_pad = src_tokenizer.token_id("pad")
        self.src_pad = self.tgt_pad if src_pad is None else src_pad
        self.max_len, self.label_smoothing = max_len, label_smoothing
        self.source_special_tokens = source_special_tokens
        self.selection = ("bleu", "max")
        self.eval_batch_size = eval_batch_size
        self.eval_generation = eval_generation or GenerationConfig(max_new_tokens=max_len)
        self.truncated: dict[str, int] = {}
        self.dev_examples = list(dev_examples)
        pairs = self.encode(train_examples, split="train")
        self.val_items = self.encode(dev_examples, split="dev")
        lengths = [len(s) + len(t) + 1 for s, t in pairs]
        self.train_items: list = pairs
        self.train_lengths: list[int] | None = lengths
        if batch_tokens:  # items become whole buckets; their order is shuffled, their contents fixed
            self.train_items = [[pairs[i] for i in b] for b in token_buckets(lengths, batch_tokens)]
            self.train_lengths = None

    # --- the fine-tuning recipe's hooks (tasks/base.py: FinetuneTask) -------------------------
    report_columns = ("bleu", "chrf")
    test_generation: GenerationConfig | None = None  # beam search for the final test evaluation
    model_summary: dict | None = None

    @classmethod
    def reader(cls, cfg: Any) -> Any:
        def read(path: str, *, skip_bad_rows: bool):
            return read_pairs(path, src=cfg.src, tgt=cfg.tgt, skip_bad_rows=skip_bad_rows)

        return read

    @classmethod
    def prepare_splits(cls, cfg: Any, splits: dict[str, list[dict]]) -> dict[str, list[dict]]:
        """A built-in corpus's ``cfg.src`` / ``cfg.tgt`` sides as {"src", "tgt"} pairs (files are read so)."""
        if not cfg.data:
            return splits
        for lang in (cfg.src, cfg.tgt):
            if lang not in splits["train"][0]:
                raise UserError(f"--src/--tgt {lang!r}: {cfg.data} has {', '.join(sorted(splits['train'][0]))}")
        return {s: [{"src": ex[cfg.src], "tgt": ex[cfg.tgt]} for ex in v] for s, v in splits.items()}

    @classmethod
    def for_finetuning(cls, cfg: Any, splits: dict[str, list[dict]], run_dir: Path) -> tuple[TranslationTask, Seq2Seq]:
        """Tokenizers (trained into ``run_dir`` unless given) and the encoder-decoder, its encoder warm-started
        from the pretrained BERT ``cfg.model`` when one is given."""
        src_tok, tgt_tok = _tokenizers(cfg, run_dir, splits["train"])
        model = _build_model(cfg, src_tok, tgt_tok)
        task = cls(
            src_tok,
            tgt_tok,
            src_lang=cfg.src,
            tgt_lang=cfg.tgt,
            max_len=cfg.max_len,
            label_smoothing=cfg.label_smoothing,
            source_special_tokens=bool(cfg.model),
            train_examples=splits["train"],
            dev_examples=splits["dev"],
            batch_tokens=cfg.batch_tokens,
        )
        task.test_generation = GenerationConfig(
            max_new_tokens=cfg.max_len, num_beams=cfg.num_beams, length_penalty=cfg.length_penalty
        )
        task.model_summary = {"parameters": sum(p.numel() for p in model.parameters()), **dataclasses.asdict(model.cfg)}
        return task, model

    @classmethod
    def from_settings(cls, run_dir: Path, settings: dict) -> TranslationTask:
        tgt = load_tokenizer(run_dir)
        src = load_tokenizer(run_dir / SOURCE_TOKENIZER_DIR) if (run_dir / SOURCE_TOKENIZER_DIR).is_dir() else tgt
        return cls(
            src,
            tgt,
            src_lang=settings["src"],
            tgt_lang=settings["tgt"],
            max_len=settings["max_len"],
            label_smoothing=settings["label_smoothing"],
            source_special_tokens=settings["source_special_tokens"],
        )

    def evaluate_test(self, model: nn.Module, examples: Sequence[dict], *, device: torch.device) -> dict:
        """The test set decoded once with beam search (``num_beams``, ``length_penalty``), timed."""
        beam = self.test_generation or self.eval_generation
        started = time.perf_counter()
        out = self.evaluate(model, examples, device=device, generation=beam)
        out["decoding"] = {**dataclasses.asdict(beam), "seconds": round(time.perf_counter() - started, 2)}
        return out

    def extras(self) -> dict:
        return {"src": self.src_lang, "tgt": self.tgt_lang, "model": self.model_summary}

    def settings(self) -> dict:
        return {
            "task": self.name,
            "src": self.src_lang,
            "tgt": self.tgt_lang,
            "max_len": self.max_len,
            "label_smoothing": self.label_smoothing,
            "source_special_tokens": self.source_special_tokens,
        }

    # --- data --------------------------------------------------------------------------------
    def encode_sources(self, texts: Sequence[str]) -> tuple[list[list[int]], int]:
        """Source token ids (with the end token, or [CLS]/[SEP]) and how many were truncated."""
        encoded = self.src_tok.tokenizer.encode_batch(list(texts), add_special_tokens=self.source_special_tokens)
        out, truncated = [], 0
        for e in encoded:
            ids = e.ids if self.source_special_tokens else [*e.ids, self.eos_id]
            if len(ids) > self.max_len:
                truncated += 1
                ids = [*ids[: self.max_len - 1], ids[-1]]  # keep the closing token
            out.append(ids)
        return out, truncated

    def encode(self, examples: Sequence[dict], *, split: str) -> list[Encoded]:
        if not examples:
            return []
        sources, cut = self.encode_sources([ex["src"] for ex in examples])
        targets = self.tgt_tok.tokenizer.encode_batch([ex["tgt"] for ex in examples], add_special_tokens=False)
        out = []
        for src, tgt in zip(sources, targets, strict=True):
            ids = tgt.ids[: self.max_len - 1]
            cut += len(tgt.ids) > self.max_len - 1
            out.append((np.asarray(src, dtype=np.int32), np.asarray(ids, dtype=np.int32)))
        self.truncated[split] = cut
        return out

    def collate(self, items: list, *, generator: torch.Generator | None = None) -> dict[str, Any]:
        if items and isinstance(items[0], list):  # token-budget buckets
            items = [pair for bucket in items for pair in bucket]
        src = pad([s for s, _ in items], self.src_pad)  # (B, S)
        src_mask = padding_mask([len(s) for s, _ in items], src.shape[1])
        decoder_in = pad([np.concatenate(([self.eos_id], t)) for _, t in items], self.tgt_pad)  # (B, T)
        labels = pad([np.concatenate((t, [self.eos_id])) for _, t in items], IGNORE)  # (B, T)
        n_targets = int((labels != IGNORE).sum())
        return {
            "input_ids": src,
            "src_mask": src_mask,
            "decoder_input_ids": decoder_in,
            "labels": labels,
            "n_targets": n_targets,
            "n_tokens": int(src_mask.sum()) + n_targets,
        }

    # --- model, loss -------------------------------------------------------------------------
    def loss(self, model: Seq2Seq, batch: dict[str, Any]) -> LossOutput:
        logits = model(batch["input_ids"], batch["decoder_input_ids"], src_mask=batch["src_mask"])  # (B, T, V)
        logits, labels = logits.reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1)
        loss = F.cross_entropy(
            logits.float(), labels.long(), ignore_index=IGNORE, label_smoothing=self.label_smoothing, reduction="sum"
        )
        counts = {}
        if not torch.is_grad_enabled():
            valid = labels != IGNORE
            counts["correct"] = float(((logits.argmax(-1) == labels) & valid).sum())
        return LossOutput(loss, counts)

    def metrics(self, sums: dict[str, float]) -> dict[str, float]:
        n = max(sums["n_targets"], 1.0)
        return {"loss": sums["loss_sum"] / n, "accuracy": sums.get("correct", 0.0) / n}

    def flops(self, model: Seq2Seq, batch: dict[str, Any]) -> float:
        cfg = model.cfg
        B, S = batch["input_ids"].shape
        T = batch["decoder_input_ids"].shape[1]
        enc = transformer_train_flops(
            n_layers=cfg.encoder.n_layers,
            d_model=cfg.d_model,
            d_ff=flops_d_ff(cfg.encoder),
            n_tokens=B * S,
            seq_len=S,
            head_rows=0,
            head_flops_per_row=0,
        )
        # decoder layers: self-attention + cross-attention projections (8 D^2 more per token) + FFN + head
        dec = transformer_train_flops(
            n_layers=cfg.n_layers,
            d_model=cfg.d_model,
            d_ff=cfg.d_ff,
            n_tokens=B * T,
            seq_len=T + S,
            head_rows=B * T,
            head_flops_per_row=2 * cfg.d_model * cfg.target_vocab,
        )
        return enc + dec + 3.0 * cfg.n_layers * 8 * cfg.d_model * cfg.d_model * B * T

    # --- decoding and evaluation -------------------------------------------------------------
    def generator(self, model: Seq2Seq) -> Generator:
        return Generator(
            model, self.tgt_tok, source_tokenizer=self.src_tok, source_special_tokens=self.source_special_tokens
        )

    def translate(
        self,
        model: Seq2Seq,
        texts: Sequence[str],
        *,
        device: torch.device,
        generation: GenerationConfig | None = None,
        generator: Generator | None = None,
    ) -> list[str]:
        """Translations of ``texts``, decoded in length-sorted batches (output in input order). A server
        passes its ``generator`` (built once) instead of a copy of the model's weights per call."""
        cfg = generation or self.eval_generation
        was_training = model.training
        model.eval()
        gen = generator or self.generator(model)
        sources, _ = self.encode_sources(texts)
        out: list[str] = [""] * len(texts)
        per_batch = max(1, self.eval_batch_size // cfg.num_beams)
        for idx in length_sorted_batches([len(s) for s in sources], per_batch):
            hyps = gen.generate([sources[i] for i in idx], cfg)
            for i, h in zip(idx, hyps[:: cfg.num_return_sequences], strict=True):
                out[i] = h.text.strip()
        model.train(was_training)
        return out

    def evaluate(
        self,
        model: nn.Module,
        examples: Sequence[dict] | None = None,
        *,
        device: torch.device,
        generation: GenerationConfig | None = None,
    ) -> dict[str, Any]:
        """sacreBLEU BLEU and chrF of the translations of ``examples`` (default: the dev set)."""
        examples = self.dev_examples if examples is None else list(examples)
        if not examples:
            return {}
        hyps = self.translate(model, [ex["src"] for ex in examples], device=device, generation=generation)
        return translation_metrics(hyps, [ex["tgt"] for ex in examples], target_lang=self.tgt_lang)

    def predict(self, model: nn.Module, examples: Sequence[dict], *, device: torch.device) -> list[dict]:
        return [{"translation": t} for t in self.translate(model, [ex["src"] for ex in examples], device=device)]


def _tokenizers(cfg: Any, run_dir: Path, train: list[dict]) -> tuple[LMTokenizer, LMTokenizer]:
    """(source, target) tokenizers, saved into the run directory.

    Every process of a torchrun job comes here and may write the same files: each is written atomically under a
    name of its own (``files.temporary_name``) with tokenizer.json last, and training on the same texts gives
    the same tokenizer, so a process that finds tokenizer.json reads a complete, identical directory.
    """
    if cfg.model and cfg.tokenizer:
        raise UserError(
            "--model (a pretrained BERT encoder) brings its own source tokenizer; give --tokenizer only without --model"
        )
    if cfg.tokenizer:
        tgt = load_tokenizer(cfg.tokenizer)
        copy_tokenizer_files(cfg.tokenizer, run_dir)
    elif (run_dir / "tokenizer.json").is_file():  # resuming, or another process saved it
        tgt = load_tokenizer(run_dir)
    else:
        sides = ("tgt",) if cfg.model else ("src", "tgt")
        tgt = train_tokenizer(lambda: (ex[s] for ex in train for s in sides), kind="bpe", vocab_size=cfg.vocab_size)
        save_tokenizer(tgt, run_dir, model_max_length=cfg.max_len)
    if not cfg.model:
        return tgt, tgt
    source_dir = run_dir / SOURCE_TOKENIZER_DIR
    source_dir.mkdir(parents=True, exist_ok=True)
    copy_tokenizer_files(cfg.model, source_dir)
    return load_tokenizer(source_dir), tgt


def _build_model(cfg: Any, src_tok: LMTokenizer, tgt_tok: LMTokenizer) -> Seq2Seq:
    m = cfg.seq2seq
    if cfg.model:
        base = read_config(cfg.model)
        if not isinstance(base, BertConfig):
            raise UserError(f"--model {cfg.model}: the encoder to warm-start must be a lmforge BERT directory")
        encoder = dataclasses.replace(base, pooler=False, mlm_head=False)
    else:
        encoder = BertConfig(
            vocab_size=src_tok.vocab_size,
            max_seq_len=cfg.max_len,
            n_layers=m.n_encoder_layers,
            n_heads=m.n_heads,
            d_model=m.d_model,
            d_ff=m.d_ff,
            dropout=m.dropout,
            attn_dropout=m.dropout,
            type_vocab_size=1,
            pooler=False,
            mlm_head=False,
        )
    model_cfg = Seq2SeqConfig(
        encoder=encoder,
        tgt_vocab_size=tgt_tok.vocab_size if cfg.model else None,
        n_layers=m.n_decoder_layers,
        n_heads=m.n_heads,
        d_ff=m.d_ff,
        max_seq_len=cfg.max_len + 1,
        dropout=m.dropout,
    )
    torch.manual_seed(cfg.seed)
    model = Seq2Seq(model_cfg)
    if cfg.model:
        load_encoder_weights(model.encoder, cfg.model)
    return model
