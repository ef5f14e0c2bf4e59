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
    "gemma3_text": lambda: transformers.Gemma3ForCausalLM(
        transformers.Gemma3TextConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=7,  # local layers 1-5 and 7, global layer 6
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=16,  # not hidden_size / heads
            intermediate_size=64,
            sliding_window=4,  # shorter than the test's sequences
            query_pre_attn_scalar=24,
            rope_parameters={
                "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
            },
            max_position_embeddings=128,
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


def _assert_same_logits(model: torch.nn.Module, hf: torch.nn.Module) -> None:
    """lmforge's and transformers' logits at the real tokens of a padded batch, to 1e-4."""
    ids, mask = _batch()
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).logits
        out = model(ids, attention_mask=mask)
    valid = mask.bool()
    torch.testing.assert_close(out[valid], ref[valid], atol=1e-4, rtol=1e-4)


def _perturb_norms(model: torch.nn.Module) -> torch.nn.Module:
    """Norm weights moved away from their initial 1 (or Gemma's 0), so that each one is checked."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                p.add_(0.3 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("family", sorted(CAUSAL))
def test_causal_lm_logits_match_transformers(family: str) -> None:
    torch.manual_seed(0)
    hf = _perturb_norms(CAUSAL[family]())
    model = _import(hf)
    _assert_same_logits(model, hf)


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


def test_gemma3_decodes_with_the_kv_cache_past_the_window_as_transformers_does() -> None:
    """Sliding-window layers with a KV cache: a prompt then one token at a time, 20 tokens past a window of 4,
    give the logits of the whole sequence at once, and the greedy tokens of transformers' generate."""
    torch.manual_seed(0)
    hf = _perturb_norms(CAUSAL["gemma3_text"]())
    model = _import(hf)
    prompt = torch.randint(0, VOCAB, (1, 6))
    with torch.no_grad():
        expected = hf.generate(prompt, max_new_tokens=20, min_new_tokens=20, do_sample=False)[0, 6:].tolist()
        cache = model.new_cache(1, 64)
        logits = model(prompt, cache=cache)[:, -1]
        tokens = []
        for _ in range(20):
            tokens.append(int(logits.argmax()))
            logits = model(torch.tensor([[tokens[-1]]]), cache=cache)[:, -1]
        whole = model(torch.cat((prompt, torch.tensor([tokens])), dim=1))
    assert tokens == expected
    torch.testing.assert_close(logits[0], whole[0, -1], atol=1e-4, rtol=1e-4)


def test_gemma3_sliding_layers_cache_only_the_window() -> None:
    """The local layers' cache holds ``window`` positions whatever the length, and decoding with it (a left-padded
    batch, a prompt, a chunk longer than the window, then single tokens) gives the logits of the whole padded
    sequences at once; beam reordering moves the local buffers with the global ones."""
    torch.manual_seed(0)
    model = _import(_perturb_norms(CAUSAL["gemma3_text"]()))
    window, n_local = model.cfg.sliding_window, sum(model.cfg.is_local(i) for i in range(model.cfg.n_layers))
    ids = torch.randint(0, VOCAB, (2, 22))
    mask = torch.ones(2, 22, dtype=torch.long)
    mask[1, :3] = 0  # the second row is left-padded
    with torch.no_grad():
        whole = model(ids, attention_mask=mask)
        cache = model.new_cache(2, 64)
        assert cache.local_keys.shape == (n_local, 2, model.cfg.kv_heads, window, model.cfg.dim_per_head)
        assert cache.keys.shape[0] == model.cfg.n_layers - n_local
        pieces, at = [], 0
        for size in (6, 7, 1, 1, 1, 6):
            pieces.append(model(ids[:, at : at + size], attention_mask=mask[:, : at + size], cache=cache))
            at += size
        real = mask.bool()  # a padding position's output is never read
        torch.testing.assert_close(torch.cat(pieces, dim=1)[real], whole[real], atol=1e-4, rtol=1e-4)
        before = cache.local_keys.clone()
        cache.reorder(torch.tensor([1, 1]))
        torch.testing.assert_close(cache.local_keys[:, 0], before[:, 1], rtol=0, atol=0)


def test_gemma3_exports_to_a_config_and_weights_transformers_runs() -> None:
    """lmforge's Gemma 3 written as a Hugging Face config and state dict: transformers builds the model from them
    and computes the same logits (export and import both ways)."""
    torch.manual_seed(1)
    model = _perturb_norms(_import(CAUSAL["gemma3_text"]()))
    hf_cfg, hf_state = to_hf(model.cfg, model.state_dict(), token_ids={"pad": 0, "bos": 1, "eos": 2})
    config = transformers.Gemma3TextConfig(**{k: v for k, v in hf_cfg.items() if k != "architectures"})
    hf = transformers.Gemma3ForCausalLM(config).eval()
    hf.load_state_dict(hf_state, strict=False)
    _assert_same_logits(model, hf)
    again = _import(hf)
    assert again.cfg == model.cfg
