"""TrainConfig: how ``train.loop.fit`` trains (steps, batches, optimizer, precision, evaluation,
early stopping, adversarial training, checkpoints). Its field docstrings are the ``--help`` text."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from lmforge.config import check_range
from lmforge.train.optim import OptimConfig


def check_device(device: str, *, key: str = "device") -> None:
    """ValueError unless ``device`` is auto or a device torch knows and this machine has."""
    if device == "auto":
        return
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(f"{key}={device!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{key}={device!r}: this machine has no CUDA device; use auto or cpu")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"{key}={device!r}: lmforge trains on cpu or cuda")


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
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """bf16 autocast (CPU and CUDA) or fp16 with loss scaling (CUDA)."""
    compile: bool = False
    """torch.compile every transformer block."""
    deterministic: bool = False
    """Deterministic kernels (exact repeatability, slower on GPU)."""
    seed: int = 1234
    """Seed for initialisation, data order, masking and dropout."""
    eval_every: int = 200
    """Evaluate every N steps (and at the end); 0 = only at the end."""
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
                raise ValueError(f"train.{key}={getattr(self, key)} must be positive")
        for key in ("max_minutes", "grad_clip", "eval_every", "patience", "save_every", "keep_last", "adv_steps"):
            check_range(f"train.{key}", getattr(self, key), at_least=0)
        check_range("train.max_bad_steps", self.max_bad_steps, at_least=1)
        check_device(self.device, key="train.device")
