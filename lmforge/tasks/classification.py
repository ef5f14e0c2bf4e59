"""Text (and text-pair) classification: BERT fine-tuning as in Devlin et al. (2019), Section 4.1, and the same head
on a decoder (GPT, SmolLM2, Gemma 3), as transformers' ``*ForSequenceClassification`` (Radford et al. 2018, Section
3.3: the last token's state into a linear classifier).

Examples are ``{"text", "label"[, "text_pair"]}`` with string labels; the label set comes from the
training data (sorted, so it does not depend on row order). On a BERT a pair is encoded ``[CLS] a [SEP] b
[SEP]`` with segment ids 0 / 1; on a decoder as the tokenizer's own start (Gemma's ``<bos>``, else nothing), ``a``,
a newline and ``b``. Sequences longer than ``max_len`` are truncated (pairs: the longer side first) and counted,
never silently. The head pools the hidden states (a BERT's ``cls`` / ``pooler`` / ``mean``; a decoder's ``last``
real token, the only one that has read the whole text under the causal mask, or ``mean``) into a linear classifier
trained with cross-entropy. Batches are length-grouped and padded (on the right) to their longest sequence.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lmforge.data.batching import length_sorted_batches, pad, padding_mask, to_device
from lmforge.data.tokenizer import LMTokenizer, load_tokenizer
from lmforge.errors import UserError
from lmforge.metrics import classification_metrics
from lmforge.models.gpt import GPT, GPTConfig
from lmforge.models.heads import EncoderWithHead, SequenceClassifier
from lmforge.models.registry import decoder_for_finetuning, encoder_for_finetuning, read_config
from lmforge.tasks.base import HeadOnEncoder, LossOutput, fit_max_len, flops_d_ff, transformer_train_flops

Encoded = tuple  # (ids int32 array, segment ids int8 array or None, label index or -1) of one example
BACKBONE_POOLING = {"bert": ("pooler", ("cls", "pooler", "mean")), "gpt": ("last", ("last", "mean"))}
"""Per backbone: the pooling ``auto`` means, and the poolings it supports."""


class ClassificationTask(HeadOnEncoder):
    """Fine-tune an encoder to map a text (or text pair) to one of ``labels``."""

    name = "classify"

    def __init__(
        self,
        tokenizer: LMTokenizer,
        labels: Sequence[str],
        *,
        max_len: int = 128,
        pooling: str = "auto",
        dropout: float = 0.1,
        selection: str = "accuracy",
        train_examples: Sequence[dict] = (),
        dev_examples: Sequence[dict] = (),
        eval_batch_size: int = 64,
        backbone: str = "bert",
    ) -> None:
        if selection not in ("accuracy", "macro_f1"):
            raise UserError(f"selection metric {selection!r} must be 'accuracy' or 'macro_f1'")
        pooling = resolve_pooling(pooling, backbone)
        self.tokenizer, self.labels, self.backbone = tokenizer, list(labels), backbone
        self.label_index = {name: i for i, name in enumerate(self.labels)}
        if backbone == "bert":
            ids = {r: tokenizer.token_id(r) for r in ("cls", "sep", "pad")}
            if None in ids.values():
                raise UserError("classification on a BERT needs a WordPiece tokenizer with [CLS], [SEP] and [PAD]")
            self.cls_id, self.sep_id, self.pad_id = ids["cls"], ids["sep"], ids["pad"]
            self.start, self.between, self.end = [self.cls_id], [self.sep_id], [self.sep_id]
        else:  # a decoder: the tokenizer's own start token (Gemma's <bos>) if it adds one; a pair joined by a newline
            pad, eos = tokenizer.token_id("pad"), tokenizer.token_id("eos")
            self.cls_id = self.sep_id = None
            self.pad_id = pad if pad is not None else eos
            self.start, self.between, self.end = tokenizer.encode(""), tokenizer.encode("\n", special_tokens=False), []
            if self.pad_id is None:
                raise UserError("classification on a decoder needs a tokenizer with a padding or end-of-text token")
        self.max_len, self.pooling, self.dropout = max_len, pooling, dropout
        self.selection = (selection, "max")
        self.eval_batch_size = eval_batch_size
        self.truncated: dict[str, int] = {}
        self.train_items = self.encode(train_examples, split="train")
        self.val_items = self.encode(dev_examples, split="dev")
        self.train_lengths = [len(item[0]) for item in self.train_items]

    # --- the fine-tuning recipe's hooks (tasks/base.py: FinetuneTask) -------------------------
    report_columns = ("accuracy", "macro_f1", "loss")

    @classmethod
    def for_finetuning(
        cls, cfg: Any, splits: dict[str, list[dict]], run_dir: Path
    ) -> tuple[ClassificationTask, nn.Module]:
        """The task over ``splits`` and the pretrained encoder (or decoder) of ``cfg.model`` with a fresh head."""
        pooler = None
        if isinstance(read_config(cfg.model), GPTConfig):
            backbone = "gpt"
            resolve_pooling(cfg.pooling, backbone)  # refused before the weights load
            encoder: nn.Module = decoder_for_finetuning(cfg.model, init=cfg.init, dropout=cfg.dropout, seed=cfg.seed)
        else:
            backbone = "bert"
            encoder, pooler = encoder_for_finetuning(
                cfg.model, init=cfg.init, dropout=cfg.dropout, seed=cfg.seed, purpose="classification"
            )
        task = cls(
            load_tokenizer(cfg.model),
            label_set(splits["train"]),
            max_len=fit_max_len(cfg.max_len, encoder.cfg),
            pooling=cfg.pooling,
            dropout=encoder.cfg.dropout,
            selection=cfg.selection,
            train_examples=splits["train"],
            dev_examples=splits["dev"],
            backbone=backbone,
        )
        return task, task.build_model(encoder, pretrained_pooler=pooler)

    @classmethod
    def for_search(
        cls, tokenizer: LMTokenizer, splits: dict[str, list[dict]], *, max_len: int, dropout: float
    ) -> ClassificationTask:
        """The task ``lmforge nas`` scores candidates on: the pooler head (a small, fixed head for every encoder)."""
        return cls(
            tokenizer,
            label_set(splits["train"]),
            max_len=max_len,
            pooling="pooler",
            train_examples=splits["train"],
            dev_examples=splits["dev"],
            dropout=dropout,
        )

    def report_input(self, example: dict) -> dict | None:
        """The text a report explains (pairs are passed over: the report shows one text per row; so are a decoder's
        texts: attributions are computed for BERT classifiers)."""
        return None if example.get("text_pair") or self.backbone != "bert" else {"text": example["text"]}

    def report_outcome(self, example: dict, text: dict, prediction: dict) -> tuple[Any, Any]:
        return example["label"], prediction["label"]

    @classmethod
    def from_settings(cls, run_dir: Path, settings: dict) -> ClassificationTask:
        return cls(
            load_tokenizer(run_dir),
            settings["labels"],
            max_len=settings["max_len"],
            pooling=settings["pooling"],
            selection=settings.get("selection", "accuracy"),
            backbone=settings.get("backbone", "bert"),
        )

    def settings(self) -> dict:
        """What task.json stores to rebuild this task for evaluation and prediction."""
        return {
            "task": self.name,
            "labels": self.labels,
            "max_len": self.max_len,
            "pooling": self.pooling,
            "selection": self.selection[0],
            "backbone": self.backbone,
        }

    # --- data --------------------------------------------------------------------------------
    def encode(self, examples: Sequence[dict], *, split: str, need_labels: bool = True) -> list[Encoded]:
        """Token ids, segment ids and label index per example; counts truncation under ``split``."""
        if not examples:
            return []
        budget = self.max_len - len(self.start) - len(self.end)
        texts = [ex["text"] for ex in examples]
        pairs = [ex.get("text_pair") for ex in examples]
        encode = self.tokenizer.tokenizer.encode_batch
        firsts = encode(texts, add_special_tokens=False)
        paired = [i for i, p in enumerate(pairs) if p]
        seconds = dict(zip(paired, encode([pairs[i] for i in paired], add_special_tokens=False), strict=True))
        out, truncated = [], 0
        for i, ex in enumerate(examples):
            a = firsts[i].ids
            b = seconds[i].ids if i in seconds else None
            if b is None:
                truncated += len(a) > budget
                ids, types = [*self.start, *a[:budget], *self.end], None
            else:
                budget_pair = budget - len(self.between)
                truncated += len(a) + len(b) > budget_pair
                while len(a) + len(b) > budget_pair:  # longest first, as BERT's reference code
                    a, b = (a[:-1], b) if len(a) >= len(b) else (a, b[:-1])
                ids = [*self.start, *a, *self.between, *b, *self.end]
                first = len(self.start) + len(a) + len(self.between)
                types = [0] * first + [1] * (len(ids) - first) if self.backbone == "bert" else None
            if not ids:  # an empty text on a decoder without a start token: read as its padding token alone
                ids = [self.pad_id]
            label = -1
            if need_labels:
                label = self.label_index.get(ex["label"], -1)
                if label < 0:
                    where = ex.get("source", f"{split} example {i + 1}")
                    raise UserError(
                        f"{where}: label {ex['label']!r} never occurs in the training data; known labels: "
                        f"{', '.join(self.labels)}"
                    )
            type_ids = None if types is None else np.asarray(types, dtype=np.int8)
            out.append((np.asarray(ids, dtype=np.int32), type_ids, label))
        self.truncated[split] = truncated
        return out

    def collate(self, items: list[Encoded], *, generator: torch.Generator | None = None) -> dict[str, Any]:
        ids = pad([it[0] for it in items], self.pad_id)  # (B, T)
        lengths = torch.tensor([len(it[0]) for it in items])
        mask = padding_mask(lengths, ids.shape[1])  # (B, T) 1 at real tokens
        types = None
        if any(it[1] is not None for it in items):
            types = pad([it[1] if it[1] is not None else np.zeros(len(it[0]), np.int8) for it in items], 0)
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "token_type_ids": types,
            "labels": torch.tensor([it[2] for it in items]),
            "n_targets": len(items),
            "n_tokens": int(lengths.sum()),
        }

    # --- model -------------------------------------------------------------------------------
    def build_model(self, encoder: nn.Module, *, pretrained_pooler: nn.Module | None = None) -> EncoderWithHead:
        """The head on ``encoder`` (a BERT, or a GPT whose hidden states it reads: ``logits``)."""
        head = SequenceClassifier(encoder.cfg.d_model, len(self.labels), dropout=self.dropout, pooling=self.pooling)
        if isinstance(encoder, GPT):  # zero: every class equally likely at the start. A decoder's final hidden states
            with torch.no_grad():  # are large (Gemma 3 270M's norms reach ~220), so transformers' N(0, 0.02) starts
                head.out.weight.zero_()  # from logits of about +-5: a loss of ~1 and gradient norms of ~100
                head.out.bias.zero_()
        if head.dense is not None and pretrained_pooler is not None:
            head.dense.load_state_dict(pretrained_pooler.dense.state_dict())
        return EncoderWithHead(encoder, head)

    @staticmethod
    def logits(model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        """(B, C) class logits. First-token pooling needs the last layer at [CLS] only: it computes just
        that row (its keys and values still see every token), ~1/n_layers of the encoder's cost saved. A decoder
        reads right-padded rows under its causal mask alone (no real position sees the padding after it)."""
        ids, mask, types = batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]
        if isinstance(model.encoder, GPT):
            return model.head(model.encoder.hidden_states(ids), mask)
        if model.head.pooling == "mean":
            return model(ids, attention_mask=mask, token_type_ids=types)
        B, T = ids.shape
        first = model.encoder(
            ids, attention_mask=mask, token_type_ids=types, select=torch.arange(B, device=ids.device) * T
        )
        return model.head(first[:, None, :])  # (B, 1, D) -> (B, C)

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> LossOutput:
        logits = self.logits(model, batch)
        loss_sum = F.cross_entropy(logits.float(), batch["labels"], reduction="sum")
        return LossOutput(loss_sum, {"correct": float((logits.argmax(-1) == batch["labels"]).sum())})

    def metrics(self, sums: dict[str, float]) -> dict[str, float]:
        n = max(sums["n_targets"], 1.0)
        return {"loss": sums["loss_sum"] / n, "accuracy": sums.get("correct", 0.0) / n}

    def flops(self, model: nn.Module, batch: dict[str, Any]) -> float:
        """Training FLOPs spent: with first-token pooling the last layer runs its keys and values over
        every token but the rest at [CLS] only (as ``mlm_train_flops``)."""
        cfg = model.encoder.cfg
        B, T = batch["input_ids"].shape
        d, head = cfg.d_model, 2 * cfg.d_model * (cfg.d_model + len(self.labels))
        if isinstance(model.encoder, GPT) or model.head.pooling == "mean":
            return transformer_train_flops(
                n_layers=cfg.n_layers,
                d_model=d,
                d_ff=flops_d_ff(cfg),
                n_tokens=B * T,
                seq_len=T,
                head_rows=B,
                head_flops_per_row=head,
            )
        dense = transformer_train_flops(
            n_layers=cfg.n_layers - 1,
            d_model=d,
            d_ff=flops_d_ff(cfg),
            n_tokens=B * T,
            seq_len=T,
            head_rows=B,
            head_flops_per_row=head,
        )
        return dense + 3.0 * (B * T * 4 * d * d + B * (4 * d * d + 4 * d * flops_d_ff(cfg) + 4 * T * d))

    # --- inference ---------------------------------------------------------------------------
    @torch.inference_mode()
    def _run(self, model: nn.Module, items: list[Encoded], device: torch.device) -> tuple[np.ndarray, float]:
        """Class probabilities (N, C) in item order, and the summed loss over labelled items."""
        logits, loss_sum = self._logits(model, items, device)
        return torch.from_numpy(logits).softmax(-1).numpy(), loss_sum

    @torch.inference_mode()
    def _logits(self, model: nn.Module, items: list[Encoded], device: torch.device) -> tuple[np.ndarray, float]:
        was_training = model.training
        model.eval()
        out = np.zeros((len(items), len(self.labels)), dtype=np.float32)
        loss_sum = 0.0
        for index in length_sorted_batches([len(it[0]) for it in items], self.eval_batch_size):
            batch = self.collate([items[i] for i in index])
            batch = to_device(batch, device)
            logits = self.logits(model, batch).float()
            labels = batch["labels"]
            if (labels >= 0).all():
                loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
            out[index] = logits.cpu().numpy()
        model.train(was_training)
        return out, loss_sum

    def class_logits(self, model: nn.Module, examples: Sequence[dict], *, device: torch.device) -> np.ndarray:
        """(N, C) class logits of ``{"text"[, "text_pair"]}`` examples, in order (a distillation teacher's)."""
        return self._logits(model, self.encode(examples, split="predict", need_labels=False), device)[0]

    def evaluate(self, model: nn.Module, examples: Sequence[dict] | None = None, *, device: torch.device) -> dict:
        """Loss and classification metrics on ``examples`` (default: the dev set)."""
        items = self.val_items if examples is None else self.encode(examples, split="eval")
        probs, loss_sum = self._run(model, items, device)
        gold = [it[2] for it in items]
        out = classification_metrics(gold, probs.argmax(-1).tolist(), self.labels)
        return {"loss": loss_sum / max(len(items), 1), **out}

    def predict(self, model: nn.Module, examples: Sequence[dict], *, device: torch.device) -> list[dict]:
        """Label, its probability and every label's probability, per example."""
        items = self.encode(examples, split="predict", need_labels=False)
        probs, _ = self._run(model, items, device)
        return [
            {
                "label": self.labels[int(p.argmax())],
                "score": float(p.max()),
                "scores": {name: round(float(v), 6) for name, v in zip(self.labels, p, strict=True)},
            }
            for p in probs
        ]


def resolve_pooling(pooling: str, backbone: str) -> str:
    """The pooling ``pooling`` means on ``backbone`` (``auto``: BERT's pooler, a decoder's last token); a UserError
    for one the backbone cannot use."""
    if backbone not in BACKBONE_POOLING:
        raise UserError(f"backbone {backbone!r} is not one of {', '.join(BACKBONE_POOLING)}")
    default, valid = BACKBONE_POOLING[backbone]
    if pooling == "auto":
        return default
    if pooling not in valid:
        raise UserError(f"--pooling {pooling}: a {backbone} classifier pools with {' or '.join(valid)} (or auto)")
    return pooling


def label_set(examples: Sequence[dict]) -> list[str]:
    """The sorted set of labels of training examples."""
    labels = sorted({ex["label"] for ex in examples})
    if len(labels) < 2:
        raise UserError(f"classification needs at least 2 labels in the training data; found {labels}")
    return labels
