"""What is explained for each task: the scalar output and the input tokens, per TASKS entry's ``explaining``.

- classification: the probability of a label (default: the predicted one);
- NER: per predicted entity, the mean probability of its predicted tags (the CRF's marginals), per word;
- embeddings: the cosine similarity of two texts, attributed to each text's tokens in turn;
- translation: per generated token, its probability given the tokens before it, attributed to the source tokens
  (gradients through the encoder's embeddings, or the decoder's cross-attention for ``attention``);
- GPT / chat: per generated token, the same over the prompt's tokens (the chat template's own tokens score 0).

``explain(run, example, ...)`` checks the method, the input and the label against the task's ``explaining``
capability and calls its ``explainer``; nothing here compares task names. The methods are ``attribution.py``'s.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from lmforge.errors import UserError
from lmforge.explain.attribution import (
    METHODS,
    Encoded,
    Explanation,
    TokenScore,
    attention_maps,
    attention_rollout,
    attribute,
    cross_attention_maps,
    encode_text,
    encoder_attribution,
    token_scores,
)
from lmforge.tasks import TASKS, Explaining, resolve, with_capability


def explain_classification(
    run, example: dict, *, method: str, label: str | None = None, steps: int = 50, baseline: str = "pad"
) -> list[Explanation]:
    """Attribution of the probability of ``label`` (default: the predicted one) to the tokens of the text."""
    text = example["text"]
    task, model = run.task, run.model
    if task.backbone != "bert":
        raise UserError(
            f"{run.directory}: a classifier on a {task.backbone} decoder; explanations of classifiers are computed for "
            "BERT encoders ([CLS] / mean pooling), not for a decoder's last token"
        )
    enc = encode_text(task.tokenizer, text, max_len=task.max_len, cls_id=task.cls_id, sep_id=task.sep_id)
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
    _, scores, delta, specials = encoder_attribution(
        method,
        lambda ids, mask, types: probs(ids, mask, types)[:, target],
        run,
        enc,
        rows=rows,
        steps=steps,
        baseline=baseline,
    )
    explanation = Explanation(
        text,
        task.labels[target],
        method,
        float(p[target]),
        token_scores(enc, scores, text),
        delta,
        {
            "probabilities": {lab: round(float(v), 6) for lab, v in zip(task.labels, p, strict=True)},
            "special_tokens": round(specials, 6),
        },
    )
    return [explanation]


def explain_entities(run, example: dict, *, method: str, steps: int = 50, baseline: str = "pad") -> list[Explanation]:
    """One explanation per predicted entity of ``text``: the mean probability of its predicted tags (the CRF's
    marginals, or the softmax without one), attributed to every word of the sentence, inside and outside it."""
    from lmforge.metrics import entity_spans
    from lmforge.tasks.ner import words_with_offsets

    task, model, text = run.task, run.model, example["text"]
    words, spans = words_with_offsets(task.tokenizer, {"text": text})
    if not words:
        return []
    enc, first, owner = _sentence_window(task, words)
    word_pos = torch.tensor(first, dtype=torch.long)[None, :]  # (1, W) each word's first sub-token

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
        value, scores, delta, specials = encoder_attribution(
            method, target, run, enc, rows=rows, steps=steps, baseline=baseline
        )
        per_word = np.zeros(len(words))
        np.add.at(per_word, owner[1:-1], scores[1:-1])
        start, end = spans[s][0], spans[e - 1][1]
        tokens = [TokenScore(w, int(a), int(b), float(v)) for w, (a, b), v in zip(words, spans, per_word, strict=True)]
        extra = {
            "type": kind,
            "start": start,
            "end": end,
            "inside": list(range(s, e)),
            "special_tokens": round(specials, 6),
        }
        out.append(Explanation(text, f"{kind} {text[start:end]}", method, value, tokens, delta, extra))
    return out


def _sentence_window(task, words: list[str]) -> tuple[Encoded, list[int], np.ndarray]:
    """The one window of an NER sentence as the task encodes it: (the encoded ids, each word's first sub-token,
    each sub-token's word); a sentence longer than the window is refused."""
    window = task.windows([{"tokens": words}], split="explain", need_tags=False)
    if len(window) > 1:
        raise UserError(
            f"explain: a text of {len(words)} words is longer than the model's window ({task.max_len} sub-tokens); "
            "explain it in shorter pieces"
        )
    ids, first, _, _ = window[0]
    # each sub-token belongs to the word whose first sub-token is the last at or before it
    owner = np.searchsorted(first, np.arange(len(ids)), side="right") - 1
    enc = Encoded(
        torch.tensor(ids, dtype=torch.long)[None, :],
        None,
        [task.tokenizer.tokenizer.id_to_token(int(i)) or "" for i in ids],
        [(0, 0)] * len(ids),
        [True, *([False] * (len(ids) - 2)), True],
    )
    return enc, first, owner


def similarity(run, text: str, other: str, *, method: str, steps: int = 50, baseline: str = "pad") -> Explanation:
    """Attribution of the cosine similarity of ``text`` and ``other`` (an embedding run) to the tokens of
    ``text``, ``other``'s vector held fixed (call again with the two swapped for ``other``'s tokens)."""
    task, model = run.task, run.model
    enc = encode_text(task.tokenizer, text, max_len=task.max_len, cls_id=_cls(task), sep_id=_sep(task))
    with torch.no_grad():
        fixed = F.normalize(task.embed(model, *_ids_mask(task, other)).float(), dim=-1)  # (1, D)

    def similarity(ids: Tensor, mask: Tensor, types: Tensor | None) -> Tensor:
        return (F.normalize(task.embed(model, ids, mask).float(), dim=-1) * fixed).sum(-1)

    rows = [0] if task.pooling == "cls" else [i for i, s in enumerate(enc.special) if not s]
    value, scores, delta, specials = encoder_attribution(
        method, similarity, run, enc, rows=rows, steps=steps, baseline=baseline
    )
    tokens = token_scores(enc, scores, text)
    extra = {"special_tokens": round(specials, 6)}
    return Explanation(text, f"similarity to: {other}", method, value, tokens, delta, extra)


def explain_similarity(run, example: dict, *, method: str, steps: int = 50, baseline: str = "pad") -> list[Explanation]:
    """The similarity of ``example``'s text and text_pair, attributed to the tokens of each in turn."""
    text, other = example["text"], example.get("text_pair")
    if not other:
        raise UserError("an embedding model explains the similarity of two texts: give each input a text_pair")
    return [
        similarity(run, text, other, method=method, steps=steps, baseline=baseline),
        similarity(run, other, text, method=method, steps=steps, baseline=baseline),
    ]


def _generated(
    run,
    enc: Encoded,
    target_ids: list[int],
    prefix: Tensor,
    logits_of: Callable,
    *,
    tok: Any,
    attention_rows: Callable[[Tensor], Tensor],
    method: str,
    steps: int,
) -> list[Explanation]:
    """One explanation per generated token: the probability the model gives it (teacher-forced on the tokens
    before it), attributed to the input tokens of ``enc``; ``prefix`` (1, P) + the generated tokens are what the
    model reads, ``logits_of(ids, mask, types, reading)`` gives (N, P + n, V); ``tok`` decodes the generated
    tokens; ``attention_rows(reading)`` (T, S): per position read, the attention to each input token."""
    reading = torch.cat([prefix, torch.tensor([target_ids[:-1]], dtype=torch.long)], dim=1) if target_ids else prefix
    first = prefix.shape[1] - 1  # the position whose logits predict the first generated token
    pad = tok.token_id("pad") if tok.token_id("pad") is not None else tok.token_id("eos")
    text = enc.tokens and "".join(enc.tokens)  # unused for offsets; keeps the type checker quiet
    del text
    out = []
    rows_attention = attention_rows(reading) if method == "attention" else None
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
                token_scores(enc, scores, source_text),
                delta,
                {"position": n, "token_id": int(token), "token": piece, "special_tokens": round(specials, 6)},
            )
        )
    return out


def explain_translation(
    run, example: dict, *, method: str, steps: int = 32, max_new_tokens: int = 64
) -> list[Explanation]:
    """The greedy translation of ``text``; per generated token, how much each source token raised its probability
    (gradients through the encoder's embeddings) or how much the decoder's cross-attention read it (``attention``:
    the mean over layers and heads)."""
    from lmforge.inference.config import GenerationConfig

    task, model, text = run.task, run.model, example["text"]
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

    def cross_attention(reading: Tensor) -> Tensor:  # the mean over layers and heads of the cross-attention, (T, S)
        return cross_attention_maps(model, enc.ids, reading)[:, 0].mean((0, 1))

    return _generated(
        run,
        enc,
        generated,
        prefix,
        logits_of,
        tok=task.tgt_tok,
        attention_rows=cross_attention,
        method=method,
        steps=steps,
    )


def explain_continuation(
    run, example: dict, *, method: str, steps: int = 32, max_new_tokens: int = 32
) -> list[Explanation]:
    """A GPT's greedy continuation of ``text`` (a chat model: its reply to ``text`` as a user turn); per generated
    token, how much each token of ``text`` raised its probability (or, ``attention``, the rollout from its
    position to them). The chat template's own tokens score 0."""
    from lmforge.inference.chat import ChatSession
    from lmforge.inference.config import GenerationConfig

    task, model, text = run.task, run.model, example["text"]
    tok = task.tokenizer
    encoding = tok.tokenizer.encode(text, add_special_tokens=False)
    text_ids = list(encoding.ids)
    if run.finetuned and tok.token_id("im_start") is not None:
        session = ChatSession(model, tok, is_chat_model=True)
        ids = session.prompt_ids([{"role": "user", "content": text}], max_new_tokens)
        at = next((i for i in range(len(ids) - len(text_ids) + 1) if ids[i : i + len(text_ids)] == text_ids), None)
        if at is None:
            raise UserError("explain: the text is not tokenized the same inside the chat template; explain it raw")
        stop = session.turn_ends
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

    def rollout(reading: Tensor) -> Tensor:  # the GPT reads the prompt and the tokens generated before each one
        return attention_rollout(attention_maps(model, reading, torch.ones_like(reading))[:, 0])

    return _generated(
        run, enc, generated, prefix, logits_of, tok=tok, attention_rows=rollout, method=method, steps=steps
    )


def _ids_mask(task, text: str) -> tuple[Tensor, Tensor]:
    ids = torch.tensor(task.encode_texts([text])[0], dtype=torch.long)[None, :]
    return ids, torch.ones_like(ids)


def _cls(task) -> int:
    return task.tokenizer.token_id("cls")


def _sep(task) -> int:
    return task.tokenizer.token_id("sep")


def refuse_compressed(directory: Any, backend: dict | None) -> None:
    """Explanations need the fp32 PyTorch model (gradients, attention probabilities): an int8 or ONNX copy
    (``backend``: its backend.json) is refused, naming the run to explain instead."""
    if backend is not None:
        source = backend.get("source") or "the run it was made from"
        raise UserError(
            f"{directory} is an {backend['backend']} copy: explanations need the fp32 model's gradients and attention; "
            f"explain {source} instead"
        )


def explaining_of(task_name: str) -> Explaining:
    """The ``explaining`` capability of ``task_name``; a UserError naming the tasks that have one otherwise."""
    entry = TASKS.get(task_name)
    if entry is None or entry.explaining is None:
        raise UserError(f"explain works on {', '.join(with_capability('explaining'))} runs, not {task_name!r}")
    return entry.explaining


def check_request(
    explaining: Explaining, task_name: str, *, method: str, label: str | None, baseline: str = "pad"
) -> None:
    """The method, the label and IG's baseline checked against what the task's explanations support, before any
    work: a flag the task cannot honour is refused, never ignored."""
    if method not in METHODS:
        raise UserError(f"--method {method!r} must be one of {', '.join(METHODS)}")
    if method not in explaining.methods:
        raise UserError(
            f"--method {method} is not available for {task_name} runs (occlusion needs a [MASK] token): use "
            f"{', '.join(explaining.methods)}"
        )
    if label is not None and not explaining.label:
        raise UserError(f"--label is for classification runs; this is a {task_name!r} run")
    if baseline not in ("pad", "mask"):
        raise UserError(f"--baseline {baseline!r} must be 'pad' or 'mask'")
    if baseline != "pad" and not explaining.baselines:
        raise UserError(f"--baseline {baseline}: {task_name} models have no [MASK]; their baseline is [PAD]")


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
    task: one for classification, two for similarity (one per text), one per predicted entity for NER, one per
    generated token for translation and GPTs."""
    explaining = explaining_of(run.task_name)
    check_request(explaining, run.task_name, method=method, label=label, baseline=baseline)
    refuse_compressed(run.directory, run.backend)
    options = {"label": label} if explaining.label else {}
    if explaining.baselines:
        options["baseline"] = baseline
    explanations = resolve(explaining.explainer)(run, example, method=method, steps=steps, **options)
    for e in explanations:
        mark_unread(e)
    return explanations


def mark_unread(e: Explanation) -> None:
    """Where the model stopped reading a text longer than its window: ``extra["read_chars"]``, the end of the
    last token it read, set when text other than white space follows (nothing after it is explained, and the
    pictures show only what was read)."""
    if e.tokens:
        end = max(t.end for t in e.tokens)
        if e.text[end:].strip():
            e.extra["read_chars"] = end
