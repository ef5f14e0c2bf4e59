"""Token attribution methods: which input tokens drove one scalar output of a model (``explain/`` package).

Four methods, each a score per input token for one scalar output (the predicted class's probability; the
mean probability of an entity's predicted tags; the cosine similarity of two texts):

- ``ig``: Integrated Gradients (Sundararajan et al. 2017) on the embedding layer's output, from a baseline
  whose every text token is [PAD] (or [MASK]) and whose [CLS] / [SEP] stay: the scores sum to
  f(x) - f(baseline) (completeness), up to the Riemann sum's error (reported as ``delta``);
- ``grad-x-input``: the gradient times the embedding layer's output (Shrikumar et al. 2016), one backward;
- ``occlusion``: f(x) - f(x with the token replaced by [MASK]) (Zeiler & Fergus 2014), one forward per token;
- ``attention``: attention rollout (Abnar & Zuidema 2020): each layer's head-averaged attention, plus the
  identity for the residual connection and renormalised, multiplied through the layers; the score of a token
  is the rolled-out attention to it from the output's position(s) ([CLS], an entity's tokens, or all tokens
  when the model mean-pools). Unsigned, and not a gradient: a view, whose faithfulness ``bench/explain_faithfulness.py``
  measures like the others'.

The first three come from Captum (``LayerIntegratedGradients``, ``LayerGradientXActivation``,
``FeatureAblation``). The attention maps and the rollout are written here: SDPA returns no probabilities and
Captum has no rollout, so ``attention_maps`` recomputes each self-attention's probabilities from the layer's own
projections of the input it was given (a forward hook), with its own mask.

Every score is aligned to character offsets of the original text: a sub-token's (start, end) from the
tokenizer; NER reports one score per word (the sum of its sub-tokens'), as it tags words.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from lmforge.errors import UserError
from lmforge.models.layers import Attention, Embeddings, apply_rotary
from lmforge.tasks import ALL_METHODS

METHODS = ALL_METHODS


@dataclass
class TokenScore:
    """One input token (a sub-token, or an NER word) with its characters in the text and its score."""

    token: str
    start: int
    end: int
    score: float


@dataclass
class Explanation:
    """The attribution of one output to the tokens of one text.

    ``target``: the explained output (a label; "TYPE text" of an entity; "similarity to: OTHER"; a generated token);
    ``value``: that output's value on the text (a probability or a cosine); ``delta`` (ig): the Riemann sum's error,
    sum of scores + ``extra["special_tokens"]`` - (f(x) - f(baseline)); ``extra["special_tokens"]``: the share of
    [CLS] / [SEP] / template tokens, which are not shown.
    """

    text: str
    target: str
    method: str
    value: float
    tokens: list[TokenScore]
    delta: float | None = None
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class Encoded:
    """One text as the model sees it: ids (1, T), token types or None, and per position its token, offsets and
    whether it is a special token."""

    ids: Tensor
    types: Tensor | None
    tokens: list[str]
    offsets: list[tuple[int, int]]
    special: list[bool]
    extra_text: str = ""
    """The text the offsets point into (generation explanations)."""

    @property
    def mask(self) -> Tensor:
        return torch.ones_like(self.ids)


def encoder_of(model: nn.Module) -> nn.Module:
    """The BERT inside a task model (``EncoderWithHead``) or the model itself (an embedding run)."""
    return getattr(model, "encoder", model)


def embedding_layer(model: nn.Module) -> Embeddings:
    return encoder_of(model).embed


# --- attention maps and rollout ----------------------------------------------------------------------


def attention_maps(model: nn.Module, ids: Tensor, mask: Tensor | None = None) -> Tensor:
    """Self-attention probabilities of every layer and head of the encoder, (L, B, H, T, T) (rows: queries).

    Recomputed in a forward hook from each ``Attention``'s own query/key projections of its input and from
    the mask it was called with, so they are the probabilities its SDPA used (checked against its output in
    the tests). Rows of padding queries are those SDPA computed too; only rows of real tokens are meaningful.
    """
    encoder = encoder_of(model)
    captured: list[Tensor] = []

    def hook(module: Attention, args: tuple, kwargs: dict, _output: Tensor) -> None:
        x = args[0]
        q, k, _ = module.qkv(x).split(module.split, dim=-1)
        B, T, _ = x.shape
        q = q.view(B, T, module.n_heads, module.head_dim).transpose(1, 2)
        k = k.view(B, T, module.n_kv_heads, module.head_dim).transpose(1, 2)
        rope = kwargs.get("rope")
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if module.n_kv_heads != module.n_heads:
            k = k.repeat_interleave(module.n_heads // module.n_kv_heads, dim=1)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(module.head_dim)  # (B, H, T, T)
        allowed = kwargs.get("mask")
        if allowed is not None:
            scores = scores.masked_fill(~allowed, float("-inf"))
        elif kwargs.get("is_causal"):
            scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1), float("-inf"))
        captured.append(scores.float().softmax(-1))

    attentions = [m for m in encoder.modules() if isinstance(m, Attention) and not m.cross]
    handles = [m.register_forward_hook(hook, with_kwargs=True) for m in attentions]
    try:
        with torch.no_grad():
            encoder(ids, attention_mask=mask)
    finally:
        for h in handles:
            h.remove()
    return torch.stack(captured)


def attention_rollout(maps: Tensor, real: Tensor | None = None) -> Tensor:
    """Attention rollout (Abnar & Zuidema 2020) of one sequence's maps (L, H, T, T): (T, T), row i = how much
    position i's output draws on each input position through all layers.

    Per layer: the heads' mean, plus the identity (the residual path), rows renormalised to sum to 1; then the
    product of the layers, the last on the left. ``real`` (T,) bool keeps real tokens only (padding columns are
    dropped before renormalising; their rows and columns come out 0).
    """
    L, _, T, _ = maps.shape
    keep = torch.ones(T, dtype=torch.bool) if real is None else real.bool()
    rolled = torch.eye(T, dtype=torch.float64)
    for layer in range(L):
        a = maps[layer].mean(0).double() * keep[None, :]  # (T, T), padding keys dropped
        a = 0.5 * a / a.sum(-1, keepdim=True).clamp(min=1e-12) + 0.5 * torch.eye(T, dtype=torch.float64)
        a = a / a.sum(-1, keepdim=True)
        rolled = a @ rolled
    rolled = rolled * keep[None, :] * keep[:, None]
    return rolled.float()


def cross_attention_maps(model: nn.Module, src: Tensor, tgt: Tensor) -> Tensor:
    """Cross-attention probabilities of an encoder-decoder, (L, B, H, T_tgt, S) (rows: target positions),
    recomputed in a hook from each cross-attention's query projection and the memory keys it was given."""
    captured: list[Tensor] = []

    def hook(module: Attention, args: tuple, kwargs: dict, _output: Tensor) -> None:
        x, (k, _) = args[0], kwargs["memory_kv"]
        B, T, _ = x.shape
        q = module.q(x).view(B, T, module.n_heads, module.head_dim).transpose(1, 2)
        if module.n_kv_heads != module.n_heads:
            k = k.repeat_interleave(module.n_heads // module.n_kv_heads, dim=1)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(module.head_dim)
        if kwargs.get("mask") is not None:
            scores = scores.masked_fill(~kwargs["mask"], float("-inf"))
        captured.append(scores.float().softmax(-1))

    handles = [m.register_forward_hook(hook, with_kwargs=True) for m in model.modules() if getattr(m, "cross", False)]
    try:
        with torch.no_grad():
            model(src, tgt, src_mask=torch.ones_like(src))
    finally:
        for h in handles:
            h.remove()
    return torch.stack(captured)


# --- attribution of one scalar function of the ids ---------------------------------------------------

Scalar = Callable[..., Tensor]  # (ids (N, T), mask (N, T), types) -> (N,)


OCCLUSIONS_PER_CALL = 16
"""Occluded copies of the input run through the model in one call: the same scores as one at a time, and on 2
cores about 20% faster for e5-small at 150 tokens (``bench/explain_occlusion.py``, FINDINGS)."""


def attribute(
    method: str,
    forward: Scalar,
    model: nn.Module,
    enc: Encoded,
    *,
    baseline_id: int,
    occlusion_id: int,
    rows: Sequence[int] = (0,),
    steps: int = 50,
) -> tuple[np.ndarray, float | None, float]:
    """Scores (T,) of ``method`` for ``forward`` at ``enc``; for ``ig`` the completeness gap ``delta`` (the Riemann
    sum's error: sum of all scores - (f(x) - f(baseline))); and the special tokens' share of the scores.

    ``baseline_id`` replaces the text tokens in IG's baseline; ``occlusion_id`` replaces one token at a time;
    ``rows`` are the positions whose output is explained (for ``attention``). Special tokens score 0.
    """
    from captum.attr import FeatureAblation, LayerGradientXActivation, LayerIntegratedGradients

    if method not in METHODS:
        raise UserError(f"--method {method!r} must be one of {', '.join(METHODS)}")
    special = torch.tensor(enc.special)
    args = (enc.mask, enc.types)
    delta = None
    was_training = model.training
    model.eval()
    try:
        if method == "ig":
            baseline = enc.ids.masked_fill(~special[None, :], baseline_id)
            ig = LayerIntegratedGradients(forward, embedding_layer(model))
            attr, gap = ig.attribute(
                enc.ids,
                baselines=baseline,
                additional_forward_args=args,
                n_steps=steps,
                internal_batch_size=steps,
                return_convergence_delta=True,
            )
            scores, delta = attr.sum(-1)[0], float(gap[0])
        elif method == "grad-x-input":
            attr = LayerGradientXActivation(forward, embedding_layer(model)).attribute(
                enc.ids, additional_forward_args=args
            )
            scores = attr.sum(-1)[0]
        elif method == "occlusion":
            groups = torch.arange(enc.ids.shape[1])[None, :]
            with torch.no_grad():
                attr = FeatureAblation(forward).attribute(
                    enc.ids,
                    baselines=occlusion_id,
                    additional_forward_args=args,
                    feature_mask=groups,
                    perturbations_per_eval=OCCLUSIONS_PER_CALL,
                )
            scores = attr[0].float()
        else:
            rolled = attention_rollout(attention_maps(model, enc.ids, enc.mask)[:, 0])
            scores = rolled[list(rows)].mean(0)
    finally:
        model.train(was_training)
    # a GPT's embedding layer also embeds the generated tokens after the prompt: identical in the baseline, so
    # their attributions are 0; only the input's positions are scored
    scores = scores[: enc.ids.shape[1]]
    out = scores.detach().double().numpy()
    out[special.numpy()] = 0.0
    # [CLS] / [SEP] are the same in the baseline, but their embedding can still move (a bigram embedding pairs
    # [SEP] with the token before it): their share is returned, so that text scores + it = f(x) - f(baseline) + delta
    specials = float(scores.detach().double().numpy()[special.numpy()].sum()) if method != "attention" else 0.0
    return out, delta, specials


def encode_text(tokenizer, text: str, *, max_len: int, cls_id: int, sep_id: int) -> Encoded:
    """[CLS] text [SEP], as the classification and embedding tasks encode one text (truncated to ``max_len``)."""
    enc = tokenizer.tokenizer.encode(text, add_special_tokens=False)
    budget = max_len - 2
    ids = [cls_id, *enc.ids[:budget], sep_id]
    tokens = ["[CLS]", *enc.tokens[:budget], "[SEP]"]
    offsets = [(0, 0), *[tuple(o) for o in enc.offsets[:budget]], (0, 0)]
    special = [True, *([False] * min(len(enc.ids), budget)), True]
    return Encoded(torch.tensor([ids]), None, tokens, offsets, special)


def token_scores(enc: Encoded, scores: np.ndarray, text: str) -> list[TokenScore]:
    """The text tokens with their scores. Sub-tokens whose characters overlap (byte-level BPE splits one Chinese
    character into several byte tokens, each with that character's offsets) become one token with the summed
    score, so every character is shown once."""
    out: list[TokenScore] = []
    for tok, (s, e), sp, v in zip(enc.tokens, enc.offsets, enc.special, scores, strict=True):
        if sp:
            continue
        if out and s < out[-1].end:
            last = out[-1]
            last.end, last.score = max(last.end, int(e)), last.score + float(v)
            last.token = text[last.start : last.end]
            continue
        out.append(TokenScore(text[s:e] or tok, int(s), int(e), float(v)))
    return out


def encoder_attribution(
    method: str, forward: Scalar, run, enc: Encoded, *, rows: Sequence[int], steps: int, baseline: str
) -> tuple[float, np.ndarray, float | None, float]:
    """``attribute`` for an encoder run (IG's baseline of [PAD] or [MASK], occlusion by [MASK]), with f(x) first:
    (value, scores, delta, the special tokens' share)."""
    tok = run.task.tokenizer
    with torch.no_grad():
        value = float(forward(enc.ids, enc.mask, None)[0])
    scores, delta, specials = attribute(
        method,
        forward,
        run.model,
        enc,
        baseline_id=baseline_id(tok, baseline),
        occlusion_id=baseline_id(tok, "mask"),
        rows=rows,
        steps=steps,
    )
    return value, scores, delta, specials


def baseline_id(tokenizer, kind: str) -> int:
    """The id of [PAD] or [MASK] (IG's baseline token; occlusion uses [MASK])."""
    if kind not in ("pad", "mask"):
        raise UserError(f"--baseline {kind!r} must be 'pad' or 'mask'")
    found = tokenizer.token_id(kind)
    if found is None:
        raise UserError(f"the tokenizer has no [{kind.upper()}] token for the baseline; use the other one")
    return found
