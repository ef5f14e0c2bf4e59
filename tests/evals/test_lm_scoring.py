"""Log-likelihood scoring (evals/scoring.py) against a plain forward pass of each request alone, the harness's
context / continuation split, and the sliding window that never scores a token twice or skips one."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lmforge.evals.scoring import encode_pair, pieces, score
from lmforge.rundir import load_run


def _alone(model, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    """The summed log-probability of ``continuation`` after ``context``, one unpadded forward pass."""
    ids = torch.tensor([context + continuation])
    with torch.inference_mode():
        logprobs = model(ids[:, :-1]).log_softmax(-1)[0]
    targets = ids[0, len(context) :]
    rows = logprobs[len(context) - 1 :]
    return rows.gather(-1, targets[:, None]).sum().item(), bool((rows.argmax(-1) == targets).all())


@pytest.fixture(scope="module")
def run(chat_gpt: Path):
    return load_run(chat_gpt)


def test_batched_scores_equal_each_request_scored_alone(run) -> None:
    tok = run.task.tokenizer
    texts = [("这家酒店", "很好"), ("房间", "有点小，但是干净"), ("早餐", "一般"), ("", "服务员的态度很热情")]
    requests = [encode_pair(tok, c, x) for c, x in texts]
    scored = score(run.model, requests, window=64, batch_size=3)
    for (context, continuation), result in zip(requests, scored, strict=True):
        logprob, greedy = _alone(run.model, context, continuation)
        assert result.logprob == pytest.approx(logprob, abs=1e-4)
        assert result.greedy == greedy and result.tokens == len(continuation) and result.cut == 0


def test_the_first_token_of_a_document_is_scored_after_a_start_token(run) -> None:
    tok = run.task.tokenizer
    context, continuation = encode_pair(tok, "", "价格实惠")
    assert context == [tok.token_id("bos") or tok.token_id("eos")]
    assert tok.decode(continuation) == "价格实惠"


def test_trailing_spaces_of_the_context_move_to_the_continuation(run) -> None:
    tok = run.task.tokenizer
    context, continuation = encode_pair(tok, "Answer: ", "B")
    assert context == tok.encode("Answer:", special_tokens=False)
    assert continuation == tok.encode("Answer: B", special_tokens=False)[len(context) :]


@pytest.mark.parametrize(
    ("context", "length", "window", "stride"),
    [(1, 10, 4, 4), (1, 10, 4, 2), (3, 30, 8, 3), (20, 25, 8, 8), (20, 40, 6, 1), (5, 5 + 6, 6, 2), (9, 10, 4, 4)],
)
def test_pieces_score_every_target_once_within_the_window(context: int, length: int, window: int, stride: int) -> None:
    tokens = list(range(100, 100 + length))
    split, cut = pieces(context, tokens, window, stride)
    scored = []
    for piece, targets in split:
        assert len(piece) - 1 <= window and 0 < targets <= len(piece) - 1
        start = tokens.index(piece[0])
        assert piece == tokens[start : start + len(piece)]
        scored.extend(piece[len(piece) - targets :])
    assert scored == tokens[context:]
    assert cut == tokens.index(split[0][0][0])


def test_a_long_text_slides_and_a_short_continuation_keeps_the_tokens_right_before_it(run) -> None:
    tok = run.task.tokenizer
    ids = tok.encode("这家酒店的位置很好，房间干净，早餐丰富，服务员热情，下次还会再来。" * 2, special_tokens=False)
    context, continuation = [tok.token_id("eos")], ids
    assert len(continuation) > 12
    (slid,) = score(run.model, [(context, continuation)], window=8, stride=8)
    expected, start = 0.0, 0
    full = context + continuation
    while start < len(continuation):  # disjoint windows: each scores up to 8 tokens after the one before them
        end = min(len(continuation), start + 8)
        low = max(0, end - 8)  # index into full: the window's inputs are full[low:end]
        piece = full[low : end + 1]
        logprob, _ = _alone(run.model, piece[: len(piece) - (end - start)], piece[len(piece) - (end - start) :])
        expected += logprob
        start = end
    assert slid.tokens == len(continuation) and slid.logprob == pytest.approx(expected, abs=1e-4)
    (cut,) = score(run.model, [(full[:-3], full[-3:])], window=8)
    assert cut.cut == len(full) - 1 - 8
    assert cut.logprob == pytest.approx(_alone(run.model, full[-9:-3], full[-3:])[0], abs=1e-4)
