"""The BERT encoder: embeddings, transformer layers, pooler and the tied MLM head.

Follows Devlin et al., 2019 ("BERT: Pre-training of Deep Bidirectional Transformers") and matches
Hugging Face's ``BertModel`` / ``BertForMaskedLM`` numerically, so their checkpoints load through
``models/convert.py``. Task heads (classification, NER, ...) are generic and live in ``heads.py``.

The options that budget pretraining uses (Cramming, Geiping & Goldstein 2022; Izsak et al. 2021) are
fields of ``BertConfig``, all off by default (the original BERT):

- ``pre_norm``: pre-LN blocks with a final LayerNorm (Xiong et al. 2020, "On Layer Normalization in the
  Transformer Architecture"), the layout of Hugging Face's ``RobertaPreLayerNorm*``, which the export uses;
- ``gated_ffn``: a gated feed-forward, GEGLU with the GELU activation (Shazeer 2020, "GLU Variants");
- ``bias=False``: no biases in the attention and feed-forward projections (LayerNorms keep theirs);
- ``bigram_buckets``: hashed character-bigram input embeddings, a known boost for Chinese NER with small
  models (Zhang & Yang 2018 "Chinese NER Using Lattice LSTM" and its successors use bigram embeddings).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lmforge.errors import UserError
from lmforge.models.layers import (
    Activation,
    Attention,
    Embeddings,
    FeedForward,
    activation_fn,
    build_attention_mask,
    init_weights,
)


@dataclass
class BertConfig:
    """Shape and regularisation of a BERT encoder."""

    vocab_size: int = 21128
    """Number of token ids."""
    max_seq_len: int = 512
    """Number of learned positions: the longest input."""
    n_layers: int = 4
    """Transformer layers."""
    n_heads: int = 4
    """Attention heads per layer; must divide d_model."""
    d_model: int = 256
    """Hidden width."""
    d_ff: int = 1024
    """Feed-forward inner width."""
    dropout: float = 0.1
    """Dropout on embeddings and residual branches."""
    attn_dropout: float = 0.1
    """Dropout on attention probabilities."""
    type_vocab_size: int = 2
    """Number of segment (token type) ids."""
    norm_eps: float = 1e-12
    """LayerNorm epsilon."""
    activation: Activation = "gelu"
    """Feed-forward activation (BERT uses the exact erf GELU)."""
    pooler: bool = True
    """Include the tanh pooler over the first token."""
    mlm_head: bool = True
    """Include the masked-LM head (decoder tied to the word embeddings)."""
    init_std: float = 0.02
    """Standard deviation of the initial weights."""
    pre_norm: bool = False
    """Pre-LN blocks, x + attn(norm(x)) then x + ffn(norm(x)), with a LayerNorm after the last layer
    (Xiong et al. 2020); false is BERT's post-LN, norm(x + attn(x))."""
    gated_ffn: bool = False
    """Gated feed-forward down(act(gate(x)) * up(x)): GEGLU with the gelu activation (Shazeer 2020). It has
    three d_model x d_ff matrices instead of two."""
    bias: bool = True
    """Biases in the attention (qkv, output) and feed-forward projections."""
    bigram_buckets: int = 0
    """Hashed bigram input embeddings: the pair (previous token, token) adds a vector from a table of this
    many rows (0 = none). For Chinese, where a token is a character, this is the character bigram."""

    def __post_init__(self) -> None:
        for key in ("vocab_size", "max_seq_len", "n_layers", "n_heads", "d_model", "d_ff"):
            if getattr(self, key) <= 0:
                raise UserError(f"model.{key}={getattr(self, key)} must be a positive integer")
        if self.bigram_buckets < 0:
            raise UserError(f"model.bigram_buckets={self.bigram_buckets} must be 0 (none) or a positive integer")
        if self.d_model % self.n_heads:
            raise UserError(f"model.d_model={self.d_model} must be divisible by model.n_heads={self.n_heads}")
        for key in ("dropout", "attn_dropout"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise UserError(f"model.{key}={getattr(self, key)} must be in [0, 1)")


class BertLayer(nn.Module):
    """Post-LN block, x = norm(x + attn(x)); x = norm(x + ffn(x)), or with ``pre_norm``
    x = x + attn(norm(x)); x = x + ffn(norm(x))."""

    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.pre_norm = cfg.pre_norm
        self.attn = Attention(cfg.d_model, cfg.n_heads, dropout=cfg.attn_dropout, qkv_bias=cfg.bias, out_bias=cfg.bias)
        self.attn_norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.ffn = FeedForward(cfg.d_model, cfg.d_ff, activation=cfg.activation, gated=cfg.gated_ffn, bias=cfg.bias)
        self.ffn_norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, mask: Tensor | None, queries: Tensor | None = None) -> Tensor:
        """``queries`` (B, T', D): compute the outputs at these rows only (keys/values from all of x)."""
        residual = x if queries is None else queries
        if self.pre_norm:
            normed = self.attn_norm(x)
            q = None if queries is None else self.attn_norm(queries)
            x = residual + self.dropout(self.attn(normed, mask=mask, queries=q))
            return x + self.dropout(self.ffn(self.ffn_norm(x)))
        x = self.attn_norm(residual + self.dropout(self.attn(x, mask=mask, queries=queries)))
        return self.ffn_norm(x + self.dropout(self.ffn(x)))


class MLMHead(nn.Module):
    """Transform (dense + activation + LayerNorm), then logits against the tied word embeddings."""

    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.transform = nn.Linear(cfg.d_model, cfg.d_model)
        self.act = activation_fn(cfg.activation)
        self.norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def forward(self, hidden: Tensor, word_embeddings: Tensor) -> Tensor:
        h = self.norm(self.act(self.transform(hidden)))
        return nn.functional.linear(h, word_embeddings, self.bias)


class Pooler(nn.Module):
    """tanh(dense(first token)), BERT's sentence representation for next-sentence prediction."""

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.dense = nn.Linear(d_model, d_model)

    def forward(self, hidden: Tensor) -> Tensor:
        return torch.tanh(self.dense(hidden[:, 0]))  # (B, D)


class Bert(nn.Module):
    """BERT encoder. ``forward`` gives hidden states; ``pool`` and ``mlm_logits`` apply the heads."""

    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = Embeddings(
            cfg.vocab_size,
            cfg.d_model,
            max_positions=cfg.max_seq_len,
            type_vocab_size=cfg.type_vocab_size,
            norm=nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps),
            dropout=cfg.dropout,
            bigram_buckets=cfg.bigram_buckets,
        )
        self.layers = nn.ModuleList(BertLayer(cfg) for _ in range(cfg.n_layers))
        self.final_norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps) if cfg.pre_norm else None
        self.pooler = Pooler(cfg.d_model) if cfg.pooler else None
        self.mlm_head = MLMHead(cfg) if cfg.mlm_head else None
        init_weights(self, cfg.init_std)

    def forward(
        self,
        input_ids: Tensor,
        *,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        position_ids: Tensor | None = None,
        select: Tensor | None = None,
    ) -> Tensor:
        """Hidden states (B, T, D) for token ids (B, T); ``attention_mask`` is 1 at real tokens.

        ``select``: ascending flat indices into B*T. Only those rows are returned, (N, D), and the last
        layer computes only them (its keys and values still see every token): masked-LM training
        needs ~15% of the outputs, and the last layer's queries, output projection and feed-forward
        are then ~85% cheaper.
        """
        B, T = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(T, device=input_ids.device).expand(B, T)
        x = self.embed(input_ids, position_ids, token_type_ids)
        mask, _ = build_attention_mask(attention_mask, q_len=T, k_len=T, causal=False)
        for layer in self.layers[:-1]:
            x = layer(x, mask)
        if select is None:
            return self._final(self.layers[-1](x, mask))
        rows = select // T
        counts = torch.bincount(rows, minlength=B)
        slots = torch.arange(len(select), device=select.device) - (counts.cumsum(0) - counts)[rows]
        index = torch.zeros(B, int(counts.max()), dtype=torch.long, device=select.device)  # (B, T')
        index[rows, slots] = select % T
        queries = x.gather(1, index[:, :, None].expand(-1, -1, x.shape[-1]))  # (B, T', D)
        out = self.layers[-1](x, mask, queries=queries)  # (B, T', D)
        return self._final(out[rows, slots])  # (N, D), in the order of select

    def _final(self, hidden: Tensor) -> Tensor:
        return hidden if self.final_norm is None else self.final_norm(hidden)

    def pool(self, hidden: Tensor) -> Tensor:
        """The pooled first-token representation (B, D)."""
        if self.pooler is None:
            raise UserError("this BERT has no pooler (model.pooler=false)")
        return self.pooler(hidden)

    def mlm_logits(self, hidden: Tensor) -> Tensor:
        """Vocabulary logits for hidden states (..., D) -> (..., V).

        Pass only the rows you need (e.g. the masked positions, gathered first): the projection
        to the vocabulary dominates the cost of small models.
        """
        if self.mlm_head is None:
            raise UserError("this BERT has no MLM head (model.mlm_head=false)")
        return self.mlm_head(hidden, self.embed.word.weight)
