"""Named model sizes.

BERT sizes follow Turc et al., 2019 ("Well-Read Students Learn Better": BERT-Tiny/Mini/Small/
Medium) and Devlin et al., 2019 (Base); gpt2-small is GPT-2's 124M model; the tiny GPT and Llama
sizes are the ones our CPU measurements use (d_model 256, 4 layers). The vocabulary size is not
part of a size: it comes from the tokenizer the model is built for.
"""

from __future__ import annotations

from dataclasses import replace

from lmforge.errors import UserError
from lmforge.models.bert import BertConfig
from lmforge.models.gpt import GPTConfig

_LLAMA = dict(
    norm="rmsnorm",
    norm_eps=1e-6,
    positions="rope",
    activation="silu",
    gated_ffn=True,
    qkv_bias=False,
    out_bias=False,
    ffn_bias=False,
    tie_embeddings=False,
)

SIZES: dict[str, BertConfig | GPTConfig] = {
    "bert-tiny": BertConfig(n_layers=2, n_heads=2, d_model=128, d_ff=512),
    "bert-mini": BertConfig(n_layers=4, n_heads=4, d_model=256, d_ff=1024),
    "bert-small": BertConfig(n_layers=4, n_heads=8, d_model=512, d_ff=2048),
    "bert-medium": BertConfig(n_layers=8, n_heads=8, d_model=512, d_ff=2048),
    "bert-base": BertConfig(n_layers=12, n_heads=12, d_model=768, d_ff=3072),
    "gpt-tiny": GPTConfig(n_layers=4, n_heads=4, d_model=256, d_ff=1024, max_seq_len=512),
    "gpt2-small": GPTConfig(vocab_size=50257, n_layers=12, n_heads=12, d_model=768, d_ff=3072, dropout=0.1),
    "llama-tiny": GPTConfig(n_layers=4, n_heads=8, n_kv_heads=2, d_model=256, d_ff=688, max_seq_len=1024, **_LLAMA),
    "qwen2-tiny": GPTConfig(
        n_layers=4, n_heads=8, n_kv_heads=2, d_model=256, d_ff=688, max_seq_len=1024, **{**_LLAMA, "qkv_bias": True}
    ),
}


def model_size(name: str, *, vocab_size: int | None = None) -> BertConfig | GPTConfig:
    """The config of the named size, with ``vocab_size`` set when given."""
    if name not in SIZES:
        raise UserError(f"unknown model size {name!r}; known sizes: {', '.join(SIZES)}")
    cfg = SIZES[name]
    return replace(cfg, vocab_size=vocab_size) if vocab_size else replace(cfg)
