"""lmforge GPT configs of the decoder families that export to Hugging Face and GGUF (GPT-2, Llama, Qwen2, Gemma 3):
the switches of ``models/gpt.GPTConfig`` that make each, shared by the tests that build a tiny model of every
family (GGUF export against llama.cpp, LoRA against PEFT); each test adds its sizes."""

from __future__ import annotations

DECODER_FAMILIES: dict[str, dict] = {
    "gpt2": {},
    "llama": dict(
        norm="rmsnorm",
        positions="rope",
        gated_ffn=True,
        activation="silu",
        n_kv_heads=2,
        qkv_bias=False,
        out_bias=False,
        ffn_bias=False,
    ),
    "qwen2": dict(
        norm="rmsnorm",
        positions="rope",
        gated_ffn=True,
        activation="silu",
        n_kv_heads=2,
        qkv_bias=True,
        out_bias=False,
        ffn_bias=False,
        rope_theta=1e6,
    ),
    "gemma3": dict(
        norm="rmsnorm_plus_one",
        positions="rope",
        gated_ffn=True,
        activation="gelu_tanh",
        n_kv_heads=1,
        qk_norm=True,
        sandwich_norms=True,
        embed_scale=True,
        qkv_bias=False,
        out_bias=False,
        ffn_bias=False,
        rope_theta=1e6,
        rope_local_theta=1e4,
        norm_eps=1e-6,
    ),
}
