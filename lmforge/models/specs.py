"""Model shape specs that recipes and the command line name, torch-free (``--help`` imports no torch).

``ModelSpec``: a named size (``models/sizes.py``) with overrides; ``ElectraSpec``: ELECTRA's generator
and objective weights (``models/electra.py``, ``tasks/electra.py``); ``Seq2SeqSpec``: the translation
encoder-decoder (``models/seq2seq.py``); ``LoRASpec``: low-rank adapters on a frozen base (``models/lora.py``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from lmforge.errors import UserError


@dataclass
class ModelSpec:
    """A named size, optionally reshaped (None keeps the size's value)."""

    size: str = "bert-tiny"
    """Named size (lmforge.models.sizes): bert-tiny, bert-mini, ..., gpt-tiny, llama-tiny, ..."""
    n_layers: int | None = None
    """Transformer layers."""
    n_heads: int | None = None
    """Attention heads."""
    n_kv_heads: int | None = None
    """Key/value heads (GPT sizes: grouped-query attention)."""
    d_model: int | None = None
    """Hidden width."""
    d_ff: int | None = None
    """Feed-forward width."""
    max_seq_len: int | None = None
    """Longest sequence the model accepts."""
    dropout: float | None = None
    """Dropout (BERT: also on attention probabilities)."""
    pre_norm: bool | None = None
    """BERT sizes: pre-LN blocks with a final LayerNorm (Xiong et al. 2020); None = the size's (post-LN)."""
    gated_ffn: bool | None = None
    """BERT sizes: GEGLU feed-forward (Shazeer 2020); None = the size's (plain GELU)."""
    bias: bool | None = None
    """BERT sizes: biases in the attention and feed-forward projections; None = the size's (with)."""
    bigram_buckets: int | None = None
    """BERT sizes: rows of the hashed (previous token, token) embedding table; 0 or None = no table."""

    def build(self, vocab_size: int):
        """The model config: the named size with this spec's overrides."""
        from lmforge.models.bert import BertConfig
        from lmforge.models.sizes import model_size

        cfg = model_size(self.size, vocab_size=vocab_size)
        changes = {k: v for k, v in dataclasses.asdict(self).items() if k != "size" and v is not None}
        if "n_kv_heads" in changes and isinstance(cfg, BertConfig):
            raise UserError("model.n_kv_heads applies to GPT sizes only")
        bert_only = sorted(k for k in ("pre_norm", "gated_ffn", "bias", "bigram_buckets") if k in changes)
        if bert_only and not isinstance(cfg, BertConfig):
            raise UserError(f"model.{bert_only[0]} applies to BERT sizes only (model.size={self.size!r} is a GPT)")
        if isinstance(cfg, BertConfig) and "dropout" in changes:
            changes["attn_dropout"] = changes["dropout"]
        return dataclasses.replace(cfg, **changes)


@dataclass
class ElectraSpec:
    """The generator and the objective of ELECTRA pretraining (task: electra)."""

    generator_fraction: float = 0.25
    """Generator width (and heads, feed-forward) as a fraction of the discriminator's."""
    generator_layers: int | None = None
    """Generator depth; None = the discriminator's."""
    disc_weight: float = 50.0
    """lambda: weight of the discriminator's loss against the generator's MLM loss."""
    sampling: Literal["multinomial", "gumbel"] = "multinomial"
    """How replacements are drawn from the generator (the Gumbel-max trick draws the same distribution)."""
    generator_objective: Literal["mle", "adversarial", "mixed"] = "mle"
    """mle (ELECTRA), adversarial (REINFORCE against the discriminator), or mixed (both)."""
    adversarial_weight: float = 1.0
    """Weight of the REINFORCE loss (adversarial and mixed)."""
    baseline_decay: float = 0.99
    """Decay of the running-mean reward baseline."""

    def __post_init__(self) -> None:
        if not 0.0 < self.generator_fraction <= 1.0:
            raise UserError(f"electra.generator_fraction={self.generator_fraction} must be in (0, 1]")
        if self.generator_layers is not None and self.generator_layers <= 0:
            raise UserError(f"electra.generator_layers={self.generator_layers} must be positive")
        if self.disc_weight <= 0 or self.adversarial_weight <= 0 or not 0 <= self.baseline_decay < 1:
            raise UserError("electra.disc_weight and adversarial_weight must be > 0, baseline_decay in [0, 1)")


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


@dataclass
class LoRASpec:
    """Low-rank adapters (LoRA, Hu et al. 2021) on a frozen base; rank 0 = full fine-tuning."""

    rank: int = 0
    """Rank r of each adapter; 0 = no adapters (every weight trains)."""
    alpha: float = 16.0
    """Scale numerator: the update is (alpha / r) * B A (rsLoRA: alpha / sqrt(r))."""
    dropout: float = 0.0
    """Dropout on the adapters' input (the base's path has none)."""
    targets: list[str] = dataclasses.field(default_factory=list)
    """Linear layers to adapt, as patterns on lmforge's module names (``fnmatch``: ``*.attn.qkv``); empty = the
    family's default (``models/lora.DEFAULT_TARGETS``: attention and feed-forward projections)."""
    rslora: bool = False
    """Rank-stabilised scaling alpha / sqrt(r) (Kalajievski 2023)."""
    dora: bool = False
    """Weight-decomposed adapters (DoRA, Liu et al. 2024): a trained magnitude per output row times the direction of
    W + (alpha / r) B A."""
    base: Literal["auto", "fp32", "bf16", "int8"] = "auto"
    """How the frozen base's adapted matrices are held: fp32; bf16 (half the memory); int8 weight-only with one scale
    per row (a quarter: the QLoRA idea with the int8 kernels decoding uses); auto = bf16 where bf16 arithmetic is
    native, else fp32."""

    def __post_init__(self) -> None:
        if self.rank < 0:
            raise UserError(f"lora.rank={self.rank}: must be >= 0 (0 = no adapters)")
        if self.alpha <= 0:
            raise UserError(f"lora.alpha={self.alpha}: must be > 0")
        if not 0 <= self.dropout < 1:
            raise UserError(f"lora.dropout={self.dropout}: must be in [0, 1)")
