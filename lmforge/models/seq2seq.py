"""The Transformer encoder-decoder for translation.

Follows "Attention Is All You Need" (Vaswani et al., 2017): post-LN blocks, a decoder with causal
self-attention and cross-attention to the encoder output, the target embedding tied to the output
projection (Press & Wolf, 2017). Positions are learned, as in BERT and BART (Lewis et al., 2020),
whose decoder this one matches in layout. The encoder *is* a lmforge BERT (composition, no copy),
so a pretrained lmforge BERT can warm-start it (Rothe et al., 2020, "Leveraging Pre-trained
Checkpoints for Sequence Generation Tasks"); its own token embedding is shared with the decoder when
source and target use one vocabulary.

Incremental decoding keeps the decoder's self-attention keys/values in a preallocated ``KVCache``
and projects the cross-attention keys/values of the source once (``memory_kv``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from lmforge.errors import UserError
from lmforge.models.bert import Bert, BertConfig
from lmforge.models.layers import (
    Activation,
    Attention,
    FeedForward,
    KVCache,
    build_attention_mask,
    init_weights,
)


@dataclass
class Seq2SeqConfig:
    """Shape of an encoder-decoder: the encoder is a BERT config, the decoder is described here."""

    encoder: BertConfig = field(default_factory=lambda: BertConfig(n_layers=3, pooler=False, mlm_head=False))
    """The encoder (a BERT without pooler and MLM head); its vocab_size is the source vocabulary."""
    tgt_vocab_size: int | None = None
    """Target vocabulary; None = share the source vocabulary and its embedding matrix."""
    n_layers: int = 3
    """Decoder layers."""
    n_heads: int = 4
    """Decoder attention heads."""
    d_ff: int = 1024
    """Decoder feed-forward width (the width d_model is the encoder's)."""
    max_seq_len: int = 256
    """Longest target sequence (learned positions)."""
    dropout: float = 0.1
    """Dropout on decoder embeddings, residual branches and attention probabilities."""
    activation: Activation = "gelu"
    """Decoder feed-forward activation."""
    norm_eps: float = 1e-5
    """Decoder LayerNorm epsilon."""
    init_std: float = 0.02
    """Standard deviation of the initial decoder weights."""

    def __post_init__(self) -> None:
        if isinstance(self.encoder, dict):  # from config.json
            self.encoder = BertConfig(**self.encoder)
        if self.encoder.pooler or self.encoder.mlm_head:
            self.encoder = dataclasses.replace(self.encoder, pooler=False, mlm_head=False)
        for key in ("n_layers", "n_heads", "d_ff", "max_seq_len"):
            if getattr(self, key) <= 0:
                raise UserError(f"model.{key}={getattr(self, key)} must be a positive integer")
        if self.tgt_vocab_size is not None and self.tgt_vocab_size <= 0:
            raise UserError(f"model.tgt_vocab_size={self.tgt_vocab_size} must be positive (or null: shared)")
        if self.d_model % self.n_heads:
            raise UserError(f"the width {self.d_model} must be divisible by model.n_heads={self.n_heads}")

    @property
    def d_model(self) -> int:
        return self.encoder.d_model

    @property
    def shared_vocab(self) -> bool:
        return self.tgt_vocab_size is None

    @property
    def target_vocab(self) -> int:
        return self.encoder.vocab_size if self.tgt_vocab_size is None else self.tgt_vocab_size


class DecoderLayer(nn.Module):
    """Post-LN: x = norm(x + self_attn(x)); x = norm(x + cross_attn(x, memory)); x = norm(x + ffn(x))."""

    def __init__(self, cfg: Seq2SeqConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.self_attn = Attention(d, cfg.n_heads, dropout=cfg.dropout)
        self.self_norm = nn.LayerNorm(d, eps=cfg.norm_eps)
        self.cross_attn = Attention(d, cfg.n_heads, dropout=cfg.dropout, cross=True)
        self.cross_norm = nn.LayerNorm(d, eps=cfg.norm_eps)
        self.ffn = FeedForward(d, cfg.d_ff, activation=cfg.activation)
        self.ffn_norm = nn.LayerNorm(d, eps=cfg.norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, *, mask, is_causal, memory_kv, memory_mask, cache, layer) -> Tensor:
        h = self.self_attn(x, mask=mask, is_causal=is_causal, cache=cache, layer=layer)
        x = self.self_norm(x + self.dropout(h))
        h = self.cross_attn(x, memory_kv=memory_kv, mask=memory_mask)
        x = self.cross_norm(x + self.dropout(h))
        return self.ffn_norm(x + self.dropout(self.ffn(x)))


class Seq2Seq(nn.Module):
    """Encoder-decoder. ``forward`` gives target logits; ``encode`` / ``decode`` split it for generation."""

    def __init__(self, cfg: Seq2SeqConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.encoder = Bert(cfg.encoder)
        # With a shared vocabulary the decoder reads (and predicts with) the encoder's word embedding.
        self.tgt_word = None if cfg.shared_vocab else nn.Embedding(cfg.target_vocab, d)
        self.tgt_position = nn.Embedding(cfg.max_seq_len, d)
        self.embed_norm = nn.LayerNorm(d, eps=cfg.norm_eps)
        self.embed_dropout = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.n_layers))
        for module in (self.tgt_word, self.tgt_position, self.embed_norm, self.layers):
            if module is not None:
                init_weights(module, cfg.init_std)

    @property
    def target_embedding(self) -> Tensor:
        """The (V_tgt, D) matrix that embeds target tokens and projects to target logits."""
        return self.encoder.embed.word.weight if self.tgt_word is None else self.tgt_word.weight

    def encode(self, src_ids: Tensor, src_mask: Tensor | None = None) -> Tensor:
        """Encoder output (B, S, D); ``src_mask`` is 1 at real source tokens."""
        return self.encoder(src_ids, attention_mask=src_mask)

    def memory_kv(self, memory: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Each decoder layer's cross-attention keys and values (B, H, S, Hd), computed once per source."""
        return [layer.cross_attn.project_memory(memory) for layer in self.layers]

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        """An empty self-attention cache for ``batch_size`` target sequences of up to ``max_len`` tokens."""
        weight = self.target_embedding
        return KVCache(
            n_layers=self.cfg.n_layers,
            batch_size=batch_size,
            n_kv_heads=self.cfg.n_heads,
            head_dim=self.cfg.d_model // self.cfg.n_heads,
            max_len=max_len,
            dtype=weight.dtype,
            device=weight.device,
        )

    def decode(
        self,
        tgt_ids: Tensor,
        *,
        memory_kv: list[tuple[Tensor, Tensor]],
        src_mask: Tensor | None = None,
        cache: KVCache | None = None,
    ) -> Tensor:
        """Decoder hidden states (B, T, D) for target ids (B, T) given the source's ``memory_kv``.

        Targets are right-padded (padding only after the end), so causal attention alone keeps real
        positions from seeing padding; ``src_mask`` (B, S) hides source padding from cross-attention.
        """
        T = tgt_ids.shape[1]
        past = cache.length if cache is not None else 0
        if past + T > self.cfg.max_seq_len:
            raise UserError(f"target position {past + T - 1} is past model.max_seq_len={self.cfg.max_seq_len}")
        positions = torch.arange(past, past + T, device=tgt_ids.device)
        x = nn.functional.embedding(tgt_ids, self.target_embedding) + self.tgt_position(positions)  # (B, T, D)
        x = self.embed_dropout(self.embed_norm(x))
        mask, is_causal = build_attention_mask(None, q_len=T, k_len=past + T, causal=True)
        memory_mask = None if src_mask is None else src_mask.bool()[:, None, None, :]  # (B, 1, 1, S)
        for i, layer in enumerate(self.layers):
            x = layer(
                x,
                mask=mask,
                is_causal=is_causal,
                memory_kv=memory_kv[i],
                memory_mask=memory_mask,
                cache=cache,
                layer=i,
            )
        if cache is not None:
            cache.advance(T)
        return x

    def logits(self, hidden: Tensor) -> Tensor:
        """Target vocabulary logits (..., V) for decoder hidden states (..., D)."""
        return nn.functional.linear(hidden, self.target_embedding)

    def forward(self, src_ids: Tensor, tgt_ids: Tensor, *, src_mask: Tensor | None = None) -> Tensor:
        memory = self.encode(src_ids, src_mask)
        return self.logits(self.decode(tgt_ids, memory_kv=self.memory_kv(memory), src_mask=src_mask))
