"""The only shared transformer blocks: attention, feed-forward, norms, embeddings, rotary positions.

Follows "Attention Is All You Need" (Vaswani et al., 2017) for attention, BERT (Devlin et al., 2019)
and GPT-2 (Radford et al., 2019) for the embedding sums and GELU feed-forward, RoFormer (Su et al.,
2021) for rotary positions and GLU Variants (Shazeer, 2020) for SwiGLU. Attention runs through
``torch.nn.functional.scaled_dot_product_attention`` so the fused kernels are used where available.

Glossary for shape comments: B batch, T query length, S key length, D model width, H heads,
Hkv key/value heads, Hd head dim, V vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.errors import UserError

Activation = Literal["gelu", "gelu_tanh", "relu", "silu"]
NormKind = Literal["layernorm", "rmsnorm", "rmsnorm_plus_one"]


def activation_fn(name: Activation):
    """Return the activation function called ``name`` (``gelu`` is the exact erf form)."""
    table = {
        "gelu": F.gelu,
        "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
        "relu": F.relu,
        "silu": F.silu,
    }
    if name not in table:
        raise UserError(f"activation {name!r} is not one of {sorted(table)}")
    return table[name]


class RMSNormPlusOne(nn.Module):
    """Gemma's RMSNorm: ``x * rsqrt(mean(x^2) + eps) * (1 + w)`` computed in float32 and cast back, with ``w``
    stored as Gemma stores it (zero at initialisation)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor) -> Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * (1.0 + self.weight.float())).type_as(x)


def make_norm(kind: NormKind, dim: int, eps: float) -> nn.Module:
    """LayerNorm (BERT, GPT-2), RMSNorm (Llama, Qwen) or Gemma's RMSNorm with 1 + w over the last dimension."""
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=eps)
    if kind == "rmsnorm":
        return nn.RMSNorm(dim, eps=eps)
    if kind == "rmsnorm_plus_one":
        return RMSNormPlusOne(dim, eps)
    raise UserError(f"norm {kind!r} is not one of ['layernorm', 'rmsnorm', 'rmsnorm_plus_one']")


class Embeddings(nn.Module):
    """Token embedding plus optional learned positions, token types, norm and dropout.

    BERT uses all of them (word + position + token type, then LayerNorm); GPT-2 uses word +
    position; Llama-style models use the word embedding alone (positions come from RoPE).
    ``bigram_buckets`` adds a hashed embedding of (previous token, token): ``bigram_ids`` gives the rows.
    """

    def __init__(
        self,
        vocab_size: int,
        d_model: int,
        *,
        max_positions: int = 0,
        type_vocab_size: int = 0,
        norm: nn.Module | None = None,
        dropout: float = 0.0,
        bigram_buckets: int = 0,
    ) -> None:
        super().__init__()
        self.word = nn.Embedding(vocab_size, d_model)
        self.bigram = nn.Embedding(bigram_buckets, d_model) if bigram_buckets else None
        self.position = nn.Embedding(max_positions, d_model) if max_positions else None
        self.token_type = nn.Embedding(type_vocab_size, d_model) if type_vocab_size else None
        self.norm = norm
        self.dropout = nn.Dropout(dropout)

    def forward(
        self, input_ids: Tensor, position_ids: Tensor | None = None, token_type_ids: Tensor | None = None
    ) -> Tensor:
        x = self.word(input_ids)  # (B, T, D)
        if self.bigram is not None:
            x = x + self.bigram(bigram_ids(input_ids, self.bigram.num_embeddings))
        if self.position is not None:
            if position_ids is None:
                raise UserError("position_ids are required with learned position embeddings")
            limit = self.position.num_embeddings
            # A value check reads the tensor: skipped while torch.compile / torch.export trace (no values there).
            if not torch.compiler.is_compiling() and position_ids.numel() and int(position_ids.max()) >= limit:
                raise UserError(
                    f"position {int(position_ids.max())} is past max_seq_len={limit}; "
                    f"use sequences of at most {limit} tokens"
                )
            x = x + self.position(position_ids)
        if self.token_type is not None:
            if token_type_ids is None:
                token_type_ids = torch.zeros_like(input_ids)
            x = x + self.token_type(token_type_ids)
        if self.norm is not None:
            x = self.norm(x)
        return self.dropout(x)


_BIGRAM_PRIME = 1_000_003  # > any vocabulary size, so (previous, token) -> previous * P + token is one-to-one


def bigram_ids(input_ids: Tensor, buckets: int) -> Tensor:
    """Hash bucket (B, T) of each (previous token, token) pair of ``input_ids`` (B, T).

    The first position pairs with "no previous token" (-1). The pair's integer (previous + 1) * P + token is
    one-to-one for vocabularies under P, then reduced modulo ``buckets`` (the hashing trick, Weinberger et
    al. 2009): distinct pairs share a row only through that modulo.
    """
    previous = torch.cat((torch.full_like(input_ids[:, :1], -1), input_ids[:, :-1]), dim=1)
    return ((previous + 1) * _BIGRAM_PRIME + input_ids) % buckets


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (RoFormer), in the rotate-half layout Llama and Qwen use."""

    def __init__(self, head_dim: int, theta: float = 10000.0) -> None:
        super().__init__()
        self.head_dim, self.theta = head_dim, theta
        self.register_buffer("inv_freq", self._frequencies(), persistent=False)

    def _frequencies(self, device: torch.device | str | None = None) -> Tensor:
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=device) / self.head_dim
        return 1.0 / (self.theta**exponents)

    def init_buffers(self, device: torch.device | str = "cpu") -> None:
        """Compute the frequencies again on ``device`` (a model built on the meta device, then given its weights)."""
        self.inv_freq = self._frequencies(device)

    def forward(self, position_ids: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos and sin of shape (B, 1, T, Hd), computed in float32 then cast to ``dtype``."""
        freqs = position_ids[:, :, None].float() * self.inv_freq[None, None, :]  # (B, T, Hd/2)
        angles = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, T, Hd)
        return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate (B, H, T, Hd) queries or keys by the position angles."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class KVCache:
    """Preallocated keys and values of every layer for incremental decoding.

    One buffer of shape (L, B, Hkv, S_max, Hd) each for keys and values, filled in place, so a
    decoding step allocates nothing new for the cache. ``length`` counts the positions already
    stored; a model call appends its T new positions in every layer, then advances ``length``.

    With ``window`` and ``local_layers`` (Gemma 3's sliding-window layers), those layers keep only the last
    ``window`` positions, in their own (Ll, B, Hkv, window, Hd) buffers, so their memory stays bounded however long
    the conversation: a query sees at most ``window - 1`` earlier keys. A local layer's ``append`` returns the kept
    keys followed by the new ones (positions ``length - local_length`` onwards; the model slices its mask the same
    way) and keeps the last ``window`` of them.
    """

    def __init__(
        self,
        *,
        n_layers: int,
        batch_size: int,
        n_kv_heads: int,
        head_dim: int,
        max_len: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        window: int = 0,
        local_layers: Sequence[int] = (),
    ) -> None:
        local = list(local_layers) if window else []
        self.window = window
        self.slot = {}  # layer -> its index in the global or the local buffers
        for layer in range(n_layers):
            same_kind = [other for other in range(layer) if (other in local) == (layer in local)]
            self.slot[layer] = len(same_kind)
        self.local = set(local)
        shape = (n_layers - len(local), batch_size, n_kv_heads, max_len, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        local_shape = (len(local), batch_size, n_kv_heads, window, head_dim)
        self.local_keys = torch.zeros(local_shape, dtype=dtype, device=device)
        self.local_values = torch.zeros(local_shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.length = 0

    @property
    def local_length(self) -> int:
        """How many earlier positions the local layers hold (the last ones)."""
        return min(self.window, self.length)

    def append(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store (B, Hkv, T, Hd) keys/values after the cached ones; return all (B, Hkv, S, Hd) the layer attends to."""
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise UserError(f"KV cache holds {self.max_len} positions; {end} were requested")
        i = self.slot[layer]
        if layer in self.local:
            held = self.local_length
            keys = torch.cat((self.local_keys[i, :, :, :held], k), dim=2)
            values = torch.cat((self.local_values[i, :, :, :held], v), dim=2)
            keep = min(self.window, keys.shape[2])
            self.local_keys[i, :, :, :keep] = keys[:, :, -keep:]
            self.local_values[i, :, :, :keep] = values[:, :, -keep:]
            return keys, values
        self.keys[i, :, :, self.length : end] = k
        self.values[i, :, :, self.length : end] = v
        return self.keys[i, :, :, :end], self.values[i, :, :, :end]

    def advance(self, n: int) -> None:
        self.length += n

    def reorder(self, index: Tensor) -> None:
        """Keep the sequences ``index`` names, in that order (beam search)."""
        self.keys, self.values = self.keys.index_select(1, index), self.values.index_select(1, index)
        self.local_keys = self.local_keys.index_select(1, index)
        self.local_values = self.local_values.index_select(1, index)


def sliding_window_mask(
    mask: Tensor | None, is_causal: bool, *, q_len: int, k_len: int, window: int, device: torch.device
) -> Tensor:
    """``build_attention_mask``'s (mask, is_causal) further limited to a sliding window: a query at position q
    sees the keys at k with q - window < k <= q (Gemma 3's local layers; positions count cached keys too)."""
    q_pos = torch.arange(k_len - q_len, k_len, device=device)
    k_pos = torch.arange(k_len, device=device)
    near = (q_pos[:, None] - k_pos[None, :] < window)[None, None]  # (1, 1, T, S)
    if mask is None:
        mask = (k_pos[None, :] <= q_pos[:, None])[None, None] if is_causal else torch.ones_like(near)
    mask = mask & near
    return mask | ~mask.any(dim=-1, keepdim=True)  # a padding query that sees nothing sees everything (never read)


def packed_positions_and_mask(segment_ids: Tensor) -> tuple[Tensor, Tensor, bool]:
    """Positions and the SDPA (mask, is_causal) pair of rows that pack several sequences (``segment_ids`` (B, T),
    equal along each sequence): a position counts from its sequence's start and a query sees the earlier keys of
    its own sequence only (block-diagonal causal attention, as packed fine-tuning in TRL or torchtune)."""
    T = segment_ids.shape[1]
    index = torch.arange(T, device=segment_ids.device)
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    first = torch.cummax(torch.where(starts, index, 0), dim=-1).values  # each position's sequence start
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    return index - first, (same & (index[None, :] <= index[:, None]))[:, None], False


def build_attention_mask(
    key_valid: Tensor | None, *, q_len: int, k_len: int, causal: bool
) -> tuple[Tensor | None, bool]:
    """Build the (mask, is_causal) pair for SDPA.

    ``key_valid`` is a (B, S) mask, true/1 at real tokens. Queries are the last ``q_len`` of the
    ``k_len`` positions (the earlier ones come from a KV cache). Returns ``(None, True)`` when
    SDPA's built-in causal mask is exact, else a boolean (B|1, 1, T, S) mask, true = may attend.
    """
    if key_valid is None:
        if not causal or q_len == 1:
            return None, False
        if q_len == k_len:
            return None, True
    mask: Tensor | None = None
    if causal:
        device = key_valid.device if key_valid is not None else None
        q_pos = torch.arange(k_len - q_len, k_len, device=device)
        k_pos = torch.arange(k_len, device=device)
        mask = (k_pos[None, :] <= q_pos[:, None])[None, None]  # (1, 1, T, S)
    if key_valid is not None:
        if key_valid.shape[-1] != k_len:
            raise UserError(f"attention_mask covers {key_valid.shape[-1]} positions, expected {k_len}")
        valid = key_valid.bool()[:, None, None, :]  # (B, 1, 1, S)
        mask = valid if mask is None else mask & valid
    # A padding query may see no key at all (left padding under a causal mask); let it see every
    # key so SDPA returns finite numbers there. Those positions are never read.
    mask = mask | ~mask.any(dim=-1, keepdim=True)
    return mask, False


class Attention(nn.Module):
    """Multi-head attention with grouped key/value heads, self or cross, optional rotary and cache.

    Self-attention projects queries, keys and values with one fused matrix ``qkv`` (one matmul
    instead of three, which matters at small widths); cross-attention projects queries from the
    input (``q``) and keys/values from the memory (``kv``).
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        *,
        n_kv_heads: int | None = None,
        head_dim: int | None = None,
        qkv_bias: bool = True,
        out_bias: bool = True,
        dropout: float = 0.0,
        cross: bool = False,
        qk_norm: tuple[NormKind, float] | None = None,
        scale: float | None = None,
    ) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads or n_heads
        self.head_dim = head_dim or d_model // n_heads
        if n_heads % self.n_kv_heads:
            raise UserError(f"n_heads={n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}")
        q_dim, kv_dim = n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        self.split = (q_dim, kv_dim, kv_dim)
        self.cross = cross
        if cross:
            self.q = nn.Linear(d_model, q_dim, bias=qkv_bias)
            self.kv = nn.Linear(d_model, 2 * kv_dim, bias=qkv_bias)
        else:
            self.qkv = nn.Linear(d_model, q_dim + 2 * kv_dim, bias=qkv_bias)
        self.out = nn.Linear(q_dim, d_model, bias=out_bias)
        self.dropout = dropout
        self.scale = scale  # None: 1 / sqrt(head_dim)
        # Gemma 3: each head's queries and keys normalised (over the head's width) before the rotation
        self.q_norm = make_norm(qk_norm[0], self.head_dim, qk_norm[1]) if qk_norm else None
        self.k_norm = make_norm(qk_norm[0], self.head_dim, qk_norm[1]) if qk_norm else None

    def forward(
        self,
        x: Tensor,
        *,
        mask: Tensor | None = None,
        is_causal: bool = False,
        rope: tuple[Tensor, Tensor] | None = None,
        memory: Tensor | None = None,
        memory_kv: tuple[Tensor, Tensor] | None = None,
        queries: Tensor | None = None,
        cache: KVCache | None = None,
        layer: int = 0,
    ) -> Tensor:
        """Attend from ``x`` (B, T, D) to itself, or to ``memory`` (cross-attention).

        ``memory_kv``: cross-attention keys and values already projected by ``project_memory`` (a
        decoder computes them once per source and reuses them at every step).
        ``queries`` (B, T', D), self-attention only: the queries come from these rows instead of all of
        ``x`` (keys and values still from all of ``x``): for outputs needed at a few positions only.
        """
        if self.cross:
            if memory_kv is None:
                if memory is None:
                    raise UserError("cross-attention needs the encoder output as memory")
                memory_kv = self.project_memory(memory)
            B, T, _ = x.shape
            q = self.q(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, Hd)
            return self._attend(q, *memory_kv, mask=mask, is_causal=False)
        if queries is not None:
            q_dim = self.split[0]
            if type(self.qkv) is nn.Linear:  # project each part only from the rows that need it (not LoRA, int8)
                bias = self.qkv.bias
                q = F.linear(queries, self.qkv.weight[:q_dim], None if bias is None else bias[:q_dim])
                kv = F.linear(x, self.qkv.weight[q_dim:], None if bias is None else bias[q_dim:])
            else:  # a packed projection (int8, inference/int8.py) cannot be sliced: project, then keep the parts
                q, kv = self.qkv(queries)[..., :q_dim], self.qkv(x)[..., q_dim:]
            k, v = kv.split(self.split[1:], dim=-1)
            x = queries
        else:
            q, k, v = self.qkv(x).split(self.split, dim=-1)
        B, T, _ = x.shape
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, Hd)
        k = k.view(B, -1, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, S, Hd)
        v = v.view(B, -1, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, S, Hd)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if cache is not None:
            k, v = cache.append(layer, k, v)
        return self._attend(q, k, v, mask=mask, is_causal=is_causal)

    def project_memory(self, memory: Tensor) -> tuple[Tensor, Tensor]:
        """Cross-attention keys and values (B, Hkv, S, Hd) of the encoder output ``memory`` (B, S, D)."""
        B = memory.shape[0]
        k, v = self.kv(memory).split(self.split[1:], dim=-1)
        k = k.view(B, -1, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, S, Hd)
        v = v.view(B, -1, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, S, Hd)
        return k, v

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, *, mask: Tensor | None, is_causal: bool) -> Tensor:
        B, _, T, _ = q.shape
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=is_causal,
            scale=self.scale,
            enable_gqa=self.n_kv_heads != self.n_heads,
        )  # (B, H, T, Hd)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # (B, T, H*Hd)
        return self.out(y)


class FeedForward(nn.Module):
    """Position-wise feed-forward: ``down(act(up(x)))``, or gated ``down(act(gate(x)) * up(x))``."""

    def __init__(
        self, d_model: int, d_ff: int, *, activation: Activation = "gelu", gated: bool = False, bias: bool = True
    ) -> None:
        super().__init__()
        self.gate = nn.Linear(d_model, d_ff, bias=bias) if gated else None
        self.up = nn.Linear(d_model, d_ff, bias=bias)
        self.down = nn.Linear(d_ff, d_model, bias=bias)
        self.act = activation_fn(activation)

    def forward(self, x: Tensor) -> Tensor:
        if self.gate is not None:
            return self.down(self.act(self.gate(x)) * self.up(x))
        return self.down(self.act(self.up(x)))


def init_weights(module: nn.Module, std: float) -> None:
    """BERT/GPT-2 initialisation: N(0, std) weights, zero biases, unit norms."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=std)
        elif isinstance(m, RMSNormPlusOne):
            nn.init.zeros_(m.weight)  # the scale is 1 + w
        elif isinstance(m, (nn.LayerNorm, nn.RMSNorm)):
            if m.weight is not None:
                nn.init.ones_(m.weight)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)


def scale_residual_projections(module: nn.Module, n_layers: int, std: float, names: tuple[str, ...]) -> None:
    """GPT-2's scaled init: output projections into the residual stream get std / sqrt(2 L)."""
    scaled = std / math.sqrt(2 * n_layers)
    for name, p in module.named_parameters():
        if name.endswith(names):
            nn.init.normal_(p, mean=0.0, std=scaled)
