"""TrainConfig and OptimConfig: how ``train.loop.fit`` trains (steps, batches, optimizer, precision,
evaluation, early stopping, adversarial training, checkpoints). Torch-free, so ``--help`` imports no
torch; their field docstrings are the ``--help`` text."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from lmforge.config import check_range
from lmforge.errors import UserError


@dataclass
class OptimConfig:
    """Optimizer and learning-rate schedule."""

    name: Literal["adamw", "sgd"] = "adamw"
    """adamw or sgd (with momentum)."""
    lr: float = 5e-4
    """Peak learning rate."""
    weight_decay: float = 0.01
    """Decoupled weight decay on matrices (not norms or biases)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.98
    """AdamW beta2."""
    eps: float = 1e-6
    """AdamW epsilon."""
    momentum: float = 0.9
    """SGD momentum."""
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after warmup."""
    warmup_steps: int = 100
    """Linear warmup steps from 0 to lr (at most warmup_share of the run)."""
    warmup_share: float = 0.25
    """The largest share of the run's steps that warm-up may take: a run shorter than warmup_steps / warmup_share
    warms up for that share of its steps instead, so a short run still reaches its peak learning rate
    (1 = warmup_steps as given, even if the run ends inside it)."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of lr."""

    def warmup_for(self, total_steps: int) -> int:
        """The warm-up steps of a run of ``total_steps``: warmup_steps, capped at warmup_share of the run (a share of
        1 caps nothing)."""
        if self.warmup_share >= 1:
            return self.warmup_steps
        return min(self.warmup_steps, int(self.warmup_share * total_steps))

    def __post_init__(self) -> None:
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise UserError(f"optim.lr={self.lr} must be a finite positive number")
        if self.warmup_steps < 0:
            raise UserError(f"optim.warmup_steps={self.warmup_steps} must be >= 0")
        if not 0.0 < self.warmup_share <= 1.0:
            raise UserError(f"optim.warmup_share={self.warmup_share} must be in (0, 1]")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise UserError(f"optim.min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")


def check_device(device: str, *, key: str = "device") -> None:
    """ValueError unless ``device`` is auto or a device torch knows and this machine has."""
    if device == "auto":
        return
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise UserError(f"{key}={device!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"{key}={device!r}: this machine has no CUDA device; use auto or cpu")
    if dev.type not in ("cpu", "cuda"):
        raise UserError(f"{key}={device!r}: lmforge trains on cpu or cuda")


@dataclass
class TrainConfig:
    """How to train: steps, batch, optimizer, precision, evaluation, checkpoints."""

    max_steps: int = 1000
    """Optimizer steps."""
    max_minutes: float = 0.0
    """Stop (with a checkpoint) after this much wall time; 0 = no limit."""
    global_batch_size: int = 32
    """Sequences per optimizer step, over all processes and accumulation."""
    micro_batch_size: int = 32
    """Sequences per forward pass; global = micro x accumulation x processes."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    grad_clip: float = 1.0
    """Clip the global gradient norm (0 = off)."""
    precision: Literal["fp32", "bf16", "fp16", "auto"] = "fp32"
    """bf16 autocast (CPU and CUDA) or fp16 with loss scaling (CUDA); auto: bf16 on a GPU with bf16 or a CPU with
    avx512_bf16 / amx_bf16, else fp32 (a CPU without them emulates bf16, ~4x slower than fp32)."""
    compile: bool = False
    """torch.compile every transformer block."""
    activation_checkpointing: bool = False
    """Keep only each transformer block's input for the backward pass and recompute the rest (Chen et al. 2016):
    activations take one block's worth of memory instead of all of them, for about a third more compute."""
    deterministic: bool = False
    """Deterministic kernels (exact repeatability, slower on GPU)."""
    seed: int = 1234
    """Seed for initialisation, data order, masking and dropout."""
    eval_every: int = 200
    """Evaluate every N steps (and at the end); 0 = only at the end."""
    min_evals: int = 0
    """Evaluate at least this many times in a run: a run shorter than eval_every x min_evals steps evaluates every
    max_steps / min_evals steps instead (0 = eval_every as given)."""
    eval_batches: int = 50
    """Validation micro-batches per evaluation (tasks with their own evaluate() use the whole dev set)."""
    patience: int = 0
    """Early stopping: stop after this many evaluations without a better dev metric; 0 = never."""
    adversarial: Literal["none", "fgm", "pgd"] = "none"
    """Adversarial training on the word embeddings (FGM or PGD)."""
    adv_epsilon: float = 1.0
    """FGM/PGD: L2 size of the embedding perturbation."""
    adv_alpha: float = 0.3
    """PGD: size of each ascent step."""
    adv_steps: int = 3
    """PGD: ascent steps per batch."""
    log_every: int = 10
    """Log training metrics every N steps."""
    save_every: int = 500
    """Checkpoint every N steps (and at the end)."""
    keep_last: int = 2
    """Checkpoints kept besides the best."""
    max_bad_steps: int = 10
    """Stop after this many consecutive non-finite losses or gradients."""
    distributed: Literal["ddp", "fsdp"] = "ddp"
    """Strategy under torchrun."""
    device: str = "auto"
    """auto, cpu or cuda."""
    progress: bool = True
    """Show a progress bar."""
    peak_tflops: float = 0.0
    """Device peak for MFU in TFLOP/s; 0 = measure once and cache."""

    def __post_init__(self) -> None:
        for key in ("max_steps", "global_batch_size", "micro_batch_size", "log_every", "eval_batches"):
            if getattr(self, key) <= 0:
                raise UserError(f"training.{key}={getattr(self, key)} must be positive")
        for key in (
            "max_minutes",
            "grad_clip",
            "eval_every",
            "min_evals",
            "patience",
            "save_every",
            "keep_last",
            "adv_steps",
        ):
            check_range(f"training.{key}", getattr(self, key), at_least=0)
        check_range("training.max_bad_steps", self.max_bad_steps, at_least=1)
        check_device(self.device, key="training.device")

    def eval_interval(self) -> int:
        """Steps between evaluations: eval_every, shortened so that the run evaluates min_evals times (0: only at
        the end)."""
        if not (self.eval_every and self.min_evals):
            return self.eval_every
        return max(1, min(self.eval_every, self.max_steps // self.min_evals))


def loop_defaults(
    *,
    batch: int,
    every: int,
    log_every: int,
    lr: float,
    warmup: int,
    schedule: str,
    min_lr_ratio: float = 0.0,
    weight_decay: float = 0.01,
    **more,
) -> TrainConfig:
    """A recipe's default loop: ``batch`` sequences per step (one micro-batch), evaluated and saved ``every``
    steps, AdamW at ``lr`` with ``warmup`` steps and the ``schedule``; ``more`` sets any other field."""
    optim = OptimConfig(
        lr=lr, warmup_steps=warmup, schedule=schedule, min_lr_ratio=min_lr_ratio, weight_decay=weight_decay
    )
    return TrainConfig(
        global_batch_size=batch,
        micro_batch_size=batch,
        eval_every=every,
        save_every=every,
        log_every=log_every,
        optim=optim,
        **more,
    )
