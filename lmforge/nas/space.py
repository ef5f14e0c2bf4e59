"""The architecture search space: which shapes a search may pick, and the constraints they must meet.

An architecture (``Arch``) is a uniform transformer: ``n_layers`` layers of width ``d_model`` with
``n_heads`` heads and feed-forward width ``d_ff`` (the dimensions HAT, Wang et al. 2020, and
AutoTinyBERT, Yin et al. 2021, search; both also allow per-layer widths, which we leave out so that
every candidate is a plain lmforge model). The space lists the allowed values of each dimension;
an architecture belongs to it when each value is allowed and ``n_heads`` divides ``d_model``.
Constraints bound the parameter count and the latency predicted (or measured) on this device at
the space's batch size and sequence length.
"""

from __future__ import annotations

import dataclasses
import itertools
import random
from dataclasses import dataclass, field
from typing import Literal

import torch

from lmforge.errors import UserError
from lmforge.models.bert import BertConfig
from lmforge.models.gpt import GPTConfig
from lmforge.models.registry import build_model
from lmforge.models.sizes import SIZES


@dataclass(frozen=True, order=True)
class Arch:
    """One candidate architecture."""

    n_layers: int
    d_model: int
    n_heads: int
    d_ff: int

    @property
    def name(self) -> str:
        return f"L{self.n_layers}-D{self.d_model}-H{self.n_heads}-F{self.d_ff}"

    def config(self, base: BertConfig | GPTConfig) -> BertConfig | GPTConfig:
        """``base`` (vocabulary, positions, dropout, ...) with this shape."""
        return dataclasses.replace(base, **dataclasses.asdict(self))

    @classmethod
    def of(cls, cfg: BertConfig | GPTConfig) -> Arch:
        return cls(cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.d_ff)


@dataclass
class SearchSpace:
    """Allowed values of each dimension, the model family, and the constraints on a candidate."""

    family: Literal["bert", "gpt"] = "bert"
    """bert (encoder: classification, NER) or gpt (decoder)."""
    n_layers: list[int] = field(default_factory=lambda: [1, 2, 3])
    """Allowed layer counts."""
    d_model: list[int] = field(default_factory=lambda: [64, 128, 192])
    """Allowed widths."""
    n_heads: list[int] = field(default_factory=lambda: [1, 2, 4])
    """Allowed head counts (a candidate's must divide its width)."""
    d_ff: list[int] = field(default_factory=lambda: [128, 256, 512, 768])
    """Allowed feed-forward widths."""
    max_params: int = 0
    """Largest parameter count allowed (embeddings included); 0 = no limit."""
    max_latency_ms: float = 0.0
    """Largest latency allowed at latency_batch x latency_seq_len on this device; 0 = no limit."""
    latency_batch: int = 8
    """Batch size latency is measured and constrained at."""
    latency_seq_len: int = 128
    """Sequence length latency is measured and constrained at."""
    baselines: list[str] = field(default_factory=lambda: ["bert-tiny", "bert-mini"])
    """Named sizes measured and marked beside the search's results."""

    def __post_init__(self) -> None:
        for key in ("n_layers", "d_model", "n_heads", "d_ff"):
            values = getattr(self, key)
            if not values or any(v <= 0 for v in values):
                raise UserError(f"space.{key}={values}: give at least one positive value")
            setattr(self, key, sorted(set(values)))
        if not self.archs():
            raise UserError(f"space: no n_heads in {self.n_heads} divides any d_model in {self.d_model}")
        for name in self.baselines:
            if name not in SIZES:
                raise UserError(f"space.baselines: unknown size {name!r}; known sizes: {', '.join(SIZES)}")

    def archs(self) -> list[Arch]:
        """Every architecture of the space, smallest first."""
        return [
            Arch(n, d, h, f)
            for n, d, h, f in itertools.product(self.n_layers, self.d_model, self.n_heads, self.d_ff)
            if d % h == 0
        ]

    def contains(self, arch: Arch) -> bool:
        return (
            arch.n_layers in self.n_layers
            and arch.d_model in self.d_model
            and arch.n_heads in self.n_heads
            and arch.d_ff in self.d_ff
            and arch.d_model % arch.n_heads == 0
        )

    @property
    def largest(self) -> Arch:
        """Every dimension at its maximum: the supernet (the most heads that divide the widest width)."""
        d = self.d_model[-1]
        return Arch(self.n_layers[-1], d, max(h for h in self.n_heads if d % h == 0), self.d_ff[-1])

    @property
    def smallest(self) -> Arch:
        d = self.d_model[0]
        return Arch(self.n_layers[0], d, min(h for h in self.n_heads if d % h == 0), self.d_ff[0])

    def sample(self, rng: random.Random) -> Arch:
        """A uniformly random architecture of the space."""
        while True:
            arch = Arch(
                rng.choice(self.n_layers), rng.choice(self.d_model), rng.choice(self.n_heads), rng.choice(self.d_ff)
            )
            if arch.d_model % arch.n_heads == 0:
                return arch

    def check_supernet(self) -> None:
        """Weight sharing slices every dimension from the largest network: each head count must divide it."""
        bad = [h for h in self.n_heads if self.largest.d_model % h]
        if bad:
            raise UserError(f"space.n_heads {bad} do not divide the largest d_model {self.largest.d_model}")


def base_config(space: SearchSpace, vocab_size: int, *, max_seq_len: int) -> BertConfig | GPTConfig:
    """The family's config that every candidate reshapes (no pooler / MLM head: task heads sit on top)."""
    if space.family == "bert":
        return BertConfig(vocab_size=vocab_size, max_seq_len=max_seq_len, pooler=False, mlm_head=False)
    return GPTConfig(vocab_size=vocab_size, max_seq_len=max_seq_len)


def count_params(arch: Arch, base: BertConfig | GPTConfig) -> int:
    """Parameters of the encoder / decoder of ``arch`` (embeddings included), counted on a model built
    on the meta device (no memory, exact)."""
    with torch.device("meta"):
        model = build_model(arch.config(base))
    return sum(p.numel() for p in model.parameters())


def forward_flops(arch: Arch, *, batch: int, seq_len: int) -> float:
    """Matmul FLOPs of one forward pass over batch x seq_len tokens (the projections, the feed-forward,
    attention scores and weighted values; embeddings lookups and norms are not matmuls)."""
    d, f, T = arch.d_model, arch.d_ff, seq_len
    per_token = arch.n_layers * (2 * 4 * d * d + 2 * 2 * d * f + 2 * 2 * T * d)
    return float(per_token * batch * T)
