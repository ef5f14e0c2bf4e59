"""int8 weights with dynamic int8 activations for CPU inference of encoders (``lmforge quantize``).

Every ``nn.Linear`` inside a BERT encoder (attention projections and feed-forward) gets int8 weights, one
symmetric scale per output row, and its input is quantized to int8 per batch at run time (dynamic
quantization: Jacob et al. 2018; for BERT, Zafrir et al. 2019 "Q8BERT"). Embeddings, norms and the task
head stay fp32: a lookup gains nothing from int8, and the head is a few rows.

Engine: torch.ao's dynamically quantized Linear (``torch.ao.nn.quantized.dynamic.Linear``: fbgemm / x86
kernels, AVX-512 VNNI where the CPU has it), the CPU path that ships with the installed torch. torchao's
``quantize_(model, Int8DynamicActivationInt8WeightConfig())`` is the successor API, but without
``torch.compile`` it ran slower than fp32 on these CPUs (e5-small on reviews, 2 cores: 7.8 texts/s against
10.3 fp32 and 23.7 with torch.ao's kernels), so this module uses torch.ao until torchao's eager CPU path is
faster. Rounding is torch's (``torch.quantize_per_channel``); only the file layout is ours.

Activation range: torch.ao's module quantizes inputs to 7 bits (``reduce_range=True``), which keeps the
u8 x s8 pair sums of AVX2 / AVX-512 ``vpmaddubsw`` from saturating 16 bits. CPUs with VNNI
(``avx512_vnni`` / ``avx_vnni``) multiply-accumulate into 32 bits, so there the inputs get all 8 bits
(chosen at run time: ``ops/cpu_features.py``). On e5-small fine-tuned on reviews (dev split, 2-core EPYC), the
int8 labels matched fp32 on 97.8% of texts with 7 bits and on 99.1% with 8, at the same speed.

On disk, safetensors only (torch.ao's own state dict holds packed C++ objects that would need pickle):
``model.int8.safetensors`` holds, per quantized Linear ``NAME``, ``NAME.weight_int8`` (int8, out x in),
``NAME.weight_scale`` (fp32, one per output row) and ``NAME.bias``, and every other tensor of the model
as ``model.safetensors`` had it. Loading rebuilds the same quantized modules from these integers exactly.
"""

from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from lmforge.errors import UserError
from lmforge.files import atomic_write
from lmforge.models.bert import Bert
from lmforge.models.registry import build_model, read_config, read_safetensors, replace_module
from lmforge.ops.cpu_features import has_vnni

INT8_WEIGHTS_FILE = "model.int8.safetensors"
ENGINE = "torch.ao.nn.quantized.dynamic.Linear (fbgemm/x86), per-row symmetric int8 weights, dynamic int8 inputs"
"""Recorded in backend.json; the input width (7 or 8 bits) is the loading CPU's, not stored."""


@functools.cache
def _dynamic_linear() -> type[nn.Module]:
    """torch.ao's dynamic int8 Linear, with 8-bit inputs on VNNI CPUs (see the module docstring)."""
    with warnings.catch_warnings():  # torch.ao's eager quantization warns that torchao is its successor
        warnings.simplefilter("ignore")
        from torch.ao.nn.quantized.dynamic import Linear

    reduce_range = not has_vnni()

    class Int8Linear(Linear):
        def forward(self, x: Tensor) -> Tensor:
            packed = self._packed_params._packed_params
            return torch.ops.quantized.linear_dynamic(x, packed, reduce_range=reduce_range).to(x.dtype)

        def _get_name(self) -> str:
            return f"Int8Linear({8 - reduce_range}-bit inputs)"

    return Int8Linear


def _linears(model: nn.Module) -> dict[str, nn.Linear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def _quantized_linear(weight_int8: Tensor, scale: Tensor, bias: Tensor | None) -> nn.Module:
    out_features, in_features = weight_int8.shape
    zero = torch.zeros(out_features, dtype=torch.long)
    with warnings.catch_warnings():  # torch.ao's quantized tensors warn that torchao is their successor
        warnings.simplefilter("ignore")
        module = _dynamic_linear()(in_features, out_features, bias_=bias is not None, dtype=torch.qint8)
        q = torch._make_per_channel_quantized_tensor(weight_int8, scale.double(), zero, 0)
        module.set_weight_bias(q, bias)
    return module


def quantize_encoder(model: Bert) -> list[str]:
    """Replace every Linear of ``model`` (a BERT encoder) by its int8 form, in place; the names replaced."""
    if not isinstance(model, Bert):
        raise UserError(f"int8 quantization takes a BERT encoder; this is a {type(model).__name__}")
    names = []
    for name, linear in _linears(model).items():
        w = linear.weight.detach().float()
        scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)  # symmetric: the largest |w| of a row -> 127
        zero = torch.zeros(len(scale), dtype=torch.long)
        with warnings.catch_warnings():  # quantized tensors are deprecated in favour of torchao (see above)
            warnings.simplefilter("ignore")
            q = torch.quantize_per_channel(w, scale.double(), zero, 0, torch.qint8)
        bias = None if linear.bias is None else linear.bias.detach().float()
        replace_module(model, name, _quantized_linear(q.int_repr(), scale.float(), bias))
        names.append(name)
    return names


def int8_state(model: nn.Module) -> dict[str, Tensor]:
    """The tensors of a quantized model as plain int8 / fp32 tensors (see the module docstring)."""
    Linear = _dynamic_linear()
    quantized = {name: m for name, m in model.named_modules() if isinstance(m, Linear)}
    state = {}
    for name, m in quantized.items():
        weight = m.weight()
        state[f"{name}.weight_int8"] = weight.int_repr().contiguous()
        state[f"{name}.weight_scale"] = weight.q_per_channel_scales().float().contiguous()
        if m.bias() is not None:
            state[f"{name}.bias"] = m.bias().detach().contiguous()
    for key, value in model.state_dict().items():
        if isinstance(value, Tensor) and not any(key.startswith(f"{n}.") for n in quantized):
            state[key] = value.detach().contiguous()
    return state


def save_int8(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write ``model.int8.safetensors`` (atomically) into ``directory``."""
    path = Path(directory) / INT8_WEIGHTS_FILE
    with atomic_write(path) as tmp:
        save_file(int8_state(model), str(tmp), metadata={"format": "pt", "engine": ENGINE})
    return path


def load_int8(directory: str | os.PathLike, quantized: list[str]) -> Bert:
    """The quantized encoder of ``directory`` (config.json + model.int8.safetensors), in eval mode;
    ``quantized`` names its int8 Linears (backend.json)."""
    cfg = read_config(directory)
    path = Path(directory) / INT8_WEIGHTS_FILE
    if not path.is_file():
        raise UserError(f"{directory}: no {INT8_WEIGHTS_FILE} (write one with `lmforge quantize`)")
    tensors = read_safetensors(path)
    model = build_model(cfg)
    if not isinstance(model, Bert):
        raise UserError(f"{directory}/config.json: int8 inference takes a BERT encoder, not {type(model).__name__}")
    linears = _linears(model)
    unknown = sorted(set(quantized) - set(linears))
    if unknown:
        raise UserError(f"{path}: quantized layers {unknown} are not Linear layers of this config")
    int8: dict[str, tuple[Tensor, Tensor, Tensor | None]] = {}
    for name in quantized:
        keys = (f"{name}.weight_int8", f"{name}.weight_scale")
        missing = [k for k in keys if k not in tensors]
        if missing:
            raise UserError(f"{path}: missing tensors {missing}")
        weight, scale = (tensors.pop(k) for k in keys)
        expected = tuple(linears[name].weight.shape)
        if tuple(weight.shape) != expected or weight.dtype != torch.int8 or tuple(scale.shape) != expected[:1]:
            raise UserError(
                f"{path}: {keys[0]} is {weight.dtype} {tuple(weight.shape)} with {tuple(scale.shape)} scales, "
                f"expected int8 {expected} with {expected[0]}"
            )
        int8[name] = (weight, scale, tensors.pop(f"{name}.bias", None))
    rest = {k for k in model.state_dict() if not any(k.startswith(f"{n}.") for n in quantized)}
    missing, unexpected = sorted(rest - set(tensors)), sorted(set(tensors) - rest)
    if missing or unexpected:
        raise UserError(f"{path}: missing tensors {missing}, unexpected tensors {unexpected}")
    model.load_state_dict(tensors, strict=False)  # the fp32 tensors; the int8 Linears replace theirs below
    for name, (weight, scale, bias) in int8.items():
        replace_module(model, name, _quantized_linear(weight, scale, bias))
    return model.eval()
