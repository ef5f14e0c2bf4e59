"""Tiny GGUF files written the way llama.cpp's ``convert_hf_to_gguf.py`` writes them, from a transformers model and
a byte-level BPE tokenizer trained here: GGUF names, the Llama Q/K row permutation, the metadata keys, and each
tensor in a chosen ggml type. The tests read them with lmforge and with transformers' own GGUF loader (an
independent reader) and compare."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

TEXTS = [
    "Hello world, the quick brown fox jumps over the lazy dog.",
    "今天天气很好，我们去公园散步吧。机器学习和自然语言处理",
    "Numbers 12345 and 2026-12-07, emoji 😀🚀 and full-width ＡＢＣ１２３！",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>",
] * 20
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def train_bpe(vocab_size: int) -> Tokenizer:
    """A GPT-2-style byte-level BPE over ``TEXTS`` with ChatML specials at ids 0-2."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(TEXTS, trainer)
    return tok


def tokenizer_metadata(tok: Tokenizer, pre: str = "gpt2") -> dict:
    """The ``tokenizer.ggml.*`` keys of ``tok`` as llama.cpp writes them for a byte-level BPE."""
    import json

    model = json.loads(tok.to_str())["model"]
    vocab = model["vocab"]
    tokens = sorted(vocab, key=vocab.get)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return {
        "tokens": tokens,
        "token_type": [3 if t in SPECIALS else 1 for t in tokens],
        "merges": merges,
        "pre": pre,
        "bos": tokens.index("<|im_start|>"),
        "eos": tokens.index("<|im_end|>"),
        "pad": tokens.index("<|endoftext|>"),
    }


def permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's ``LlamaModel.permute``: each head's rows from rotate-half halves to interleaved pairs."""
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


K_BLOCKS = {  # ggml type -> (bytes per 256 weights, byte offsets of its fp16 scales)
    gguf.GGMLQuantizationType.Q4_K: (144, (0, 2)),
    gguf.GGMLQuantizationType.Q5_K: (176, (0, 2)),
    gguf.GGMLQuantizationType.Q6_K: (210, (208,)),
    gguf.GGMLQuantizationType.Q2_K: (84, (80, 82)),
}


def k_quant_bytes(shape: tuple[int, ...], qtype: gguf.GGMLQuantizationType, rng: np.random.Generator) -> np.ndarray:
    """Blocks of a "K" type that gguf cannot quantize to: random quants and sub-scales under small fp16 scales
    (the file is not a trained model; both readers must decode the same numbers from it)."""
    size, scales = K_BLOCKS[qtype]
    rows, cols = shape
    blocks = rng.integers(0, 256, size=(rows * cols // 256, size), dtype=np.uint8)
    for at in scales:
        blocks[:, at : at + 2] = np.frombuffer(np.float16(0.002).tobytes(), dtype=np.uint8)
    return blocks.reshape(rows, cols // 256 * size)


_LAYER = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def gguf_name(hf_name: str) -> str:
    name = hf_name.removeprefix("model.")
    if name.startswith("layers."):
        _, layer, rest = name.split(".", 2)
        return f"blk.{layer}.{_LAYER[rest]}"
    return {"embed_tokens.weight": "token_embd.weight", "norm.weight": "output_norm.weight"}.get(name, "output.weight")


def write_gguf(
    path: Path,
    hf_model: torch.nn.Module,
    tok: Tokenizer,
    *,
    qtype: gguf.GGMLQuantizationType = gguf.GGMLQuantizationType.F32,
    pre: str = "gpt2",
    chat_template: str | None = None,
) -> Path:
    """``hf_model`` (a transformers Llama or Qwen2) as a GGUF file; 2-D weights in ``qtype``, norms and biases F32."""
    cfg = hf_model.config
    arch = cfg.model_type
    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name("tiny-test")
    _add_shape(writer, cfg)
    writer.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    meta = tokenizer_metadata(tok, pre)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(meta["pre"])
    writer.add_token_list(meta["tokens"])
    writer.add_token_types(meta["token_type"])
    writer.add_token_merges(meta["merges"])
    writer.add_bos_token_id(meta["bos"])
    writer.add_eos_token_id(meta["eos"])
    writer.add_pad_token_id(meta["pad"])
    writer.add_add_bos_token(False)
    if chat_template:
        writer.add_chat_template(chat_template)
    for name, value in hf_model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        data = value.detach().float().numpy()
        if arch == "llama" and name.endswith("q_proj.weight"):
            data = permute(data, cfg.num_attention_heads)
        elif arch == "llama" and name.endswith("k_proj.weight"):
            data = permute(data, cfg.num_key_value_heads)
        kind = qtype if data.ndim == 2 else gguf.GGMLQuantizationType.F32
        if kind == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(gguf_name(name), data)
        elif kind == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(gguf_name(name), data.astype(np.float16))
        elif kind in K_BLOCKS:
            writer.add_tensor(gguf_name(name), k_quant_bytes(data.shape, kind, rng), raw_dtype=kind)
        else:
            writer.add_tensor(gguf_name(name), gguf.quants.quantize(data, kind), raw_dtype=kind)
    return _finish(writer, path)


GEMMA_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"]
_GEMMA_LAYER = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "post_attention_layernorm.weight": "post_attention_norm.weight",
    "pre_feedforward_layernorm.weight": "ffn_norm.weight",
    "post_feedforward_layernorm.weight": "post_ffw_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def sentencepiece_vocab(size: int) -> dict:
    """A Gemma-style vocabulary as a GGUF stores it: the special tokens, a user-defined newline, the 256 byte
    tokens, then BPE pieces over ``TEXTS`` with spaces as ``▁``, in merge order (the order Gemma's merges follow)."""
    from tokenizers import normalizers

    tok = Tokenizer(models.BPE(byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    trainer = trainers.BpeTrainer(vocab_size=size, special_tokens=[], show_progress=False)
    tok.train_from_iterator(TEXTS, trainer)
    learned = sorted(tok.get_vocab(), key=tok.get_vocab().get)
    tokens = [*GEMMA_SPECIALS, "\n", *(f"<0x{b:02X}>" for b in range(256))]
    tokens += [t for t in learned if t not in tokens and t != "\n" and "im_start" not in t and "im_end" not in t]
    kinds = [3] * len(GEMMA_SPECIALS) + [4] + [6] * 256 + [1] * (len(tokens) - len(GEMMA_SPECIALS) - 257)
    scores = [-1000.0] * (len(GEMMA_SPECIALS) + 1) + [0.0] * 256 + [-float(i) for i in range(len(tokens) - 264)]
    return {"tokens": tokens, "token_type": kinds, "scores": scores}


def write_gemma3_gguf(path: Path, hf_model: torch.nn.Module, vocab: dict, *, qtype=gguf.GGMLQuantizationType.F32):
    """A transformers Gemma3ForCausalLM as llama.cpp writes it: norms stored as 1 + w, no permutation, a
    'llama' (SentencePiece) tokenizer without merges."""
    cfg = hf_model.config
    writer = gguf.GGUFWriter(str(path), "gemma3")
    _add_shape(writer, cfg)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_rope_freq_base(float(cfg.rope_parameters["full_attention"]["rope_theta"]))
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_sliding_window(cfg.sliding_window)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(vocab["tokens"])
    writer.add_token_scores(vocab["scores"])
    writer.add_token_types(vocab["token_type"])
    writer.add_bos_token_id(2)
    writer.add_eos_token_id(1)
    writer.add_unk_token_id(3)
    writer.add_pad_token_id(0)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    for name, value in hf_model.state_dict().items():
        if name == "lm_head.weight":
            continue
        data = value.detach().float().numpy()
        short = name.removeprefix("model.")
        if short.startswith("layers."):
            _, layer, rest = short.split(".", 2)
            target = f"blk.{layer}.{_GEMMA_LAYER[rest]}"
        else:
            target = {"embed_tokens.weight": "token_embd.weight", "norm.weight": "output_norm.weight"}[short]
        if name.endswith("norm.weight"):
            data = data + 1.0  # llama.cpp's Gemma converter: the norm's scale 1 + w
        if data.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32:
            writer.add_tensor(target, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(target, data)
    return _finish(writer, path)


def _add_shape(writer: gguf.GGUFWriter, cfg) -> None:
    """The ``ARCH.*`` shape keys every decoder's GGUF file has."""
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)


def _finish(writer: gguf.GGUFWriter, path: Path) -> Path:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
