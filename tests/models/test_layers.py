"""Shared blocks against a plain reference computation: masks, cross-attention, GQA, rotary, SwiGLU."""

from __future__ import annotations

import math

import torch

from lmforge.models.layers import Attention, FeedForward, RotaryEmbedding, apply_rotary, build_attention_mask


def _reference_attention(q, k, v, allowed):
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~allowed, float("-inf"))
    return scores.softmax(-1) @ v


def test_cross_attention_matches_reference_and_ignores_padded_memory() -> None:
    attn = Attention(16, 4, cross=True).eval()
    x, memory = torch.randn(2, 3, 16), torch.randn(2, 5, 16)
    valid = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    mask, is_causal = build_attention_mask(valid, q_len=3, k_len=5, causal=False)
    assert not is_causal
    out = attn(x, memory=memory, mask=mask)
    q = attn.q(x).view(2, 3, 4, 4).transpose(1, 2)
    k, v = attn.kv(memory).split(16, dim=-1)
    k, v = k.view(2, 5, 4, 4).transpose(1, 2), v.view(2, 5, 4, 4).transpose(1, 2)
    ref = _reference_attention(q, k, v, valid.bool()[:, None, None, :]).transpose(1, 2).reshape(2, 3, 16)
    torch.testing.assert_close(out, attn.out(ref), atol=1e-5, rtol=1e-5)
    # Changing padded memory positions changes nothing.
    memory2 = memory.clone()
    memory2[1, 3:] = torch.randn(2, 16)
    torch.testing.assert_close(attn(x, memory=memory2, mask=mask)[1], out[1], atol=1e-6, rtol=1e-6)


def test_grouped_query_attention_shares_key_value_heads() -> None:
    attn = Attention(32, 8, n_kv_heads=2).eval()
    x = torch.randn(1, 6, 32)
    out = attn(x, is_causal=True)
    q, k, v = attn.qkv(x).split(attn.split, dim=-1)
    q = q.view(1, 6, 8, 4).transpose(1, 2)
    k = k.view(1, 6, 2, 4).transpose(1, 2).repeat_interleave(4, dim=1)  # each kv head serves 4 query heads
    v = v.view(1, 6, 2, 4).transpose(1, 2).repeat_interleave(4, dim=1)
    causal = torch.ones(6, 6, dtype=torch.bool).tril()
    ref = _reference_attention(q, k, v, causal).transpose(1, 2).reshape(1, 6, 32)
    torch.testing.assert_close(out, attn.out(ref), atol=1e-5, rtol=1e-5)


def test_causal_mask_with_cache_offset() -> None:
    mask, is_causal = build_attention_mask(None, q_len=2, k_len=5, causal=True)
    assert not is_causal
    assert mask[0, 0].tolist() == [[True, True, True, True, False], [True, True, True, True, True]]
    assert build_attention_mask(None, q_len=4, k_len=4, causal=True) == (None, True)
    assert build_attention_mask(None, q_len=1, k_len=9, causal=True) == (None, False)


def test_fully_padded_query_rows_stay_finite() -> None:
    valid = torch.tensor([[0, 0, 1, 1]])
    mask, _ = build_attention_mask(valid, q_len=4, k_len=4, causal=True)
    attn = Attention(8, 2).eval()
    assert torch.isfinite(attn(torch.randn(1, 4, 8), mask=mask)).all()


def test_rotary_preserves_norms_and_encodes_relative_position() -> None:
    rope = RotaryEmbedding(8)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)

    def rotated(x, pos):
        cos, sin = rope(torch.tensor([[pos]]), torch.float32)
        return apply_rotary(x, cos, sin)

    torch.testing.assert_close(rotated(q, 7).norm(), q.norm())
    dot = lambda a, b: (rotated(q, a) * rotated(k, b)).sum()  # noqa: E731
    torch.testing.assert_close(dot(3, 1), dot(12, 10), atol=1e-5, rtol=1e-5)


def test_swiglu_feed_forward() -> None:
    ffn = FeedForward(8, 12, activation="silu", gated=True, bias=False)
    x = torch.randn(2, 8)
    ref = ffn.down(torch.nn.functional.silu(ffn.gate(x)) * ffn.up(x))
    torch.testing.assert_close(ffn(x), ref)
