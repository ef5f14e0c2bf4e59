"""Which items make up each global batch: a deterministic function of the step.

Every epoch is a permutation of the items drawn from ``seed + epoch``; the global batch of step
``s`` holds items ``s * G ... (s + 1) * G - 1`` of that endless sequence (wrapping into the next
epoch). Nothing about the data position needs saving: a resumed run, on any number of
processes, reads exactly the batches the uninterrupted run would have.

Length grouping (given ``lengths``): each epoch's permutation is cut into pools of ``pool``
global batches, each pool is sorted by length and cut into global batches (the last one
overlapping its neighbour when the items do not divide evenly, so every batch is full and no
batch straddles two groups), and the batches of the whole epoch are shuffled. Sequences of
similar length then share a batch (and, sliced in order, a micro-batch), so dynamic padding
wastes little compute, while the batch order stays random (the bucketing of Nematus and
transformers' ``group_by_length``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

from lmforge.errors import UserError


class GlobalBatches:
    """Item indices of the global batch at each step."""

    def __init__(
        self,
        n_items: int,
        global_batch_size: int,
        *,
        seed: int,
        shuffle: bool = True,
        lengths: Sequence[int] | None = None,
        pool: int = 64,
    ) -> None:
        if n_items <= 0:
            raise UserError("no training items: the data is empty or shorter than one sequence")
        if lengths is not None and len(lengths) != n_items:
            raise UserError(f"lengths has {len(lengths)} entries for {n_items} items")
        self.n, self.size, self.seed, self.shuffle = n_items, global_batch_size, seed, shuffle
        self.lengths = None if lengths is None else np.asarray(lengths)
        self.pool = pool
        self._epoch, self._order = -1, np.arange(0)

    def _order_of(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            rng = np.random.default_rng(self.seed + epoch)
            order = rng.permutation(self.n) if self.shuffle else np.arange(self.n)
            if self.lengths is not None:
                order = self._grouped(order, rng)
            self._order, self._epoch = order, epoch
        return self._order

    def _grouped(self, order: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        span = self.size * self.pool
        pools = [order[i : i + span] for i in range(0, self.n, span)]
        # longest first inside a pool: a batch's longest item sets its padded width
        pools = [p[np.argsort(-self.lengths[p], kind="stable")] for p in pools]
        flat = np.concatenate(pools)
        if len(flat) < self.size:
            flat = np.resize(flat, self.size)
        starts = list(range(0, len(flat) - self.size + 1, self.size))
        if len(flat) % self.size:  # the last batch overlaps the one before: full batches, similar lengths
            starts.append(len(flat) - self.size)
        batches = [flat[i : i + self.size] for i in starts]
        return np.concatenate([batches[i] for i in rng.permutation(len(batches))])

    def at(self, step: int) -> np.ndarray:
        if self.lengths is not None:  # whole batches per epoch, so no batch straddles two length groups
            per_epoch = -(-max(self.n, self.size) // self.size)
            epoch, k = divmod(step, per_epoch)
            return self._order_of(epoch)[k * self.size : (k + 1) * self.size].astype(np.int64)
        flat = np.arange(step * self.size, (step + 1) * self.size)
        out = np.empty(self.size, dtype=np.int64)
        for epoch in np.unique(flat // self.n):
            sel = flat // self.n == epoch
            out[sel] = self._order_of(int(epoch))[flat[sel] % self.n]
        return out

    def epoch_of(self, step: int) -> float:
        return step * self.size / self.n


def pad(sequences: Sequence[Sequence[int]], value: int, *, width: int | None = None) -> torch.Tensor:
    """Right-pad integer sequences into a (B, T) tensor, T = the longest (or ``width``): dynamic padding."""
    width = max((len(s) for s in sequences), default=0) if width is None else width
    out = torch.full((len(sequences), width), value, dtype=torch.long)
    for i, s in enumerate(sequences):
        out[i, : len(s)] = torch.as_tensor(np.asarray(s, dtype=np.int64))
    return out


def padding_mask(lengths: Sequence[int], width: int) -> torch.Tensor:
    """(B, width) long mask, 1 at the first ``lengths[b]`` positions of each row (the real tokens)."""
    return (torch.arange(width)[None, :] < torch.as_tensor(lengths)[:, None]).long()


def to_device(batch: dict, device: torch.device) -> dict:
    """Move a batch's tensors to ``device``; other values (counts) stay as they are."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> Iterator[list[int]]:
    """Indices in batches of similar length (longest first), for inference with little padding."""
    order = np.argsort(-np.asarray(lengths), kind="stable")
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size].tolist()


def token_buckets(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Indices grouped into buckets of similar length holding at most ``max_tokens`` padded tokens
    (rows x the longest row), fairseq's ``--max-tokens`` batching; an item longer than the budget
    gets a bucket of its own."""
    if max_tokens <= 0:
        raise UserError(f"max_tokens={max_tokens} must be positive")
    order = np.argsort(np.asarray(lengths), kind="stable")
    buckets: list[list[int]] = []
    current: list[int] = []
    for i in order.tolist():
        # sorted ascending: the newest item is the longest in its bucket
        if current and (len(current) + 1) * lengths[i] > max_tokens:
            buckets.append(current)
            current = []
        current.append(i)
    if current:
        buckets.append(current)
    return buckets
