"""Optimizers, parameter groups and learning-rate schedules.

AdamW (Loshchilov & Hutter, 2019) with torch's fused kernel (CPU and CUDA), or SGD with
momentum. Weight decay applies to matrices only: norms, biases and other 1-D parameters are
exempt (as in BERT and GPT-2 training code). Schedules: linear warmup, then cosine or linear
decay to ``min_lr_ratio`` of the peak, or constant. Warm-up never takes more than ``warmup_share`` of the run
(a quarter by default), the cap that transformers' ``warmup_ratio`` expresses as a share: a 3-step fine-tune on a
30-row file otherwise ends inside a 100-step warm-up at a hundredth of its learning rate.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lmforge.train.config import OptimConfig

__all__ = ["OptimConfig", "build_optimizer", "build_scheduler", "lr_factor", "param_groups"]


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    # The fused kernel (CUDA and, since torch 2.4, CPU) updates each tensor in one pass instead of ~10.
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=True)


def lr_factor(step: int, *, cfg: OptimConfig, total_steps: int) -> float:
    """Multiplier of the peak learning rate at ``step`` (0-based)."""
    warmup = cfg.warmup_for(total_steps)
    if warmup and step < warmup:
        return (step + 1) / warmup
    if cfg.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.schedule == "cosine" else 1.0 - progress
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * shape


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg=cfg, total_steps=total_steps))
