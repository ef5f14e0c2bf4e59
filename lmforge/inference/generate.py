"""Decoding for the GPT decoder and the encoder-decoder: greedy, beam search, sampling, streaming.

- Greedy and sampling with temperature, top-k (Fan et al., 2018), top-p / nucleus (Holtzman et
  al., 2020), the repetition penalty of CTRL (Keskar et al., 2019) and no-repeat n-grams (Paulus
  et al., 2018); stop tokens and stop strings; batched prompts with left padding.
- Beam search with the length penalty score / length**alpha (Wu et al., 2016, in the form
  transformers uses), early stopping and n-best lists.
- ``stream`` yields text deltas and holds back a delta while it ends in an incomplete UTF-8
  sequence (a byte-level BPE token can carry half of a Chinese character).

Speed at small batch on a CPU is bound by reading the weights and by per-step overhead, not by
FLOPs (FINDINGS). The per-model stepping lives in ``models/decoding.py``: the preallocated
``KVCache`` (no per-step concatenation), cross-attention keys/values projected once, logits only
at the last position, and every weight in the layout a matrix-vector product reads fastest (a
layout change only: the outputs are exactly the model's). The ``Generator`` decodes a copy of the
model so stored that way.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from lmforge.data.tokenizer import LMTokenizer
from lmforge.errors import UserError
from lmforge.inference.config import GenerationConfig
from lmforge.models.decoding import (
    GPTSteps,
    OutputProjection,
    Seq2SeqSteps,
    Steps,
    decoding_layout,
    int8_weights,
    output_weight,
    resolve_precision,
)
from lmforge.models.gpt import GPT
from lmforge.models.seq2seq import Seq2Seq

FinishReason = Literal["stop", "length"]


@dataclass
class Generation:
    """One generated sequence: its text, token ids (without the prompt), why it ended and its score
    (beam search: the length-penalised log-probability; greedy / sampling with ``output_scores``: the
    summed log-probability; otherwise None). A byte-level model can emit bytes that are not UTF-8: the text
    leaves them out (no U+FFFD is shown for them), the token ids keep them."""

    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    score: float | None


class _LogitsProcessor:
    """Repetition penalty, no-repeat n-grams, temperature, top-k and top-p on (N, V) logits."""

    def __init__(self, cfg: GenerationConfig, histories: list[list[int]], vocab: int, device: torch.device) -> None:
        self.cfg = cfg
        self.histories = [list(h) for h in histories]  # per row: the tokens the penalties look at
        self.seen = None
        if cfg.repetition_penalty != 1.0:
            self.seen = torch.zeros((len(histories), vocab), dtype=torch.bool, device=device)
            for row, h in enumerate(histories):
                self.seen[row, h] = True

    def append(self, tokens: Tensor) -> None:
        if self.seen is not None:
            self.seen[torch.arange(len(tokens), device=tokens.device), tokens] = True
        if self.cfg.no_repeat_ngram_size:
            for h, t in zip(self.histories, tokens.tolist(), strict=True):
                h.append(t)

    def reorder(self, index: Tensor) -> None:
        if self.seen is not None:
            self.seen = self.seen.index_select(0, index)
        self.histories = [list(self.histories[i]) for i in index.tolist()]

    def scores(self, logits: Tensor) -> Tensor:
        """Processed logits: penalties always; temperature / top-k / top-p only when sampling."""
        cfg = self.cfg
        if self.seen is not None:
            penalised = torch.where(logits > 0, logits / cfg.repetition_penalty, logits * cfg.repetition_penalty)
            logits = torch.where(self.seen, penalised, logits)
        n = cfg.no_repeat_ngram_size
        if n:
            for row, h in enumerate(self.histories):
                banned = _banned_ngram_tokens(h, n)
                if banned:
                    logits[row, banned] = float("-inf")
        if not cfg.do_sample:
            return logits
        scaled = logits / cfg.temperature
        if torch.isposinf(scaled).any() or torch.isnan(scaled).any():
            # a temperature so small that logits / T overflows: its limit, all mass on the top logit(s)
            top = logits.amax(-1, keepdim=True)
            scaled = torch.zeros_like(logits).masked_fill(logits < top, float("-inf"))
        logits = scaled
        if cfg.top_k and cfg.top_k < logits.shape[-1]:
            kth = logits.topk(cfg.top_k, dim=-1).values[:, -1:]  # (N, 1)
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if cfg.top_p < 1.0:
            logits = _top_p(logits, cfg.top_p)
        return logits


NUCLEUS_CANDIDATES = 1024
"""Top-p looks for the nucleus among this many most probable tokens first (a partial sort: Gemma's 262,144-token
vocabulary takes ~20 ms to sort on a CPU core, as long as a decoding step); the whole vocabulary is sorted only for
rows whose candidates do not reach top_p, so the kept tokens are exactly those of the full sort."""


def _top_p(logits: Tensor, top_p: float) -> Tensor:
    """Nucleus sampling's filter (Holtzman et al. 2020): drop a token when the tokens ranked above it already reach
    ``top_p`` of the probability (the top token always stays)."""
    values, order = logits.topk(min(NUCLEUS_CANDIDATES, logits.shape[-1]), dim=-1)  # most probable first
    probs = (values - logits.logsumexp(-1, keepdim=True)).exp()
    kept = _nucleus(logits, values, order, probs, top_p)
    short = (probs.sum(-1) < top_p).nonzero()[:, 0]  # flat rows: the nucleus may lie beyond the candidates
    if len(short) and values.shape[-1] < logits.shape[-1]:
        values, order = logits[short].sort(dim=-1, descending=True)
        kept[short] = _nucleus(logits[short], values, order, values.softmax(-1), top_p)
    return kept


def _nucleus(logits: Tensor, values: Tensor, order: Tensor, probs: Tensor, top_p: float) -> Tensor:
    drop = probs.cumsum(-1) - probs >= top_p
    return torch.full_like(logits, float("-inf")).scatter(-1, order, values.masked_fill(drop, float("-inf")))


def _banned_ngram_tokens(history: list[int], n: int) -> list[int]:
    """Tokens that would complete an n-gram already present in ``history``."""
    if len(history) < n:
        return []
    prefix = tuple(history[len(history) - n + 1 :])
    return [history[i + n - 1] for i in range(len(history) - n + 1) if tuple(history[i : i + n - 1]) == prefix]


class Generator:
    """Decoding with one model and its tokenizer(s). Build once, call many times.

    The generator decodes with a copy of the model whose weights are stored in the decoding
    layout (``decoding_layout``); ``copy_weights=False`` relayouts the model itself instead (for a
    model used only for inference), and ``refresh()`` re-reads the weights after training steps.
    ``tokenizer`` decodes the output (and, for a GPT, encodes the prompts); ``source_tokenizer``
    encodes the sources of an encoder-decoder (default: ``tokenizer``). ``precision`` (``models/decoding.py``'s
    PRECISIONS, or ``auto``): ``fp32`` decodes exactly; ``int8``, ``int8-head`` and ``bf16`` read fewer bytes per token
    where bf16 arithmetic is fast, and may pick other tokens where two are nearly tied. ``start_id`` is the token a
    decoder starts from (encoder-decoder; default: the end token, as in Marian and BART).
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: LMTokenizer,
        *,
        source_tokenizer: LMTokenizer | None = None,
        start_id: int | None = None,
        source_special_tokens: bool = False,
        copy_weights: bool = True,
        precision: str = "fp32",
    ) -> None:
        if not isinstance(model, (GPT, Seq2Seq)):
            raise UserError(f"generation needs a GPT or an encoder-decoder model, not {type(model).__name__}")
        self.source_model, self.copy_weights, self.tokenizer = model, copy_weights, tokenizer
        self.source_tokenizer = source_tokenizer or tokenizer
        self.source_special_tokens = source_special_tokens
        eos = tokenizer.token_id("eos") if tokenizer.token_id("eos") is not None else tokenizer.token_id("sep")
        if eos is None:
            raise UserError("the tokenizer has no end token (eos or [SEP]) to stop generation at")
        self.eos_id = eos
        pad = tokenizer.token_id("pad")
        self.pad_id = eos if pad is None else pad
        self.start_id = eos if start_id is None else start_id
        self.precision = resolve_precision(precision, next(model.parameters()).device)
        self.refresh()

    def refresh(self) -> None:
        """Re-read the model's weights (call after they change, e.g. between training steps)."""
        model = copy.deepcopy(self.source_model) if self.copy_weights else self.source_model
        if self.precision == "bf16":
            model = model.to(torch.bfloat16)
        self.model = decoding_layout(model.eval())
        self.head = OutputProjection(output_weight(self.model), self.precision)
        if self.precision == "int8":  # after the head read its matrix: an untied lm_head is a Linear too
            int8_weights(self.model)

    # --- public entry points ---------------------------------------------------------------------

    def generate(
        self, inputs: Sequence[str] | Sequence[list[int]], cfg: GenerationConfig | None = None
    ) -> list[Generation]:
        """Generate for every input (prompt text or token ids); ``num_return_sequences`` results per
        input, consecutive, best first."""
        cfg = cfg or GenerationConfig()
        ids = [self._encode(x) for x in inputs]
        if not ids:
            return []
        out: list[Generation] = []
        with torch.inference_mode():
            if cfg.num_beams > 1:
                for hyps in self._beam_search(ids, cfg):
                    out.extend(self._finish(tokens, reason, score) for score, tokens, reason in hyps)
            else:
                tokens, reasons, scores = self._run_sampling(ids, cfg)
                out = [self._finish(t, r, s, cfg.stop_strings) for t, r, s in zip(tokens, reasons, scores, strict=True)]
        return out

    def stream(self, prompt: str | list[int], cfg: GenerationConfig | None = None) -> Iterator[str]:
        """Yield the generated text of one prompt piece by piece (greedy or sampling).

        The pieces concatenate to the text ``generate`` returns. A piece is held back while the
        text decoded so far ends in U+FFFD (an incomplete UTF-8 sequence, which the next bytes may
        complete) or could still become a stop string; bytes that never form a character are left out.
        """
        cfg = cfg or GenerationConfig()
        if cfg.num_beams > 1:
            raise UserError("streaming needs greedy or sampling decoding (num_beams=1)")
        cfg = dataclasses.replace(cfg, num_return_sequences=1)
        sent = ""
        tokens: list[int] = []
        with torch.inference_mode():
            for step in self._sampling_steps([self._encode(prompt)], cfg):
                token = int(step[0])
                if token in self._stop_ids(cfg):
                    break
                tokens.append(token)
                text = _shown(self.tokenizer.decode(tokens).rstrip("\ufffd"))  # the tail may still complete
                cut = _stop_cut(text, cfg.stop_strings)
                if cut is not None:
                    if cut > len(sent):
                        yield text[len(sent) : cut]
                    return
                safe = len(text) - _held_back(text, cfg.stop_strings)
                if safe > len(sent):
                    yield text[len(sent) : safe]
                    sent = text[:safe]
        text = _shown(self.tokenizer.decode(tokens))
        if len(text) > len(sent):
            yield text[len(sent) :]

    # --- internals --------------------------------------------------------------------------------

    def _encode(self, x: str | list[int]) -> list[int]:
        if isinstance(x, str):
            tok = self.source_tokenizer if isinstance(self.model, Seq2Seq) else self.tokenizer
            # a GPT's prompt gets what its tokenizer adds to a text (Gemma's <bos>; nothing for lmforge's BPE)
            special = self.source_special_tokens if isinstance(self.model, Seq2Seq) else True
            ids = tok.encode(x, special_tokens=special)
            if isinstance(self.model, Seq2Seq) and not special:
                ids = [*ids, self.eos_id]
        else:
            ids = list(x)
        if not ids:
            raise UserError("cannot generate from an empty prompt")
        return ids

    def _stop_ids(self, cfg: GenerationConfig) -> set[int]:
        return {self.eos_id, *cfg.stop_token_ids}

    def _steps(self, ids: list[list[int]], copies: int, max_new: int) -> Steps:
        if isinstance(self.model, Seq2Seq):
            max_new = min(max_new, self.model.cfg.max_seq_len)
            return Seq2SeqSteps(
                self.model, self.head, ids, pad_id=self.pad_id, start_id=self.start_id, copies=copies, max_new=max_new
            )
        return GPTSteps(self.model, self.head, ids, pad_id=self.pad_id, copies=copies, max_new=max_new)

    def _max_new(self, ids: list[list[int]], cfg: GenerationConfig) -> int:
        if isinstance(self.model, Seq2Seq):
            return min(cfg.max_new_tokens, self.model.cfg.max_seq_len)
        room = self.model.cfg.max_seq_len - max(len(p) for p in ids)
        if room <= 0:
            raise UserError(
                f"a prompt of {max(len(p) for p in ids)} tokens leaves no room in the model's "
                f"max_seq_len={self.model.cfg.max_seq_len}; shorten it"
            )
        return min(cfg.max_new_tokens, room)

    def _histories(self, ids: list[list[int]], copies: int) -> list[list[int]]:
        # Penalties look at the prompt too for a GPT (it is part of the text), not at an MT source.
        return [[] if isinstance(self.model, Seq2Seq) else p for p in ids for _ in range(copies)]

    def _sampling_steps(self, ids: list[list[int]], cfg: GenerationConfig, scores: Tensor | None = None):
        """Yield each step's tokens (N,) for greedy / sampling; finished rows repeat the pad id."""
        copies = cfg.num_return_sequences
        max_new = self._max_new(ids, cfg)
        steps = self._steps(ids, copies, max_new)
        n = len(ids) * copies
        processor = _LogitsProcessor(cfg, self._histories(ids, copies), self.head.vocab_size, self.head.device)
        generator = None
        if cfg.do_sample and cfg.seed is not None:
            generator = torch.Generator(device=self.head.device).manual_seed(cfg.seed)
        stop = torch.tensor(sorted(self._stop_ids(cfg)), device=self.head.device)
        finished = torch.zeros(n, dtype=torch.bool, device=self.head.device)
        logits = steps.first()
        for i in range(max_new):
            processed = processor.scores(logits)
            if cfg.do_sample:
                tokens = torch.multinomial(processed.softmax(-1), 1, generator=generator).squeeze(1)
            else:
                tokens = processed.argmax(-1)
            if scores is not None:
                scores += torch.where(finished, 0.0, logits.log_softmax(-1).gather(1, tokens[:, None]).squeeze(1))
            tokens = tokens.masked_fill(finished, self.pad_id)
            yield tokens
            finished |= torch.isin(tokens, stop)
            if i == max_new - 1 or bool(finished.all()):
                return
            processor.append(tokens)
            logits = steps.next(tokens)

    def _run_sampling(self, ids: list[list[int]], cfg: GenerationConfig):
        n = len(ids) * cfg.num_return_sequences
        scores = torch.zeros(n, device=self.head.device) if cfg.output_scores else None
        stop_ids = self._stop_ids(cfg)
        tokens: list[list[int]] = [[] for _ in range(n)]
        reasons: list[FinishReason] = ["length"] * n
        done = [False] * n
        for step in self._sampling_steps(ids, cfg, scores):
            for row, t in enumerate(step.tolist()):
                if done[row]:
                    continue
                if t in stop_ids:
                    done[row], reasons[row] = True, "stop"
                    continue
                tokens[row].append(t)
            if cfg.stop_strings:  # end a row once its text holds a stop string; the rest is cut in _finish
                for row in range(n):
                    if not done[row] and _stop_cut(self.tokenizer.decode(tokens[row]), cfg.stop_strings) is not None:
                        done[row], reasons[row] = True, "stop"
                if all(done):
                    break
        return tokens, reasons, scores.tolist() if scores is not None else [None] * n

    def _finish(self, tokens: list[int], reason: FinishReason, score: float | None, stop_strings=()) -> Generation:
        text = _shown(self.tokenizer.decode(tokens))
        cut = _stop_cut(text, stop_strings)
        if cut is not None:
            text, reason = text[:cut], "stop"
        return Generation(text=text, token_ids=tokens, finish_reason=reason, score=score)

    def _beam_search(self, ids: list[list[int]], cfg: GenerationConfig) -> list[list[tuple[float, list[int], str]]]:
        """Per input, the n-best (score, tokens, finish reason), best first."""
        B, K = len(ids), cfg.num_beams
        max_new = self._max_new(ids, cfg)
        steps = self._steps(ids, K, max_new)
        processor = _LogitsProcessor(cfg, self._histories(ids, K), self.head.vocab_size, self.head.device)
        stop_ids = self._stop_ids(cfg)
        device = self.head.device
        beam_scores = torch.full((B, K), float("-inf"), device=device)
        beam_scores[:, 0] = 0.0  # all K rows start identical: only the first may expand at step 1
        sequences: list[list[int]] = [[] for _ in range(B * K)]
        finished: list[list[tuple[float, list[int], str]]] = [[] for _ in range(B)]
        done = [False] * B
        logits = steps.first()
        for length in range(1, max_new + 1):
            logprobs = processor.scores(logits).log_softmax(-1)  # (B*K, V)
            V = logprobs.shape[-1]
            candidates = (beam_scores[:, :, None] + logprobs.view(B, K, V)).view(B, K * V)
            top_scores, top_ids = candidates.topk(2 * K, dim=-1)  # (B, 2K): enough to find K that go on
            next_rows, next_tokens, next_scores = [], [], []
            for b in range(B):
                if done[b]:  # keep the rows busy with padding; their results are final
                    next_rows += [b * K] * K
                    next_tokens += [self.pad_id] * K
                    next_scores += [float("-inf")] * K
                    continue
                kept = 0
                for rank, (score, flat) in enumerate(zip(top_scores[b].tolist(), top_ids[b].tolist(), strict=True)):
                    beam, token = divmod(flat, V)
                    row = b * K + beam
                    if score == float("-inf"):
                        break
                    if token in stop_ids:
                        if rank < K:  # an ending among the K best counts as a finished hypothesis
                            _add_hypothesis(finished[b], K, score / length**cfg.length_penalty, sequences[row], "stop")
                        continue
                    next_rows.append(row)
                    next_tokens.append(token)
                    next_scores.append(score)
                    kept += 1
                    if kept == K:
                        break
                while kept < K:  # fewer than K live continuations (tiny vocabularies): pad with dead rows
                    next_rows.append(b * K)
                    next_tokens.append(self.pad_id)
                    next_scores.append(float("-inf"))
                    kept += 1
                done[b] = _beam_done(finished[b], K, max(next_scores[-K:]), length, cfg)
            if all(done) or length == max_new:
                for b in range(B):
                    if not done[b]:
                        for k in range(K):
                            row, score = b * K + k, next_scores[b * K + k]
                            if score > float("-inf"):
                                seq = [*sequences[next_rows[row]], next_tokens[row]]
                                _add_hypothesis(finished[b], K, score / len(seq) ** cfg.length_penalty, seq, "length")
                break
            index = torch.tensor(next_rows, device=device)
            tokens = torch.tensor(next_tokens, device=device)
            sequences = [[*sequences[r], t] for r, t in zip(next_rows, next_tokens, strict=True)]
            beam_scores = torch.tensor(next_scores, device=device).view(B, K)
            steps.reorder(index)
            processor.reorder(index)
            processor.append(tokens)
            logits = steps.next(tokens)
        return [sorted(f, key=lambda h: -h[0])[: cfg.num_return_sequences] for f in finished]


def _add_hypothesis(hyps: list, k: int, score: float, tokens: list[int], reason: str) -> None:
    hyps.append((score, list(tokens), reason))
    if len(hyps) > k:
        hyps.remove(min(hyps, key=lambda h: h[0]))


def _beam_done(hyps: list, k: int, best_live: float, length: int, cfg: GenerationConfig) -> bool:
    """A source is done when K hypotheses have ended and (without early stopping) no live beam can
    still beat the worst of them (assuming, as transformers does, the live score stays as it is)."""
    if len(hyps) < k:
        return False
    if cfg.early_stopping:
        return True
    return min(h[0] for h in hyps) >= best_live / length**cfg.length_penalty


def _shown(text: str) -> str:
    """``text`` without U+FFFD: what a byte-level tokenizer decodes from bytes that are not valid UTF-8 (a model
    can emit any byte sequence); a user is never shown a replacement character for them."""
    return text.replace("\ufffd", "")


def _stop_cut(text: str, stop_strings: Sequence[str]) -> int | None:
    """Index where the first stop string starts in ``text``, or None."""
    found = [i for s in stop_strings if s and (i := text.find(s)) >= 0]
    return min(found) if found else None


def _held_back(text: str, stop_strings: Sequence[str]) -> int:
    """Characters at the end of ``text`` not yet safe to emit: the start of a stop string."""
    partial = 0
    for s in stop_strings:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                partial = max(partial, n)
                break
    return partial
