"""Shared synthetic data of the task tests (distillation, explanations)."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest

POOL = list("房间服务酒店干净位置交通早餐价格环境前台设施卫生安静方便不错一般")


def _cue_texts(n: int, seed: int) -> list[dict]:
    """Random characters from ``POOL``; a positive text has one 好 somewhere (the only cue)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        chars = [rng.choice(POOL) for _ in range(rng.randint(6, 14))]
        positive = rng.random() < 0.5
        if positive:
            chars.insert(rng.randrange(len(chars) + 1), "好")
        out.append({"text": "".join(chars), "label": "pos" if positive else "neg"})
    return out


@pytest.fixture(scope="session")
def cue_texts() -> Callable[[int, int], list[dict]]:
    """``cue_texts(n, seed)``: n labelled texts whose label is decided by one planted character (好)."""
    return _cue_texts
