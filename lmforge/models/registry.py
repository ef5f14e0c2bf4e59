"""Model types by name, and model directories on disk: ``config.json`` + ``model.safetensors``.

A lmforge model directory names its architecture in ``config.json`` under ``lmforge_model`` and
keeps the rest of the config in lmforge's own vocabulary (``d_model``, ``n_layers``, ...).
Weights are safetensors only: loading never unpickles. Every mismatch between the file and the
model (missing, unexpected or mis-shaped tensors) raises a ValueError that names the tensors.
Hugging Face directories are recognised and pointed to ``lmforge convert``.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from lmforge.config import from_dict
from lmforge.errors import UserError
from lmforge.files import atomic_write, read_json_object, write_json
from lmforge.models.bert import Bert, BertConfig, BertLayer
from lmforge.models.gpt import GPT, GPTConfig
from lmforge.models.seq2seq import Seq2Seq, Seq2SeqConfig

MODEL_TYPES: dict[str, tuple[type, type[nn.Module]]] = {
    "bert": (BertConfig, Bert),
    "gpt": (GPTConfig, GPT),
    "seq2seq": (Seq2SeqConfig, Seq2Seq),
}
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TYPE_KEY = "lmforge_model"


def model_type_of(model_or_cfg: nn.Module | object) -> str:
    """The registry name of a model or config instance."""
    cfg = getattr(model_or_cfg, "cfg", model_or_cfg)
    for name, (cfg_cls, _) in MODEL_TYPES.items():
        if isinstance(cfg, cfg_cls):
            return name
    raise UserError(f"{type(model_or_cfg).__name__} is not a lmforge model; known: {', '.join(MODEL_TYPES)}")


def build_model(cfg: BertConfig | GPTConfig | Seq2SeqConfig) -> nn.Module:
    """A freshly initialised model for ``cfg``."""
    return MODEL_TYPES[model_type_of(cfg)][1](cfg)


def read_config(directory: str | os.PathLike) -> BertConfig | GPTConfig | Seq2SeqConfig:
    """The model config stored in ``directory/config.json``."""
    if not Path(directory).is_dir():
        raise UserError(f"{directory}: model directory not found")
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise UserError(
            f"{directory}: no {CONFIG_FILE}; a lmforge model directory holds {CONFIG_FILE} + {WEIGHTS_FILE}"
        )
    data = read_json_object(path, what="model config")
    kind = data.pop(TYPE_KEY, None)
    if kind is None:
        if "model_type" in data:
            raise UserError(
                f"{directory} is a Hugging Face {data['model_type']!r} model directory, not a lmforge one; "
                f"import it with: lmforge convert --from-hf {directory} --out OUT_DIR"
            )
        raise UserError(f"{path}: no {TYPE_KEY!r} key; expected one of {', '.join(MODEL_TYPES)}")
    if kind not in MODEL_TYPES:
        raise UserError(f"{path}: {TYPE_KEY}={kind!r} is not one of {', '.join(MODEL_TYPES)}")
    return from_dict(MODEL_TYPES[kind][0], data, where=str(path))


def config_json(cfg: BertConfig | GPTConfig | Seq2SeqConfig) -> dict:
    return {TYPE_KEY: model_type_of(cfg), **dataclasses.asdict(cfg)}


def check_state(model: nn.Module, tensors: dict[str, Tensor], *, source: str) -> None:
    """Raise ValueError naming every missing, unexpected or mis-shaped tensor."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    misshaped = [
        f"{k}: file {tuple(tensors[k].shape)} vs model {expected[k]}"
        for k in sorted(set(expected) & set(tensors))
        if tuple(tensors[k].shape) != expected[k]
    ]
    problems = []
    if missing:
        problems.append(f"missing tensors: {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {', '.join(unexpected)}")
    if misshaped:
        problems.append(f"mis-shaped tensors: {'; '.join(misshaped)}")
    if problems:
        raise UserError(f"{source}: weights do not match the {model_type_of(model)} config; " + " | ".join(problems))


def read_safetensors(path: str | os.PathLike) -> dict[str, Tensor]:
    """All tensors of a safetensors file."""
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)


def load_model(directory: str | os.PathLike, **changes) -> nn.Module:
    """Load a lmforge model directory (config.json + model.safetensors), in eval mode; ``changes`` replace config
    fields that do not change the weights' shapes (e.g. ``dropout`` for fine-tuning)."""
    cfg = read_config(directory)
    if changes:
        cfg = dataclasses.replace(cfg, **changes)
    weights = Path(directory) / WEIGHTS_FILE
    if not weights.is_file():
        raise UserError(f"{directory}: no {WEIGHTS_FILE} next to {CONFIG_FILE}")
    tensors = read_safetensors(weights)
    with torch.device("meta"):  # no weights allocated: the file's tensors become the model's (peak ~1x, not 2x)
        model = build_model(cfg)
    check_state(model, tensors, source=str(weights))
    expected = model.state_dict()
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in tensors.items()}, assign=True)
    init_meta_buffers(model)
    return model.eval()  # like transformers' from_pretrained: training code calls .train()


def init_meta_buffers(model: nn.Module) -> None:
    """Give the buffers a weight file does not hold (non-persistent: rotary frequencies) their values, for a model
    built on the meta device and then assigned its weights."""
    for name, module in model.named_modules():
        if any(b.is_meta for b in module.buffers(recurse=False)):
            if not hasattr(module, "init_buffers"):
                where = name or type(module).__name__
                raise TypeError(f"{where}: a buffer built on the meta device has no init_buffers")
            module.init_buffers()


def save_model(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write ``config.json`` and ``model.safetensors`` into ``directory`` (each file atomically)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_write(directory / WEIGHTS_FILE) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt", TYPE_KEY: model_type_of(model)})
    write_json(directory / CONFIG_FILE, config_json(model.cfg))
    return directory


def load_encoder_weights(encoder: Bert, model_dir: str | os.PathLike) -> dict[str, Tensor]:
    """Load a pretrained BERT directory's weights into ``encoder``, leaving out its MLM head and pooler
    (the ELECTRA discriminator has neither); returns all the file's tensors."""
    path = Path(model_dir) / WEIGHTS_FILE
    tensors = read_safetensors(path)
    kept = {k: v for k, v in tensors.items() if not k.startswith(("mlm_head.", "pooler."))}
    check_state(encoder, kept, source=str(path))
    encoder.load_state_dict(kept)
    return tensors


def bert_config_of(model_dir: str | os.PathLike, *, purpose: str) -> BertConfig:
    """The BertConfig of ``model_dir``; a ValueError naming ``purpose`` for any other model type."""
    cfg = read_config(model_dir)
    if not isinstance(cfg, BertConfig):
        raise UserError(f"--model {model_dir}: {purpose} needs a BERT-family model directory")
    return cfg


def encoder_for_finetuning(
    model_dir: str | os.PathLike,
    *,
    init: str = "pretrained",
    dropout: float | None = None,
    seed: int = 0,
    purpose: str = "fine-tuning",
) -> tuple[Bert, nn.Module | None]:
    """The encoder of ``model_dir`` without MLM head and pooler (pretrained weights, or the same shape
    freshly initialised when ``init`` is scratch), and its pretrained pooler if it has one."""
    from lmforge.models.bert import Pooler

    base = bert_config_of(model_dir, purpose=purpose)
    changes: dict = {"mlm_head": False, "pooler": False}
    if dropout is not None:
        changes.update(dropout=dropout, attn_dropout=dropout)
    torch.manual_seed(seed)
    encoder = Bert(dataclasses.replace(base, **changes))
    if init == "scratch":
        return encoder, None
    tensors = load_encoder_weights(encoder, model_dir)
    if not (base.pooler and "pooler.dense.weight" in tensors):
        return encoder, None
    pooler = Pooler(base.d_model)
    pooler.load_state_dict({k.removeprefix("pooler."): v for k, v in tensors.items() if k.startswith("pooler.")})
    return encoder, pooler


def decoder_for_finetuning(
    model_dir: str | os.PathLike, *, init: str = "pretrained", dropout: float | None = None, seed: int = 0
) -> GPT:
    """The GPT of ``model_dir`` for a task head on its hidden states (a decoder classifier): its pretrained weights,
    or the same shape freshly initialised when ``init`` is scratch; ``dropout`` (None: the model's) replaces the
    config's."""
    changes = {} if dropout is None else {"dropout": dropout}
    if init == "scratch":
        torch.manual_seed(seed)
        return GPT(dataclasses.replace(read_config(model_dir), **changes))
    return load_model(model_dir, **changes)


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` where ``model``'s submodule ``name`` (dotted) is: int8 layers (``inference/int8.py``) and LoRA
    layers (``models/lora.py``) replace linear layers this way."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def transformer_blocks(model: nn.Module, *, self_contained: bool = False) -> list[nn.Module]:
    """Every transformer block of ``model``, found by module type (BERT layers, GPT blocks, seq2seq decoder
    layers), whatever wraps them: a task head, an encoder-decoder, ELECTRA's generator and discriminator.
    ``torch.compile`` compiles them one by one. With ``self_contained``, only blocks whose parameters are used
    inside their own forward alone: the FSDP units (a seq2seq decoder layer's cross-attention projects the
    encoder memory once for all steps, outside its forward, so it stays in the enclosing unit)."""
    from lmforge.models.gpt import Block
    from lmforge.models.seq2seq import DecoderLayer

    kinds = (BertLayer, Block) if self_contained else (BertLayer, Block, DecoderLayer)
    return [m for m in model.modules() if isinstance(m, kinds)]
