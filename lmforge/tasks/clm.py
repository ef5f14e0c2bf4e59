"""Causal language modelling for GPT (Radford et al., 2018/2019) over packed token shards.

Windows of the token stream (documents end in <|endoftext|>) of ``seq_len + 1`` tokens give
``seq_len`` inputs and the next-token targets. The loss uses the chunked fused linear +
cross-entropy of ``tasks/base.py``, so the (B*T, V) logits are never materialised at once.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from lmforge.data.shards import TokenWindows
from lmforge.models.gpt import GPTConfig
from lmforge.ops.linear_cross_entropy import linear_cross_entropy
from lmforge.tasks.base import LossOutput, flops_d_ff, lm_metrics, transformer_train_flops


class CLMTask:
    """Next-token prediction over token shards."""

    @classmethod
    def pretraining_model(cls, model_cfg: Any, electra: Any) -> nn.Module:
        """A freshly initialised GPT of ``model_cfg``."""
        from lmforge.models.registry import build_model

        return build_model(model_cfg)

    @classmethod
    def for_pretraining(cls, cfg: Any, tok: Any, shards: Any, entry: Any) -> CLMTask:
        """The objective of a pretraining recipe (``runs/config.PretrainConfig``) over its token shards."""
        return cls(shards=str(shards), seq_len=cfg.data.seq_len)

    def __init__(self, *, shards: str, seq_len: int) -> None:
        self.name = "clm"
        self.seq_len = seq_len
        self.train_items = TokenWindows(shards, "train", length=seq_len + 1, stride=seq_len)
        self.val_items = TokenWindows(shards, "val", length=seq_len + 1, stride=seq_len)

    def collate(self, items: list[Any], *, generator: torch.Generator) -> dict[str, Any]:
        windows = torch.from_numpy(np.stack(items))  # (B, T+1)
        return {"input_ids": windows[:, :-1], "labels": windows[:, 1:], "n_targets": windows[:, 1:].numel()}

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> LossOutput:
        return clm_loss(model, batch)

    def metrics(self, sums: dict[str, float]) -> dict[str, float]:
        return lm_metrics(sums)

    def flops(self, model: nn.Module, batch: dict[str, Any]) -> float:
        return clm_train_flops(model.cfg, batch)


def clm_loss(model: nn.Module, batch: dict[str, Any]) -> LossOutput:
    """Summed next-token loss through the chunked fused head."""
    hidden = model.hidden_states(batch["input_ids"])  # (B, T, D)
    weight = model.output_weight
    loss_sum, correct = linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), weight, batch["labels"].reshape(-1))
    return LossOutput(loss_sum, {"correct": float(correct)})


def clm_train_flops(cfg: GPTConfig, batch: dict[str, Any]) -> float:
    """Training FLOPs of a batch: every position runs the whole stack and the vocabulary head."""
    B, T = batch["input_ids"].shape
    d_ff = flops_d_ff(cfg)
    return transformer_train_flops(
        n_layers=cfg.n_layers,
        d_model=cfg.d_model,
        d_ff=d_ff,
        n_tokens=B * T,
        seq_len=T,
        head_rows=B * T,
        head_flops_per_row=2 * cfg.d_model * cfg.vocab_size,
    )
