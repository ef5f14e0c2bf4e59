"""Key maps between lmforge and Hugging Face checkpoints (BERT, RoBERTa-PreLayerNorm, GPT-2, Llama, Qwen2,
Gemma 3), and between GGUF files and Hugging Face names (Llama, Qwen2, Gemma 3 both ways; GPT-2 written).

The only module where Hugging Face names live (rule 4 of the architecture page). Each family is a
list of links, one per lmforge tensor, naming the Hugging Face tensors it is made of: several
when lmforge fuses them (query, key and value become one ``qkv`` matrix), transposed for GPT-2's
``Conv1D`` layers, which store (in, out). The same links convert both ways, so import and export
cannot drift apart. Only safetensors are read: pickled ``.bin`` checkpoints are refused.

A GGUF file (``models/gguf.py``) is read as the Hugging Face checkpoint llama.cpp made it from: its metadata as a
``config.json`` (``gguf_as_hf``) and its tensors renamed (``blk.N.attn_q.weight`` -> ``layers.N.self_attn.q_proj
.weight``), with llama.cpp's conversion transforms undone: ``convert_hf_to_gguf.py`` permutes the rows of a Llama's
query and key matrices (per head, from the rotate-half layout to interleaved pairs), and the inverse permutation
restores them; it stores Gemma's norm weights as 1 + w. Then ``from_hf`` builds the lmforge model as for any
Hugging Face directory. ``hf_as_gguf`` goes the other way (``lmforge export --to gguf``), applying the same two
transforms as ``convert_hf_to_gguf.py`` and writing the ``ARCH.*`` keys llama.cpp's ``llama-model.cpp`` reads.

A pre-LN lmforge BERT (``pre_norm``) is Hugging Face's ``RobertaPreLayerNorm`` (Xiong et al. 2020's layout,
with a final LayerNorm): the same tensors, except that RoBERTa numbers positions from ``pad_token_id + 1``
(the rows below are unused), so the position table is shifted by that many rows. A model without biases
(``bias=False``) exports with zero biases, which is the same function.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lmforge.errors import UserError
from lmforge.models.bert import BertConfig
from lmforge.models.gpt import GPTConfig
from lmforge.models.registry import read_safetensors

# Hugging Face activation names -> lmforge's; gelu_new and gelu_pytorch_tanh are the same function.
_ACT_FROM_HF = {
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "relu": "relu",
    "silu": "silu",
    "swish": "silu",
}
_ACT_TO_HF = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu", "silu": "silu"}
# Tensors Hugging Face checkpoints carry that are buffers or heads lmforge does not use.
_IGNORED_SUFFIXES = (
    "embeddings.position_ids",  # BERT buffer in old checkpoints
    "attn.bias",  # GPT-2 causal-mask buffer in old checkpoints
    "attn.masked_bias",
    "rotary_emb.inv_freq",  # Llama buffer in old checkpoints
    "cls.seq_relationship.weight",  # BERT next-sentence-prediction head
    "cls.seq_relationship.bias",
    "cls.predictions.decoder.weight",  # tied to the word embeddings
    "cls.predictions.decoder.bias",  # an alias of cls.predictions.bias
    "lm_head.decoder.weight",  # RoBERTa: tied to the word embeddings
    "lm_head.decoder.bias",  # RoBERTa: an alias of lm_head.bias
)
ROBERTA_PRE_LN = "roberta-prelayernorm"


@dataclass(frozen=True)
class Link:
    """One lmforge tensor and the Hugging Face tensors it is concatenated from (along dim 0)."""

    ours: str
    theirs: tuple[str, ...]
    sizes: tuple[int, ...] = ()  # split sizes along dim 0 when ``theirs`` has several tensors
    conv1d: bool = False  # GPT-2 Conv1D weight: stored transposed


# ---------------------------------------------------------------------------------------------
# Reading a Hugging Face directory


def read_hf_dir(directory: str | os.PathLike) -> tuple[dict, dict[str, Tensor]]:
    """The config.json and all safetensors tensors (single file or sharded) of a HF model directory."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"{directory}: directory not found")
    cfg_path = directory / "config.json"
    if not cfg_path.is_file():
        raise UserError(f"{directory}: no config.json; not a Hugging Face model directory")
    hf_cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    single, index = directory / "model.safetensors", directory / "model.safetensors.index.json"
    if single.is_file():
        return hf_cfg, read_safetensors(single)
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        tensors: dict[str, Tensor] = {}
        for shard in shards:
            tensors.update(read_safetensors(directory / shard))
        return hf_cfg, tensors
    pickled = [p.name for p in directory.glob("*.bin")]
    hint = (
        f" It holds {', '.join(pickled)}: pickled weights are never loaded (they can run code); "
        "re-save them as safetensors with transformers' save_pretrained(safe_serialization=True)."
        if pickled
        else ""
    )
    raise UserError(f"{directory}: no model.safetensors or model.safetensors.index.json.{hint}")


def _strip_prefix(tensors: dict[str, Tensor], prefixes: tuple[str, ...]) -> dict[str, Tensor]:
    out = {}
    for k, v in tensors.items():
        for p in prefixes:
            if k.startswith(p):
                k = k[len(p) :]
                break
        out[k] = v
    return out


def _act(name: str, where: str) -> str:
    if name not in _ACT_FROM_HF:
        raise UserError(f"{where}: hidden activation {name!r} is not supported; supported: {sorted(_ACT_FROM_HF)}")
    return _ACT_FROM_HF[name]


# ---------------------------------------------------------------------------------------------
# Link tables


def bert_links(cfg: BertConfig) -> list[Link]:
    """A BERT as Hugging Face's ``Bert*``, or with ``pre_norm`` as ``RobertaPreLayerNorm*`` (names without the
    ``bert.`` / ``roberta_prelayernorm.`` prefix). The two differ only in where the LayerNorms sit and are named,
    the final LayerNorm and the MLM head's names."""
    qkv = (cfg.d_model,) * 3
    links = [
        Link("embed.word.weight", ("embeddings.word_embeddings.weight",)),
        Link("embed.position.weight", ("embeddings.position_embeddings.weight",)),
        Link("embed.token_type.weight", ("embeddings.token_type_embeddings.weight",)),
        Link("embed.norm.weight", ("embeddings.LayerNorm.weight",)),
        Link("embed.norm.bias", ("embeddings.LayerNorm.bias",)),
    ]
    # post-LN: the norm after each residual sum; pre-LN: the norm in front of each branch
    attn_norm, ffn_norm = (
        ("LayerNorm", "intermediate.LayerNorm") if cfg.pre_norm else ("output.LayerNorm", "output.LayerNorm")
    )
    for i in range(cfg.n_layers):
        ours, hf = f"layers.{i}.", f"encoder.layer.{i}."
        att = hf + "attention."
        for kind in ("weight", "bias"):
            links += [
                Link(
                    ours + f"attn.qkv.{kind}", tuple(att + f"self.{n}.{kind}" for n in ("query", "key", "value")), qkv
                ),
                Link(ours + f"attn.out.{kind}", (att + f"output.dense.{kind}",)),
                Link(ours + f"attn_norm.{kind}", (att + f"{attn_norm}.{kind}",)),
                Link(ours + f"ffn.up.{kind}", (hf + f"intermediate.dense.{kind}",)),
                Link(ours + f"ffn.down.{kind}", (hf + f"output.dense.{kind}",)),
                Link(ours + f"ffn_norm.{kind}", (hf + f"{ffn_norm}.{kind}",)),
            ]
    if cfg.pre_norm:
        links += [Link("final_norm.weight", ("LayerNorm.weight",)), Link("final_norm.bias", ("LayerNorm.bias",))]
    if cfg.pooler:
        links += [
            Link("pooler.dense.weight", ("pooler.dense.weight",)),
            Link("pooler.dense.bias", ("pooler.dense.bias",)),
        ]
    if cfg.mlm_head:
        head, norm, bias = (
            ("lm_head.", "layer_norm", "lm_head.bias")
            if cfg.pre_norm
            else ("cls.predictions.transform.", "LayerNorm", "cls.predictions.bias")
        )
        links += [
            Link("mlm_head.transform.weight", (head + "dense.weight",)),
            Link("mlm_head.transform.bias", (head + "dense.bias",)),
            Link("mlm_head.norm.weight", (head + f"{norm}.weight",)),
            Link("mlm_head.norm.bias", (head + f"{norm}.bias",)),
            Link("mlm_head.bias", (bias,)),
        ]
    return links


def gpt2_links(cfg: GPTConfig) -> list[Link]:
    links = [Link("embed.word.weight", ("wte.weight",)), Link("embed.position.weight", ("wpe.weight",))]
    for i in range(cfg.n_layers):
        ours, hf = f"layers.{i}.", f"h.{i}."
        links += [
            Link(ours + "attn_norm.weight", (hf + "ln_1.weight",)),
            Link(ours + "attn_norm.bias", (hf + "ln_1.bias",)),
            Link(ours + "attn.qkv.weight", (hf + "attn.c_attn.weight",), conv1d=True),
            Link(ours + "attn.qkv.bias", (hf + "attn.c_attn.bias",)),
            Link(ours + "attn.out.weight", (hf + "attn.c_proj.weight",), conv1d=True),
            Link(ours + "attn.out.bias", (hf + "attn.c_proj.bias",)),
            Link(ours + "ffn_norm.weight", (hf + "ln_2.weight",)),
            Link(ours + "ffn_norm.bias", (hf + "ln_2.bias",)),
            Link(ours + "ffn.up.weight", (hf + "mlp.c_fc.weight",), conv1d=True),
            Link(ours + "ffn.up.bias", (hf + "mlp.c_fc.bias",)),
            Link(ours + "ffn.down.weight", (hf + "mlp.c_proj.weight",), conv1d=True),
            Link(ours + "ffn.down.bias", (hf + "mlp.c_proj.bias",)),
        ]
    links += [Link("norm.weight", ("ln_f.weight",)), Link("norm.bias", ("ln_f.bias",))]
    if not cfg.tie_embeddings:
        links.append(Link("lm_head.weight", ("lm_head.weight",)))
    return links


def llama_links(cfg: GPTConfig) -> list[Link]:
    hd = cfg.dim_per_head
    qkv = (cfg.n_heads * hd, cfg.kv_heads * hd, cfg.kv_heads * hd)
    links = [Link("embed.word.weight", ("embed_tokens.weight",))]
    for i in range(cfg.n_layers):
        ours, hf = f"layers.{i}.", f"layers.{i}."
        att = hf + "self_attn."
        links += [
            Link(ours + "attn_norm.weight", (hf + "input_layernorm.weight",)),
            Link(ours + "attn.qkv.weight", tuple(att + f"{n}_proj.weight" for n in "qkv"), qkv),
            Link(ours + "attn.out.weight", (att + "o_proj.weight",)),
            Link(ours + "ffn_norm.weight", (hf + "post_attention_layernorm.weight",)),
        ]
        if cfg.qkv_bias:
            links.append(Link(ours + "attn.qkv.bias", tuple(att + f"{n}_proj.bias" for n in "qkv"), qkv))
        if cfg.out_bias:
            links.append(Link(ours + "attn.out.bias", (att + "o_proj.bias",)))
        for ours_name, hf_name in (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj")):
            links.append(Link(ours + f"ffn.{ours_name}.weight", (hf + f"mlp.{hf_name}.weight",)))
            if cfg.ffn_bias:
                links.append(Link(ours + f"ffn.{ours_name}.bias", (hf + f"mlp.{hf_name}.bias",)))
    links.append(Link("norm.weight", ("norm.weight",)))
    if not cfg.tie_embeddings:
        links.append(Link("lm_head.weight", ("lm_head.weight",)))
    return links


def gemma3_links(cfg: GPTConfig) -> list[Link]:
    """Gemma 3: Llama's links, but the feed-forward's input norm is ``pre_feedforward_layernorm`` (Gemma's
    ``post_attention_layernorm`` normalises the attention's output), plus the q/k norms and the two output norms."""
    links = [
        Link(link.ours, (link.theirs[0].replace("post_attention_layernorm", "pre_feedforward_layernorm"),))
        if link.ours.endswith("ffn_norm.weight")
        else link
        for link in llama_links(cfg)
    ]
    for i in range(cfg.n_layers):
        ours, hf = f"layers.{i}.", f"layers.{i}."
        links += [
            Link(ours + "attn.q_norm.weight", (hf + "self_attn.q_norm.weight",)),
            Link(ours + "attn.k_norm.weight", (hf + "self_attn.k_norm.weight",)),
            Link(ours + "attn_out_norm.weight", (hf + "post_attention_layernorm.weight",)),
            Link(ours + "ffn_out_norm.weight", (hf + "post_feedforward_layernorm.weight",)),
        ]
    return links


# ---------------------------------------------------------------------------------------------
# Configs


def _bert_config(hf: dict, keys: set[str], where: str) -> BertConfig:
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise UserError(f"{where}: position_embedding_type={hf['position_embedding_type']!r}; only 'absolute'")
    pre_norm = hf["model_type"] == ROBERTA_PRE_LN
    head = "lm_head.dense.weight" if pre_norm else "cls.predictions.transform.dense.weight"
    return BertConfig(
        vocab_size=hf["vocab_size"],
        max_seq_len=hf.get("max_position_embeddings", 512)
        - (_position_offset(hf.get("pad_token_id"), where) if pre_norm else 0),
        n_layers=hf["num_hidden_layers"],
        n_heads=hf["num_attention_heads"],
        d_model=hf["hidden_size"],
        d_ff=hf["intermediate_size"],
        dropout=hf.get("hidden_dropout_prob", 0.1),
        attn_dropout=hf.get("attention_probs_dropout_prob", 0.1),
        type_vocab_size=hf.get("type_vocab_size", 2),
        norm_eps=hf.get("layer_norm_eps", 1e-12),
        activation=_act(hf.get("hidden_act", "gelu"), where),
        pooler="pooler.dense.weight" in keys,
        mlm_head=head in keys,
        pre_norm=pre_norm,
    )


def _position_offset(pad_token_id: int | None, where: str) -> int:
    """Rows of a RoBERTa position table below the first position: RoBERTa counts from pad_token_id + 1."""
    if pad_token_id is None:
        raise UserError(f"{where}: RobertaPreLayerNorm needs a pad token id (its positions start after it)")
    return int(pad_token_id) + 1


def _gpt2_config(hf: dict, where: str) -> GPTConfig:
    if hf.get("scale_attn_by_inverse_layer_idx") or not hf.get("scale_attn_weights", True):
        raise UserError(f"{where}: GPT-2 attention scaling variants are not supported")
    d = hf["n_embd"]
    return GPTConfig(
        vocab_size=hf["vocab_size"],
        max_seq_len=hf["n_positions"],
        n_layers=hf["n_layer"],
        n_heads=hf["n_head"],
        d_model=d,
        d_ff=hf.get("n_inner") or 4 * d,
        dropout=hf.get("resid_pdrop", 0.1),
        norm="layernorm",
        norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        positions="learned",
        activation=_act(hf.get("activation_function", "gelu_new"), where),
        tie_embeddings=hf.get("tie_word_embeddings", True),
    )


def _rope_theta(hf: dict, where: str) -> float:
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    kind = params.get("rope_type", params.get("type", "default"))
    if kind != "default":
        raise UserError(f"{where}: rope_type={kind!r} is not supported; only 'default' RoPE")
    return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def _llama_config(hf: dict, where: str) -> GPTConfig:
    qwen = hf["model_type"] == "qwen2"
    if qwen and hf.get("use_sliding_window"):
        raise UserError(f"{where}: Qwen2 sliding-window attention is not supported")
    act = _act(hf.get("hidden_act", "silu"), where)
    attn_bias = True if qwen else bool(hf.get("attention_bias", False))
    return GPTConfig(
        vocab_size=hf["vocab_size"],
        max_seq_len=hf.get("max_position_embeddings", 2048),
        n_layers=hf["num_hidden_layers"],
        n_heads=hf["num_attention_heads"],
        n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        d_model=hf["hidden_size"],
        d_ff=hf["intermediate_size"],
        head_dim=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
        dropout=float(hf.get("attention_dropout", 0.0)),
        norm="rmsnorm",
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        positions="rope",
        rope_theta=_rope_theta(hf, where),
        activation=act,
        gated_ffn=True,
        qkv_bias=attn_bias,
        out_bias=False if qwen else attn_bias,
        ffn_bias=False if qwen else bool(hf.get("mlp_bias", False)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )


def _gemma3_config(hf: dict, where: str) -> GPTConfig:
    for key in ("final_logit_softcapping", "attn_logit_softcapping"):
        if hf.get(key) is not None:
            raise UserError(f"{where}: {key}={hf[key]} is not supported (Gemma 3 has none)")
    if hf.get("use_bidirectional_attention"):
        raise UserError(f"{where}: use_bidirectional_attention=true is not supported; only causal Gemma 3")
    n_layers, pattern = hf["num_hidden_layers"], int(hf.get("sliding_window_pattern", 6))
    expected = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(n_layers)]
    kinds = hf.get("layer_types") or expected
    if list(kinds) != expected:
        raise UserError(f"{where}: layer_types must put a full-attention layer every {pattern} layers: {kinds}")
    rope = hf.get("rope_parameters") or {}
    full, local = rope.get("full_attention", {}), rope.get("sliding_attention", {})
    for params in (full, local):
        if params.get("rope_type", "default") != "default":
            raise UserError(f"{where}: rope_type={params['rope_type']!r} is not supported; only 'default' RoPE")
    return GPTConfig(
        vocab_size=hf["vocab_size"],
        max_seq_len=hf.get("max_position_embeddings", 32768),
        n_layers=n_layers,
        n_heads=hf["num_attention_heads"],
        n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        d_model=hf["hidden_size"],
        d_ff=hf["intermediate_size"],
        head_dim=hf.get("head_dim", 256),
        dropout=float(hf.get("attention_dropout", 0.0)),
        norm="rmsnorm_plus_one",
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        positions="rope",
        rope_theta=float(full.get("rope_theta", hf.get("rope_theta", 1_000_000.0))),
        rope_local_theta=float(local.get("rope_theta", hf.get("rope_local_base_freq", 10_000.0))),
        activation=_act(hf.get("hidden_activation", "gelu_pytorch_tanh"), where),
        gated_ffn=True,
        qkv_bias=bool(hf.get("attention_bias", False)),
        out_bias=bool(hf.get("attention_bias", False)),
        ffn_bias=False,
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        qk_norm=True,
        sandwich_norms=True,
        embed_scale=True,
        attn_scale=float(hf.get("query_pre_attn_scalar", 256)) ** -0.5,
        sliding_window=int(hf.get("sliding_window", 512)),
        global_every=pattern,
    )


def hf_family(cfg: BertConfig | GPTConfig) -> str:
    """The Hugging Face model_type a lmforge config exports to, or ValueError saying why none fits."""
    if not isinstance(cfg, (BertConfig, GPTConfig)):
        raise UserError(
            f"a {type(cfg).__name__.removesuffix('Config')} model has no Hugging Face export here (BERT and GPT "
            "model directories export; a translation run's encoder-decoder does not)"
        )
    if isinstance(cfg, BertConfig):
        if cfg.gated_ffn:
            raise UserError(
                "model.gated_ffn=true: no Hugging Face BERT class has a gated feed-forward (BERT and "
                "RobertaPreLayerNorm use up/act/down); export a model trained with gated_ffn=false"
            )
        if cfg.bigram_buckets:
            raise UserError(
                f"model.bigram_buckets={cfg.bigram_buckets}: no Hugging Face BERT class has bigram input "
                "embeddings; export a model trained with bigram_buckets=0"
            )
        if cfg.pre_norm and cfg.mlm_head and cfg.activation != "gelu":
            raise UserError(
                f"model.activation={cfg.activation!r}: RobertaPreLayerNorm's MLM head applies the exact gelu; "
                "export a pre-LN model with activation gelu"
            )
        return ROBERTA_PRE_LN if cfg.pre_norm else "bert"
    if cfg.norm == "rmsnorm_plus_one":
        if cfg.qk_norm and cfg.sandwich_norms and cfg.embed_scale and cfg.gated_ffn and cfg.positions == "rope":
            return "gemma3_text"
        raise UserError("a GPT with Gemma's norm exports only as Gemma 3: qk_norm, sandwich_norms, embed_scale, GeGLU")
    if cfg.qk_norm or cfg.sandwich_norms or cfg.embed_scale or cfg.sliding_window:
        raise UserError("qk_norm, sandwich_norms, embed_scale and sliding_window export only as Gemma 3")
    plain_heads = cfg.kv_heads == cfg.n_heads and cfg.dim_per_head * cfg.n_heads == cfg.d_model
    if cfg.positions == "learned":
        if (
            cfg.norm == "layernorm"
            and not cfg.gated_ffn
            and cfg.qkv_bias
            and cfg.out_bias
            and cfg.ffn_bias
            and plain_heads
        ):
            return "gpt2"
        raise UserError("a learned-position GPT exports only as GPT-2: layernorm, plain MLP, all biases, no GQA")
    if cfg.norm == "rmsnorm" and cfg.gated_ffn:
        if cfg.qkv_bias == cfg.out_bias:
            return "llama"
        if cfg.qkv_bias and not cfg.out_bias and not cfg.ffn_bias:
            return "qwen2"
    raise UserError("a RoPE GPT exports as Llama or Qwen2 only with rmsnorm and a gated feed-forward")


def _links(cfg: BertConfig | GPTConfig) -> list[Link]:
    family = hf_family(cfg)
    tables = {"bert": bert_links, ROBERTA_PRE_LN: bert_links, "gpt2": gpt2_links, "gemma3_text": gemma3_links}
    return tables.get(family, llama_links)(cfg)


# ---------------------------------------------------------------------------------------------
# Conversion


def from_hf(
    hf_cfg: dict, tensors: dict[str, Tensor], *, source: str = "checkpoint"
) -> tuple[BertConfig | GPTConfig, dict[str, Tensor]]:
    """Convert a Hugging Face config and state dict into a lmforge config and state dict."""
    kind = hf_cfg.get("model_type")
    if kind == "bert":
        tensors = _strip_prefix(tensors, ("bert.",))
        cfg: BertConfig | GPTConfig = _bert_config(hf_cfg, set(tensors), source)
    elif kind == ROBERTA_PRE_LN:
        tensors = _strip_prefix(tensors, ("roberta_prelayernorm.",))
        cfg = _bert_config(hf_cfg, set(tensors), source)
        position = "embeddings.position_embeddings.weight"
        if position in tensors:
            tensors = {**tensors, position: tensors[position][_position_offset(hf_cfg.get("pad_token_id"), source) :]}
    elif kind == "gpt2":
        tensors = _strip_prefix(tensors, ("transformer.",))
        cfg = _gpt2_config(hf_cfg, source)
    elif kind in ("llama", "qwen2"):
        tensors = _strip_prefix(tensors, ("model.",))
        cfg = _llama_config(hf_cfg, source)
    elif kind in ("gemma3_text", "gemma3"):
        if kind == "gemma3":  # the multimodal config: its text part, and the language model's tensors
            hf_cfg = {**hf_cfg.get("text_config", {}), "model_type": "gemma3_text"}
            tensors = _strip_prefix(tensors, ("model.language_model.", "language_model.model."))
        tensors = _strip_prefix(tensors, ("model.",))
        cfg = _gemma3_config(hf_cfg, source)
    else:
        raise UserError(
            f"{source}: model_type={kind!r} is not supported; supported: bert, {ROBERTA_PRE_LN}, gpt2, llama, qwen2, "
            "gemma3_text"
        )
    links = _links(cfg)
    used = {name for link in links for name in link.theirs}
    if getattr(cfg, "tie_embeddings", False):
        used.add("lm_head.weight")  # some tied checkpoints store the head anyway; it is the embedding
        optional = {"lm_head.weight"}
    else:
        optional = set()
    missing = sorted(name for name in used - optional if name not in tensors)
    unknown = sorted(k for k in tensors if k not in used and not k.endswith(_IGNORED_SUFFIXES))
    if missing or unknown:
        raise UserError(
            f"{source}: tensors do not match its {kind} config; missing: {', '.join(missing) or 'none'}; "
            f"unexpected: {', '.join(unknown) or 'none'}"
        )
    ours = {}
    for link in links:
        parts = [tensors[name].t() if link.conv1d else tensors[name] for name in link.theirs]
        ours[link.ours] = torch.cat(parts, dim=0).contiguous() if len(parts) > 1 else parts[0].contiguous()
    return cfg, ours


def to_hf(
    cfg: BertConfig | GPTConfig, tensors: dict[str, Tensor], *, token_ids: dict[str, int | None]
) -> tuple[dict, dict[str, Tensor]]:
    """Convert a lmforge config and state dict into a Hugging Face config.json dict and state dict.

    ``token_ids`` gives the tokenizer's ``pad``, ``bos`` and ``eos`` ids for the config.
    """
    family = hf_family(cfg)
    hf: dict[str, Tensor] = {}
    for link in _links(cfg):
        if link.ours not in tensors and isinstance(cfg, BertConfig) and not cfg.bias and link.ours.endswith(".bias"):
            weight = tensors[link.ours[: -len("bias")] + "weight"]
            value = weight.new_zeros(weight.shape[0])  # a layer without bias is the same layer with a zero bias
        else:
            value = tensors[link.ours]
        parts = value.split(list(link.sizes), dim=0) if link.sizes else (value,)
        for name, part in zip(link.theirs, parts, strict=True):
            hf[name] = (part.t() if link.conv1d else part).contiguous()
    if family == ROBERTA_PRE_LN:
        hf_cfg = _bert_hf_config(cfg, token_ids)
        offset = hf_cfg["max_position_embeddings"] - cfg.max_seq_len
        position = "embeddings.position_embeddings.weight"
        hf[position] = torch.cat((hf[position].new_zeros(offset, cfg.d_model), hf[position]))
    hf = {_hf_prefixed(cfg, family, k): v for k, v in hf.items()}
    if family in ("bert", ROBERTA_PRE_LN):
        return _bert_hf_config(cfg, token_ids), hf
    if family == "gpt2":
        return _gpt2_hf_config(cfg, token_ids), hf
    if family == "gemma3_text":
        return _gemma3_hf_config(cfg, token_ids), hf
    return _llama_hf_config(cfg, family, token_ids), hf


def _hf_prefixed(cfg: BertConfig | GPTConfig, family: str, name: str) -> str:
    """A Hugging Face tensor name as it stands in the whole model of ``family`` (the base model's prefix, which the
    heads outside it do not get)."""
    if family == "bert":
        return name if name.startswith("cls.") or not cfg.mlm_head else "bert." + name
    if family == ROBERTA_PRE_LN:
        return name if name.startswith("lm_head.") or not cfg.mlm_head else "roberta_prelayernorm." + name
    if name == "lm_head.weight":
        return name
    return ("transformer." if family == "gpt2" else "model.") + name


def hf_weight_parts(cfg: BertConfig | GPTConfig, ours: str) -> tuple[list[tuple[str, int]], bool]:
    """The Hugging Face tensors (full names in the exported model, row counts) that lmforge's weight ``ours`` is
    concatenated from, and whether they are GPT-2 ``Conv1D`` weights (stored transposed): how an adapter on a fused
    lmforge matrix (``attn.qkv``) maps onto Hugging Face's separate projections (``models/lora.py``)."""
    family = hf_family(cfg)
    for link in _links(cfg):
        if link.ours == ours:
            sizes = link.sizes or (None,)
            return [
                (_hf_prefixed(cfg, family, n), size) for n, size in zip(link.theirs, sizes, strict=True)
            ], link.conv1d
    raise UserError(f"{ours}: no Hugging Face tensor corresponds to it in a {family} model")


def _common(token_ids: dict[str, int | None]) -> dict:
    return {
        "pad_token_id": token_ids.get("pad"),
        "bos_token_id": token_ids.get("bos"),
        "eos_token_id": token_ids.get("eos"),
        "dtype": "float32",
    }


def _bert_hf_config(cfg: BertConfig, token_ids: dict[str, int | None]) -> dict:
    name = "RobertaPreLayerNorm" if cfg.pre_norm else "Bert"
    offset = _position_offset(token_ids.get("pad"), "export of a pre-LN BERT") if cfg.pre_norm else 0
    return {
        "architectures": [f"{name}ForMaskedLM" if cfg.mlm_head else f"{name}Model"],
        "model_type": ROBERTA_PRE_LN if cfg.pre_norm else "bert",
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_seq_len + offset,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff,
        "hidden_dropout_prob": cfg.dropout,
        "attention_probs_dropout_prob": cfg.attn_dropout,
        "type_vocab_size": cfg.type_vocab_size,
        "layer_norm_eps": cfg.norm_eps,
        "hidden_act": _ACT_TO_HF[cfg.activation],
        "initializer_range": cfg.init_std,
        "position_embedding_type": "absolute",
        "tie_word_embeddings": True,
        **_common(token_ids),
    }


def _gpt2_hf_config(cfg: GPTConfig, token_ids: dict[str, int | None]) -> dict:
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.max_seq_len,
        "n_layer": cfg.n_layers,
        "n_head": cfg.n_heads,
        "n_embd": cfg.d_model,
        "n_inner": cfg.d_ff,
        "activation_function": _ACT_TO_HF[cfg.activation],
        "resid_pdrop": cfg.dropout,
        "embd_pdrop": cfg.dropout,
        "attn_pdrop": cfg.dropout,
        "layer_norm_epsilon": cfg.norm_eps,
        "initializer_range": cfg.init_std,
        "tie_word_embeddings": cfg.tie_embeddings,
        **_common(token_ids),
    }


def _whole(x: float) -> int | float:
    """``x`` as an int when it is one (to rounding): transformers types Gemma's query_pre_attn_scalar as int."""
    return round(x) if abs(x - round(x)) < 1e-6 else x


def _decoder_shape(cfg: GPTConfig) -> dict:
    """The config.json keys of a RoPE decoder's shape, as Llama, Qwen2 and Gemma 3 name them."""
    return {
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_seq_len,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.dim_per_head,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff,
    }


def _gemma3_hf_config(cfg: GPTConfig, token_ids: dict[str, int | None]) -> dict:
    pattern = cfg.global_every or cfg.n_layers + 1
    return {
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        **_decoder_shape(cfg),
        "hidden_activation": _ACT_TO_HF[cfg.activation] if cfg.activation != "gelu_tanh" else "gelu_pytorch_tanh",
        "rms_norm_eps": cfg.norm_eps,
        "query_pre_attn_scalar": _whole((cfg.attn_scale or cfg.dim_per_head**-0.5) ** -2),
        "sliding_window": cfg.sliding_window or cfg.max_seq_len,
        "layer_types": [
            "full_attention" if (i + 1) % pattern == 0 or not cfg.sliding_window else "sliding_attention"
            for i in range(cfg.n_layers)
        ],
        "rope_parameters": {
            "full_attention": {"rope_type": "default", "rope_theta": cfg.rope_theta},
            "sliding_attention": {"rope_type": "default", "rope_theta": cfg.rope_local_theta or cfg.rope_theta},
        },
        "attention_bias": cfg.qkv_bias,
        "final_logit_softcapping": None,
        "attn_logit_softcapping": None,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        **_common(token_ids),
    }


def _llama_hf_config(cfg: GPTConfig, family: str, token_ids: dict[str, int | None]) -> dict:
    out = {
        "architectures": ["Qwen2ForCausalLM" if family == "qwen2" else "LlamaForCausalLM"],
        "model_type": family,
        **_decoder_shape(cfg),
        "hidden_act": _ACT_TO_HF[cfg.activation],
        "rms_norm_eps": cfg.norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "rope_theta": cfg.rope_theta,
        "attention_dropout": cfg.dropout,
        "initializer_range": cfg.init_std,
        "tie_word_embeddings": cfg.tie_embeddings,
        **_common(token_ids),
    }
    if family == "llama":
        out.update(attention_bias=cfg.qkv_bias, mlp_bias=cfg.ffn_bias)
    else:
        out.update(use_sliding_window=False)
    return out


# ---------------------------------------------------------------------------------------------
# GGUF: llama.cpp's names and metadata keys

GGUF_ARCHITECTURES = ("llama", "qwen2", "gemma3")
"""GGUF ``general.architecture`` values read here."""

_GGUF_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_output.bias": "self_attn.o_proj.bias",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GGUF_GEMMA3_LAYER_NAMES = {  # Gemma's post_attention_layernorm normalises the attention's output
    **{k: v for k, v in _GGUF_LAYER_NAMES.items() if k != "ffn_norm.weight"},
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "ffn_norm.weight": "pre_feedforward_layernorm.weight",
    "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
}
_GGUF_NAMES = {
    "token_embd.weight": "embed_tokens.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "lm_head.weight",
}


def gguf_hf_name(name: str, arch: str = "llama") -> str | None:
    """The Hugging Face name of a GGUF tensor of a Llama / Qwen2 / Gemma 3 file, or None for one that has none."""
    if name in _GGUF_NAMES:
        return _GGUF_NAMES[name]
    layers = _GGUF_GEMMA3_LAYER_NAMES if arch == "gemma3" else _GGUF_LAYER_NAMES
    head, _, rest = name.partition(".")
    layer, _, part = rest.partition(".")
    if head == "blk" and layer.isdigit() and part in layers:
        return f"layers.{layer}.{layers[part]}"
    return None


def unpermute_rows(weight: Tensor, n_heads: int) -> Tensor:
    """Undo llama.cpp's ``permute`` of a query or key matrix (or bias) of ``n_heads`` heads: it stored each head's
    rows as interleaved (even, odd) pairs; Hugging Face's rotate-half layout has the two halves in turn."""
    rows = weight.shape[0]
    half = rows // n_heads // 2
    return weight.reshape(n_heads, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def gguf_architecture(gguf) -> str:
    """The architecture of an opened GGUF file, or a UserError naming it and the supported ones."""
    arch = gguf.architecture
    if arch not in GGUF_ARCHITECTURES:
        raise UserError(
            f"{gguf.path}: general.architecture={arch!r} is not supported; supported: {', '.join(GGUF_ARCHITECTURES)}"
        )
    return arch


def gguf_as_hf(gguf) -> tuple[dict, dict[str, Tensor]]:
    """The Hugging Face config and tensors of an opened GGUF file (``models/gguf.GGUFFile``), dequantized to fp32."""
    arch, where = gguf_architecture(gguf), str(gguf.path)
    key = lambda name: f"{arch}.{name}"  # noqa: E731
    scaling = gguf.value(key("rope.scaling.type"), "none")
    if scaling not in ("none", None) or "rope_freqs.weight" in gguf.tensors:
        raise UserError(f"{where}: RoPE scaling ({scaling!r}, rope_freqs) is not supported; only plain RoPE")
    heads, d = int(gguf.require(key("attention.head_count"))), int(gguf.require(key("embedding_length")))
    kv_heads = int(gguf.value(key("attention.head_count_kv"), heads))
    n_layers = int(gguf.require(key("block_count")))
    head_dim = (
        int(gguf.value(key("attention.key_length"), 0) or gguf.value(key("rope.dimension_count"), 0)) or d // heads
    )
    hf_cfg = {
        "model_type": "gemma3_text" if arch == "gemma3" else arch,
        "vocab_size": int(gguf.value(key("vocab_size"), 0) or gguf.tensors["token_embd.weight"].shape[1]),
        "max_position_embeddings": int(gguf.value(key("context_length"), 2048)),
        "num_hidden_layers": n_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "hidden_size": d,
        "intermediate_size": int(gguf.require(key("feed_forward_length"))),
        "head_dim": head_dim,
        "rms_norm_eps": float(gguf.value(key("attention.layer_norm_rms_epsilon"), 1e-6)),
        "rope_theta": float(gguf.value(key("rope.freq_base"), 10000.0)),
        "hidden_act": "silu",
        "tie_word_embeddings": "output.weight" not in gguf.tensors,
        "attention_bias": "blk.0.attn_q.bias" in gguf.tensors,
    }
    if arch == "gemma3":
        hf_cfg.update(_gemma3_gguf_config(gguf, hf_cfg, where))
    tensors, unknown = {}, []
    for name in gguf.tensors:
        hf_name = gguf_hf_name(name, arch)
        if hf_name is None:
            unknown.append(name)
            continue
        value = gguf.dequantized(name)
        if arch == "llama" and name.endswith(("attn_q.weight", "attn_q.bias")):
            value = unpermute_rows(value, heads)
        elif arch == "llama" and name.endswith(("attn_k.weight", "attn_k.bias")):
            value = unpermute_rows(value, kv_heads)
        elif arch == "gemma3" and name.endswith("norm.weight"):
            value = value - 1.0  # llama.cpp stores Gemma's 1 + w; Gemma (and lmforge) hold w
        tensors[hf_name] = value
    if unknown:
        raise UserError(f"{where}: tensors a {arch} model does not have: {', '.join(sorted(unknown)[:8])}")
    return hf_cfg, tensors


def _gemma3_gguf_config(gguf, hf_cfg: dict, where: str) -> dict:
    """Gemma 3's keys, with llama.cpp's own rules where the file has none: a global layer every 6 (its
    ``set_swa_pattern(6)``), local layers' RoPE base 10,000, and the query scale 1 / sqrt(head width) except for
    the 62-layer 27B, which uses 1 / sqrt(width / heads)."""
    d, heads = hf_cfg["hidden_size"], hf_cfg["num_attention_heads"]
    scalar = d // heads if hf_cfg["num_hidden_layers"] == 62 else hf_cfg["head_dim"]
    return {
        "hidden_activation": "gelu_pytorch_tanh",
        "query_pre_attn_scalar": scalar,
        "sliding_window": int(gguf.value("gemma3.attention.sliding_window", 512)),
        "sliding_window_pattern": 6,
        "rope_parameters": {
            "full_attention": {"rope_type": "default", "rope_theta": hf_cfg["rope_theta"]},
            "sliding_attention": {
                "rope_type": "default",
                "rope_theta": float(gguf.value("gemma3.rope.freq_base_swa", 10000.0)),
            },
        },
        "tie_word_embeddings": True if "output.weight" not in gguf.tensors else hf_cfg["tie_word_embeddings"],
    }


# ---------------------------------------------------------------------------------------------
# GGUF export: Hugging Face names and config -> llama.cpp's (the inverse of ``gguf_as_hf``)

GGUF_EXPORT_ARCHITECTURES = {"gpt2": "gpt2", "llama": "llama", "qwen2": "qwen2", "gemma3_text": "gemma3"}
"""Hugging Face model_type -> the GGUF ``general.architecture`` it is written as."""

_GGUF_GPT2_LAYER_NAMES = {
    "ln_1": "attn_norm",
    "attn.c_attn": "attn_qkv",
    "attn.c_proj": "attn_output",
    "ln_2": "ffn_norm",
    "mlp.c_fc": "ffn_up",
    "mlp.c_proj": "ffn_down",
}
_GGUF_GPT2_NAMES = {"wte": "token_embd", "wpe": "position_embd", "ln_f": "output_norm", "lm_head": "output"}
_GGUF_ACTIVATIONS = {"gpt2": ("gelu_new",), "llama": ("silu",), "qwen2": ("silu",), "gemma3": ("gelu_pytorch_tanh",)}
"""The one feed-forward activation llama.cpp computes for each architecture (GPT-2 and Gemma: tanh GELU)."""


def permute_rows(weight: Tensor, n_heads: int) -> Tensor:
    """llama.cpp's ``permute`` of a query or key matrix (or bias) of ``n_heads`` heads, the inverse of
    ``unpermute_rows``: each head's two rotate-half halves become interleaved (even, odd) pairs."""
    rows = weight.shape[0]
    half = rows // n_heads // 2
    return weight.reshape(n_heads, 2, half, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _gguf_name(hf_name: str, arch: str) -> str:
    name, _, kind = hf_name.rpartition(".")  # kind: weight / bias
    if arch == "gpt2":
        name = name.removeprefix("transformer.")
        if name in _GGUF_GPT2_NAMES:
            return f"{_GGUF_GPT2_NAMES[name]}.{kind}"
        _, layer, part = name.split(".", 2)  # h.N.part
        return f"blk.{layer}.{_GGUF_GPT2_LAYER_NAMES[part]}.{kind}"
    hf_name = hf_name.removeprefix("model.")
    ours = {v: k for k, v in _GGUF_NAMES.items()}
    if hf_name in ours:
        return ours[hf_name]
    layers = _GGUF_GEMMA3_LAYER_NAMES if arch == "gemma3" else _GGUF_LAYER_NAMES
    _, layer, part = hf_name.split(".", 2)  # layers.N.part
    return f"blk.{layer}.{ {v: k for k, v in layers.items()}[part] }"


def hf_as_gguf(hf_cfg: dict, tensors: dict[str, Tensor]) -> tuple[str, dict[str, Any], dict[str, Tensor]]:
    """The GGUF architecture, ``ARCH.*`` metadata and tensors (llama.cpp's names and transforms) of a Hugging Face
    config and state dict of the families ``GGUF_EXPORT_ARCHITECTURES`` names; a UserError for what llama.cpp would
    compute differently (another activation, Gemma 3 with another query scale or layer pattern)."""
    family = hf_cfg["model_type"]
    if family not in GGUF_EXPORT_ARCHITECTURES:
        raise UserError(
            f"a {family} model has no GGUF export; the decoder families llama.cpp runs are exported: "
            f"{', '.join(GGUF_EXPORT_ARCHITECTURES.values())}"
        )
    arch = GGUF_EXPORT_ARCHITECTURES[family]
    activation = hf_cfg.get("activation_function") or hf_cfg.get("hidden_activation") or hf_cfg.get("hidden_act")
    if activation not in _GGUF_ACTIVATIONS[arch]:
        raise UserError(
            f"model.activation: llama.cpp's {arch} computes {_GGUF_ACTIVATIONS[arch][0]} only, this model uses "
            f"{activation!r}; export it to Hugging Face (--to hf) instead"
        )
    meta = _gguf_gpt2_metadata(hf_cfg) if arch == "gpt2" else _gguf_rope_metadata(hf_cfg, arch)
    out = {}
    for hf_name, value in tensors.items():
        if hf_name == "lm_head.weight" and hf_cfg.get("tie_word_embeddings"):
            continue
        value = value.detach().float()
        name = _gguf_name(hf_name, arch)
        if arch == "gpt2" and value.ndim == 2 and name.startswith("blk."):
            value = value.t()  # GPT-2's Conv1D stores (in, out)
        if arch == "llama" and name.endswith(("attn_q.weight", "attn_q.bias")):
            value = permute_rows(value, hf_cfg["num_attention_heads"])
        elif arch == "llama" and name.endswith(("attn_k.weight", "attn_k.bias")):
            value = permute_rows(value, hf_cfg["num_key_value_heads"])
        elif arch == "gemma3" and name.endswith("norm.weight"):
            value = value + 1.0  # llama.cpp multiplies by the stored weight; Gemma's norms scale by 1 + w
        out[name] = value.contiguous()
    return arch, {f"{arch}.{k}": v for k, v in meta.items()}, out


def _gguf_gpt2_metadata(hf: dict) -> dict[str, Any]:
    return {
        "context_length": hf["n_positions"],
        "embedding_length": hf["n_embd"],
        "block_count": hf["n_layer"],
        "feed_forward_length": hf.get("n_inner") or 4 * hf["n_embd"],
        "attention.head_count": hf["n_head"],
        "attention.layer_norm_epsilon": float(hf["layer_norm_epsilon"]),
        "vocab_size": hf["vocab_size"],
    }


def _gguf_rope_metadata(hf: dict, arch: str) -> dict[str, Any]:
    head_dim = hf["head_dim"]
    meta = {
        "context_length": hf["max_position_embeddings"],
        "embedding_length": hf["hidden_size"],
        "block_count": hf["num_hidden_layers"],
        "feed_forward_length": hf["intermediate_size"],
        "attention.head_count": hf["num_attention_heads"],
        "attention.head_count_kv": hf["num_key_value_heads"],
        "attention.key_length": head_dim,
        "attention.value_length": head_dim,
        "attention.layer_norm_rms_epsilon": float(hf["rms_norm_eps"]),
        "rope.dimension_count": head_dim,
        "vocab_size": hf["vocab_size"],
    }
    if arch != "gemma3":
        if arch == "llama" and hf.get("mlp_bias"):
            raise UserError("model.ffn_bias=true: llama.cpp's llama has no feed-forward biases; export to --to hf")
        return {**meta, "rope.freq_base": float(hf["rope_theta"])}
    rope = hf["rope_parameters"]
    scalar, n_layers = hf["query_pre_attn_scalar"], hf["num_hidden_layers"]
    expected = hf["hidden_size"] // hf["num_attention_heads"] if n_layers == 62 else head_dim
    if scalar != expected:
        raise UserError(
            f"model.attn_scale: llama.cpp scales Gemma 3's queries by {expected}^-0.5 (for {n_layers} layers), this "
            f"model by {scalar}^-0.5; export it to Hugging Face (--to hf) instead"
        )
    pattern = ["sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(n_layers)]
    if "sliding_attention" in hf["layer_types"] and hf["layer_types"] != pattern:
        raise UserError(
            "model.global_every: llama.cpp's Gemma 3 makes every 6th layer global and the others sliding-window; "
            "this model's layers differ; export it to Hugging Face (--to hf) instead"
        )
    window = hf["sliding_window"] if "sliding_attention" in hf["layer_types"] else hf["max_position_embeddings"]
    return {
        **meta,
        "rope.freq_base": float(rope["full_attention"]["rope_theta"]),
        "rope.freq_base_swa": float(rope["sliding_attention"]["rope_theta"]),
        "attention.sliding_window": window,
    }
