"""Model behaviour: shapes, causality, padding invariance, KV-cache decoding, named sizes."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lmforge.models.bert import Bert, BertConfig
from lmforge.models.gpt import GPT, GPTConfig
from lmforge.models.sizes import SIZES, model_size

VOCAB = 101
GPT_FLAVOURS = {
    "gpt2": model_size("gpt-tiny", vocab_size=VOCAB),
    "llama": model_size("llama-tiny", vocab_size=VOCAB),
    "qwen2": model_size("qwen2-tiny", vocab_size=VOCAB),
}


def _small(cfg: GPTConfig) -> GPT:
    cfg = dataclasses.replace(cfg, n_layers=2, d_model=64, d_ff=128, n_heads=4, n_kv_heads=cfg.n_kv_heads and 2)
    return GPT(cfg).eval()


def test_bert_shapes() -> None:
    model = Bert(BertConfig(vocab_size=VOCAB, n_layers=2, n_heads=2, d_model=32, d_ff=64)).eval()
    ids = torch.randint(0, VOCAB, (2, 7))
    hidden = model(ids)
    assert hidden.shape == (2, 7, 32)
    assert model.pool(hidden).shape == (2, 32)
    assert model.mlm_logits(hidden[:, [1, 3]]).shape == (2, 2, VOCAB)


def test_bert_padding_invariance() -> None:
    model = Bert(BertConfig(vocab_size=VOCAB, n_layers=2, n_heads=2, d_model=32, d_ff=64)).eval()
    ids = torch.randint(1, VOCAB, (1, 6))
    padded = torch.cat([ids, torch.zeros(1, 4, dtype=torch.long)], dim=1)
    mask = torch.tensor([[1] * 6 + [0] * 4])
    with torch.no_grad():
        alone = model(ids)
        batched = model(padded, attention_mask=mask)
    torch.testing.assert_close(batched[:, :6], alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("flavour", sorted(GPT_FLAVOURS))
def test_gpt_is_causal(flavour: str) -> None:
    model = _small(GPT_FLAVOURS[flavour])
    ids = torch.randint(0, VOCAB, (2, 10))
    changed = ids.clone()
    changed[:, 6] = (changed[:, 6] + 1) % VOCAB
    with torch.no_grad():
        a, b = model(ids), model(changed)
    torch.testing.assert_close(a[:, :6], b[:, :6], atol=0, rtol=0)
    assert not torch.allclose(a[:, 6:], b[:, 6:])


@pytest.mark.parametrize("flavour", sorted(GPT_FLAVOURS))
def test_gpt_left_padding_invariance(flavour: str) -> None:
    model = _small(GPT_FLAVOURS[flavour])
    ids = torch.randint(1, VOCAB, (1, 7))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], dim=1)
    mask = torch.tensor([[0, 0, 0] + [1] * 7])
    with torch.no_grad():
        alone = model(ids)
        batched = model(padded, attention_mask=mask)
    torch.testing.assert_close(batched[:, 3:], alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("flavour", sorted(GPT_FLAVOURS))
def test_kv_cache_decoding_equals_full_forward(flavour: str) -> None:
    model = _small(GPT_FLAVOURS[flavour])
    ids = torch.randint(1, VOCAB, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :3] = 0  # left-padded prompt in the second row
    with torch.no_grad():
        full = model(ids, attention_mask=mask)
        cache = model.new_cache(2, 16)
        steps = [model(ids[:, :5], attention_mask=mask[:, :5], cache=cache)]  # prefill
        steps.append(model(ids[:, 5:8], attention_mask=mask[:, :8], cache=cache))  # a chunk
        for t in range(8, 12):  # one token at a time
            steps.append(model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], cache=cache))
    incremental = torch.cat(steps, dim=1)
    valid = mask.bool()
    torch.testing.assert_close(incremental[valid], full[valid], atol=1e-5, rtol=1e-5)
    assert cache.length == 12


def test_kv_cache_overflow_names_the_limit() -> None:
    model = _small(GPT_FLAVOURS["llama"])
    cache = model.new_cache(1, 4)
    with pytest.raises(ValueError, match="holds 4 positions"):
        model(torch.randint(0, VOCAB, (1, 5)), cache=cache)


def test_learned_positions_past_max_seq_len_fail_clearly() -> None:
    model = GPT(dataclasses.replace(GPT_FLAVOURS["gpt2"], max_seq_len=8, n_layers=1))
    with pytest.raises(ValueError, match="max_seq_len=8"):
        model(torch.randint(0, VOCAB, (1, 9)))


@pytest.mark.parametrize("name", sorted(SIZES))
def test_named_sizes_build(name: str) -> None:
    cfg = model_size(name, vocab_size=VOCAB)
    assert cfg.vocab_size == VOCAB
    with torch.device("meta"):  # shapes only: bert-base and gpt2-small need no real memory here
        model = Bert(cfg) if isinstance(cfg, BertConfig) else GPT(cfg)
    assert sum(p.numel() for p in model.parameters()) > 0


def test_bert_tiny_is_tiny() -> None:
    cfg = model_size("bert-tiny")
    assert 128 <= cfg.d_model <= 256 and 2 <= cfg.n_layers <= 4


def test_unknown_size_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match="bert-tiny"):
        model_size("bert-huge")


@pytest.mark.parametrize(
    ("change", "message"),
    [({"d_model": 30, "n_heads": 4}, "divisible"), ({"n_layers": 0}, "n_layers"), ({"dropout": 1.5}, "dropout")],
)
def test_bad_config_values_name_the_key(change: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        BertConfig(**change)


def test_bert_selected_rows_equal_the_full_forward() -> None:
    model = Bert(BertConfig(vocab_size=VOCAB, n_layers=3, n_heads=2, d_model=32, d_ff=64)).eval()
    ids = torch.randint(1, VOCAB, (3, 9))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[2, 6:] = 0
    select = torch.tensor([1, 4, 5, 10, 20, 21, 22])  # row 0: three, row 1: one, row 2: three
    with torch.no_grad():
        full = model(ids, attention_mask=mask).reshape(-1, 32)[select]
        sparse = model(ids, attention_mask=mask, select=select)
    torch.testing.assert_close(sparse, full, atol=1e-5, rtol=1e-5)
