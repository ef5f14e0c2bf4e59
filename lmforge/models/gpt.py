"""The GPT decoder: GPT-2, the Llama / Qwen2 family and Gemma 3 from one configurable pre-LN stack.

GPT-2 (Radford et al., 2019): learned positions, LayerNorm, tanh-GELU MLP, biases, tied head.
Llama (Touvron et al., 2023) and Qwen2: rotary positions, RMSNorm, SwiGLU, grouped-query
attention (Ainslie et al., 2023), no biases (Qwen2: biases on q/k/v only), untied head.
Gemma 3 (Gemma Team, 2025) switches on: RMSNorm with 1 + w in float32 (``rmsnorm_plus_one``), RMSNorm on each
head's queries and keys before the rotation (``qk_norm``), a norm after attention and after the feed-forward as
well as before (``sandwich_norms``), embeddings scaled by sqrt(d) (``embed_scale``), GeGLU (gated tanh-GELU),
a head width of its own and the attention scale ``query_pre_attn_scalar^-0.5`` (``attn_scale``), and local
layers (``sliding_window`` keys back; all but every ``global_every``-th layer) whose RoPE base is
``rope_local_theta``.
Reads like nanoGPT's ``model.py``; matches Hugging Face's ``GPT2LMHeadModel``,
``LlamaForCausalLM``, ``Qwen2ForCausalLM`` and ``Gemma3ForCausalLM`` numerically (see ``models/convert.py``).
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
    packed_positions_and_mask,
    scale_residual_projections,
    sliding_window_mask,
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
    qk_norm: bool = False
    """Normalise each head's queries and keys (with ``norm``) before the rotation (Gemma 3)."""
    sandwich_norms: bool = False
    """Also normalise the attention's and the feed-forward's outputs before adding them (Gemma 3)."""
    embed_scale: bool = False
    """Multiply the token embeddings by sqrt(d_model) (Gemma)."""
    attn_scale: float | None = None
    """Attention scores' scale; None = 1 / sqrt(head width) (Gemma 3: query_pre_attn_scalar ** -0.5)."""
    sliding_window: int = 0
    """Local layers attend to this many positions back, themselves included; 0 = every layer is global."""
    global_every: int = 0
    """With sliding_window: every global_every-th layer (1-based) is global, the others local (Gemma 3: 6)."""
    rope_local_theta: float | None = None
    """RoPE base of the local layers; None = rope_theta (Gemma 3: 10,000, global layers 1,000,000)."""

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
        if self.sliding_window < 0 or self.global_every < 0:
            raise UserError("model.sliding_window and model.global_every must be >= 0")

    def is_local(self, layer: int) -> bool:
        """Whether layer ``layer`` (0-based) attends within the sliding window."""
        if not self.sliding_window:
            return False
        return not self.global_every or (layer + 1) % self.global_every != 0

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
            qk_norm=(cfg.norm, cfg.norm_eps) if cfg.qk_norm else None,
            scale=cfg.attn_scale,
        )
        self.ffn_norm = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps)
        self.ffn = FeedForward(cfg.d_model, cfg.d_ff, activation=cfg.activation, gated=cfg.gated_ffn, bias=cfg.ffn_bias)
        sandwich = cfg.sandwich_norms
        self.attn_out_norm = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps) if sandwich else None
        self.ffn_out_norm = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps) if sandwich else None
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, *, mask, is_causal, rope, cache, layer) -> Tensor:
        h = self.attn(self.attn_norm(x), mask=mask, is_causal=is_causal, rope=rope, cache=cache, layer=layer)
        if self.attn_out_norm is not None:
            h = self.attn_out_norm(h)
        x = x + self.dropout(h)
        h = self.ffn(self.ffn_norm(x))
        if self.ffn_out_norm is not None:
            h = self.ffn_out_norm(h)
        return x + self.dropout(h)


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
        local_theta = cfg.rope_local_theta
        self.local_rotary = None if learned or local_theta is None else RotaryEmbedding(cfg.dim_per_head, local_theta)
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
            window=self.cfg.sliding_window,
            local_layers=[i for i in range(self.cfg.n_layers) if self.cfg.is_local(i)],
        )

    def hidden_states(
        self,
        input_ids: Tensor,
        *,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        cache: KVCache | None = None,
        segment_ids: Tensor | None = None,
    ) -> Tensor:
        """Final-norm hidden states (B, T, D).

        ``attention_mask`` (B, S) is 1 at real tokens and covers the cached positions too
        (S = cached + T). Positions default to each sequence's count of real tokens so far, so
        left-padded prompts get the same positions as unpadded ones.

        ``segment_ids`` (B, T): several sequences packed in one row (training, no cache). A token attends only to
        the earlier tokens of its own segment and its position counts from its segment's start, so each packed
        sequence gets exactly the hidden states it gets alone (the block-diagonal mask of packed fine-tuning).
        """
        B, T = input_ids.shape
        past = cache.length if cache is not None else 0
        if segment_ids is not None:
            if cache is not None or attention_mask is not None or position_ids is not None:
                raise ValueError("segment_ids stand for the attention mask and the positions, without a cache")
            position_ids, mask, is_causal = packed_positions_and_mask(segment_ids)
        else:
            if position_ids is None:
                if attention_mask is not None:
                    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
                else:
                    position_ids = torch.arange(past, past + T, device=input_ids.device).expand(B, T)
            mask, is_causal = build_attention_mask(attention_mask, q_len=T, k_len=past + T, causal=True)
        x = self.embed(input_ids, position_ids)
        if self.cfg.embed_scale:  # Gemma: sqrt(d) cast to the weights' dtype first, as Gemma computes it
            x = x * torch.tensor(self.cfg.d_model**0.5, dtype=x.dtype)
        rope = self.rotary(position_ids, x.dtype) if self.rotary is not None else None
        local_rope = self.local_rotary(position_ids, x.dtype) if self.local_rotary is not None else rope
        local_mask = None
        if self.cfg.sliding_window and past + T > 1:
            local_mask = sliding_window_mask(
                mask, is_causal, q_len=T, k_len=past + T, window=self.cfg.sliding_window, device=x.device
            )
            if cache is not None:  # the local layers' cache holds only the last positions: their columns
                local_mask = local_mask[..., past - cache.local_length :]
        for i, layer in enumerate(self.layers):
            if self.cfg.is_local(i):
                x = layer(x, mask=local_mask, is_causal=False, rope=local_rope, cache=cache, layer=i)
            else:
                x = layer(x, mask=mask, is_causal=is_causal, rope=rope, cache=cache, layer=i)
        if cache is not None:
            cache.advance(T)
        return self.norm(x)

    @property
    def output_weight(self) -> Tensor:
        """The (V, D) vocabulary projection: the token embeddings when tied, else the output layer's."""
        return self.embed.word.weight if self.lm_head is None else self.lm_head.weight

    def logits(self, hidden: Tensor) -> Tensor:
        """Vocabulary logits (..., V) for hidden states (..., D)."""
        return nn.functional.linear(hidden, self.output_weight)

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
