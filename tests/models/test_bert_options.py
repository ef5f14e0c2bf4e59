"""The budget-pretraining options of BertConfig: pre-LN, GEGLU, no biases, hashed bigram embeddings.

Each against a reference: pre-LN against transformers' RobertaPreLayerNorm (import and `lmforge export`),
GEGLU and the bigram hash against hand-computed cases, no-bias against the same model with zero biases.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers

from lmforge.cli import main
from lmforge.data.tokenizer import load_tokenizer
from lmforge.errors import UserError
from lmforge.models.bert import BertConfig
from lmforge.models.convert import from_hf, to_hf
from lmforge.models.layers import Embeddings, FeedForward, bigram_ids
from lmforge.models.registry import build_model, load_model, save_model
from lmforge.models.specs import ModelSpec

VOCAB = 97
SMALL = BertConfig(vocab_size=VOCAB, max_seq_len=16, n_layers=2, n_heads=4, d_model=32, d_ff=64, dropout=0.0)


def _padded_batch(pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(4, VOCAB, (3, 12))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    mask[2, 5:] = 0
    return ids.masked_fill(mask == 0, pad), mask


def _perturb_norms(model: torch.nn.Module) -> None:
    """Move every LayerNorm off (1, 0) so a swapped or skipped norm cannot go unnoticed."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.2)


def test_pre_ln_bert_matches_roberta_prelayernorm_of_transformers() -> None:
    hf_cfg = transformers.RobertaPreLayerNormConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=20,
        pad_token_id=1,
    )
    hf = transformers.RobertaPreLayerNormForMaskedLM(hf_cfg).eval()
    _perturb_norms(hf)
    cfg, state = from_hf(hf.config.to_dict(), hf.state_dict())
    assert cfg.pre_norm and cfg.max_seq_len == 20 - 2  # positions start after pad_token_id
    ours = build_model(cfg).eval()
    ours.load_state_dict(state)
    ids, mask = _padded_batch(pad=1)
    with torch.no_grad():
        ref_hidden = hf.roberta_prelayernorm(input_ids=ids, attention_mask=mask).last_hidden_state
        ref_logits = hf(input_ids=ids, attention_mask=mask).logits
        hidden = ours(ids, attention_mask=mask)
        logits = ours.mlm_logits(hidden)
    valid = mask.bool()
    torch.testing.assert_close(hidden[valid], ref_hidden[valid], atol=1e-5, rtol=1e-5)  # after the final LayerNorm
    torch.testing.assert_close(logits[valid], ref_logits[valid], atol=1e-4, rtol=1e-4)


def test_pre_ln_layer_is_the_pre_ln_formula() -> None:
    """x + attn(LN1(x)), then + ffn(LN2(.)), and the final LayerNorm on top: computed by hand."""
    cfg = dataclasses.replace(SMALL, n_layers=1, pre_norm=True, pooler=False, mlm_head=False)
    model = build_model(cfg).eval()
    _perturb_norms(model)
    ids = torch.randint(0, VOCAB, (2, 7))
    layer = model.layers[0]
    with torch.no_grad():
        x = model.embed(ids, torch.arange(7).expand(2, 7))
        h = x + layer.attn(layer.attn_norm(x))
        h = h + layer.ffn.down(F.gelu(layer.ffn.up(layer.ffn_norm(h))))
        expected = model.final_norm(h)
        torch.testing.assert_close(model(ids), expected, atol=1e-6, rtol=1e-6)


def test_geglu_is_gelu_of_the_gate_times_the_linear_branch() -> None:
    ffn = FeedForward(8, 16, activation="gelu", gated=True, bias=False)
    x = torch.randn(5, 8)
    wg, wu, wd = ffn.gate.weight, ffn.up.weight, ffn.down.weight
    expected = (F.gelu(x @ wg.T) * (x @ wu.T)) @ wd.T  # Shazeer 2020, eq. (6) with the output projection
    torch.testing.assert_close(ffn(x), expected)
    assert sum(p.numel() for p in ffn.parameters()) == 3 * 8 * 16


def test_no_bias_bert_has_no_projection_biases_and_equals_zero_biases() -> None:
    without = build_model(dataclasses.replace(SMALL, bias=False)).eval()
    names = {n for n, _ in without.named_parameters()}
    assert not any(n.endswith(("qkv.bias", "attn.out.bias", "ffn.up.bias", "ffn.down.bias")) for n in names)
    assert "layers.0.attn_norm.bias" in names  # LayerNorms keep theirs
    with_bias = build_model(SMALL).eval()
    state = with_bias.state_dict()
    state.update(without.state_dict())
    for name in state:
        if name not in without.state_dict():
            state[name] = torch.zeros_like(state[name])
    with_bias.load_state_dict(state)
    ids, mask = _padded_batch()
    with torch.no_grad():
        torch.testing.assert_close(without(ids, attention_mask=mask), with_bias(ids, attention_mask=mask))


def test_bigram_ids_hash_previous_and_current_token() -> None:
    ids = torch.tensor([[5, 7, 5, 7]])
    # ((previous + 1) * 1_000_003 + token) % 10, with previous = -1 at the first position
    assert bigram_ids(ids, 10).tolist() == [[5, (6 * 1_000_003 + 7) % 10, (8 * 1_000_003 + 5) % 10, 5]]
    ids = torch.randint(0, 21128, (4, 50))
    exact = bigram_ids(ids, 1 << 62)  # no reduction: one-to-one on (previous, token)
    pairs = {}
    for row_ids, row_buckets in zip(ids.tolist(), exact.tolist(), strict=True):
        for t, bucket in enumerate(row_buckets):
            pair = (row_ids[t - 1] if t else -1, row_ids[t])
            assert pairs.setdefault(bucket, pair) == pair


def test_bigram_embedding_sees_exactly_the_previous_token() -> None:
    embed = Embeddings(VOCAB, 16, bigram_buckets=101).eval()
    ids = torch.randint(0, VOCAB, (1, 6))
    base = embed(ids)
    changed_prev = ids.clone()
    changed_prev[0, 2] = (ids[0, 2] + 1) % VOCAB
    out = embed(changed_prev)
    assert not torch.allclose(out[0, 3], base[0, 3])  # position 3 pairs with the changed token
    torch.testing.assert_close(out[0, 4:], base[0, 4:])  # later positions do not see it
    torch.testing.assert_close(out[0, :2], base[0, :2])


def test_every_option_together_trains_a_masked_lm(mlm_shards: Path, review_wordpiece: Path) -> None:
    from lmforge.tasks.mlm import MLMTask

    task = MLMTask(shards=str(mlm_shards), tokenizer=load_tokenizer(review_wordpiece), seq_len=32, mask_prob=0.3)
    spec = ModelSpec(d_model=64, d_ff=128, dropout=0.0, pre_norm=True, gated_ffn=True, bias=False, bigram_buckets=512)
    model = build_model(spec.build(task.vocab_size))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    batch = task.collate([task.train_items[i] for i in range(16)], generator=generator)
    losses = []
    for _ in range(40):  # over-fit one batch: every new parameter is wired into the loss
        out = task.loss(model, batch)
        loss = out.loss_sum / batch["n_targets"]
        optimizer.zero_grad()
        loss.backward()
        assert model.embed.bigram.weight.grad.abs().sum() > 0 and model.final_norm.weight.grad.abs().sum() > 0
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_pre_ln_export_reloads_in_transformers(tmp_path: Path, wordpiece_dir: Path) -> None:
    tok = load_tokenizer(wordpiece_dir)
    cfg = ModelSpec(pre_norm=True, bias=False, max_seq_len=64).build(tok.vocab_size)
    model = build_model(cfg)
    _perturb_norms(model)
    run = tmp_path / "run"
    save_model(model, run)
    for f in wordpiece_dir.iterdir():
        shutil.copyfile(f, run / f.name)
    out = tmp_path / "hf"
    assert main(["export", str(run), "--to", "hf", "--out", str(out)]) == 0
    hf = transformers.AutoModelForMaskedLM.from_pretrained(out).eval()
    assert type(hf).__name__ == "RobertaPreLayerNormForMaskedLM"
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    batch = hf_tok(["我爱北京天安门", "Hello World! 价格：１２８元", "自然语言处理"], padding=True, return_tensors="pt")
    ours = load_model(run).eval()
    assert ours.cfg.pre_norm and not ours.cfg.bias
    with torch.no_grad():
        ref = hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logits = ours.mlm_logits(ours(batch["input_ids"], attention_mask=batch["attention_mask"]))
    valid = batch["attention_mask"].bool()
    torch.testing.assert_close(logits[valid], ref[valid], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    ("change", "message"), [({"gated_ffn": True}, "model.gated_ffn"), ({"bigram_buckets": 8}, "model.bigram_buckets")]
)
def test_export_names_the_option_it_cannot_write(change: dict, message: str) -> None:
    cfg = dataclasses.replace(SMALL, pre_norm=True, **change)
    with pytest.raises(UserError, match=message):
        to_hf(cfg, build_model(cfg).state_dict(), token_ids={"pad": 0})


def test_bert_options_are_refused_for_gpt_sizes() -> None:
    with pytest.raises(UserError, match="model.pre_norm applies to BERT sizes only"):
        ModelSpec(size="gpt-tiny", pre_norm=True).build(100)
    with pytest.raises(UserError, match="bigram_buckets"):
        BertConfig(bigram_buckets=-1)
