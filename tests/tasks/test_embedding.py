"""SimCSE: InfoNCE by hand, negatives gathered across 2 DDP processes, metrics by hand, and
`lmforge finetune embed` / `lmforge embed` end to end on a tiny BERT."""

from __future__ import annotations

import json
import math
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from lmforge.cli import main
from lmforge.data.builtin import load_builtin
from lmforge.data.readers import write_jsonl
from lmforge.data.tokenizer import copy_tokenizer_files, load_tokenizer
from lmforge.models.bert import Bert, BertConfig
from lmforge.models.registry import save_model
from lmforge.tasks.embedding import EmbeddingTask, info_nce, knn_accuracy, uniformity


def test_info_nce_equals_a_hand_computed_value() -> None:
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    c = torch.tensor([[1.0, 1.0], [0.0, 1.0], [-1.0, 0.0]])  # two positives and one hard negative
    loss, correct = info_nce(a, c, torch.tensor([0, 1]), temperature=0.5)
    cos = [[1 / math.sqrt(2), 0.0, -1.0], [1 / math.sqrt(2), 1.0, 0.0]]
    expected = 0.0
    for row, target in ((0, 0), (1, 1)):
        logits = [x / 0.5 for x in cos[row]]
        expected += -logits[target] + math.log(sum(math.exp(x) for x in logits))
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    assert int(correct) == 2


def test_uniformity_and_knn_by_hand() -> None:
    z = np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)  # squared distance 2 between the only pair
    assert uniformity(z) == pytest.approx(-4.0, abs=1e-5)
    index = np.array([[1, 0], [0.9, 0.1], [0, 1]], dtype=np.float32)
    queries = np.array([[1, 0], [0, 1]], dtype=np.float32)
    assert knn_accuracy(index, ["a", "a", "b"], queries, ["a", "b"], k=1) == 1.0
    assert knn_accuracy(index, ["a", "a", "b"], queries, ["a", "b"], k=3) == 0.5  # majority 'a' both times


GATHER_SCRIPT = textwrap.dedent(
    """
    import json, os, sys, torch, torch.distributed as dist
    from lmforge.tasks.embedding import gather_with_grad, info_nce
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(0)
    anchors_all, positives_all = torch.randn(2 * 3, 4, generator=g), torch.randn(2 * 3, 4, generator=g)
    a = anchors_all[3 * rank : 3 * rank + 3].clone().requires_grad_(True)
    p = positives_all[3 * rank : 3 * rank + 3].clone().requires_grad_(True)
    candidates = gather_with_grad(p)
    loss, _ = info_nce(a, candidates, torch.arange(3) + 3 * rank, 0.05)
    loss.backward()
    json.dump({"loss": float(loss), "candidates": candidates.shape[0], "grad_a": a.grad.tolist(),
               "grad_p": p.grad.tolist()}, open(os.path.join(sys.argv[1], f"rank{rank}.json"), "w"))
    from lmforge.train.distributed import Dist, teardown
    teardown(Dist(rank=rank, world_size=world))  # the one teardown: every process meets before the group goes
    """
)


def test_negatives_are_gathered_across_two_ddp_processes(tmp_path: Path, run_process) -> None:
    """Two processes with 3 anchors each give the loss and gradients of one process with all 6."""
    script = tmp_path / "gather.py"
    script.write_text(GATHER_SCRIPT)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
        str(script),
        str(tmp_path),
    ]
    run_process(cmd, timeout=300)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["candidates"] == 6 for r in ranks)
    g = torch.Generator().manual_seed(0)
    anchors, positives = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    anchors.requires_grad_(True)
    positives.requires_grad_(True)
    loss, _ = info_nce(anchors, positives, torch.arange(6), 0.05)
    loss.backward()
    assert ranks[0]["loss"] + ranks[1]["loss"] == pytest.approx(float(loss.detach()), rel=1e-5)
    got_a = torch.tensor(ranks[0]["grad_a"] + ranks[1]["grad_a"])
    got_p = torch.tensor(ranks[0]["grad_p"] + ranks[1]["grad_p"])
    assert torch.allclose(got_a, anchors.grad, atol=1e-5)
    assert torch.allclose(got_p, positives.grad, atol=1e-5)  # gradients reach the other process's positives


def test_unsupervised_batches_repeat_each_text_and_supervised_ones_stack_pairs(review_wordpiece: Path) -> None:
    tok = load_tokenizer(review_wordpiece)
    unsup = EmbeddingTask(tok, train_examples=[{"text": "很好"}, {"text": "太差了"}])
    batch = unsup.collate(unsup.train_items)
    assert batch["input_ids"].shape[0] == 4 and torch.equal(batch["input_ids"][:2], batch["input_ids"][2:])
    pairs = [
        {"text": "很好", "text_pair": "不错", "negative": "很差"},
        {"text": "太差", "text_pair": "糟糕", "negative": "好"},
    ]
    sup = EmbeddingTask(tok, mode="sup", train_examples=pairs)
    batch = sup.collate(sup.train_items)
    assert batch["input_ids"].shape[0] == 6 and batch["n_negatives"] == 2 and batch["n_targets"] == 2
    with pytest.raises(ValueError, match="every example or none"):
        mixed = [
            {"text": "a", "text_pair": "b", "negative": "c"},
            {"text": "d", "text_pair": "e", "source": "f.jsonl:2"},
        ]
        EmbeddingTask(tok, mode="sup", train_examples=mixed)


def test_finetune_embed_then_embed(tmp_path: Path, review_wordpiece: Path) -> None:
    model_dir = tmp_path / "bert"
    cfg = BertConfig(
        vocab_size=load_tokenizer(review_wordpiece).vocab_size,
        d_model=32,
        n_layers=1,
        n_heads=2,
        d_ff=64,
        max_seq_len=64,
    )
    save_model(Bert(cfg), model_dir)
    copy_tokenizer_files(review_wordpiece, model_dir)
    reviews = load_builtin("reviews-sentiment")
    (tmp_path / "train.txt").write_text("\n".join(ex["text"] for ex in reviews["train"][:96]) + "\n", encoding="utf-8")
    write_jsonl(tmp_path / "dev.jsonl", reviews["dev"][:40])
    out = tmp_path / "run"
    args = [
        "finetune",
        "embed",
        "--model",
        str(model_dir),
        "--train",
        str(tmp_path / "train.txt"),
        "--dev",
        str(tmp_path / "dev.jsonl"),
        "--out",
        str(out),
        "--max-len",
        "32",
        "--training.max-steps",
        "4",
        "--training.global-batch-size",
        "16",
        "--training.micro-batch-size",
        "16",
        "--training.eval-every",
        "2",
        "--training.optim.lr",
        "1e-3",
        "--training.no-progress",
        "--training.peak-tflops",
        "1",
    ]
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["selection"] == "alignment_uniformity"  # the training texts carry no labels: no k-NN index
    assert {"alignment", "uniformity"} <= set(results["dev"]) and "dev" in results["before_finetuning"]
    texts = tmp_path / "texts.jsonl"
    write_jsonl(texts, [{"id": "a", "text": "很好用"}, {"id": "b", "text": "太差了"}])
    assert main(["embed", "--model", str(out), "--input", str(texts), "--output", str(tmp_path / "vec")]) == 0
    vectors = np.load(tmp_path / "vec.npy")
    assert vectors.shape == (2, 32) and np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert (tmp_path / "vec.ids.txt").read_text().split() == ["a", "b"]
