"""Low-rank adapters on a frozen base (LoRA, Hu et al. 2021), saved and read in PEFT's format.

``add_lora(model, spec)`` turns every ``nn.Linear`` whose module name matches ``spec.targets`` (``fnmatch``
patterns; the family's ``DEFAULT_TARGETS`` when empty) into a ``LoRALinear``: the same layer, its weight and bias
frozen, plus ``lora_A`` (r x in) and ``lora_B`` (out x r), so that it computes ``W x + b + s * B A dropout(x)`` with
``s = alpha / r`` (rsLoRA, Kalajievski 2023: ``alpha / sqrt(r)``). ``A`` starts as PEFT's (Kaiming-uniform with
a = sqrt(5)) and ``B`` at zero, so the adapted model starts as the base. Every other parameter of the pretrained
model is frozen; a task's head around it (a classifier) keeps training.

DoRA (Liu et al. 2024, ``spec.dora``) splits each adapted matrix into a magnitude and a direction: the layer computes
``m / ||W + s B A|| * (W + s B A) x + b`` with ``m`` (one per output row, starting at the rows' norms ``||W||``, so
again the adapted model starts as the base) trained beside A and B, and the row norms treated as a constant in the
backward pass, as the paper's section 4.3 and PEFT do (``lora_magnitude_vector`` in PEFT's files).

lmforge fuses the attention's query, key and value into one matrix (``attn.qkv``) where Hugging Face models keep
three; PEFT puts one adapter on each. A ``LoRALinear`` over a fused matrix therefore holds one adapter per part
(``parts``: the row counts ``models/convert.hf_weight_parts`` gives): ``lora_A`` stacks the parts' A matrices and
part i's output rows use rows i*r..(i+1)*r of it, which is exactly PEFT's three adapters. ``save_adapter`` writes
``adapter_config.json`` and ``adapter_model.safetensors`` under the names PEFT gives them on the model's Hugging
Face export (``base_model.model.<module>.lora_A.weight``: a decoder as ``*ForCausalLM``, a fine-tuned encoder as
the bare ``BertModel`` that ``AutoModel`` loads), so ``peft.PeftModel.from_pretrained`` on that export computes
what lmforge computes; ``load_adapter`` reads them back (matching module names by suffix, as PEFT does), refusing
an adapter made for a base of another shape.
``merge_lora`` folds the adapters into the weights (``W + s * B A``) and restores plain ``nn.Linear`` layers.

The frozen matrices may be held in bf16 or int8 (``LoRASpec.base``; the QLoRA idea, Dettmers et al. 2023, with
int8 weight-only rows instead of NF4: the kernel decoding already uses on CPUs, ``torch._weight_int8pack_mm``).
The adapters always train in fp32. Merging folds them into the weight the adapters were trained against (the
dequantized int8 or the bf16 one widened to fp32). With a narrow base the rest of the frozen model (embeddings,
norms) is copied out of the memory-mapped weights file, so that the file's fp32 pages, read once to quantize, are
released rather than kept resident for the whole run.

Written here rather than wrapping the model with PEFT: PEFT matches Hugging Face module names and has no notion of
one matrix holding three projections, so it could only adapt lmforge's fused ``qkv`` as a whole (one shared A, a
different and non-exportable adapter), and its wrappers would change every state-dict key the checkpoints,
``save_model`` and the exports use. ``LoRALinear`` keeps the base's keys (``...qkv.weight``) and adds two.
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from lmforge.errors import UserError
from lmforge.files import atomic_write, read_json_object, write_json
from lmforge.models.registry import replace_module
from lmforge.models.specs import LoRASpec

ADAPTER_DIR = "adapter"
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
ADAPTER_BASE = "lmforge_base.json"
"""Beside PEFT's two files: the family and shape of the base the adapter was made for (PEFT warns about keys of its
config it does not know, so they are not added there)."""
DEFAULT_TARGETS = {
    "gpt": ("layers.*.attn.qkv", "layers.*.attn.out", "layers.*.ffn.gate", "layers.*.ffn.up", "layers.*.ffn.down"),
    "bert": ("*layers.*.attn.qkv", "*layers.*.attn.out", "*layers.*.ffn.up", "*layers.*.ffn.down"),
}
"""Each family's adapted layers when ``--lora.targets`` is empty: every attention and feed-forward projection (the
QLoRA paper's finding that adapting all of them matters more than the rank)."""


class _Int8Matmul(torch.autograd.Function):
    """``x @ (int8 * scale).T`` by ``torch._weight_int8pack_mm`` (bf16 inputs, as decoding's int8 path); the gradient
    for ``x`` from the weight dequantized for that one product (the weight itself never trains)."""

    @staticmethod
    def forward(ctx, x: Tensor, int8: Tensor, scale: Tensor) -> Tensor:
        from lmforge.models.decoding import int8_product

        ctx.save_for_backward(int8, scale)
        return int8_product(x, int8, scale).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        int8, scale = ctx.saved_tensors
        weight = int8.to(grad.dtype) * scale.to(grad.dtype)[:, None]
        return grad @ weight, None, None


class LoRALinear(nn.Linear):
    """An ``nn.Linear`` (frozen) with one low-rank adapter per part of its output rows (``parts``). ``base`` holds the
    frozen matrix in fp32 (the layer's own ``weight``), bf16 or int8 (non-persistent buffers made from it: a
    checkpoint, which holds what trains, does not carry them; they are made again from the pretrained model)."""

    def __init__(
        self,
        base: nn.Linear,
        parts: Sequence[int],
        *,
        rank: int,
        alpha: float,
        dropout: float,
        rslora: bool,
        base_precision: str = "fp32",
        dora: bool = False,
    ):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias  # the same tensors: the base's keys stay
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.base_precision = base_precision
        if base_precision == "int8":
            from lmforge.models.decoding import quantize_rows

            int8, scale = quantize_rows(base.weight)
            self.register_buffer("base_int8", int8, persistent=False)
            self.register_buffer("base_scale", scale, persistent=False)
            self.weight = None  # only the int8 copy is kept
        elif base_precision == "bf16":
            self.register_buffer("base_bf16", base.weight.detach().bfloat16(), persistent=False)
            self.weight = None
        if sum(parts) != self.out_features:
            raise ValueError(f"parts {list(parts)} do not add up to {self.out_features} output rows")
        self.parts, self.rank = tuple(parts), rank
        self.scaling = alpha / (math.sqrt(rank) if rslora else rank)
        factory = {"device": base.weight.device, "dtype": torch.float32}  # the adapters train in full precision
        self.lora_A = nn.Parameter(torch.empty(len(self.parts) * rank, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, **factory))
        for i in range(len(self.parts)):  # PEFT's initialisation of each part's A
            nn.init.kaiming_uniform_(self.lora_A[i * rank : (i + 1) * rank], a=math.sqrt(5))
        self.lora_dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.lora_magnitude = None  # DoRA: the rows' norms, trained
        if dora:
            self.lora_magnitude = nn.Parameter(self.base_weight().detach().float().norm(dim=1))

    def base_weight(self) -> Tensor:
        """The frozen matrix (fp32; dequantized from int8, or widened from bf16)."""
        if self.base_precision == "int8":
            return self.base_int8.float() * self.base_scale.float()[:, None]
        if self.base_precision == "bf16":
            return self.base_bf16.float()
        return self.weight

    def _base_product(self, x: Tensor) -> Tensor:
        if self.base_precision == "int8":
            return _Int8Matmul.apply(x, self.base_int8, self.base_scale)
        if self.base_precision == "bf16":
            return nn.functional.linear(x.to(torch.bfloat16), self.base_bf16).to(x.dtype)
        return nn.functional.linear(x, self.weight)

    def forward(self, x: Tensor) -> Tensor:
        y = self._base_product(x)
        dropped = self.lora_dropout(x)
        z = nn.functional.linear(dropped.to(self.lora_A.dtype), self.lora_A)  # (..., parts * r)
        if len(self.parts) == 1:
            delta = nn.functional.linear(z, self.lora_B)
        else:
            zs, bs = z.split(self.rank, dim=-1), self.lora_B.split(self.parts, dim=0)
            delta = torch.cat([nn.functional.linear(zi, bi) for zi, bi in zip(zs, bs, strict=True)], dim=-1)
        delta = (delta * self.scaling).to(y.dtype)
        if self.lora_magnitude is None:
            out = y + delta
        else:  # PEFT's order of operations: the base's product (on the dropped input while training) rescaled
            norm = (self.base_weight().detach().float() + self.delta_weight().detach()).norm(dim=1)
            scale = (self.lora_magnitude / norm).to(y.dtype)
            undropped = isinstance(self.lora_dropout, nn.Identity) or not self.training
            plain = y if undropped else self._base_product(dropped)
            out = y + (scale - 1) * plain + scale * delta
        return out if self.bias is None else out + self.bias

    def delta_weight(self) -> Tensor:
        """``s * B A`` as one (out, in) matrix, part by part."""
        bs = self.lora_B.split(self.parts, dim=0)
        a_s = self.lora_A.split(self.rank, dim=0)
        return torch.cat([b @ a for b, a in zip(bs, a_s, strict=True)], dim=0) * self.scaling

    def merged_weight(self) -> Tensor:
        """The plain layer's weight that computes what this one does (without dropout): ``W + s B A``, for DoRA
        rescaled row by row to the trained magnitudes."""
        weight = self.base_weight().detach().float() + self.delta_weight().detach()
        if self.lora_magnitude is not None:
            weight = weight * (self.lora_magnitude.detach() / weight.norm(dim=1))[:, None]
        return weight

    def extra_repr(self) -> str:
        shape = f"in_features={self.in_features}, out_features={self.out_features}, base={self.base_precision}"
        dora = ", dora" if self.lora_magnitude is not None else ""
        return f"{shape}, rank={self.rank}, parts={list(self.parts)}, scaling={self.scaling:g}{dora}"


def _family(model: nn.Module) -> str:
    from lmforge.models.registry import model_type_of

    return model_type_of(_config(model))


def _config(model: nn.Module):
    cfg = getattr(model, "cfg", None)
    if cfg is None:  # a task model: its encoder or decoder holds the config
        cfg = next((m.cfg for m in model.modules() if hasattr(m, "cfg")), None)
    return cfg


def _base_prefix(model: nn.Module) -> str:
    """The module path of the model whose config names the tensors (``""``, or e.g. ``encoder.`` in a task model)."""
    for name, module in model.named_modules():
        if hasattr(module, "cfg"):
            return f"{name}." if name else ""
    return ""


def add_lora(model: nn.Module, spec: LoRASpec) -> list[str]:
    """Adapt ``model`` in place (see the module docstring); the adapted layers' names. Every base parameter is
    frozen; a UserError lists the linear layers that exist when no target matches one."""
    from lmforge.models.convert import hf_family

    if spec.rank <= 0:
        raise UserError(f"lora.rank={spec.rank}: adapters need a rank >= 1")
    try:
        hf_family(_config(model))  # the adapters are saved under the Hugging Face export's names
    except UserError as e:
        raise UserError(
            f"--lora.rank: adapters are saved in PEFT's format, which needs a Hugging Face export: {e}"
        ) from None
    linears = {name: m for name, m in model.named_modules() if type(m) is nn.Linear}
    patterns = spec.targets or DEFAULT_TARGETS.get(_family(model), ())
    prefix = _base_prefix(model)  # a pattern matches a name within the pretrained model, or the whole name

    def matches(name: str) -> bool:
        return any(fnmatch.fnmatchcase(n, p) for p in patterns for n in {name, name.removeprefix(prefix)})

    chosen = [name for name in linears if matches(name)]
    if not chosen:
        shown = ", ".join(sorted({_pattern_of(n) for n in linears})[:20])
        raise UserError(f"lora.targets={list(patterns)} match no linear layer of this model; its layers: {shown}")
    backbone = model.get_submodule(prefix.rstrip(".")) if prefix else model
    for p in backbone.parameters():
        p.requires_grad_(False)  # the pretrained model; a task's head outside it keeps training
    precision = base_precision(spec.base, next(model.parameters()).device)
    for name in chosen:
        linear = linears[name]
        _, sizes, _ = _hf_parts(model, name)
        parts = tuple(size or linear.out_features for size in sizes)
        lora = LoRALinear(
            linear,
            parts,
            rank=spec.rank,
            alpha=spec.alpha,
            dropout=spec.dropout,
            rslora=spec.rslora,
            base_precision=precision,
            dora=spec.dora,
        )
        replace_module(model, name, lora)
    if precision != "fp32":  # the rest of the base leaves the memory-mapped file, so that its pages can be released
        with torch.no_grad():
            for p in backbone.parameters():
                if not p.requires_grad:
                    p.data = p.data.clone()
    return chosen


def base_precision(choice: str, device: torch.device) -> str:
    """``auto`` -> bf16 where bf16 arithmetic is native (``ops/cpu_features.bf16_is_fast``), else fp32."""
    from lmforge.ops.cpu_features import bf16_is_fast

    if choice == "auto":
        return "bf16" if bf16_is_fast(device) else "fp32"
    return choice


def _pattern_of(name: str) -> str:
    """A module name with its layer number replaced by ``*`` (the way targets are usually written)."""
    return ".".join("*" if part.isdigit() else part for part in name.split("."))


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its layer's weight (``W + s * B A``) and put plain ``nn.Linear`` layers back."""
    for name, layer in lora_layers(model).items():
        plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
        with torch.no_grad():
            plain.weight = nn.Parameter(layer.merged_weight())
            if layer.bias is not None:
                plain.bias = nn.Parameter(layer.bias.detach().clone())
        replace_module(model, name, plain)
    return model


# ---------------------------------------------------------------------------------------------
# PEFT's files


def save_adapter(model: nn.Module, spec: LoRASpec, directory: str | os.PathLike, *, base: str = "") -> Path:
    """``directory``/adapter_config.json + adapter_model.safetensors in PEFT's format and names."""
    from lmforge.models.convert import ROBERTA_PRE_LN, hf_family

    cfg = _config(model)
    directory = Path(directory)
    tensors, modules, fan_in_fan_out = {}, [], False
    for name, layer in lora_layers(model).items():
        names, _, conv1d = _hf_parts(model, name)
        fan_in_fan_out |= conv1d
        a_s, bs = layer.lora_A.split(layer.rank, dim=0), layer.lora_B.split(layer.parts, dim=0)
        magnitudes = layer.lora_magnitude.split(layer.parts) if layer.lora_magnitude is not None else [None] * len(bs)
        for hf, a, b, m in zip(names, a_s, bs, magnitudes, strict=True):
            tensors[f"base_model.model.{hf}.lora_A.weight"] = a.detach().float().contiguous()
            tensors[f"base_model.model.{hf}.lora_B.weight"] = b.detach().float().contiguous()
            if m is not None:
                tensors[f"base_model.model.{hf}.lora_magnitude_vector"] = m.detach().float().contiguous()
            modules.append(hf)
    family = hf_family(cfg)
    config = {
        "peft_type": "LORA",
        "task_type": "FEATURE_EXTRACTION" if family in ("bert", ROBERTA_PRE_LN) else "CAUSAL_LM",
        "base_model_name_or_path": base,
        "r": spec.rank,
        "lora_alpha": spec.alpha,
        "lora_dropout": spec.dropout,
        "use_rslora": spec.rslora,
        "use_dora": spec.dora,
        "bias": "none",
        "fan_in_fan_out": fan_in_fan_out,
        "target_modules": modules,
        "inference_mode": True,
        "init_lora_weights": True,
    }
    directory.mkdir(parents=True, exist_ok=True)
    with atomic_write(directory / ADAPTER_WEIGHTS) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    write_json(directory / ADAPTER_CONFIG, config)
    write_json(directory / ADAPTER_BASE, {"model_type": family, "shape": _shape_of(cfg)})
    return directory


def _shape_of(cfg) -> dict:
    keys = ("vocab_size", "n_layers", "n_heads", "d_model", "d_ff")
    return {k: getattr(cfg, k) for k in keys if hasattr(cfg, k)}


def load_adapter(model: nn.Module, directory: str | os.PathLike, *, base: str = "fp32") -> LoRASpec:
    """Add the adapters of ``directory`` (PEFT's files, as ``save_adapter`` writes them) to ``model``; a UserError
    when they were made for a base of another shape or name layers this model does not have. ``base``: how the
    adapted matrices are held (LoRASpec.base); fp32 by default, so that a merge (``export --merge``) folds the
    adapters into the exact base on every machine, not into a bf16 copy where the CPU has native bf16."""
    directory = Path(directory)
    config = read_json_object(directory / ADAPTER_CONFIG, what="adapter config")
    if config.get("peft_type") != "LORA":
        raise UserError(f"{directory / ADAPTER_CONFIG}: peft_type={config.get('peft_type')!r}; only LORA adapters")
    cfg = _config(model)
    base = directory / ADAPTER_BASE
    made_for = read_json_object(base, what="adapter base").get("shape") if base.is_file() else None
    if made_for is not None and made_for != _shape_of(cfg):
        raise UserError(
            f"{directory}: the adapter was made for a base of shape {json.dumps(made_for)}, this model is "
            f"{json.dumps(_shape_of(cfg))}; load it on the model it was trained from"
        )
    spec = LoRASpec(
        rank=int(config["r"]),
        alpha=float(config["lora_alpha"]),
        dropout=float(config.get("lora_dropout", 0.0)),
        rslora=bool(config.get("use_rslora", False)),
        dora=bool(config.get("use_dora", False)),
    )
    tensors = load_file(str(directory / ADAPTER_WEIGHTS))
    targets = list(config["target_modules"])

    def target_of(hf: str) -> str | None:  # PEFT matches module names by suffix; so does this
        return next((t for t in targets if t == hf or t.endswith("." + hf) or hf.endswith("." + t)), None)

    linears = {name: m for name, m in model.named_modules() if type(m) is nn.Linear}
    chosen = {}
    for name in linears:
        try:
            parts, _, _ = _hf_parts(model, name)
        except UserError:
            continue
        found = [target_of(hf) for hf in parts]
        if all(found):
            chosen[name] = found
    if not chosen:
        raise UserError(f"{directory}: none of its target modules is a layer of this model")
    missing = sorted(set(targets) - {t for found in chosen.values() for t in found})
    if missing:
        raise UserError(f"{directory}: adapters for layers this model does not have: {', '.join(missing[:5])}")
    add_lora(model, LoRASpec(**{**spec.__dict__, "targets": list(chosen), "base": base}))
    for name, layer in lora_layers(model).items():
        found = chosen[name]
        with torch.no_grad():
            layer.lora_A.copy_(torch.cat([tensors[f"base_model.model.{t}.lora_A.weight"] for t in found]))
            layer.lora_B.copy_(torch.cat([tensors[f"base_model.model.{t}.lora_B.weight"] for t in found]))
            if layer.lora_magnitude is not None:
                magnitudes = [tensors[f"base_model.model.{t}.lora_magnitude_vector"] for t in found]
                layer.lora_magnitude.copy_(torch.cat(magnitudes))
    return spec


def _hf_parts(model: nn.Module, name: str) -> tuple[list[str], list[int | None], bool]:
    """The Hugging Face projections lmforge's linear layer ``name`` fuses: their module names in the base's export,
    their row counts (None: the whole layer) and whether they are GPT-2 ``Conv1D`` layers; a UserError for a layer
    that has no Hugging Face counterpart."""
    from lmforge.models.convert import hf_weight_parts

    parts, conv1d = hf_weight_parts(_config(model), f"{name.removeprefix(_base_prefix(model))}.weight")
    return [hf.removesuffix(".weight") for hf, _ in parts], [size for _, size in parts], conv1d
