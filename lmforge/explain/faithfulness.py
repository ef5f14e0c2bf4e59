"""How faithful a classification explanation is: deletion curves against random tokens and ERASER's
comprehensiveness and sufficiency (DeYoung et al. 2020), scored by the model itself
(``bench/explain_faithfulness.py`` runs it over a test set)."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from lmforge.explain.attribution import encode_text, encoder_attribution

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
    enc = encode_text(task.tokenizer, text, max_len=task.max_len, cls_id=task.cls_id, sep_id=task.sep_id)
    ids = enc.ids[0].tolist()
    text_positions = [i for i, s in enumerate(enc.special) if not s]

    def probabilities(variants: list[list[int]]) -> np.ndarray:
        return _probabilities(task, model, variants)

    full = probabilities([ids])[0]
    target = int(full.argmax())
    rows = [0] if model.head.pooling != "mean" else text_positions

    def prob_of(ids_, mask_, types_):
        batch = {"input_ids": ids_, "attention_mask": mask_, "token_type_ids": types_}
        return task.logits(model, batch).softmax(-1)[:, target]

    _, scores, _, _ = encoder_attribution(method, prob_of, run, enc, rows=rows, steps=steps, baseline="pad")
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
    return {  # the variants' probabilities in ``p``: top-k deletions, random deletions, comprehensiveness, sufficiency
        "label": task.labels[target],
        "probability": p0,
        "tokens": n,
        "deletion_top": {k: p0 - float(v) for k, v in zip(usable, top, strict=True)},
        "deletion_random": {k: p0 - float(v) for k, v in zip(usable, rand, strict=True)},
        "comprehensiveness": float(np.mean(p0 - rest[: len(sizes)])),
        "sufficiency": float(np.mean(p0 - rest[len(sizes) :])),
    }


def _probabilities(task, model, variants: list[list[int]]) -> np.ndarray:
    """Class probabilities (N, C) of token-id sequences of different lengths, in one padded batch."""
    from lmforge.data.batching import pad, padding_mask

    batch = pad([np.asarray(v, dtype=np.int64) for v in variants], task.pad_id)
    mask = padding_mask([len(v) for v in variants], batch.shape[1])
    with torch.no_grad():
        out = task.logits(model, {"input_ids": batch, "attention_mask": mask, "token_type_ids": None})
    return out.float().softmax(-1).numpy()
