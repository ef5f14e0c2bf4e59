"""Contrastive sentence embeddings: SimCSE (Gao et al., 2021) with the InfoNCE loss (van den Oord et al., 2018).

- Unsupervised: every sentence is encoded twice; dropout makes the two views differ, and each view's
  positive is the other view of the same sentence, the other sentences of the batch its negatives.
- Supervised: ``{"text", "text_pair"[, "negative"]}``: the pair is the positive, an optional hard
  negative joins the candidates of every anchor.

The loss of anchor i is cross-entropy over cos(a_i, c_j) / temperature against its own positive
(temperature 0.05 as in the paper). Under DDP the candidates of every process are gathered (with
their gradients, ``torch.distributed.nn.all_gather``), so each anchor sees world_size x batch
negatives. The sentence vector is the first token's or the mean of the real tokens' hidden state.

Evaluation (``evaluate``): Spearman correlation of cosine similarity with gold scores when the dev
pairs carry a ``score``; k-NN accuracy when the dev texts carry a ``label`` (the labelled training
texts are the index); always alignment and uniformity (Wang & Isola, 2020) over the dev texts:
alignment = E ||f(x) - f(x+)||^2 over positive pairs (the pairs, or two dropout views), uniformity
= log E exp(-2 ||f(x) - f(y)||^2) over distinct texts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from scipy.stats import spearmanr
from torch import Tensor, nn

from lmforge.data.batching import length_sorted_batches, pad, padding_mask, to_device
from lmforge.data.readers import read_labelled
from lmforge.data.tokenizer import LMTokenizer, load_tokenizer
from lmforge.errors import UserError
from lmforge.models.bert import Bert
from lmforge.models.heads import pool
from lmforge.models.registry import bert_config_of, load_encoder_weights
from lmforge.tasks.base import FinetuneDefaults, LossOutput, fit_max_len, flops_d_ff, transformer_train_flops

Pooling = Literal["cls", "mean"]
INDEX_SIZE = 2000  # labelled training texts that k-NN evaluation searches


def gather_with_grad(t: Tensor) -> Tensor:
    """All processes' rows of ``t`` concatenated in rank order, gradients flowing back to each; ``t``
    itself when not distributed."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(t), dim=0)


def info_nce(anchors: Tensor, candidates: Tensor, targets: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """Summed InfoNCE loss and correct count: cross-entropy of cos(anchor, candidates) / temperature
    against the index of each anchor's positive. anchors (B, D), candidates (C, D), targets (B,)."""
    sims = F.normalize(anchors.float(), dim=-1) @ F.normalize(candidates.float(), dim=-1).t()  # (B, C)
    logits = sims / temperature
    return F.cross_entropy(logits, targets, reduction="sum"), (logits.argmax(-1) == targets).sum()


class EmbeddingTask(FinetuneDefaults):
    """Fine-tune an encoder into a sentence embedder with SimCSE."""

    name = "embed"

    def __init__(
        self,
        tokenizer: LMTokenizer,
        *,
        mode: Literal["unsup", "sup"] = "unsup",
        pooling: Pooling = "cls",
        temperature: float = 0.05,
        max_len: int = 64,
        train_examples: Sequence[dict] = (),
        dev_examples: Sequence[dict] = (),
        index_examples: Sequence[dict] = (),
        knn: int = 10,
        eval_batch_size: int = 64,
    ) -> None:
        if temperature <= 0:
            raise UserError(f"temperature={temperature} must be positive")
        if tokenizer.token_id("pad") is None:
            raise UserError("sentence embeddings need a BERT (WordPiece) tokenizer with [PAD]")
        self.tokenizer, self.mode, self.pooling = tokenizer, mode, pooling
        self.temperature, self.max_len, self.knn = temperature, max_len, knn
        self.pad_id = tokenizer.token_id("pad")
        self.eval_batch_size = eval_batch_size
        self.truncated: dict[str, int] = {}
        fields = ("text",)
        if mode == "sup":
            _require(train_examples, "text_pair", "supervised SimCSE needs 'text_pair' (the positive) in every example")
            has_negatives = any(ex.get("negative") for ex in train_examples)
            if has_negatives:  # every process must gather the same shapes
                _require(train_examples, "negative", "hard negatives must be given for every example or none")
            fields = ("text", "text_pair", "negative") if has_negatives else ("text", "text_pair")
        self.train_items = self.encode(train_examples, fields=fields, split="train")
        self.train_lengths = [sum(len(x) for x in item if x is not None) for item in self.train_items]
        self.dev_examples, self.index_examples = list(dev_examples), list(index_examples)
        self.selection = self._selection()

    def _selection(self) -> tuple[str, str]:
        if any("score" in ex for ex in self.dev_examples):
            return "spearman", "max"
        if any("label" in ex for ex in self.dev_examples) and self.index_examples:
            return "knn_accuracy", "max"
        return "alignment_uniformity", "min"

    # --- the fine-tuning recipe's hooks (tasks/base.py: FinetuneTask) -------------------------
    report_columns = ("knn_accuracy", "spearman", "alignment", "uniformity")
    evaluate_before: tuple[str, ...] = ("dev", "test")

    @classmethod
    def reader(cls, cfg: Any) -> Any:
        return _read_texts

    @classmethod
    def for_finetuning(cls, cfg: Any, splits: dict[str, list[dict]], run_dir: Path) -> tuple[EmbeddingTask, nn.Module]:
        """SimCSE over ``splits`` on the pretrained encoder of ``cfg.model``. The k-NN index is the first
        labelled training texts; with a built-in labelled corpus SimCSE trains on its texts, never its labels."""
        base = bert_config_of(cfg.model, purpose="sentence embeddings")
        fit_max_len(cfg.max_len, base)
        encoder = Bert(
            dataclasses.replace(base, mlm_head=False, pooler=False, dropout=cfg.dropout, attn_dropout=cfg.dropout)
        )
        load_encoder_weights(encoder, cfg.model)
        index = [ex for ex in splits["train"] if "label" in ex][:INDEX_SIZE]
        train = [{"text": ex["text"]} for ex in splits["train"]] if cfg.data else splits["train"]
        task = cls(
            load_tokenizer(cfg.model),
            mode=cfg.mode,
            pooling=cfg.pooling,
            temperature=cfg.temperature,
            max_len=cfg.max_len,
            train_examples=train,
            dev_examples=splits["dev"],
            index_examples=index,
        )
        return task, encoder

    @classmethod
    def pretrained_settings(cls, model_cfg: Any) -> dict:
        """A pretrained BERT directory embeds with its first token's vector, 128 tokens at most."""
        return {"task": "embed", "max_len": min(128, model_cfg.max_seq_len)}

    @classmethod
    def from_settings(cls, run_dir: Path, settings: dict) -> EmbeddingTask:
        return cls(load_tokenizer(run_dir), pooling=settings.get("pooling", "cls"), max_len=settings["max_len"])

    def predict(self, model: nn.Module, examples: Sequence[dict], *, device: torch.device) -> list[dict]:
        vectors = self.vectors(model, [ex["text"] for ex in examples], device=device)
        return [{"embedding": v.tolist()} for v in vectors]

    def extras(self) -> dict:
        return {"selection": self.selection[0], "knn_index": len(self.index_examples)}

    def settings(self) -> dict:
        return {
            "task": self.name,
            "pooling": self.pooling,
            "max_len": self.max_len,
            "mode": self.mode,
            "temperature": self.temperature,
        }

    # --- data --------------------------------------------------------------------------------
    def encode_texts(self, texts: Sequence[str]) -> list[np.ndarray]:
        encoded = self.tokenizer.tokenizer.encode_batch(list(texts))
        out = []
        for e in encoded:
            ids = e.ids if len(e.ids) <= self.max_len else [*e.ids[: self.max_len - 1], e.ids[-1]]  # keep [SEP]
            out.append(np.asarray(ids, dtype=np.int32))
        return out

    def encode(self, examples: Sequence[dict], *, fields: tuple[str, ...], split: str) -> list[tuple]:
        columns = []
        for f in fields:
            present = [i for i, ex in enumerate(examples) if ex.get(f)]
            encoded = dict(zip(present, self.encode_texts([examples[i][f] for i in present]), strict=True))
            columns.append([encoded.get(i) for i in range(len(examples))])
        self.truncated[split] = sum(
            len(self.tokenizer.encode(ex["text"])) > self.max_len for ex in examples[:2000]
        )  # counted on the first 2,000 texts
        return list(zip(*columns, strict=True)) if columns else []

    def collate(self, items: list[tuple], *, generator: torch.Generator | None = None) -> dict[str, Any]:
        anchors = [it[0] for it in items]
        if self.mode == "unsup":
            rows = anchors + anchors  # the same sentences twice: dropout makes two views
        else:
            rows = anchors + [it[1] for it in items] + [it[2] for it in items if len(it) > 2]
        ids = pad(rows, self.pad_id)
        lengths = [len(r) for r in rows]
        return {
            "input_ids": ids,
            "attention_mask": padding_mask(lengths, ids.shape[1]),
            "n_anchors": len(items),
            "n_negatives": len(rows) - 2 * len(items),
            "n_targets": len(items),
            "n_tokens": sum(lengths),
        }

    # --- model, loss -------------------------------------------------------------------------
    def embed(self, model: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return pool(model(input_ids, attention_mask=attention_mask), attention_mask, self.pooling)  # (N, D)

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> LossOutput:
        z = self.embed(model, batch["input_ids"], batch["attention_mask"])
        B = batch["n_anchors"]
        anchors, positives, negatives = z[:B], z[B : 2 * B], z[2 * B :]
        candidates = gather_with_grad(positives)  # (world x B, D)
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        if batch["n_negatives"]:
            candidates = torch.cat([candidates, gather_with_grad(negatives)])
        targets = torch.arange(B, device=z.device) + rank * B
        loss_sum, correct = info_nce(anchors, candidates, targets, self.temperature)
        return LossOutput(loss_sum, {"correct": float(correct)})

    def metrics(self, sums: dict[str, float]) -> dict[str, float]:
        n = max(sums["n_targets"], 1.0)
        return {"loss": sums["loss_sum"] / n, "accuracy": sums.get("correct", 0.0) / n}

    def flops(self, model: nn.Module, batch: dict[str, Any]) -> float:
        cfg = model.cfg
        N, T = batch["input_ids"].shape
        return transformer_train_flops(
            n_layers=cfg.n_layers,
            d_model=cfg.d_model,
            d_ff=flops_d_ff(cfg),
            n_tokens=N * T,
            seq_len=T,
            head_rows=0,
            head_flops_per_row=0,
        )

    # --- inference and evaluation ------------------------------------------------------------
    def vectors(self, model: nn.Module, texts: Sequence[str], *, device: torch.device) -> np.ndarray:
        """L2-normalised sentence vectors (N, D) of ``texts``, in their order (eval mode, batched by length)."""
        ids = self.encode_texts(texts)
        out = np.zeros((len(texts), model.cfg.d_model), dtype=np.float32)
        was_training = model.training
        model.eval()
        with torch.no_grad():
            for idx in length_sorted_batches([len(x) for x in ids], self.eval_batch_size):
                batch = pad([ids[i] for i in idx], self.pad_id)
                mask = padding_mask([len(ids[i]) for i in idx], batch.shape[1])
                b = to_device({"ids": batch, "mask": mask}, device)
                out[idx] = F.normalize(self.embed(model, b["ids"], b["mask"]).float(), dim=-1).cpu().numpy()
        model.train(was_training)
        return out

    def evaluate(self, model: nn.Module, examples: Sequence[dict] | None = None, *, device: torch.device) -> dict:
        examples = self.dev_examples if examples is None else list(examples)
        if not examples:
            return {}
        texts = [ex["text"] for ex in examples]
        z = self.vectors(model, texts, device=device)
        result: dict[str, Any] = {"uniformity": uniformity(z)}
        if all(ex.get("text_pair") for ex in examples):
            zp = self.vectors(model, [ex["text_pair"] for ex in examples], device=device)
            result["alignment"] = float(((z - zp) ** 2).sum(-1).mean())
            if all("score" in ex for ex in examples):
                result["spearman"] = float(spearmanr((z * zp).sum(-1), [float(ex["score"]) for ex in examples])[0])
        else:  # two dropout views of each text are the positive pairs, as in training
            result["alignment"] = self._dropout_alignment(model, texts[:512], device)
        result["alignment_uniformity"] = result["alignment"] + result["uniformity"]
        if self.index_examples and all("label" in ex for ex in examples):
            index = self.vectors(model, [ex["text"] for ex in self.index_examples], device=device)
            result["knn_accuracy"] = knn_accuracy(
                index, [ex["label"] for ex in self.index_examples], z, [ex["label"] for ex in examples], k=self.knn
            )
        return result

    def _dropout_alignment(self, model: nn.Module, texts: Sequence[str], device: torch.device) -> float:
        """Mean squared distance between two dropout views of each text (a fixed seed, the global RNG untouched)."""
        ids = self.encode_texts(texts)
        batch = pad(ids, self.pad_id).to(device)
        mask = padding_mask([len(x) for x in ids], batch.shape[1]).to(device)
        was_training = model.training
        model.train()
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(0)
            a, b = (F.normalize(self.embed(model, batch, mask).float(), dim=-1) for _ in range(2))
        model.train(was_training)
        return float(((a - b) ** 2).sum(-1).mean())


def _read_texts(path: str, *, skip_bad_rows: bool):
    return read_labelled(path, skip_bad_rows=skip_bad_rows, need_label=False)


def _require(examples: Sequence[dict], field: str, problem: str) -> None:
    missing = next((i for i, ex in enumerate(examples) if not ex.get(field)), None)
    if missing is not None:
        raise UserError(f"{examples[missing].get('source', f'training example {missing + 1}')}: {problem}")


def uniformity(z: np.ndarray, *, limit: int = 2000) -> float:
    """log E exp(-2 ||x - y||^2) over distinct pairs of the first ``limit`` unit vectors (Wang & Isola, 2020)."""
    z = torch.from_numpy(z[:limit])
    d2 = torch.cdist(z, z).pow(2)
    off = ~torch.eye(len(z), dtype=torch.bool)
    return float(torch.log(torch.exp(-2 * d2[off]).mean()))


def knn_accuracy(index: np.ndarray, index_labels: list, queries: np.ndarray, labels: list, *, k: int) -> float:
    """Share of queries whose k nearest index vectors (cosine) vote for their label (ties: nearest wins)."""
    sims = torch.from_numpy(queries) @ torch.from_numpy(index).t()  # (Q, I)
    top = sims.topk(min(k, len(index)), dim=-1).indices.tolist()
    correct = 0
    for row, gold in zip(top, labels, strict=True):
        votes: dict = {}
        for rank, i in enumerate(row):
            votes.setdefault(index_labels[i], [0, -rank])[0] += 1
        correct += max(votes, key=lambda label: tuple(votes[label])) == gold
    return correct / max(len(labels), 1)
