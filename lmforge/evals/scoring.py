"""Log-likelihoods of continuations under a decoder, as EleutherAI's lm-evaluation-harness defines them.

- ``encode_pair`` splits a (context, continuation) pair into tokens as the harness's ``_encode_pair`` does: the
  context's trailing spaces move to the continuation, the whole text is encoded once, and the continuation is what
  follows the context's own tokens (so a word that merges across the boundary is scored as the model reads it).
  Both are encoded without special tokens; ``prefix_ids`` (the tokenizer's beginning-of-sequence token where its
  post-processor adds one, as Gemma's does, else none) goes before the context, and before an empty context the
  beginning-of-sequence (or end-of-text) token, so that the first token of a document is predicted too (the
  harness's ``prefix_token_id``).
- ``score`` returns each request's summed log-probability, its token count and whether greedy decoding would have
  produced it (the harness's ``is_greedy``). A request longer than the window is scored in pieces: if its
  continuation fits the window, once, with the context cut from the left (the harness's ``[-(max_length + 1):]``,
  and the number of tokens cut is returned so it can be reported); otherwise with a sliding window (the Hugging
  Face perplexity guide's strided evaluation): the first piece scores up to a window of tokens, each later piece
  the next ``stride`` tokens with the ``window - stride`` before them as context. ``stride = window`` is the
  harness's disjoint rolling windows.

Pieces are batched by length, right-padded (positions count real tokens only), and only the scored positions meet
the vocabulary, in chunks of rows, so a 262k-token vocabulary never makes a (window, vocabulary) matrix at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lmforge.data.tokenizer import LMTokenizer

LOGIT_ROWS = 128  # positions projected onto the vocabulary at once


@dataclass(frozen=True)
class Scored:
    """One request's summed log-probability, scored tokens, greedy match and context tokens cut from the left."""

    logprob: float
    tokens: int
    greedy: bool
    cut: int


def prefix_ids(tok: LMTokenizer) -> list[int]:
    """What the tokenizer puts before a text (Gemma's <bos>), or nothing."""
    return tok.encode("", special_tokens=True)


def start_id(tok: LMTokenizer) -> int:
    """The token that precedes an empty context: beginning of sequence, else end of text, else the first id."""
    for role in ("bos", "eos", "eot"):
        found = tok.token_id(role)
        if found is not None:
            return found
    return 0


def encode_pair(tok: LMTokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids with the tokenizer's prefix, continuation ids), split as lm-evaluation-harness splits them."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    prefix = prefix_ids(tok)
    if not context:
        return prefix or [start_id(tok)], tok.encode(continuation, special_tokens=False)
    whole = tok.encode(context + continuation, special_tokens=False)
    context_ids = tok.encode(context, special_tokens=False)
    if context_ids[: len(prefix)] == prefix:  # a chat template that writes its own <bos>
        prefix = []
    return prefix + context_ids, whole[len(context_ids) :]


def pieces(context: int, tokens: Sequence[int], window: int, stride: int) -> tuple[list[tuple[list[int], int]], int]:
    """The pieces that score ``tokens[context:]``, each (its tokens, how many of its last tokens are scored), every
    piece's input (all its tokens but the last) at most ``window`` long; and the context tokens cut from the left."""
    n = len(tokens)
    if n - context <= window:
        low = max(0, n - 1 - window)
        return [(list(tokens[low:]), n - context)], low
    out, end = [], max(window + 1, context + stride)
    first = max(0, end - 1 - window)
    out.append((list(tokens[first:end]), end - context))
    while end < n:
        start, end = end, min(n, end + stride)
        out.append((list(tokens[end - 1 - window : end]), end - start))
    return out, first


@torch.inference_mode()
def score(
    model: torch.nn.Module,
    requests: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    window: int,
    stride: int | None = None,
    batch_size: int = 16,
    pad_id: int = 0,
) -> list[Scored]:
    """Summed log-probabilities of each (context ids, continuation ids) request under ``model`` (an lmforge GPT)."""
    stride = stride or window
    if not 0 < stride <= window:
        raise ValueError(f"stride {stride} must be in 1..window ({window})")
    work, cut = [], []
    for index, (context, continuation) in enumerate(requests):
        if not context:
            raise ValueError("every request needs a context token (encode_pair gives one)")
        split, dropped = pieces(len(context), [*context, *continuation], window, stride)
        cut.append(dropped)
        work.extend((index, tokens, targets) for tokens, targets in split if targets)
    logprob, count, greedy = [0.0] * len(requests), [0] * len(requests), [True] * len(requests)
    order = sorted(range(len(work)), key=lambda i: -len(work[i][1]))
    for start in range(0, len(order), batch_size):
        batch = [work[i] for i in order[start : start + batch_size]]
        width = max(len(tokens) - 1 for _, tokens, _ in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, (_, tokens, _) in enumerate(batch):
            ids[row, : len(tokens) - 1] = torch.tensor(tokens[:-1])
            mask[row, : len(tokens) - 1] = 1
        hidden = model.hidden_states(ids, attention_mask=mask)
        for row, (index, tokens, targets) in enumerate(batch):
            positions = torch.arange(len(tokens) - 1 - targets, len(tokens) - 1)
            labels = torch.tensor(tokens[len(tokens) - targets :])
            for chunk in range(0, targets, LOGIT_ROWS):
                states = hidden[row, positions[chunk : chunk + LOGIT_ROWS]]
                logits = model.logits(states).float()
                target = labels[chunk : chunk + LOGIT_ROWS]
                logprob[index] += logits.log_softmax(-1).gather(-1, target[:, None]).sum().item()
                greedy[index] = greedy[index] and bool((logits.argmax(-1) == target).all())
            count[index] += targets
    return [Scored(lp, n, g, c) for lp, n, g, c in zip(logprob, count, greedy, cut, strict=True)]


@torch.inference_mode()
def token_logprobs(
    model: torch.nn.Module, ids: Sequence[int], *, start: int, top: int = 0
) -> tuple[list[float], list[list[tuple[int, float]]]]:
    """The log-probability of each ``ids[i]`` for ``i >= start`` (at least 1) given ``ids[:i]``, and at each of those
    positions the ``top`` most probable tokens with theirs (an OpenAI completion's ``token_logprobs`` and
    ``top_logprobs``); one forward pass, the vocabulary met ``LOGIT_ROWS`` positions at a time."""
    if not 1 <= start <= len(ids):
        raise ValueError(f"start {start} must be in 1..{len(ids)}")
    hidden = model.hidden_states(torch.tensor([list(ids[:-1])]))[0]
    targets = torch.tensor(list(ids[start:]))
    chosen: list[float] = []
    tops: list[list[tuple[int, float]]] = []
    for chunk in range(start - 1, len(ids) - 1, LOGIT_ROWS):
        rows = slice(chunk, min(chunk + LOGIT_ROWS, len(ids) - 1))
        logprobs = model.logits(hidden[rows]).float().log_softmax(-1)
        picked = targets[rows.start - start + 1 : rows.stop - start + 1]
        chosen.extend(logprobs.gather(-1, picked[:, None])[:, 0].tolist())
        values, indices = logprobs.topk(top, dim=-1)  # top 0: an empty list per position
        tops.extend(list(zip(i, v, strict=True)) for i, v in zip(indices.tolist(), values.tolist(), strict=True))
    return chosen, tops
