"""Token attributions: which input tokens drove a classify, NER or embedding model's output.

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
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.errors import UserError
from lmforge.models.layers import Attention, Embeddings, apply_rotary

METHODS = ("ig", "grad-x-input", "occlusion", "attention")
TASKS = ("classify", "ner", "embed", "translate", "chat")


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


# --- attention maps and rollout --------------------------------------------------------------------


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


# --- attribution of one scalar function of the ids ---------------------------------------------------


Scalar = Callable[..., Tensor]  # (ids (N, T), mask (N, T), types) -> (N,)


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
                    enc.ids, baselines=occlusion_id, additional_forward_args=args, feature_mask=groups
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


# --- tasks ---------------------------------------------------------------------------------------------


def _encode_text(tokenizer, text: str, *, max_len: int, cls_id: int, sep_id: int) -> Encoded:
    """[CLS] text [SEP], as the classification and embedding tasks encode one text (truncated to ``max_len``)."""
    enc = tokenizer.tokenizer.encode(text, add_special_tokens=False)
    budget = max_len - 2
    ids = [cls_id, *enc.ids[:budget], sep_id]
    tokens = ["[CLS]", *enc.tokens[:budget], "[SEP]"]
    offsets = [(0, 0), *[tuple(o) for o in enc.offsets[:budget]], (0, 0)]
    special = [True, *([False] * min(len(enc.ids), budget)), True]
    return Encoded(torch.tensor([ids]), None, tokens, offsets, special)


def _token_scores(enc: Encoded, scores: np.ndarray, text: str) -> list[TokenScore]:
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


def _encoder_attribution(
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
        baseline_id=_baseline_id(tok, baseline),
        occlusion_id=_baseline_id(tok, "mask"),
        rows=rows,
        steps=steps,
    )
    return value, scores, delta, specials


def explain_classification(
    run, text: str, *, method: str, label: str | None = None, steps: int = 50, baseline: str = "pad"
) -> Explanation:
    """Attribution of the probability of ``label`` (default: the predicted one) to the tokens of ``text``."""
    task, model = run.task, run.model
    enc = _encode_text(task.tokenizer, text, max_len=task.max_len, cls_id=task.cls_id, sep_id=task.sep_id)
    expected = task.encode([{"text": text}], split="explain", need_labels=False)[0][0]
    assert enc.ids[0].tolist() == expected.tolist(), "explain encodes texts as the task does"

    def probs(ids: Tensor, mask: Tensor, types: Tensor | None) -> Tensor:
        return task.logits(model, {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}).softmax(-1)

    with torch.no_grad():
        p = probs(enc.ids, enc.mask, None)[0]
    if label is None:
        target = int(p.argmax())
    elif label in task.labels:
        target = task.labels.index(label)
    else:
        raise UserError(f"--label {label!r} is not one of this model's labels: {', '.join(task.labels)}")
    rows = [0] if model.head.pooling != "mean" else [i for i, s in enumerate(enc.special) if not s]
    _, scores, delta, specials = _encoder_attribution(
        method,
        lambda ids, mask, types: probs(ids, mask, types)[:, target],
        run,
        enc,
        rows=rows,
        steps=steps,
        baseline=baseline,
    )
    return Explanation(
        text,
        task.labels[target],
        method,
        float(p[target]),
        _token_scores(enc, scores, text),
        delta,
        {
            "probabilities": {lab: round(float(v), 6) for lab, v in zip(task.labels, p, strict=True)},
            "special_tokens": round(specials, 6),
        },
    )


def explain_entities(run, text: str, *, method: str, steps: int = 50, baseline: str = "pad") -> list[Explanation]:
    """One explanation per predicted entity of ``text``: the mean probability of its predicted tags (the CRF's
    marginals, or the softmax without one), attributed to every word of the sentence, inside and outside it."""
    from lmforge.metrics import entity_spans
    from lmforge.tasks.ner import words_with_offsets

    task, model = run.task, run.model
    words, spans = words_with_offsets(task.tokenizer, {"text": text})
    if not words:
        return []
    window = task.windows([{"tokens": words}], split="explain", need_tags=False)
    if len(window) > 1:
        raise UserError(
            f"explain: a text of {len(words)} words is longer than the model's window ({task.max_len} sub-tokens); "
            "explain it in shorter pieces"
        )
    ids, first, _, _ = window[0]
    word_pos = torch.tensor(first, dtype=torch.long)[None, :]  # (1, W) each word's first sub-token
    # each sub-token belongs to the word whose first sub-token is the last at or before it
    owner = np.searchsorted(first, np.arange(len(ids)), side="right") - 1
    enc = Encoded(
        torch.tensor(ids, dtype=torch.long)[None, :],
        None,
        [task.tokenizer.tokenizer.id_to_token(int(i)) or "" for i in ids],
        [(0, 0)] * len(ids),
        [True, *([False] * (len(ids) - 2)), True],
    )

    def tag_probs(ids: Tensor, mask: Tensor, types: Tensor | None) -> Tensor:  # (N, W, C)
        scores = model(ids, attention_mask=mask).float()
        emissions = scores.gather(1, word_pos.expand(ids.shape[0], -1)[:, :, None].expand(-1, -1, scores.shape[-1]))
        if model.crf is None:
            return emissions.softmax(-1)
        return model.crf.log_marginals(emissions, torch.ones(emissions.shape[:2], dtype=torch.bool)).exp()

    predicted = task.predict(model, [{"text": text}], device=torch.device("cpu"))[0]
    tags = [task.tag_index[t] for t in predicted["tags"]]
    out = []
    for kind, s, e in entity_spans(predicted["tags"], task.scheme):
        chosen = torch.tensor(tags[s:e])

        def target(ids: Tensor, mask: Tensor, types: Tensor | None, s=s, e=e, chosen=chosen) -> Tensor:
            return (
                tag_probs(ids, mask, types)[:, s:e]
                .gather(2, chosen[None, :, None].expand(ids.shape[0], -1, 1))
                .mean((1, 2))
            )

        rows = [int(first[w]) for w in range(s, e)]
        value, scores, delta, specials = _encoder_attribution(
            method, target, run, enc, rows=rows, steps=steps, baseline=baseline
        )
        per_word = np.zeros(len(words))
        np.add.at(per_word, owner[1:-1], scores[1:-1])
        start, end = spans[s][0], spans[e - 1][1]
        tokens = [TokenScore(w, int(a), int(b), float(v)) for w, (a, b), v in zip(words, spans, per_word, strict=True)]
        out.append(
            Explanation(
                text,
                f"{kind} {text[start:end]}",
                method,
                value,
                tokens,
                delta,
                {
                    "type": kind,
                    "start": start,
                    "end": end,
                    "inside": [int(i) for i in range(s, e)],
                    "special_tokens": round(specials, 6),
                },
            )
        )
    return out


def explain_similarity(
    run, text: str, other: str, *, method: str, steps: int = 50, baseline: str = "pad"
) -> Explanation:
    """Attribution of the cosine similarity of ``text`` and ``other`` (an embedding run) to the tokens of
    ``text``, ``other``'s vector held fixed (call again with the two swapped for ``other``'s tokens)."""
    task, model = run.task, run.model
    enc = _encode_text(task.tokenizer, text, max_len=task.max_len, cls_id=_cls(task), sep_id=_sep(task))
    with torch.no_grad():
        fixed = F.normalize(task.embed(model, *_ids_mask(task, other)).float(), dim=-1)  # (1, D)

    def similarity(ids: Tensor, mask: Tensor, types: Tensor | None) -> Tensor:
        return (F.normalize(task.embed(model, ids, mask).float(), dim=-1) * fixed).sum(-1)

    rows = [0] if task.pooling == "cls" else [i for i, s in enumerate(enc.special) if not s]
    value, scores, delta, specials = _encoder_attribution(
        method, similarity, run, enc, rows=rows, steps=steps, baseline=baseline
    )
    tokens = _token_scores(enc, scores, text)
    extra = {"special_tokens": round(specials, 6)}
    return Explanation(text, f"similarity to: {other}", method, value, tokens, delta, extra)


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


def _generated(
    run, enc: Encoded, target_ids: list[int], prefix: Tensor, logits_of: Callable, *, method: str, steps: int
) -> list[Explanation]:
    """One explanation per generated token: the probability the model gives it (teacher-forced on the tokens
    before it), attributed to the input tokens of ``enc``; ``prefix`` (1, P) + the generated tokens are what the
    model reads, ``logits_of(ids, mask, types, reading)`` gives (N, P + n, V)."""
    task = run.task
    tok = task.tgt_tok if run.name == "translate" else task.tokenizer
    reading = torch.cat([prefix, torch.tensor([target_ids[:-1]], dtype=torch.long)], dim=1) if target_ids else prefix
    first = prefix.shape[1] - 1  # the position whose logits predict the first generated token
    pad = tok.token_id("pad") if tok.token_id("pad") is not None else tok.token_id("eos")
    text = enc.tokens and "".join(enc.tokens)  # unused for offsets; keeps the type checker quiet
    del text
    out = []
    rows_attention = None
    if method == "attention":
        if run.name == "translate":
            maps = cross_attention_maps(run.model, enc.ids, reading)  # (L, 1, H, T, S)
            rows_attention = maps[:, 0].mean((0, 1))  # (T, S)
        else:
            # the GPT reads the prompt and the tokens generated before each one: rollout over that sequence
            rows_attention = attention_rollout(attention_maps(run.model, reading, torch.ones_like(reading))[:, 0])
    source_text = enc.extra_text
    for n, token in enumerate(target_ids):
        position = first + n

        def prob(ids: Tensor, mask: Tensor, types: Tensor | None, position=position, token=token) -> Tensor:
            return logits_of(ids, mask, types, reading)[:, position].float().softmax(-1)[:, token]

        with torch.no_grad():
            value = float(prob(enc.ids, enc.mask, None)[0])
        if method == "attention":
            row = rows_attention[position][: enc.ids.shape[1]].double().numpy().copy()
            row[np.asarray(enc.special)] = 0.0
            scores, delta, specials = row, None, 0.0
        else:
            scores, delta, specials = attribute(
                method, prob, run.model, enc, baseline_id=pad, occlusion_id=pad, rows=[0], steps=steps
            )
        piece = tok.decode([token])
        out.append(
            Explanation(
                source_text,
                f"#{n + 1} {piece!r}",
                method,
                value,
                _token_scores(enc, scores, source_text),
                delta,
                {"position": n, "token_id": int(token), "token": piece, "special_tokens": round(specials, 6)},
            )
        )
    return out


def explain_translation(run, text: str, *, method: str, steps: int = 32, max_new_tokens: int = 64) -> list[Explanation]:
    """The greedy translation of ``text``; per generated token, how much each source token raised its probability
    (gradients through the encoder's embeddings) or how much the decoder's cross-attention read it (``attention``:
    the mean over layers and heads)."""
    from lmforge.inference.config import GenerationConfig

    if method == "occlusion":
        raise UserError(
            "--method occlusion needs a [MASK] token; translation models have none: use ig, grad-x-input or attention"
        )
    task, model = run.task, run.model
    encoding = task.src_tok.tokenizer.encode(text, add_special_tokens=task.source_special_tokens)
    ids, tokens, offsets = list(encoding.ids), list(encoding.tokens), [tuple(o) for o in encoding.offsets]
    special = [bool(m) for m in encoding.special_tokens_mask]
    if not task.source_special_tokens:
        ids, tokens, offsets, special = [*ids, task.eos_id], [*tokens, "</s>"], [*offsets, (0, 0)], [*special, True]
    ids, tokens, offsets, special = (
        ids[: task.max_len],
        tokens[: task.max_len],
        offsets[: task.max_len],
        special[: task.max_len],
    )
    enc = Encoded(torch.tensor([ids]), None, tokens, offsets, special)
    enc.extra_text = text
    gen = task.generator(model)
    generated = gen.generate([ids], GenerationConfig(max_new_tokens=min(max_new_tokens, task.max_len)))[0].token_ids
    prefix = torch.tensor([[gen.start_id]])

    def logits_of(src: Tensor, mask: Tensor, types: Tensor | None, reading: Tensor) -> Tensor:
        return model(src, reading.expand(src.shape[0], -1), src_mask=mask)

    return _generated(run, enc, generated, prefix, logits_of, method=method, steps=steps)


def explain_continuation(
    run, text: str, *, method: str, steps: int = 32, max_new_tokens: int = 32
) -> list[Explanation]:
    """A GPT's greedy continuation of ``text`` (a chat model: its reply to ``text`` as a user turn); per generated
    token, how much each token of ``text`` raised its probability (or, ``attention``, the rollout from its
    position to them). The chat template's own tokens score 0."""
    from lmforge.inference.chat import ChatSession
    from lmforge.inference.config import GenerationConfig

    if method == "occlusion":
        raise UserError(
            "--method occlusion needs a [MASK] token; GPT models have none: use ig, grad-x-input or attention"
        )
    task, model = run.task, run.model
    tok = task.tokenizer
    encoding = tok.tokenizer.encode(text, add_special_tokens=False)
    text_ids = list(encoding.ids)
    if run.finetuned and tok.token_id("im_start") is not None:
        session = ChatSession(model, tok, is_chat_model=True)
        ids = session.prompt_ids([{"role": "user", "content": text}], max_new_tokens)
        at = next((i for i in range(len(ids) - len(text_ids) + 1) if ids[i : i + len(text_ids)] == text_ids), None)
        if at is None:
            raise UserError("explain: the text is not tokenized the same inside the chat template; explain it raw")
        stop = [session.im_end]
    else:
        ids, at, stop = text_ids, 0, []
    if not text_ids:
        raise UserError("explain: the text has no tokens")
    n = len(ids)
    tokens = [tok.tokenizer.id_to_token(i) or "" for i in ids]
    offsets = [(0, 0)] * n
    special = [True] * n
    for j, (o, t) in enumerate(zip(encoding.offsets, encoding.tokens, strict=True)):
        offsets[at + j], special[at + j], tokens[at + j] = tuple(o), False, t
    enc = Encoded(torch.tensor([ids]), None, tokens, offsets, special)
    enc.extra_text = text
    from lmforge.inference.generate import Generator

    cfg = GenerationConfig(max_new_tokens=max_new_tokens, stop_token_ids=stop)
    generated = Generator(model, tok).generate([ids], cfg)[0].token_ids
    prefix = torch.tensor([ids])

    def logits_of(prompt: Tensor, mask: Tensor, types: Tensor | None, reading: Tensor) -> Tensor:
        full = torch.cat([prompt, reading[:, prompt.shape[1] :].expand(prompt.shape[0], -1)], dim=1)
        return model(full)

    return _generated(run, enc, generated, prefix, logits_of, method=method, steps=steps)


def _ids_mask(task, text: str) -> tuple[Tensor, Tensor]:
    ids = torch.tensor(task.encode_texts([text])[0], dtype=torch.long)[None, :]
    return ids, torch.ones_like(ids)


def _cls(task) -> int:
    return task.tokenizer.token_id("cls")


def _sep(task) -> int:
    return task.tokenizer.token_id("sep")


def _baseline_id(tokenizer, kind: str) -> int:
    """The id of [PAD] or [MASK] (IG's baseline token; occlusion uses [MASK])."""
    if kind not in ("pad", "mask"):
        raise UserError(f"--baseline {kind!r} must be 'pad' or 'mask'")
    found = tokenizer.token_id(kind)
    if found is None:
        raise UserError(f"the tokenizer has no [{kind.upper()}] token for the baseline; use the other one")
    return found


def refuse_compressed(run_dir) -> None:
    """Explanations need the fp32 PyTorch model (gradients, attention probabilities): an int8 or ONNX copy is
    refused, naming the run to explain instead."""
    from lmforge.runs.run_dir import backend_of

    backend = backend_of(run_dir) if run_dir is not None else None
    if backend is not None:
        source = backend.get("source") or "the run it was made from"
        raise UserError(
            f"{run_dir} is an {backend['backend']} copy: explanations need the fp32 model's gradients and attention; "
            f"explain {source} instead"
        )


def explain(
    run,
    example: dict[str, Any],
    *,
    method: str,
    label: str | None = None,
    steps: int = 50,
    baseline: str = "pad",
) -> list[Explanation]:
    """The explanations of one input (``{"text"}``; an embedding run also needs ``"text_pair"``) for the run's
    task: one for classification and similarity, one per predicted entity for NER."""
    if method not in METHODS:
        raise UserError(f"--method {method!r} must be one of {', '.join(METHODS)}")
    refuse_compressed(run.directory)
    if run.name == "classify":
        return [
            explain_classification(run, example["text"], method=method, label=label, steps=steps, baseline=baseline)
        ]
    if run.name == "ner":
        return explain_entities(run, example["text"], method=method, steps=steps, baseline=baseline)
    if run.name == "embed":
        other = example.get("text_pair")
        if not other:
            raise UserError("an embedding model explains the similarity of two texts: give each input a text_pair")
        return [
            explain_similarity(run, example["text"], other, method=method, steps=steps, baseline=baseline),
            explain_similarity(run, other, example["text"], method=method, steps=steps, baseline=baseline),
        ]
    if run.name == "translate":
        return explain_translation(run, example["text"], method=method, steps=steps)
    if run.name == "chat":
        return explain_continuation(run, example["text"], method=method, steps=steps)
    raise UserError(f"explain works on {', '.join(TASKS)} runs, not {run.name!r}")


# --- faithfulness ----------------------------------------------------------------------------------------

ERASER_BINS = (0.01, 0.05, 0.10, 0.20, 0.50)  # DeYoung et al. 2020's token fractions for AOPC


def faithfulness(
    run,
    text: str,
    *,
    method: str,
    ks: Sequence[int] = (1, 2, 3, 4, 5),
    random_draws: int = 10,
    steps: int = 50,
    seed: int = 0,
) -> dict[str, Any]:
    """How much the predicted class's probability depends on the tokens ``method`` ranks first (classification).

    - deletion curve: the drop p(y|x) - p(y|x without the top-k tokens), k in ``ks``, and the same for k random
      tokens (mean of ``random_draws``); tokens are deleted, as ERASER does, [CLS] / [SEP] kept;
    - ERASER (DeYoung et al. 2020), over the top ``ERASER_BINS`` fractions of the tokens (at least one):
      comprehensiveness p(y|x) - p(y|x without them) and sufficiency p(y|x) - p(y|only them), each averaged over
      the bins (AOPC). Higher comprehensiveness and lower sufficiency are more faithful.
    """
    task, model = run.task, run.model
    enc = _encode_text(task.tokenizer, text, max_len=task.max_len, cls_id=task.cls_id, sep_id=task.sep_id)
    ids = enc.ids[0].tolist()
    text_positions = [i for i, s in enumerate(enc.special) if not s]

    def probabilities(variants: list[list[int]]) -> np.ndarray:
        from lmforge.data.batching import pad, padding_mask

        batch = pad([np.asarray(v, dtype=np.int64) for v in variants], task.pad_id)
        mask = padding_mask([len(v) for v in variants], batch.shape[1])
        with torch.no_grad():
            out = task.logits(model, {"input_ids": batch, "attention_mask": mask, "token_type_ids": None})
        return out.float().softmax(-1).numpy()

    full = probabilities([ids])[0]
    target = int(full.argmax())
    rows = [0] if model.head.pooling != "mean" else text_positions

    def prob_of(ids_, mask_, types_):
        batch = {"input_ids": ids_, "attention_mask": mask_, "token_type_ids": types_}
        return task.logits(model, batch).softmax(-1)[:, target]

    _, scores, _, _ = _encoder_attribution(method, prob_of, run, enc, rows=rows, steps=steps, baseline="pad")
    order = sorted(text_positions, key=lambda i: -scores[i])  # most supporting first; ties by position

    def without(drop: set[int]) -> list[int]:
        return [t for i, t in enumerate(ids) if i not in drop]

    def only(keep: set[int]) -> list[int]:
        return [t for i, t in enumerate(ids) if enc.special[i] or i in keep]

    rng = random.Random(seed)
    n = len(text_positions)
    usable = [k for k in ks if k < n]
    variants = [without(set(order[:k])) for k in usable]
    randoms = [[without(set(rng.sample(text_positions, k))) for _ in range(random_draws)] for k in usable]
    sizes = [max(1, round(b * n)) for b in ERASER_BINS]
    comp = [without(set(order[:s])) for s in sizes]
    suff = [only(set(order[:s])) for s in sizes]
    everything = [*variants, *(v for r in randoms for v in r), *comp, *suff]
    p = probabilities(everything)[:, target] if everything else np.zeros(0)
    p0 = float(full[target])
    top = p[: len(usable)]
    rand = p[len(usable) : len(usable) * (1 + random_draws)].reshape(len(usable), random_draws).mean(1)
    rest = p[len(usable) * (1 + random_draws) :]
    return {
        "label": task.labels[target],
        "probability": p0,
        "tokens": n,
        "deletion_top": {k: p0 - float(v) for k, v in zip(usable, top, strict=True)},
        "deletion_random": {k: p0 - float(v) for k, v in zip(usable, rand, strict=True)},
        "comprehensiveness": float(np.mean(p0 - rest[: len(sizes)])),
        "sufficiency": float(np.mean(p0 - rest[len(sizes) :])),
    }


# --- explained examples for a run's report --------------------------------------------------------------


def explained_examples(
    run, examples: Sequence[dict], *, per_kind: int = 2, steps: int = 32, scan: int = 200
) -> list[dict[str, Any]]:
    """Integrated Gradients for the first ``per_kind`` correctly and wrongly predicted of the first ``scan``
    labelled examples (classification: the predicted label; NER: every predicted entity of the sentence), as rows
    ``{"kind": "correct"|"wrong", "text", "gold", "predicted", "explanations": [Explanation, ...]}``. NER
    sentences longer than the model's window are passed over."""
    from lmforge.metrics import entity_spans

    task = run.task
    scanned = list(examples[:scan])
    if run.name == "ner":
        texts = [
            {"text": "".join(ex["tokens"]) if all(len(t) == 1 for t in ex["tokens"]) else " ".join(ex["tokens"])}
            for ex in scanned
        ]
    else:
        texts = [{"text": ex["text"]} for ex in scanned if not ex.get("text_pair")]
        scanned = [ex for ex in scanned if not ex.get("text_pair")]
    predicted = task.predict(run.model, texts, device=torch.device("cpu"))
    rows: list[dict[str, Any]] = []
    counts = {"correct": 0, "wrong": 0}
    for ex, text, pred in zip(scanned, texts, predicted, strict=True):
        if run.name == "ner":
            gold = sorted(f"{k} {text['text'][s:e]}" for k, s, e in _char_entities(ex, entity_spans, task.scheme))
            guess = sorted(f"{e['type']} {e['text']}" for e in pred["entities"])
            kind = "correct" if gold == guess else "wrong"
        else:
            gold, guess = ex["label"], pred["label"]
            kind = "correct" if gold == guess else "wrong"
        if counts[kind] >= per_kind:
            continue
        try:
            explanations = explain(run, text, method="ig", steps=steps)
        except UserError:  # longer than one window
            continue
        counts[kind] += 1
        rows.append(
            {"kind": kind, "text": text["text"], "gold": gold, "predicted": guess, "explanations": explanations}
        )
        if all(c >= per_kind for c in counts.values()):
            break
    return rows


def _char_entities(example: dict, entity_spans, scheme: str) -> list[tuple[str, int, int]]:
    """Gold entities of a ``{"tokens", "tags"}`` sentence as (type, start, end) character offsets of its text."""
    tokens = example["tokens"]
    sep = 0 if all(len(t) == 1 for t in tokens) else 1
    starts, pos = [], 0
    for t in tokens:
        starts.append(pos)
        pos += len(t) + sep
    return [(k, starts[s], starts[e - 1] + len(tokens[e - 1])) for k, s, e in entity_spans(example["tags"], scheme)]
