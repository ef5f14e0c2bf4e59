"""The GPT decoder: GPT-2 and the Llama / Qwen2 family from one configurable pre-LN stack.

GPT-2 (Radford et al., 2019): learned positions, LayerNorm, tanh-GELU MLP, biases, tied head.
Llama (Touvron et al., 2023) and Qwen2: rotary positions, RMSNorm, SwiGLU, grouped-query
attention (Ainslie et al., 2023), no biases (Qwen2: biases on q/k/v only), untied head.
Reads like nanoGPT's ``model.py``; matches Hugging Face's ``GPT2LMHeadModel``,
``LlamaForCausalLM`` and ``Qwen2ForCausalLM`` numerically (see ``models/convert.py``).
Incremental decoding appends to a preallocated ``KVCache``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from lmforge.errors import UserError
from lmforge.models.layers import (
    Activation,
    Attention,
    Embeddings,
    FeedForward,
    KVCache,
    NormKind,
    RotaryEmbedding,
    build_attention_mask,
    init_weights,
    make_norm,
    scale_residual_projections,
)


@dataclass
class GPTConfig:
    """Shape and flavour of a decoder-only language model."""

    vocab_size: int = 21128
    """Number of token ids."""
    max_seq_len: int = 1024
    """Longest sequence (learned positions) or the context the model is trained for (RoPE)."""
    n_layers: int = 4
    """Transformer blocks."""
    n_heads: int = 4
    """Query heads."""
    n_kv_heads: int | None = None
    """Key/value heads (grouped-query attention); None = n_heads."""
    d_model: int = 256
    """Hidden width."""
    d_ff: int = 1024
    """Feed-forward inner width."""
    head_dim: int | None = None
    """Per-head width; None = d_model // n_heads."""
    dropout: float = 0.0
    """Dropout on embeddings, attention probabilities and residual branches."""
    norm: NormKind = "layernorm"
    """layernorm (GPT-2) or rmsnorm (Llama, Qwen)."""
    norm_eps: float = 1e-5
    """Norm epsilon."""
    positions: Literal["learned", "rope"] = "learned"
    """learned (GPT-2) or rope (Llama, Qwen)."""
    rope_theta: float = 10000.0
    """RoPE base."""
    activation: Activation = "gelu_tanh"
    """Feed-forward activation."""
    gated_ffn: bool = False
    """Gated feed-forward (SwiGLU with activation=silu)."""
    qkv_bias: bool = True
    """Bias on the query/key/value projections."""
    out_bias: bool = True
    """Bias on the attention output projection."""
    ffn_bias: bool = True
    """Biases in the feed-forward."""
    tie_embeddings: bool = True
    """Output projection shares the token embedding matrix."""
    init_std: float = 0.02
    """Standard deviation of the initial weights."""

    def __post_init__(self) -> None:
        for key in ("vocab_size", "max_seq_len", "n_layers", "n_heads", "d_model", "d_ff"):
            if getattr(self, key) <= 0:
                raise UserError(f"model.{key}={getattr(self, key)} must be a positive integer")
        if self.positions not in ("learned", "rope"):
            raise UserError(f"model.positions={self.positions!r} must be 'learned' or 'rope'")
        if self.head_dim is None and self.d_model % self.n_heads:
            raise UserError(f"model.d_model={self.d_model} must be divisible by model.n_heads={self.n_heads}")
        kv = self.n_kv_heads or self.n_heads
        if self.n_heads % kv:
            raise UserError(f"model.n_heads={self.n_heads} must be a multiple of model.n_kv_heads={kv}")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"model.dropout={self.dropout} must be in [0, 1)")

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.d_model // self.n_heads


class Block(nn.Module):
    """Pre-LN block: x = x + attn(norm(x)); x = x + ffn(norm(x))."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.attn_norm = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps)
        self.attn = Attention(
            cfg.d_model,
            cfg.n_heads,
            n_kv_heads=cfg.kv_heads,
            head_dim=cfg.dim_per_head,
            qkv_bias=cfg.qkv_bias,
            out_bias=cfg.out_bias,
            dropout=cfg.dropout,
        )
        self.ffn_norm = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps)
        self.ffn = FeedForward(cfg.d_model, cfg.d_ff, activation=cfg.activation, gated=cfg.gated_ffn, bias=cfg.ffn_bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, *, mask, is_causal, rope, cache, layer) -> Tensor:
        h = self.attn(self.attn_norm(x), mask=mask, is_causal=is_causal, rope=rope, cache=cache, layer=layer)
        x = x + self.dropout(h)
        return x + self.dropout(self.ffn(self.ffn_norm(x)))


class GPT(nn.Module):
    """Decoder-only LM. ``forward`` gives logits; ``hidden_states`` and ``logits`` split it in two."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        learned = cfg.positions == "learned"
        self.embed = Embeddings(
            cfg.vocab_size, cfg.d_model, max_positions=cfg.max_seq_len if learned else 0, dropout=cfg.dropout
        )
        self.rotary = None if learned else RotaryEmbedding(cfg.dim_per_head, cfg.rope_theta)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        init_weights(self, cfg.init_std)
        scale_residual_projections(self, cfg.n_layers, cfg.init_std, ("attn.out.weight", "ffn.down.weight"))

    def new_cache(self, batch_size: int, max_len: int | None = None, *, dtype: torch.dtype | None = None) -> KVCache:
        """An empty KV cache for ``batch_size`` sequences of up to ``max_len`` positions."""
        weight = self.embed.word.weight
        return KVCache(
            n_layers=self.cfg.n_layers,
            batch_size=batch_size,
            n_kv_heads=self.cfg.kv_heads,
            head_dim=self.cfg.dim_per_head,
            max_len=max_len or self.cfg.max_seq_len,
            dtype=dtype or weight.dtype,
            device=weight.device,
        )

    def hidden_states(
        self,
        input_ids: Tensor,
        *,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        cache: KVCache | None = None,
    ) -> Tensor:
        """Final-norm hidden states (B, T, D).

        ``attention_mask`` (B, S) is 1 at real tokens and covers the cached positions too
        (S = cached + T). Positions default to each sequence's count of real tokens so far, so
        left-padded prompts get the same positions as unpadded ones.
        """
        B, T = input_ids.shape
        past = cache.length if cache is not None else 0
        if position_ids is None:
            if attention_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
            else:
                position_ids = torch.arange(past, past + T, device=input_ids.device).expand(B, T)
        x = self.embed(input_ids, position_ids)
        rope = self.rotary(position_ids, x.dtype) if self.rotary is not None else None
        mask, is_causal = build_attention_mask(attention_mask, q_len=T, k_len=past + T, causal=True)
        for i, layer in enumerate(self.layers):
            x = layer(x, mask=mask, is_causal=is_causal, rope=rope, cache=cache, layer=i)
        if cache is not None:
            cache.advance(T)
        return self.norm(x)

    def logits(self, hidden: Tensor) -> Tensor:
        """Vocabulary logits (..., V) for hidden states (..., D)."""
        weight = self.embed.word.weight if self.lm_head is None else self.lm_head.weight
        return nn.functional.linear(hidden, weight)

    def forward(
        self,
        input_ids: Tensor,
        *,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        cache: KVCache | None = None,
    ) -> Tensor:
        hidden = self.hidden_states(input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache)
        return self.logits(hidden)
