"""Which items make up each global batch: a deterministic function of the step.

Every epoch is a permutation of the items drawn from ``seed + epoch``; the global batch of step
``s`` holds items ``s * G ... (s + 1) * G - 1`` of that endless sequence (wrapping into the next
epoch). Nothing about the data position needs saving: a resumed run, on any number of
processes, reads exactly the batches the uninterrupted run would have.
"""

from __future__ import annotations

import numpy as np


class GlobalBatches:
    """Item indices of the global batch at each step."""

    def __init__(self, n_items: int, global_batch_size: int, *, seed: int, shuffle: bool = True) -> None:
        if n_items <= 0:
            raise ValueError("no training items: the data is empty or shorter than one sequence")
        self.n, self.size, self.seed, self.shuffle = n_items, global_batch_size, seed, shuffle
        self._epoch, self._order = -1, np.arange(0)

    def _order_of(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            rng = np.random.default_rng(self.seed + epoch)
            self._order = rng.permutation(self.n) if self.shuffle else np.arange(self.n)
            self._epoch = epoch
        return self._order

    def at(self, step: int) -> np.ndarray:
        flat = np.arange(step * self.size, (step + 1) * self.size)
        out = np.empty(self.size, dtype=np.int64)
        for epoch in np.unique(flat // self.n):
            sel = flat // self.n == epoch
            out[sel] = self._order_of(int(epoch))[flat[sel] % self.n]
        return out

    def epoch_of(self, step: int) -> float:
        return step * self.size / self.n
