"""MLM and CLM tasks: masking statistics, whole-word masking, the fused loss, over-fitting a batch."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lmforge.data.tokenizer import load_tokenizer
from lmforge.models.registry import build_model
from lmforge.models.sizes import model_size
from lmforge.ops.linear_cross_entropy import IGNORE, linear_cross_entropy, sequence_log_likelihoods
from lmforge.tasks.clm import CLMTask
from lmforge.tasks.mlm import MLMTask


def _gen(seed: int = 0) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


@pytest.fixture(scope="module")
def mlm(mlm_shards: Path, review_wordpiece: Path) -> MLMTask:
    return MLMTask(shards=str(mlm_shards), tokenizer=load_tokenizer(review_wordpiece), seq_len=64)


def test_mlm_masking_statistics(mlm: MLMTask) -> None:
    items = [mlm.train_items[i] for i in range(256)]
    batch = mlm.collate(items, generator=_gen())
    original = torch.cat([torch.full((256, 1), mlm.cls_id), torch.stack([torch.from_numpy(w) for w, _ in items])], 1)
    flat = original.view(-1)
    positions, labels = batch["positions"], batch["labels"]
    assert torch.equal(labels, flat[positions])
    assert not torch.isin(flat[positions], mlm.special).any()  # [CLS] [SEP] never predicted
    candidates = (~torch.isin(original, mlm.special)).sum().item()
    assert abs(len(positions) / candidates - 0.15) < 0.01
    corrupted = batch["input_ids"].view(-1)[positions]
    masked = (corrupted == mlm.mask_id).float().mean().item()
    kept = (corrupted == labels).float().mean().item()
    assert abs(masked - 0.8) < 0.02 and 0.08 < kept < 0.13  # kept: the 10% plus random draws of the same id
    unpredicted = torch.ones_like(flat, dtype=torch.bool)
    unpredicted[positions] = False
    assert torch.equal(batch["input_ids"].view(-1)[unpredicted], flat[unpredicted])
    assert batch["n_targets"] == len(positions)


def test_mlm_masks_are_a_function_of_the_seed(mlm: MLMTask) -> None:
    items = [mlm.train_items[i] for i in range(8)]
    a, b = mlm.collate(items, generator=_gen(3)), mlm.collate(items, generator=_gen(3))
    c = mlm.collate(items, generator=_gen(4))
    assert torch.equal(a["input_ids"], b["input_ids"]) and not torch.equal(a["input_ids"], c["input_ids"])


def test_whole_word_masking_masks_whole_words(wwm_shards: Path, review_wordpiece: Path) -> None:
    task = MLMTask(shards=str(wwm_shards), tokenizer=load_tokenizer(review_wordpiece), seq_len=64, whole_word=True)
    items = [task.train_items[i] for i in range(64)]
    batch = task.collate(items, generator=_gen())
    selected = torch.zeros(64 * 64, dtype=torch.bool)
    selected[batch["positions"]] = True
    selected = selected.view(64, 64)
    multi_char_words = 0
    for row, (_, starts) in enumerate(items):
        starts = [True, *starts.tolist()]  # [CLS] starts its own word
        words: list[list[int]] = [[]]
        for t in range(1, 64):
            if starts[t] and words[-1]:
                words.append([])
            words[-1].append(t)
        for tokens in words:
            flags = {bool(selected[row, i]) for i in tokens}
            assert len(flags) == 1, (row, tokens)  # all or nothing
            multi_char_words += len(tokens) > 1
    assert multi_char_words > 100
    assert 0.1 < selected.float().mean().item() < 0.25


@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_cross_entropy_matches_reference(with_bias: bool) -> None:
    hidden = torch.randn(37, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    bias = torch.randn(50, requires_grad=True) if with_bias else None
    labels = torch.randint(0, 50, (37,))
    with torch.no_grad():
        labels[:10] = F.linear(hidden, weight, bias)[:10].argmax(-1)  # some predictions are right
    labels[[3, 9]] = IGNORE
    loss, _ = linear_cross_entropy(hidden, weight, labels, bias=bias, chunk_bytes=4 * 50 * 5)  # 5-row chunks
    logits = F.linear(hidden, weight, bias)
    ref = F.cross_entropy(logits, labels, ignore_index=IGNORE, reduction="sum")
    torch.testing.assert_close(loss, ref)
    valid = labels != IGNORE
    with torch.no_grad():  # accuracy is counted in evaluation only
        _, correct = linear_cross_entropy(hidden, weight, labels, bias=bias, chunk_bytes=4 * 50 * 5)
    assert int(correct) == int((logits.argmax(-1)[valid] == labels[valid]).sum()) > 0
    params = [hidden, weight] + ([bias] if with_bias else [])
    grads = torch.autograd.grad(2.5 * loss, params)
    ref_grads = torch.autograd.grad(2.5 * ref, params)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)


def test_linear_cross_entropy_with_a_frozen_vocabulary_and_per_sequence() -> None:
    """Under adapters the vocabulary matrix is frozen: the hidden states' gradient is still exact, none is made for
    the matrix; per-sequence log-likelihoods (preference tuning) are the rows' summed log-softmax of their targets."""
    hidden = torch.randn(3, 7, 16, requires_grad=True)
    weight = torch.randn(50, 16)  # frozen
    labels = torch.randint(0, 50, (3, 7))
    labels[0, :3] = IGNORE
    logps = sequence_log_likelihoods(hidden, weight, labels)
    log_softmax = F.log_softmax(hidden @ weight.t(), -1)
    ref = torch.stack(
        [
            log_softmax[r].gather(1, labels[r].clamp(min=0)[:, None]).squeeze(1)[labels[r] != IGNORE].sum()
            for r in range(3)
        ]
    )
    torch.testing.assert_close(logps, ref)
    weights = torch.tensor([1.0, -2.0, 0.5])
    (grad,) = torch.autograd.grad((weights * logps).sum(), hidden)
    (ref_grad,) = torch.autograd.grad((weights * ref).sum(), hidden)
    torch.testing.assert_close(grad, ref_grad, atol=1e-5, rtol=1e-5)


def test_linear_cross_entropy_under_bf16_autocast() -> None:
    hidden, weight = torch.randn(64, 32), torch.randn(100, 32, requires_grad=True)
    labels = torch.randint(0, 100, (64,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = linear_cross_entropy(hidden, weight, labels)
    ref = F.cross_entropy(hidden @ weight.t(), labels, reduction="sum")
    assert abs(loss.item() - ref.item()) / ref.item() < 0.02
    loss.backward()
    assert weight.grad is not None and weight.grad.dtype == torch.float32


def _overfit(task, model, batch, steps: int = 60) -> tuple[float, float]:
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(steps):
        out = task.loss(model, batch)
        loss = out.loss_sum / batch["n_targets"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses[0], losses[-1]


def test_mlm_loss_starts_at_uniform_and_falls_on_one_batch(mlm: MLMTask) -> None:
    model = build_model(model_size("bert-tiny", vocab_size=mlm.vocab_size))
    batch = mlm.collate([mlm.train_items[i] for i in range(8)], generator=_gen())
    first, last = _overfit(mlm, model, batch)
    assert abs(first - math.log(mlm.vocab_size)) < 0.5  # a fresh model predicts ~uniformly
    assert last < 0.3 * first


def test_clm_batch_shifts_targets_and_loss_falls(clm_shards: Path, review_bpe: Path) -> None:
    task = CLMTask(shards=str(clm_shards), seq_len=32)
    batch = task.collate([task.train_items[i] for i in range(4)], generator=_gen())
    assert torch.equal(batch["input_ids"][:, 1:], batch["labels"][:, :-1]) and batch["n_targets"] == 4 * 32
    vocab = load_tokenizer(review_bpe).vocab_size
    model = build_model(model_size("gpt-tiny", vocab_size=vocab))
    first, last = _overfit(task, model, batch)
    assert abs(first - math.log(vocab)) < 0.5
    assert last < 0.3 * first
