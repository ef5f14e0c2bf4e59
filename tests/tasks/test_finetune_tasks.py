"""Fine-tuning tasks: sub-token alignment, windows, offsets, over-fitting, adversarial steps, batching."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from lmforge.data.batching import GlobalBatches
from lmforge.data.tokenizer import WORDPIECE_SPECIALS, LMTokenizer, _bert_wordpiece
from lmforge.models.bert import Bert, BertConfig
from lmforge.tasks.base import IGNORE
from lmforge.tasks.classification import ClassificationTask
from lmforge.tasks.ner import NERTask, tag_set, words_with_offsets
from lmforge.train.adversarial import EmbeddingAttack

VOCAB = [*WORDPIECE_SPECIALS.values(), "北", "京", "是", "首", "都", "hel", "##lo", "好", "差", "书", "很", "!"]


@pytest.fixture(scope="module")
def tok() -> LMTokenizer:
    vocab = {t: i for i, t in enumerate(VOCAB)}
    return LMTokenizer(_bert_wordpiece(vocab, lowercase=True), "wordpiece", dict(WORDPIECE_SPECIALS))


def _ids(*tokens: str) -> list[int]:
    return [VOCAB.index(t) for t in tokens]


def _encoder(vocab_size: int, seed: int = 0) -> Bert:
    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=vocab_size,
        d_model=32,
        n_layers=2,
        n_heads=2,
        d_ff=64,
        max_seq_len=64,
        dropout=0.0,
        attn_dropout=0.0,
        pooler=False,
        mlm_head=False,
    )
    return Bert(cfg)


SENTENCE = {
    "tokens": ["Hello", "北", "京", "是", "xyz", "首", "都"],
    "tags": ["O", "B-LOC", "I-LOC", "O", "O", "B-LOC", "I-LOC"],
}


def test_ner_collation_puts_each_tag_on_the_first_sub_token(tok: LMTokenizer) -> None:
    task = NERTask(tok, tag_set([SENTENCE]), max_len=32, train_examples=[SENTENCE])
    assert task.tags == ["O", "B-LOC", "I-LOC"]
    batch = task.collate([task.train_items[0]])
    # "Hello" -> hel ##lo (tag on hel only); "xyz" -> [UNK] keeps its slot
    expected = _ids("[CLS]", "hel", "##lo", "北", "京", "是", "[UNK]", "首", "都", "[SEP]")
    assert batch["input_ids"][0].tolist() == expected
    O, B, I = 0, 1, 2
    assert batch["labels"][0].tolist() == [IGNORE, O, IGNORE, B, I, O, O, B, I, IGNORE]
    assert batch["word_pos"][0].tolist() == [1, 3, 4, 5, 6, 7, 8]
    assert batch["tags"][0].tolist() == [O, B, I, O, O, B, I]
    assert batch["n_targets"] == 7 and batch["n_tokens"] == 10


def test_long_sentences_split_into_overlapping_windows_that_cover_every_token(tok: LMTokenizer) -> None:
    tokens = ["北", "京", "是", "首", "都"] * 4  # 20 tokens, window budget 6, overlap 2
    sentence = {"tokens": tokens, "tags": ["O"] * 19 + ["B-LOC"]}
    tags = ["O", "B-LOC", "I-LOC", "B-ORG", "I-ORG", "B-PER", "I-PER"]  # enough tags to stand for window numbers
    task = NERTask(tok, tags, max_len=8, overlap=2, train_examples=[sentence])
    spans = [w[3][1:] for w in task.train_items]
    assert spans[0][0] == 0 and spans[-1][1] == 20
    assert all(e - s <= 6 for s, e in spans)
    assert all(nxt[0] == prev[1] - 2 for prev, nxt in itertools.pairwise(spans))  # 2 tokens shared
    assert task.truncated["train"] == 1  # one sentence needed more than one window
    # each token's prediction comes from the window where it is farthest from an edge
    results = [(np.full(e - s, k), np.full(e - s, 0.5, dtype=np.float32)) for k, (s, e) in enumerate(spans)]
    ((tags, _),) = task._merge(task.train_items, results, [20])
    chosen = [task.tag_index[t] for t in tags]
    for j, k in enumerate(chosen):
        s, e = spans[k]
        best = max(min(j - s2, e2 - 1 - j) for s2, e2 in spans if s2 <= j < e2)
        assert s <= j < e and min(j - s, e - 1 - j) == best


def test_predicted_offsets_point_into_the_original_text(tok: LMTokenizer) -> None:
    words, spans = words_with_offsets(tok, {"text": "Hello 北京!"})
    assert words == ["Hello", "北", "京", "!"]
    assert spans == [(0, 5), (6, 7), (7, 8), (8, 9)]
    words, spans = words_with_offsets(tok, {"tokens": ["北", "京"]})
    assert spans == [(0, 1), (1, 2)]


def test_classification_encodes_pairs_with_segments_and_counts_truncation(tok: LMTokenizer) -> None:
    examples = [{"text": "很好", "label": "pos"}, {"text": "北京北京北京", "text_pair": "书书书", "label": "neg"}]
    task = ClassificationTask(tok, ["neg", "pos"], max_len=8, train_examples=examples)
    batch = task.collate(task.train_items)
    # longest side trimmed first: 6 + 3 tokens -> 2 + 3 in a window of 8 with [CLS] [SEP] [SEP]
    assert batch["input_ids"][1].tolist() == _ids("[CLS]", "北", "京", "[SEP]", "书", "书", "书", "[SEP]")
    assert batch["token_type_ids"][1].tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert batch["attention_mask"][0].tolist() == [1, 1, 1, 1, 0, 0, 0, 0]
    assert batch["labels"].tolist() == [1, 0]
    assert task.truncated["train"] == 1


@pytest.mark.parametrize("pooling", ["cls", "pooler", "mean"])
def test_first_token_shortcut_equals_the_full_forward(tok: LMTokenizer, pooling: str) -> None:
    examples = [{"text": "很好", "label": "pos"}, {"text": "北京北京书", "text_pair": "差", "label": "neg"}]
    task = ClassificationTask(tok, ["neg", "pos"], pooling=pooling, dropout=0.0, train_examples=examples)
    model = task.build_model(_encoder(tok.vocab_size)).eval()
    batch = task.collate(task.train_items)
    full = model(batch["input_ids"], attention_mask=batch["attention_mask"], token_type_ids=batch["token_type_ids"])
    torch.testing.assert_close(task.logits(model, batch), full, rtol=1e-5, atol=1e-6)


def test_a_label_unseen_in_training_names_its_source(tok: LMTokenizer) -> None:
    task = ClassificationTask(tok, ["neg", "pos"])
    with pytest.raises(ValueError, match=r"dev\.csv:7: label 'meh' never occurs in the training data"):
        task.encode([{"text": "好", "label": "meh", "source": "dev.csv:7"}], split="dev")
    ner = NERTask(tok, ["O", "B-LOC", "I-LOC"])
    with pytest.raises(ValueError, match=r"dev\.conll:3: tag 'B-PER' never occurs"):
        ner.windows([{"tokens": ["北"], "tags": ["B-PER"], "source": "dev.conll:3"}], split="dev")


def _overfit(task, model, steps: int = 60, lr: float = 3e-3) -> tuple[float, float]:
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    batch = task.collate(task.train_items)
    first = last = None
    for _ in range(steps):
        out = task.loss(model, batch)
        optimizer.zero_grad()
        (out.loss_sum / batch["n_targets"]).backward()
        optimizer.step()
        value = float(out.loss_sum.detach()) / batch["n_targets"]
        first = value if first is None else first
        last = value
    return first, last


def test_classification_overfits_a_tiny_batch(tok: LMTokenizer) -> None:
    examples = [{"text": t, "label": y} for t, y in [("很好", "pos"), ("差", "neg"), ("好书", "pos"), ("很差", "neg")]]
    task = ClassificationTask(
        tok, ["neg", "pos"], max_len=16, dropout=0.0, train_examples=examples, dev_examples=examples
    )
    model = task.build_model(_encoder(tok.vocab_size))
    first, last = _overfit(task, model)
    assert last < 0.05 < first
    metrics = task.evaluate(model, device=torch.device("cpu"))
    assert metrics["accuracy"] == 1.0
    predictions = task.predict(model, [{"text": "很好"}], device=torch.device("cpu"))
    assert predictions[0]["label"] == "pos" and abs(sum(predictions[0]["scores"].values()) - 1) < 1e-5


@pytest.mark.parametrize("head", ["crf", "softmax"])
def test_ner_overfits_a_tiny_batch_and_decodes_the_gold_tags(tok: LMTokenizer, head: str) -> None:
    other = {"tokens": ["首", "都", "是", "北", "京"], "tags": ["B-LOC", "I-LOC", "O", "B-LOC", "I-LOC"]}
    data = [SENTENCE, other]
    task = NERTask(tok, tag_set(data), max_len=32, head=head, dropout=0.0, train_examples=data, dev_examples=data)
    model = task.build_model(_encoder(tok.vocab_size))
    first, last = _overfit(task, model, steps=80)
    assert last < 0.1 < first
    metrics = task.evaluate(model, device=torch.device("cpu"))
    assert metrics["f1"] == 1.0
    (prediction,) = task.predict(model, [{"text": "Hello 北京是xyz首都"}], device=torch.device("cpu"))
    found = [(e["type"], e["text"], e["start"], e["end"]) for e in prediction["entities"]]
    assert found == [("LOC", "北京", 6, 8), ("LOC", "首都", 12, 14)]


@pytest.mark.parametrize("kind", ["fgm", "pgd"])
def test_adversarial_step_adds_the_gradient_at_the_perturbed_embeddings(tok: LMTokenizer, kind: str) -> None:
    examples = [{"text": "很好", "label": "pos"}, {"text": "差", "label": "neg"}]
    task = ClassificationTask(tok, ["neg", "pos"], dropout=0.0, train_examples=examples)
    model = task.build_model(_encoder(tok.vocab_size))
    batch = task.collate(task.train_items)
    weight = model.encoder.embed.word.weight
    task.loss(model, batch).loss_sum.backward()
    clean = {n: p.grad.clone() for n, p in model.named_parameters()}
    original = weight.detach().clone()
    # by hand: one step of 0.5 along the normalised gradient (PGD with one step of alpha=0.5 inside epsilon=1)
    with torch.no_grad():
        weight += 0.5 * clean["encoder.embed.word.weight"] / clean["encoder.embed.word.weight"].norm()
    model.zero_grad()
    task.loss(model, batch).loss_sum.backward()
    expected = {n: clean[n] + p.grad for n, p in model.named_parameters()}
    with torch.no_grad():
        weight.copy_(original)
    for n, p in model.named_parameters():
        p.grad = clean[n].clone()
    if kind == "fgm":
        attack = EmbeddingAttack(model, kind="fgm", epsilon=0.5, alpha=0.0, steps=0)
    else:
        attack = EmbeddingAttack(model, kind="pgd", epsilon=1.0, alpha=0.5, steps=1)
    attack.backward(lambda: task.loss(model, batch).loss_sum)
    assert torch.equal(weight, original)  # embeddings restored exactly
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[n], rtol=1e-4, atol=1e-6)


def test_pgd_keeps_its_perturbation_inside_the_epsilon_ball(tok: LMTokenizer) -> None:
    examples = [{"text": "很好", "label": "pos"}, {"text": "差", "label": "neg"}]
    task = ClassificationTask(tok, ["neg", "pos"], dropout=0.0, train_examples=examples)
    model = task.build_model(_encoder(tok.vocab_size))
    batch = task.collate(task.train_items)
    task.loss(model, batch).loss_sum.backward()
    original = model.encoder.embed.word.weight.detach().clone()
    seen = []

    def loss():
        seen.append(float((model.encoder.embed.word.weight.detach() - original).norm()))
        return task.loss(model, batch).loss_sum

    EmbeddingAttack(model, kind="pgd", epsilon=0.3, alpha=0.2, steps=4).backward(loss)
    assert len(seen) == 4 and seen[0] == pytest.approx(0.2, rel=1e-4)
    assert all(s <= 0.3 + 1e-5 for s in seen) and seen[-1] == pytest.approx(0.3, rel=1e-3)


def test_length_grouped_batches_are_deterministic_complete_and_pad_less() -> None:
    rng = np.random.default_rng(0)
    lengths = rng.lognormal(3.5, 0.8, size=1000).astype(int) + 1
    grouped = GlobalBatches(1000, 20, seed=3, lengths=lengths)
    plain = GlobalBatches(1000, 20, seed=3)
    epoch = np.concatenate([grouped.at(s) for s in range(50)])
    assert sorted(epoch.tolist()) == list(range(1000))  # every item once per epoch
    # items that do not fill the last batch: it overlaps its neighbour, and the next epochs stay aligned
    odd = GlobalBatches(1010, 20, seed=3, lengths=np.concatenate([lengths, lengths[:10]]))
    for e in range(3):
        epoch = np.concatenate([odd.at(s) for s in range(51 * e, 51 * (e + 1))])
        assert set(epoch.tolist()) == set(range(1010)) and len(epoch) == 1020
        spread = [np.ptp(odd.lengths[odd.at(s)]) for s in range(51 * e, 51 * (e + 1))]
        assert np.median(spread) < 5  # batches drawn from one sorted run of lengths
    again = GlobalBatches(1000, 20, seed=3, lengths=lengths)
    assert all(np.array_equal(grouped.at(s), again.at(s)) for s in (0, 17, 49, 50, 123))

    def padding(batches: GlobalBatches) -> float:
        waste = [lengths[b].max() * len(b) - lengths[b].sum() for b in (batches.at(s) for s in range(50))]
        return float(np.sum(waste)) / lengths.sum()

    assert padding(grouped) < 0.3 * padding(plain)
    # batch order is still shuffled: the first batches are not simply the longest items
    firsts = [int(lengths[grouped.at(s)].max()) for s in range(5)]
    assert firsts != sorted(firsts, reverse=True) or len(set(firsts)) == 1
