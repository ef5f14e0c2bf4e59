"""ELECTRA: discriminator labels, shared embeddings, the REINFORCE loss by hand, the loss falling on a
tiny corpus, and the saved discriminator fine-tuning as a normal BERT."""

from __future__ import annotations

import json
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lmforge.cli import main
from lmforge.data.tokenizer import load_tokenizer
from lmforge.models.bert import BertConfig
from lmforge.models.electra import Electra, generator_config
from lmforge.models.specs import ElectraSpec
from lmforge.tasks.electra import ElectraTask, corrupt


def _tiny(vocab: int, **spec) -> Electra:
    cfg = BertConfig(
        vocab_size=vocab, d_model=64, n_layers=2, n_heads=4, d_ff=128, max_seq_len=64, dropout=0.0, attn_dropout=0.0
    )
    return Electra(cfg, ElectraSpec(**spec))


def test_generator_is_a_quarter_of_the_discriminator_and_shares_its_embeddings() -> None:
    model = _tiny(100)
    g = generator_config(model.cfg, model.spec)
    assert (g.d_model, g.n_heads, g.d_ff, g.n_layers) == (16, 1, 32, 2)
    names = [n for n, _ in model.named_parameters()]
    assert not any("word" in n for n in names if not n.startswith("discriminator."))  # one token embedding
    hidden = model.generator_hidden(torch.randint(0, 100, (2, 8)), torch.tensor([1, 9]))
    assert hidden.shape == (2, 64) and model.generator_logits(hidden).shape == (2, 100)


def test_discriminator_labels_are_replaced_exactly_where_the_sample_differs() -> None:
    originals = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    positions = torch.tensor([1, 2, 5, 7])  # flat indices: (0,1) (0,2) (1,1) (1,3)
    samples = torch.tensor([6, 3, 10, 4])  # (0,1) and (1,1) happen to be the original tokens
    corrupted, replaced = corrupt(originals, positions, samples)
    assert corrupted.tolist() == [[5, 6, 3, 8], [9, 10, 11, 4]]
    assert replaced.tolist() == [[0, 0, 1, 0], [0, 0, 0, 1]]


def test_generator_samples_flow_into_the_discriminator_labels() -> None:
    """A generator that always samples token 7: masked positions holding 7 are labelled original."""
    torch.manual_seed(0)
    model = _tiny(20)
    with torch.no_grad():
        model.gen_bias[7] = 1e4
    originals = torch.tensor([[1, 7, 3, 7, 5, 6]])
    positions = torch.tensor([1, 2, 3, 4])
    masked = originals.clone().view(-1)
    masked[positions] = 19  # the [MASK] id of this toy vocabulary
    logits = model.generator_logits(model.generator_hidden(masked.view(1, -1), positions))
    for sampling in ("multinomial", "gumbel"):
        model.spec.sampling = sampling
        samples = model.sample(logits)
        assert samples.tolist() == [7, 7, 7, 7]
        _, replaced = corrupt(originals, positions, samples)
        assert replaced.tolist() == [[0, 0, 1, 0, 1, 0]]


def test_reinforce_loss_by_hand() -> None:
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]], requires_grad=True)
    samples = torch.tensor([0, 2])
    disc_logits = torch.tensor([[3.0, -1.0, 0.0]])  # P(replaced) at flat positions 0 and 2 -> sigmoid(3), 0.5
    stub = types.SimpleNamespace(
        reward_baseline=torch.tensor(0.0), training=False, spec=ElectraSpec(baseline_decay=0.9)
    )
    loss = ElectraTask._reinforce(stub, logits, samples, disc_logits, torch.tensor([0, 2]))
    log_p = [F.log_softmax(logits[0], -1)[0], F.log_softmax(logits[1], -1)[2]]
    rewards = [torch.log(1 - torch.sigmoid(torch.tensor(3.0))), torch.log(torch.tensor(0.5))]
    expected = -(rewards[0] * log_p[0] + rewards[1] * log_p[1])
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-5)
    stub.training = True  # while training the baseline moves towards the mean reward first
    ElectraTask._reinforce(stub, logits, samples, disc_logits, torch.tensor([0, 2]))
    assert float(stub.reward_baseline) == pytest.approx(0.1 * float(sum(rewards) / 2), rel=1e-5)


@pytest.mark.parametrize("objective", ["mle", "mixed"])
def test_electra_loss_falls_on_a_tiny_corpus(objective: str, mlm_shards: Path, review_wordpiece: Path) -> None:
    tok = load_tokenizer(review_wordpiece)
    task = ElectraTask(shards=str(mlm_shards), tokenizer=tok, seq_len=32)
    torch.manual_seed(0)
    model = _tiny(tok.vocab_size, generator_objective=objective)
    batch = task.collate([task.train_items[i] for i in range(8)], generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for step in range(30):
        torch.manual_seed(step)  # the sampling draws, as the loop seeds them per step
        out = task.loss(model, batch)
        (out.loss_sum / batch["n_targets"]).backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(out.loss_sum.detach()) / batch["n_targets"])
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5
    metrics = task.metrics({"loss_sum": float(out.loss_sum.detach()), "n_targets": batch["n_targets"], **out.counts})
    assert 0.0 <= metrics["discriminator_accuracy"] <= 1.0 and 0.0 <= metrics["replaced_fraction"] <= 1.0


def test_pretrained_discriminator_finetunes_for_classification(
    tmp_path: Path, review_corpus: Path, review_wordpiece: Path, mlm_shards: Path
) -> None:
    fast = ["--training.no-progress", "--training.peak-tflops", "1"]
    pre = tmp_path / "electra"
    args = [
        "pretrain",
        "--task",
        "electra",
        "--out",
        str(pre),
        "--model.size",
        "bert-tiny",
        "--model.d-model",
        "32",
        "--model.d-ff",
        "64",
        "--data.input",
        str(review_corpus),
        "--data.tokenizer",
        str(review_wordpiece),
        "--data.shards",
        str(mlm_shards),
        "--data.seq-len",
        "32",
        "--training.max-steps",
        "4",
        "--training.global-batch-size",
        "8",
        "--training.micro-batch-size",
        "8",
        "--training.eval-every",
        "2",
        "--training.eval-batches",
        "2",
        *fast,
    ]
    assert main(args) == 0
    config = json.loads((pre / "config.json").read_text())
    assert config["lmforge_model"] == "bert" and config["d_model"] == 32 and not config["mlm_head"]
    evals = [json.loads(line) for line in (pre / "metrics.jsonl").read_text().splitlines() if '"eval"' in line]
    assert {"generator_loss", "discriminator_accuracy", "replaced_fraction"} <= set(evals[-1])
    out = tmp_path / "cls"
    args = [
        "finetune",
        "classify",
        "--model",
        str(pre),
        "--data",
        "builtin:reviews-sentiment",
        "--out",
        str(out),
        "--epochs",
        "0",
        "--training.max-steps",
        "2",
        "--training.eval-every",
        "2",
        "--max-len",
        "32",
        "--training.no-progress",
        "--training.peak-tflops",
        "1",
    ]
    assert main(args) == 0
    assert "accuracy" in json.loads((out / "results.json").read_text())["test"]


def test_inverse_cdf_sampling_follows_the_distribution() -> None:
    model = _tiny(5)
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2, 0.0, 0.0]]).clamp(min=1e-12)).expand(20000, 5)
    torch.manual_seed(0)
    counts = torch.bincount(model.sample(logits), minlength=5).float() / 20000
    assert counts.tolist() == pytest.approx([0.5, 0.3, 0.2, 0.0, 0.0], abs=0.015)
