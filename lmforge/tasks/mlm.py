"""Masked language modelling for BERT (Devlin et al., 2019), with Chinese whole-word masking.

Each training sequence is [CLS] followed by a window of the packed token stream (documents end in
[SEP]). Masking is dynamic (RoBERTa, Liu et al., 2019): drawn anew for every batch from a
generator the loop seeds per step, so a resumed run masks exactly as the uninterrupted one. 15%
of the non-special tokens (or, with whole-word masking, of the jieba words: Cui et al., 2019)
are selected; of those 80% become [MASK], 10% a random token, 10% stay. The head runs only at the
selected positions: hidden states are gathered before the vocabulary projection, whose cost
dominates small models (transformers projects every position).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from lmforge.data.shards import TokenWindows
from lmforge.data.tokenizer import LMTokenizer
from lmforge.errors import UserError
from lmforge.models.bert import BertConfig
from lmforge.ops.linear_cross_entropy import linear_cross_entropy
from lmforge.tasks.base import LossOutput, flops_d_ff, lm_metrics, transformer_train_flops


class _WindowsWithWords(Sequence):
    """Windows plus, for whole-word masking, their word-start flags."""

    def __init__(self, windows: TokenWindows, whole_word: bool) -> None:
        self.windows, self.whole_word = windows, whole_word

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray | None]:
        words = self.windows.word_starts_at(i) if self.whole_word else None
        return self.windows[i], words


class MLMTask:
    """Masked LM over token shards; ``whole_word`` masks jieba words as a whole."""

    @classmethod
    def pretraining_model(cls, model_cfg: Any, electra: Any) -> nn.Module:
        """A freshly initialised BERT of ``model_cfg``."""
        from lmforge.models.registry import build_model

        return build_model(model_cfg)

    @classmethod
    def for_pretraining(cls, cfg: Any, tok: Any, shards: Any, entry: Any) -> MLMTask:
        """The objective of a pretraining recipe (``runs/config.PretrainConfig``) over its token shards."""
        return cls(
            shards=str(shards),
            tokenizer=tok,
            seq_len=cfg.data.seq_len,
            mask_prob=cfg.mask_prob,
            whole_word=entry.whole_word,
        )

    def __init__(
        self,
        *,
        shards: str,
        tokenizer: LMTokenizer,
        seq_len: int,
        mask_prob: float = 0.15,
        whole_word: bool = False,
    ) -> None:
        self.name = "wwm-mlm" if whole_word else "mlm"
        ids = {r: tokenizer.token_id(r) for r in ("cls", "sep", "mask", "pad", "unk")}
        missing = [r for r in ("cls", "sep", "mask") if ids[r] is None]
        if missing:
            raise UserError(f"MLM needs a WordPiece tokenizer with [CLS] [SEP] [MASK]; missing: {missing}")
        self.cls_id, self.mask_id = ids["cls"], ids["mask"]
        self.special = torch.tensor(sorted(i for i in ids.values() if i is not None))
        self.vocab_size = tokenizer.vocab_size
        self.seq_len, self.mask_prob = seq_len, mask_prob
        length = seq_len - 1  # [CLS] + window
        self.train_items = _WindowsWithWords(TokenWindows(shards, "train", length=length), whole_word)
        self.val_items = _WindowsWithWords(TokenWindows(shards, "val", length=length), whole_word)
        self.whole_word = whole_word

    def collate(self, items: list[Any], *, generator: torch.Generator) -> dict[str, Any]:
        windows = torch.from_numpy(np.stack([w for w, _ in items]))  # (B, T-1)
        B = windows.shape[0]
        input_ids = torch.cat([torch.full((B, 1), self.cls_id), windows], dim=1)  # (B, T)
        candidates = ~torch.isin(input_ids, self.special)
        if self.whole_word:
            starts = torch.from_numpy(np.stack([w for _, w in items]))
            starts = torch.cat([torch.ones(B, 1, dtype=torch.bool), starts], dim=1)
            word = starts.long().cumsum(1)  # (B, T) word index per token
            chosen = torch.rand(word.shape, generator=generator) < self.mask_prob
            selected = chosen.gather(1, word.clamp(max=word.shape[1] - 1)) & candidates
        else:
            selected = (torch.rand(input_ids.shape, generator=generator) < self.mask_prob) & candidates
        if not selected.any():  # tiny batches: always predict something
            selected.view(-1)[candidates.view(-1).nonzero()[0]] = True
        positions = selected.view(-1).nonzero().squeeze(1)  # flat indices into B*T
        labels = input_ids.view(-1)[positions].clone()
        action = torch.rand(len(positions), generator=generator)
        corrupted = input_ids.clone().view(-1)
        corrupted[positions[action < 0.8]] = self.mask_id
        random_at = positions[(action >= 0.8) & (action < 0.9)]
        corrupted[random_at] = torch.randint(0, self.vocab_size, (len(random_at),), generator=generator)
        return {
            "input_ids": corrupted.view(B, -1),
            "positions": positions,
            "labels": labels,
            "n_targets": len(positions),
        }

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> LossOutput:
        return mlm_loss(model, batch)

    def metrics(self, sums: dict[str, float]) -> dict[str, float]:
        return lm_metrics(sums)

    def flops(self, model: nn.Module, batch: dict[str, Any]) -> float:
        return mlm_train_flops(model.cfg, batch)


def mlm_loss(model: nn.Module, batch: dict[str, Any]) -> LossOutput:
    """Summed loss at the selected positions; the head never sees the other rows."""
    picked = model(batch["input_ids"], select=batch["positions"])  # (N, D): only the masked rows
    head = model.mlm_head
    transformed = head.norm(head.act(head.transform(picked)))
    loss_sum, correct = linear_cross_entropy(transformed, model.embed.word.weight, batch["labels"], bias=head.bias)
    return LossOutput(loss_sum, {"correct": float(correct)})


def mlm_train_flops(cfg: BertConfig, batch: dict[str, Any]) -> float:
    """Training FLOPs actually spent: dense layers but the last, whose keys/values are dense and whose
    queries, output projection, feed-forward and head run at the N masked rows only."""
    B, T = batch["input_ids"].shape
    n, d = batch["n_targets"], cfg.d_model
    d_ff = flops_d_ff(cfg)
    dense = transformer_train_flops(
        n_layers=cfg.n_layers - 1,
        d_model=d,
        d_ff=d_ff,
        n_tokens=B * T,
        seq_len=T,
        head_rows=n,
        head_flops_per_row=2 * d * cfg.vocab_size + 2 * d * d,
    )
    last = 3.0 * (B * T * 4 * d * d + n * (4 * d * d + 4 * d * d_ff + 4 * T * d))
    return dense + last
