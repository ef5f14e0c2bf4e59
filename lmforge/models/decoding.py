"""Incremental decoding of lmforge's decoders: the prompt pass, one step at a time, beam reordering.

``GPTSteps`` and ``Seq2SeqSteps`` give ``generate.py`` the same three calls for both model kinds:
``first()`` (logits after the prompt, or after the decoder start token), ``next(tokens)`` and
``reorder(index)`` (beam search). They keep the model's preallocated ``KVCache``; the
encoder-decoder projects its cross-attention keys/values once per source.

Speed at small batch on a CPU is bound by reading the weights, not by FLOPs (FINDINGS):
``decoding_layout`` stores each projection in the layout a matrix-vector product reads fastest,
and ``OutputProjection`` keeps the vocabulary matrix both ways. In fp32 only the memory layout changes:
the outputs are exactly the model's. ``PRECISIONS`` names the two inexact paths that read fewer bytes
(int8 vocabulary matrix; every matrix int8; everything in bf16), chosen at run time by ``resolve_precision``.
The int8 matrices are weight-only (one scale per output row, gpt-fast's ``int8`` scheme), multiplied by
``torch._weight_int8pack_mm`` with bf16 inputs; norms, attention, the residual stream and the cache stay fp32.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lmforge.models.gpt import GPT
from lmforge.models.seq2seq import Seq2Seq

PRECISIONS = ("fp32", "int8", "int8-head", "bf16")
"""Decoding precisions: ``fp32`` (exact: the reference and the default); ``int8``: every linear layer and the
vocabulary projection with int8 weights (one scale per output row) and bf16 inputs, the rest fp32;
``int8-head``: the vocabulary projection alone so; ``bf16``: every weight, the KV cache and the activations in
bf16. ``bf16`` needs bf16 arithmetic (``ops/cpu_features.bf16_is_fast``: a GPU, or a CPU with it) and is refused
elsewhere; the int8 paths only round their inputs to bf16, and run anywhere when asked for. ``auto`` picks
``int8`` where bf16 is native and ``fp32`` elsewhere (FINDINGS: int8 weight-only matrix-vector products ran 2-4x
faster than fp32's at batch 1 and 8 with avx512_bf16, bf16's slower than fp32's for the small matrices; on a CPU
without it, int8 decoded SmolLM2-135M 1.4x faster than fp32 but is not chosen unasked, since it may pick other
tokens)."""


def resolve_precision(precision: str, device: torch.device) -> str:
    """The decoding precision for ``precision`` (one of PRECISIONS or ``auto``) on ``device``."""
    from lmforge.errors import UserError
    from lmforge.ops.cpu_features import bf16_is_fast

    if precision not in (*PRECISIONS, "auto"):
        raise UserError(f"precision={precision!r} must be one of {', '.join((*PRECISIONS, 'auto'))}")
    fast = bf16_is_fast(device)
    if precision == "auto":
        return "int8" if fast else "fp32"
    if precision == "bf16" and not fast:
        raise UserError(
            "precision='bf16' needs bf16 arithmetic (a GPU, or a CPU with avx512_bf16 / amx_bf16); "
            "this CPU emulates it, ~4x slower than fp32: use fp32, int8 or auto"
        )
    return precision


def quantize_rows(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric int8 of a (out, in) matrix with one scale per row (the largest |w| -> 127): (int8, bf16 scales),
    the operands of ``torch._weight_int8pack_mm``."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
    return torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8).contiguous(), scale.bfloat16()


def int8_product(x: Tensor, int8: Tensor, scale: Tensor) -> Tensor:
    """``x @ (int8 * scale).T`` for (..., in) inputs, fp32 out: ``torch._weight_int8pack_mm`` with the inputs in bf16
    (gpt-fast's int8 weight-only kernel; with fp32 inputs it is slower than fp32 on CPUs)."""
    flat = x.reshape(-1, int8.shape[1]).bfloat16().contiguous()
    return torch._weight_int8pack_mm(flat, int8, scale).float().view(*x.shape[:-1], int8.shape[0])


class Int8WeightLinear(nn.Module):
    """A linear layer for decoding with int8 weights (``quantize_rows``) and bf16 inputs; fp32 out, fp32 bias."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        int8, scale = quantize_rows(linear.weight)
        self.register_buffer("int8", int8)
        self.register_buffer("scale", scale)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float().clone())

    def forward(self, x: Tensor) -> Tensor:
        y = int8_product(x, self.int8, self.scale)
        return y if self.bias is None else y + self.bias


def int8_weights(model: nn.Module) -> nn.Module:
    """Replace every ``nn.Linear`` of ``model`` with an ``Int8WeightLinear`` (in place)."""
    for module in list(model.modules()):
        for name, child in module.named_children():
            if type(child) is nn.Linear:  # not a LoRA layer: its adapters would be lost
                setattr(module, name, Int8WeightLinear(child))
    return model


class OutputProjection:
    """Vocabulary logits ``h @ W.T`` (fp32) for (N, D) hidden states, in the faster layout for N.

    ``precision`` (PRECISIONS): ``fp32`` keeps the matrix both ways; ``bf16`` stores it in bf16; ``int8`` and
    ``int8-head`` as int8 with one scale per vocabulary row (``quantize_rows``), multiplied by
    ``torch._weight_int8pack_mm`` with bf16 inputs (the int8 weight-only kernel of gpt-fast; with fp32 inputs
    it is slower than fp32 on CPUs).
    """

    def __init__(self, weight: Tensor, precision: str = "fp32") -> None:
        self.precision = precision
        weight = weight.detach()
        self.vocab_size, self.device = weight.shape[0], weight.device
        self.quantized = precision in ("int8", "int8-head")
        if self.quantized:  # only the int8 copy is read
            self.int8, self.scale = quantize_rows(weight)
        else:
            self.weight = weight if precision == "fp32" else weight.bfloat16()  # (V, D): faster for several rows
            self.weight_t = self.weight.t().contiguous()  # (D, V): ~3x faster for a single row in fp32

    def __call__(self, h: Tensor) -> Tensor:
        if self.quantized:
            return int8_product(h, self.int8, self.scale)
        h = h.to(self.weight.dtype)
        if h.shape[0] == 1:
            return (h @ self.weight_t).float()  # (1, V)
        return (self.weight @ h.t()).t().float()  # (N, V)


def decoding_layout(model: nn.Module) -> nn.Module:
    """Store each linear layer's weight (in, out) unless its input is the longer side (in place; values unchanged).

    ``F.linear`` computes the same numbers from either layout, but a matrix-vector product
    streams long contiguous rows much faster: from main memory, a (256 -> 1024) projection took
    74 us stored (in, out) and 147 us stored (out, in) on the benchmark CPU.
    """
    for module in model.modules():
        if type(module) is nn.Linear and module.in_features <= module.out_features:
            if module.weight.stride(0) == 1:  # already (in, out) in memory
                continue
            transposed = module.weight.detach().t().contiguous()  # (in, out) in memory
            module.weight = nn.Parameter(transposed.t(), requires_grad=module.weight.requires_grad)
    return model


class Steps:
    """Incremental logits of a model: ``first()`` for the prompts, ``next(tokens)`` per step, ``reorder``."""

    def __init__(self, model: nn.Module, head: OutputProjection) -> None:
        self.model, self.head = model, head

    def _logits(self, hidden: Tensor) -> Tensor:
        return self.head(hidden[:, -1])  # (N, V)


class GPTSteps(Steps):
    def __init__(
        self, model: GPT, head: OutputProjection, prompts: list[list[int]], *, pad_id: int, copies: int, max_new: int
    ) -> None:
        super().__init__(model, head)
        device = head.device
        n, longest = len(prompts) * copies, max(len(p) for p in prompts)
        self.ids = torch.full((n, longest), pad_id, dtype=torch.long, device=device)
        self.padded = any(len(p) != longest for p in prompts)
        self.mask = torch.ones((n, longest + max_new), dtype=torch.long, device=device) if self.padded else None
        for i, p in enumerate(prompts):
            rows = slice(i * copies, (i + 1) * copies)
            self.ids[rows, longest - len(p) :] = torch.tensor(p, dtype=torch.long, device=device)  # left padding
            if self.mask is not None:
                self.mask[rows, : longest - len(p)] = 0
        self.cache = model.new_cache(n, longest + max_new)
        self.position = torch.full((n, 1), longest, dtype=torch.long, device=device)
        if self.mask is not None:
            self.position = self.mask[:, :longest].sum(-1, keepdim=True)  # (N, 1): real tokens so far

    def first(self) -> Tensor:
        mask = None if self.mask is None else self.mask[:, : self.ids.shape[1]]
        return self._logits(self.model.hidden_states(self.ids, attention_mask=mask, cache=self.cache))

    def next(self, tokens: Tensor) -> Tensor:
        length = self.cache.length + 1
        mask = None if self.mask is None else self.mask[:, :length]
        hidden = self.model.hidden_states(
            tokens[:, None], attention_mask=mask, position_ids=self.position, cache=self.cache
        )
        self.position += 1
        return self._logits(hidden)

    def reorder(self, index: Tensor) -> None:
        self.cache.reorder(index)
        self.position = self.position.index_select(0, index)
        if self.mask is not None:
            self.mask = self.mask.index_select(0, index)


class Seq2SeqSteps(Steps):
    def __init__(
        self,
        model: Seq2Seq,
        head: OutputProjection,
        sources: list[list[int]],
        *,
        pad_id: int,
        start_id: int,
        copies: int,
        max_new: int,
    ):
        super().__init__(model, head)
        device = head.device
        longest = max(len(s) for s in sources)
        src = torch.full((len(sources), longest), pad_id, dtype=torch.long, device=device)
        for i, s in enumerate(sources):
            src[i, : len(s)] = torch.tensor(s, dtype=torch.long, device=device)
        src_mask = (
            torch.arange(longest, device=device)[None, :]
            < torch.tensor([len(s) for s in sources], device=device)[:, None]
        ).long()
        memory = model.encode(src, src_mask).repeat_interleave(copies, dim=0)  # (N, S, D)
        self.src_mask = src_mask.repeat_interleave(copies, dim=0)
        self.memory_kv = model.memory_kv(memory)
        n = len(sources) * copies
        self.cache = model.new_cache(n, max_new)
        self.start = torch.full((n,), start_id, dtype=torch.long, device=device)

    def first(self) -> Tensor:
        return self.next(self.start)

    def next(self, tokens: Tensor) -> Tensor:
        hidden = self.model.decode(tokens[:, None], memory_kv=self.memory_kv, src_mask=self.src_mask, cache=self.cache)
        return self._logits(hidden)

    def reorder(self, index: Tensor) -> None:
        # Beams are reordered within their own source, whose memory is the same in every row: only
        # the self-attention cache moves.
        self.cache.reorder(index)


def output_weight(model: GPT | Seq2Seq) -> Tensor:
    """The (V, D) matrix that maps hidden states to vocabulary logits."""
    if isinstance(model, Seq2Seq):
        return model.target_embedding
    return model.output_weight
