"""Heads: pooling, and the CRF against brute-force enumeration of every tag sequence."""

from __future__ import annotations

import itertools

import pytest
import torch

from lmforge.models.heads import CRF, SequenceClassifier, TokenClassifier, bio_transitions


def test_mean_pooling_ignores_padding() -> None:
    head = SequenceClassifier(4, 3, dropout=0.0, pooling="mean").eval()
    hidden = torch.randn(1, 5, 4)
    padded = torch.cat([hidden[:, :3], torch.randn(1, 2, 4) * 100], dim=1)
    mask = torch.tensor([[1, 1, 1, 0, 0]])
    torch.testing.assert_close(head(padded, mask), head(hidden[:, :3]))
    assert SequenceClassifier(4, 3, dropout=0.0)(hidden).shape == (1, 3)
    assert TokenClassifier(4, 7)(hidden).shape == (1, 5, 7)


def _path_score(crf: CRF, emissions: torch.Tensor, path: tuple[int, ...]) -> torch.Tensor:
    trans, start = crf._scores()
    score = start[path[0]] + emissions[0, path[0]]
    for t in range(1, len(path)):
        score = score + trans[path[t - 1], path[t]] + emissions[t, path[t]]
    return score + crf.end[path[-1]]


@pytest.fixture
def crf() -> CRF:
    crf = CRF(3)
    with torch.no_grad():
        for p in crf.parameters():
            p.normal_()
    return crf


def test_log_likelihood_matches_enumeration(crf: CRF) -> None:
    emissions = torch.randn(2, 4, 3)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    tags = torch.tensor([[0, 2, 1, 1], [2, 0, -100, -100]])
    got = crf.log_likelihood(emissions, tags, mask)
    for b, length in enumerate((4, 2)):
        scores = torch.stack([_path_score(crf, emissions[b], p) for p in itertools.product(range(3), repeat=length)])
        expected = _path_score(crf, emissions[b], tuple(tags[b, :length].tolist())) - torch.logsumexp(scores, 0)
        torch.testing.assert_close(got[b], expected)


def test_viterbi_matches_enumeration(crf: CRF) -> None:
    emissions = torch.randn(3, 5, 3)
    mask = torch.tensor([[1] * 5, [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])
    paths = crf.decode(emissions, mask)
    for b, length in enumerate((5, 3, 1)):
        with torch.no_grad():
            best = max(itertools.product(range(3), repeat=length), key=lambda p: _path_score(crf, emissions[b], p))
        assert paths[b] == list(best)


def test_marginals_match_enumeration(crf: CRF) -> None:
    emissions = torch.randn(3, 5, 3)
    mask = torch.tensor([[1] * 5, [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])
    got = crf.marginals(emissions, mask)
    for b, length in enumerate((5, 3, 1)):
        paths = list(itertools.product(range(3), repeat=length))
        with torch.no_grad():
            p = torch.softmax(torch.stack([_path_score(crf, emissions[b], q) for q in paths]), 0)
        expected = torch.zeros(5, 3)
        for prob, path in zip(p, paths, strict=True):
            for t, tag in enumerate(path):
                expected[t, tag] += prob
        torch.testing.assert_close(got[b], expected)  # padded steps: 0


def test_log_marginals_at_a_temperature_are_the_softened_crfs_and_differentiable(crf: CRF) -> None:
    emissions = torch.randn(1, 4, 3, requires_grad=True)
    mask = torch.ones(1, 4, dtype=torch.long)
    got = crf.log_marginals(emissions, mask, temperature=2.0)
    paths = list(itertools.product(range(3), repeat=4))
    with torch.no_grad():
        p = torch.softmax(torch.stack([_path_score(crf, emissions[0], q) for q in paths]) / 2.0, 0)
    expected = torch.zeros(4, 3)
    for prob, path in zip(p, paths, strict=True):
        for t, tag in enumerate(path):
            expected[t, tag] += prob
    torch.testing.assert_close(got[0].exp(), expected)
    got[0, 1, 2].backward()  # a student's soft loss trains its emissions and transitions through it
    assert emissions.grad.abs().sum() > 0 and crf.transitions.grad.abs().sum() > 0


def test_training_the_crf_raises_the_likelihood_of_the_gold_tags(crf: CRF) -> None:
    emissions = torch.randn(4, 6, 3)
    tags = torch.randint(0, 3, (4, 6))
    mask = torch.ones(4, 6, dtype=torch.bool)
    opt = torch.optim.Adam(crf.parameters(), lr=0.1)
    first = None
    for _ in range(50):
        loss = -crf.log_likelihood(emissions, tags, mask).mean()
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first


def test_bio_constraints_forbid_invalid_paths() -> None:
    labels = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
    allowed, start = bio_transitions(labels)
    assert not start[2] and start[1] and start[0]
    assert allowed[1, 2] and allowed[2, 2] and not allowed[0, 2] and not allowed[3, 2] and not allowed[4, 2]
    crf = CRF(len(labels), allowed=allowed, allowed_start=start)
    emissions = torch.zeros(1, 4, 5)
    emissions[0, :, 2] = 5.0  # I-PER everywhere is tempting but invalid at the start
    path = crf.decode(emissions, torch.ones(1, 4, dtype=torch.bool))[0]
    assert path[0] != 2
    assert all(allowed[a, b] for a, b in itertools.pairwise(path))


def test_crf_refuses_left_padding() -> None:
    with pytest.raises(ValueError, match="left-aligned"):
        CRF(2).decode(torch.zeros(1, 3, 2), torch.tensor([[0, 1, 1]]))
