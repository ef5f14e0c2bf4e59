"""Latency on the user's own device: measured for a sample of architectures, predicted for the rest.

HAT (Wang et al., 2020) showed that FLOPs rank transformer latency poorly on real hardware and
trained a latency predictor on measured samples; ours is a linear model over the cost terms of a
transformer forward pass (projections L·B·T·d², feed-forward L·B·T·d·f, attention L·B·T²·d,
element-wise work L·B·T·d and L·B·T²·h, a per-layer and a per-call overhead, the embeddings
B·T·d), fitted with non-negative coefficients (every term costs time) by least squares on the
*relative* error, so small and large models are fitted alike. Its error is reported on measured
architectures held out of the fit.

Measurement: the model in eval mode under ``torch.inference_mode``, random token ids, ``warmup``
untimed calls, then the median of ``repeats`` timed calls, with the thread count as it is.
"""

from __future__ import annotations

import random
import statistics
import time
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import nnls

from lmforge.errors import UserError
from lmforge.models.bert import BertConfig
from lmforge.models.gpt import GPTConfig
from lmforge.models.registry import build_model
from lmforge.nas.space import Arch

FEATURES = ("projections", "feed_forward", "attention", "elementwise", "softmax", "per_layer", "embeddings", "call")


@torch.inference_mode()
def measure_latency(
    arch: Arch,
    base: BertConfig | GPTConfig,
    *,
    batch: int,
    seq_len: int,
    warmup: int = 3,
    repeats: int = 15,
    seed: int = 0,
) -> float:
    """Median milliseconds of one forward pass of ``arch`` over a (batch, seq_len) input on the CPU."""
    torch.manual_seed(seed)
    model = build_model(arch.config(base)).eval()
    ids = torch.randint(5, base.vocab_size, (batch, seq_len))
    for _ in range(warmup):
        model(ids)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(ids)
        times.append(time.perf_counter() - start)
    return 1000.0 * statistics.median(times)


def features(arch: Arch, *, batch: int, seq_len: int) -> np.ndarray:
    """The cost terms the latency model weighs (in units that keep the coefficients well scaled)."""
    L, d, f, h, B, T = arch.n_layers, arch.d_model, arch.d_ff, arch.n_heads, batch, seq_len
    return np.array(
        [
            L * B * T * d * d / 1e9,
            L * B * T * d * f / 1e9,
            L * B * T * T * d / 1e9,
            L * B * T * d / 1e6,
            L * B * T * T * h / 1e6,
            L,
            B * T * d / 1e6,
            1.0,
        ]
    )


@dataclass
class LatencyModel:
    """Milliseconds = coefficients · features(arch), fitted on measured architectures."""

    coefficients: list[float]
    batch: int
    seq_len: int

    @classmethod
    def fit(cls, archs: list[Arch], ms: list[float], *, batch: int, seq_len: int) -> LatencyModel:
        if len(archs) < 2:
            raise UserError(f"the latency model needs at least 2 measured architectures, got {len(archs)}")
        X = np.stack([features(a, batch=batch, seq_len=seq_len) for a in archs])
        y = np.asarray(ms, dtype=np.float64)
        coef, _ = nnls(X / y[:, None], np.ones_like(y))  # minimise the relative error
        return cls([float(c) for c in coef], batch, seq_len)

    def predict(self, arch: Arch) -> float:
        return float(features(arch, batch=self.batch, seq_len=self.seq_len) @ np.asarray(self.coefficients))

    def to_dict(self) -> dict:
        return {
            "coefficients": dict(zip(FEATURES, self.coefficients, strict=True)),
            "batch": self.batch,
            "seq_len": self.seq_len,
        }

    @classmethod
    def from_dict(cls, data: dict) -> LatencyModel:
        return cls([float(data["coefficients"][k]) for k in FEATURES], int(data["batch"]), int(data["seq_len"]))


def relative_errors(model: LatencyModel, archs: list[Arch], ms: list[float]) -> list[float]:
    return [abs(model.predict(a) - m) / m for a, m in zip(archs, ms, strict=True)]


def held_out_split(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices (fit, held out): ``fraction`` of ``n`` measurements (at least one) held out, seeded."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    k = max(1, round(fraction * n))
    return sorted(order[k:]), sorted(order[:k])
