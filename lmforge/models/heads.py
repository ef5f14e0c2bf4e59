"""Generic heads over (B, T, D) hidden states: sequence classification, token classification, CRF.

Heads know nothing about the encoder beneath them (no ``BertForX`` classes, rule 2 of the
architecture page). The CRF is a linear-chain conditional random field (Lafferty et al., 2001;
used over BiLSTM/BERT emissions by Lample et al., 2016): training maximises the log-likelihood
(forward algorithm), decoding is Viterbi; both run in log space over padded batches. An optional
transition mask forbids paths such as ``O -> I-PER`` for BIO/BIOES tag sets. No well-kept
PyTorch CRF library fits (pytorch-crf is unmaintained since 2020), hence our own.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from lmforge.errors import UserError

FORBIDDEN = -1e4  # added to forbidden transition scores: exp(-1e4) underflows to 0 in fp32


class SequenceClassifier(nn.Module):
    """Pool the hidden states, then dropout + linear -> (B, C) logits.

    Pooling: ``cls`` takes the first token; ``pooler`` passes it through dense + tanh first (BERT's
    pooler; the fine-tuning code copies a pretrained pooler's weights in when the checkpoint has one);
    ``mean`` averages the real tokens; ``last`` takes the last real token (a decoder's: the only position that has
    read the whole text under a causal mask, as transformers' ``*ForSequenceClassification``).
    """

    def __init__(
        self,
        d_model: int,
        n_classes: int,
        *,
        dropout: float = 0.1,
        pooling: Literal["cls", "pooler", "mean", "last"] = "pooler",
    ) -> None:
        super().__init__()
        if pooling not in ("cls", "pooler", "mean", "last"):
            raise UserError(f"pooling={pooling!r} must be 'cls', 'pooler', 'mean' or 'last'")
        self.pooling = pooling
        self.dense = nn.Linear(d_model, d_model) if pooling == "pooler" else None
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(d_model, n_classes)

    def forward(self, hidden: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        pooled = pool(hidden, attention_mask, "cls" if self.pooling == "pooler" else self.pooling)  # (B, D)
        if self.dense is not None:
            pooled = torch.tanh(self.dense(pooled))
        return self.out(self.dropout(pooled))


def pool(hidden: Tensor, attention_mask: Tensor | None, pooling: Literal["cls", "mean", "last"]) -> Tensor:
    """(B, D) sentence vectors from (B, T, D) hidden states: the first token, the mean of real tokens, or the last
    real token (right padding)."""
    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "last":
        if attention_mask is None:
            return hidden[:, -1]
        last = attention_mask.long().sum(1).clamp(min=1) - 1  # (B,)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    if pooling != "mean":
        raise UserError(f"pooling={pooling!r} must be 'cls', 'mean' or 'last'")
    weights = torch.ones(hidden.shape[:2], device=hidden.device) if attention_mask is None else attention_mask
    weights = weights.to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)


class TokenClassifier(nn.Module):
    """Dropout + linear per token -> (B, T, C) scores (softmax logits or CRF emissions)."""

    def __init__(self, d_model: int, n_tags: int, *, dropout: float = 0.1) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(d_model, n_tags)

    def forward(self, hidden: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        return self.out(self.dropout(hidden))


class EncoderWithHead(nn.Module):
    """An encoder giving (B, T, D) hidden states, a head on top, and optionally a CRF over the head's scores."""

    def __init__(self, encoder: nn.Module, head: nn.Module, *, crf: CRF | None = None) -> None:
        super().__init__()
        self.encoder, self.head, self.crf = encoder, head, crf

    def forward(
        self, input_ids: Tensor, *, attention_mask: Tensor | None = None, token_type_ids: Tensor | None = None
    ) -> Tensor:
        """Head outputs: (B, C) class logits or (B, T, C) token scores."""
        hidden = self.encoder(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        return self.head(hidden, attention_mask)


class CRF(nn.Module):
    """Linear-chain CRF over (B, T, C) emissions; sequences are left-aligned, ``mask`` (B, T) marks real steps."""

    def __init__(self, n_tags: int, *, allowed: Tensor | None = None, allowed_start: Tensor | None = None) -> None:
        super().__init__()
        self.n_tags = n_tags
        self.transitions = nn.Parameter(torch.zeros(n_tags, n_tags))  # [from, to]
        self.start = nn.Parameter(torch.zeros(n_tags))
        self.end = nn.Parameter(torch.zeros(n_tags))
        penalty = torch.zeros(n_tags, n_tags) if allowed is None else (~allowed).float() * FORBIDDEN
        start_penalty = torch.zeros(n_tags) if allowed_start is None else (~allowed_start).float() * FORBIDDEN
        self.register_buffer("penalty", penalty, persistent=False)
        self.register_buffer("start_penalty", start_penalty, persistent=False)

    def _scores(self) -> tuple[Tensor, Tensor]:
        return self.transitions + self.penalty, self.start + self.start_penalty

    def _check(self, emissions: Tensor, mask: Tensor) -> Tensor:
        mask = mask.bool()
        if not mask[:, 0].all():
            raise UserError("CRF sequences must start at position 0 (left-aligned, right padding)")
        return mask

    def log_likelihood(self, emissions: Tensor, tags: Tensor, mask: Tensor) -> Tensor:
        """log p(tags | emissions) per sequence, (B,). Tags at padded steps are ignored."""
        mask = self._check(emissions, mask)
        emissions = emissions.float()
        trans, start = self._scores()
        B = emissions.shape[0]
        tags = tags.clamp(min=0) * mask  # padded labels (e.g. -100) -> 0, masked out below
        batch = torch.arange(B, device=emissions.device)
        emitted = emissions.gather(2, tags[:, :, None]).squeeze(2) * mask  # (B, T)
        moved = trans[tags[:, :-1], tags[:, 1:]] * mask[:, 1:]  # (B, T-1): mask is a prefix, so both ends real
        last = tags[batch, mask.sum(1) - 1]
        score = start[tags[:, 0]] + emitted.sum(1) + moved.sum(1) + self.end[last]
        return score - self._log_partition(emissions, mask, trans, start)

    def _log_partition(self, emissions: Tensor, mask: Tensor, trans: Tensor, start: Tensor) -> Tensor:
        return torch.logsumexp(self._alphas(emissions, mask, trans, start)[-1] + self.end, dim=1)

    @staticmethod
    def _alphas(emissions: Tensor, mask: Tensor, trans: Tensor, start: Tensor) -> list[Tensor]:
        """Forward scores per step: alpha_t[c] = log-sum over tag prefixes ending in c at t (B, C) each; a padded
        step repeats the last real one."""
        alphas = [start + emissions[:, 0]]
        for t in range(1, emissions.shape[1]):
            # alpha'[j] = logsumexp_i(alpha[i] + trans[i, j]) + emission[t, j]
            nxt = torch.logsumexp(alphas[-1].unsqueeze(2) + trans.unsqueeze(0), dim=1) + emissions[:, t]
            alphas.append(torch.where(mask[:, t, None], nxt, alphas[-1]))
        return alphas

    def log_marginals(self, emissions: Tensor, mask: Tensor, *, temperature: float = 1.0) -> Tensor:
        """log p(tag at step t = c | emissions) per step (B, T, C) by forward-backward, differentiable; padded
        steps are 0. ``temperature`` divides every score (emissions, transitions, start, end) first: the
        marginals of the softened CRF, which distillation matches at T > 1."""
        mask = self._check(emissions, mask)
        trans, start = self._scores()
        emissions, trans, start, end = (x / temperature for x in (emissions.float(), trans, start, self.end))
        T = emissions.shape[1]
        alphas = self._alphas(emissions, mask, trans, start)
        log_z = torch.logsumexp(alphas[-1] + end, dim=1)  # (B,)
        beta = end.expand_as(alphas[0])  # beta_t[c]: log-sum over tag suffixes after c at t
        betas = [beta]
        for t in range(T - 2, -1, -1):
            # beta_t[i] = logsumexp_j(trans[i, j] + emission[t + 1, j] + beta_{t+1}[j]); the last real step: end
            back = torch.logsumexp(trans.unsqueeze(0) + (emissions[:, t + 1] + beta).unsqueeze(1), dim=2)
            beta = torch.where(mask[:, t + 1, None], back, end.expand_as(back))
            betas.append(beta)
        log_p = torch.stack(alphas, 1) + torch.stack(betas[::-1], 1) - log_z[:, None, None]
        return log_p * mask[:, :, None]

    @torch.no_grad()
    def marginals(self, emissions: Tensor, mask: Tensor) -> Tensor:
        """p(tag at step t = c | emissions) per step (B, T, C); padded steps are 0."""
        return self.log_marginals(emissions, mask).exp() * mask[:, :, None]

    @torch.no_grad()
    def decode(self, emissions: Tensor, mask: Tensor) -> list[list[int]]:
        """The highest-scoring tag sequence of each sequence (Viterbi), as lists of its real length."""
        mask = self._check(emissions, mask)
        emissions = emissions.float()
        trans, start = self._scores()
        B, T, _ = emissions.shape
        score = start + emissions[:, 0]  # (B, C)
        history = []
        for t in range(1, T):
            candidates = score.unsqueeze(2) + trans.unsqueeze(0)  # (B, C_from, C_to)
            best, index = candidates.max(dim=1)  # (B, C)
            history.append(index)
            score = torch.where(mask[:, t, None], best + emissions[:, t], score)
        score = score + self.end
        lengths = mask.sum(1).tolist()
        paths = []
        for b in range(B):
            tag = int(score[b].argmax())
            path = [tag]
            for t in range(lengths[b] - 1, 0, -1):
                tag = int(history[t - 1][b, tag])
                path.append(tag)
            paths.append(path[::-1])
        return paths


def bio_transitions(labels: list[str]) -> tuple[Tensor, Tensor]:
    """Allowed (from, to) transitions and allowed first tags for BIO or BIOES labels.

    An inside tag (I-X, or E-X under BIOES) may only follow B-X or I-X of the same type; a sequence
    may not start inside an entity.
    """
    n = len(labels)
    allowed = torch.ones(n, n, dtype=torch.bool)
    start = torch.ones(n, dtype=torch.bool)
    for j, to in enumerate(labels):
        prefix, _, kind = to.partition("-")
        if prefix in ("I", "E"):
            start[j] = False
            for i, frm in enumerate(labels):
                f_prefix, _, f_kind = frm.partition("-")
                allowed[i, j] = f_prefix in ("B", "I") and f_kind == kind
    return allowed, start
