"""Parity with Hugging Face transformers on the same weights (tiny random configs, no downloads)."""

from __future__ import annotations

import pytest
import torch
import transformers

from lmforge.models.convert import from_hf, to_hf
from lmforge.models.registry import build_model

VOCAB = 97


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, VOCAB, (3, 12))
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, 9:] = 0  # right padding
    mask[2, 5:] = 0
    return ids, mask


def _import(hf_model: torch.nn.Module):
    hf_model.eval()
    cfg, state = from_hf(hf_model.config.to_dict(), hf_model.state_dict())
    model = build_model(cfg)
    model.load_state_dict(state)
    return model.eval()


def test_bert_mlm_logits_match_transformers() -> None:
    hf_cfg = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64
    )
    hf = transformers.BertForMaskedLM(hf_cfg)
    model = _import(hf)
    ids, mask = _batch()
    types = torch.zeros_like(ids)
    types[:, 6:] = 1
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
        out = model.mlm_logits(model(ids, attention_mask=mask, token_type_ids=types))
    valid = mask.bool()
    torch.testing.assert_close(out[valid], ref[valid], atol=1e-4, rtol=1e-4)


def test_bert_hidden_states_and_pooler_match_transformers() -> None:
    hf_cfg = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=48, num_hidden_layers=3, num_attention_heads=6, intermediate_size=96
    )
    hf = transformers.BertModel(hf_cfg).eval()
    model = _import(hf)
    ids, mask = _batch()
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask)
        hidden = model(ids, attention_mask=mask)
    valid = mask.bool()
    torch.testing.assert_close(hidden[valid], ref.last_hidden_state[valid], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(model.pool(hidden), ref.pooler_output, atol=1e-4, rtol=1e-4)


CAUSAL = {
    "gpt2": lambda: transformers.GPT2LMHeadModel(
        transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    ),
    "llama": lambda: transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=64,
            rope_theta=500000.0,
        )
    ),
    "qwen2": lambda: transformers.Qwen2ForCausalLM(
        transformers.Qwen2Config(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=1,
            intermediate_size=64,
            tie_word_embeddings=True,
        )
    ),
}


@pytest.mark.parametrize("family", sorted(CAUSAL))
def test_causal_lm_logits_match_transformers(family: str) -> None:
    hf = CAUSAL[family]()
    model = _import(hf)
    ids, mask = _batch()
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).logits
        out = model(ids, attention_mask=mask)
    valid = mask.bool()
    torch.testing.assert_close(out[valid], ref[valid], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", sorted(CAUSAL))
def test_state_dict_round_trip_through_hf_names(family: str) -> None:
    hf = CAUSAL[family]()
    model = _import(hf)
    hf_cfg, hf_state = to_hf(model.cfg, model.state_dict(), token_ids={})
    assert hf_cfg["model_type"] == family
    reference = hf.state_dict()
    for name, tensor in hf_state.items():
        torch.testing.assert_close(tensor, reference[name], rtol=0, atol=0)
    tied = model.cfg.tie_embeddings
    assert set(reference) - set(hf_state) == ({"lm_head.weight"} if tied else set())
