"""Decoding: KV cache vs full forward, batching with left padding, greedy and beam search against
transformers on the same weights, sampling filters, penalties, stop conditions, streaming of split
UTF-8 characters, and golden outputs of committed tiny checkpoints."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
import transformers

from lmforge.data.tokenizer import load_tokenizer
from lmforge.inference.generate import (
    NUCLEUS_CANDIDATES,
    GenerationConfig,
    Generator,
    _banned_ngram_tokens,
    _LogitsProcessor,
    _top_p,
)
from lmforge.models.bert import BertConfig
from lmforge.models.convert import to_hf
from lmforge.models.decoding import GPTSteps
from lmforge.models.gpt import GPT, GPTConfig
from lmforge.models.registry import load_model
from lmforge.models.seq2seq import Seq2Seq, Seq2SeqConfig

FIXTURES = Path(__file__).parents[1] / "fixtures"

EOS = 0


class IdsTokenizer:
    """Ids in, ids out: for models with random weights, where only the token ids matter."""

    kind, specials = "bpe", {}

    def token_id(self, role: str) -> int | None:
        return EOS if role == "eos" else None

    def decode(self, ids, *, skip_special_tokens: bool = True) -> str:
        return " ".join(map(str, ids))


def _gpt(**changes) -> GPT:
    cfg = GPTConfig(vocab_size=50, n_layers=2, n_heads=4, d_model=32, d_ff=64, max_seq_len=64)
    return GPT(GPTConfig(**{**cfg.__dict__, **changes})).eval()


def _seq2seq() -> Seq2Seq:
    enc = BertConfig(
        vocab_size=50, max_seq_len=32, n_layers=2, n_heads=2, d_model=32, d_ff=64, dropout=0.0, attn_dropout=0.0
    )
    return Seq2Seq(Seq2SeqConfig(encoder=enc, n_layers=2, n_heads=2, d_ff=64, max_seq_len=32, dropout=0.0)).eval()


def _naive_greedy_gpt(model: GPT, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    for _ in range(n):
        with torch.no_grad():
            token = int(model(torch.tensor([ids]))[0, -1].argmax())
        if token == EOS:
            break
        ids.append(token)
    return ids[len(prompt) :]


@pytest.mark.parametrize(
    "flavour", [{}, {"positions": "rope", "norm": "rmsnorm", "n_kv_heads": 2, "gated_ffn": True, "activation": "silu"}]
)
def test_kv_cache_decoding_equals_full_forward_and_left_padding_changes_nothing(flavour) -> None:
    model = _gpt(**flavour)
    gen = Generator(model, IdsTokenizer())
    prompts = [[5, 9, 3, 7, 11, 2], [4, 8], [13, 1, 6]]  # different lengths: left padding in the batch
    batched = gen.generate(prompts, GenerationConfig(max_new_tokens=12))
    for prompt, out in zip(prompts, batched, strict=True):
        assert out.token_ids == _naive_greedy_gpt(model, prompt, 12)
        assert gen.generate([prompt], GenerationConfig(max_new_tokens=12))[0].token_ids == out.token_ids


def test_seq2seq_cached_decoding_equals_full_forward() -> None:
    torch.manual_seed(3)
    model = _seq2seq()
    gen = Generator(model, IdsTokenizer())
    sources = [[7, 3, 9, 12, EOS], [4, 4, EOS], [8, 21, 30, 2, 17, 5, EOS]]
    outs = gen.generate(sources, GenerationConfig(max_new_tokens=10))
    for src, out in zip(sources, outs, strict=True):
        tgt = [gen.start_id]
        for _ in range(10):
            with torch.no_grad():
                token = int(model(torch.tensor([src]), torch.tensor([tgt]))[0, -1].argmax())
            if token == EOS:
                break
            tgt.append(token)
        assert out.token_ids == tgt[1:]
    # beam search over a batch of sources equals beam search over each alone (padding in the encoder)
    beams = gen.generate(sources, GenerationConfig(max_new_tokens=10, num_beams=3))
    for src, out in zip(sources, beams, strict=True):
        assert gen.generate([src], GenerationConfig(max_new_tokens=10, num_beams=3))[0].token_ids == out.token_ids


def test_beam_search_of_one_beam_is_greedy() -> None:
    gen = Generator(_gpt(), IdsTokenizer())
    prompts = [[5, 9, 3], [4, 8, 1, 2]]
    greedy = gen.generate(prompts, GenerationConfig(max_new_tokens=15))
    with torch.inference_mode():
        one_beam = gen._beam_search(prompts, GenerationConfig(max_new_tokens=15, num_beams=1))
    assert [hyps[0][1] for hyps in one_beam] == [g.token_ids for g in greedy]


def _hf_twin(model: GPT) -> transformers.GPT2LMHeadModel:
    cfg, state = to_hf(model.cfg, model.state_dict(), token_ids={"eos": EOS, "bos": EOS, "pad": EOS})
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**{k: v for k, v in cfg.items() if k != "architectures"}))
    hf.load_state_dict(state, strict=False)
    hf.tie_weights()
    return hf.eval()


def _hf_new_tokens(sequences: torch.Tensor, prompt_len: int) -> list[list[int]]:
    rows = sequences[:, prompt_len:].tolist()
    return [row[: row.index(EOS)] if EOS in row else row for row in rows]


@pytest.mark.parametrize(("early_stopping", "length_penalty"), [(True, 1.0), (False, 1.0), (False, 0.6)])
def test_greedy_and_beam_search_equal_transformers_generate(early_stopping, length_penalty) -> None:
    model = _gpt()
    gen, hf = Generator(model, IdsTokenizer()), _hf_twin(model)
    common = {"max_new_tokens": 12, "eos_token_id": EOS, "pad_token_id": EOS, "do_sample": False}
    for seed in range(6):
        prompt = torch.randint(1, 50, (1, 5), generator=torch.Generator().manual_seed(seed))
        ours = gen.generate(prompt.tolist(), GenerationConfig(max_new_tokens=12))
        with torch.no_grad():
            theirs = hf.generate(prompt, attention_mask=torch.ones_like(prompt), **common)
        assert [o.token_ids for o in ours] == _hf_new_tokens(theirs, 5)
        cfg = GenerationConfig(
            max_new_tokens=12,
            num_beams=3,
            num_return_sequences=3,
            early_stopping=early_stopping,
            length_penalty=length_penalty,
        )
        ours = gen.generate(prompt.tolist(), cfg)
        with torch.no_grad():
            theirs = hf.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                num_beams=3,
                num_return_sequences=3,
                early_stopping=early_stopping,
                length_penalty=length_penalty,
                output_scores=True,
                return_dict_in_generate=True,
                **common,
            )
        assert [o.token_ids for o in ours] == _hf_new_tokens(theirs.sequences, 5)
        assert [o.score for o in ours] == pytest.approx(theirs.sequences_scores.tolist(), abs=1e-4)


def test_sampling_is_seeded_and_top_k_one_is_greedy() -> None:
    gen = Generator(_gpt(), IdsTokenizer())
    prompts = [[5, 9, 3], [4, 8]]
    sample = GenerationConfig(max_new_tokens=10, do_sample=True, temperature=1.5, seed=7, num_return_sequences=2)
    assert [o.token_ids for o in gen.generate(prompts, sample)] == [o.token_ids for o in gen.generate(prompts, sample)]
    top1 = GenerationConfig(max_new_tokens=10, do_sample=True, top_k=1, seed=1)
    assert [o.token_ids for o in gen.generate(prompts, top1)] == [
        o.token_ids for o in gen.generate(prompts, GenerationConfig(max_new_tokens=10))
    ]


def test_a_vanishing_temperature_samples_the_greedy_tokens() -> None:
    """logits / 1e-300 overflowed to inf and NaN probabilities (a 500 from the server, found by Hypothesis)."""
    gen = Generator(_gpt(), IdsTokenizer())
    prompts = [[5, 9, 3], [4, 8]]
    greedy = [o.token_ids for o in gen.generate(prompts, GenerationConfig(max_new_tokens=10))]
    for temperature in (1e-300, 1e-40):
        cold = GenerationConfig(max_new_tokens=10, do_sample=True, temperature=temperature, seed=3)
        assert [o.token_ids for o in gen.generate(prompts, cold)] == greedy


@pytest.mark.parametrize("spread", [0.5, 8.0], ids=["flat", "peaked"])
@pytest.mark.parametrize("top_p", [0.5, 0.9, 0.99])
def test_top_p_among_the_candidates_keeps_what_the_full_sort_keeps(spread: float, top_p: float) -> None:
    """The nucleus is looked for among the most probable tokens first; a flat row (the nucleus beyond them) falls
    back to sorting the whole vocabulary: either way exactly the tokens of the full sort are kept."""
    torch.manual_seed(0)
    logits = torch.randn(3, 20_000) * spread
    logits[1] *= 40 if spread < 1 else 1  # a flat batch with one peaked row: only the flat rows are sorted whole
    ordered, order = logits.sort(dim=-1, descending=True)
    probs = ordered.softmax(-1)
    drop = probs.cumsum(-1) - probs >= top_p
    expected = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    kept = _top_p(logits, top_p)
    assert torch.equal(torch.isfinite(kept), torch.isfinite(expected))
    assert torch.equal(kept[torch.isfinite(kept)], logits[torch.isfinite(expected)])
    beyond = (torch.isfinite(expected).sum(-1) > NUCLEUS_CANDIDATES).tolist()
    assert beyond == ([True, False, True] if spread < 1 else [False, False, False])  # both paths are taken


def test_logits_processor_filters_and_penalties_by_hand() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, -3.0]])
    probs = logits.softmax(-1)[0]  # 0.61, 0.22, 0.14, 0.03, 0.004
    top_p = _LogitsProcessor(GenerationConfig(do_sample=True, top_p=0.8), [[]], 5, torch.device("cpu"))
    kept = torch.isfinite(top_p.scores(logits.clone()))[0].tolist()
    assert kept == [True, True, False, False, False]  # 0.61 < 0.8 <= 0.61 + 0.22
    assert float(probs[:2].sum()) >= 0.8
    top_k = _LogitsProcessor(GenerationConfig(do_sample=True, top_k=3, temperature=2.0), [[]], 5, torch.device("cpu"))
    out = top_k.scores(logits.clone())[0]
    assert out[:3].tolist() == [1.0, 0.5, 0.25] and torch.isinf(out[3:]).all()
    penalty = _LogitsProcessor(GenerationConfig(repetition_penalty=2.0), [[0, 3]], 5, torch.device("cpu"))
    assert penalty.scores(logits.clone())[0].tolist() == [1.0, 1.0, 0.5, -2.0, -3.0]
    assert _banned_ngram_tokens([1, 2, 3, 1, 2], 3) == [3]
    assert _banned_ngram_tokens([1, 2, 3, 4], 2) == []
    assert _banned_ngram_tokens([7, 7, 7], 2) == [7, 7]


def test_no_repeat_ngram_and_stop_conditions() -> None:
    gen = Generator(_gpt(), IdsTokenizer())
    out = gen.generate([[5, 9, 3]], GenerationConfig(max_new_tokens=30, no_repeat_ngram_size=2))[0]
    sequence = [5, 9, 3, *out.token_ids]
    bigrams = list(itertools.pairwise(sequence))
    assert len(bigrams) == len(set(bigrams))
    free = gen.generate([[5, 9, 3]], GenerationConfig(max_new_tokens=8))[0]
    assert free.finish_reason == "length" and len(free.token_ids) == 8
    stop_at = free.token_ids[3]
    stopped = gen.generate([[5, 9, 3]], GenerationConfig(max_new_tokens=8, stop_token_ids=[stop_at]))[0]
    assert stopped.finish_reason == "stop" and stopped.token_ids == free.token_ids[: free.token_ids.index(stop_at)]
    stop = f" {free.token_ids[2]} "
    text = gen.generate([[5, 9, 3]], GenerationConfig(max_new_tokens=8, stop_strings=[stop]))[0]
    assert free.text.find(stop) >= 0
    assert text.finish_reason == "stop" and text.text == free.text[: free.text.find(stop)]


def test_stream_holds_back_split_utf8_characters(bpe_dir, monkeypatch) -> None:
    """A byte-level model may emit a Chinese character as three one-byte tokens: the stream yields
    each character once it is complete, and the pieces join to the generated text."""
    from tokenizers import pre_tokenizers

    tok = load_tokenizer(bpe_dir)
    text = "你好，世界 ok"
    byte_chars = "".join(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False).pre_tokenize_str(text)[0][0])
    script = [tok.tokenizer.token_to_id(ch) for ch in byte_chars] + [tok.token_id("eos")]
    assert None not in script

    def one_hot(step: int) -> torch.Tensor:
        logits = torch.full((1, tok.vocab_size), -1e4)
        logits[0, script[min(step, len(script) - 1)]] = 0.0
        return logits

    calls = {"n": 0}

    def first(self):
        calls["n"] = 1
        return one_hot(0)

    def next_(self, tokens):
        calls["n"] += 1
        return one_hot(calls["n"] - 1)

    monkeypatch.setattr(GPTSteps, "first", first)
    monkeypatch.setattr(GPTSteps, "next", next_)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, n_layers=1, n_heads=2, d_model=16, d_ff=32, max_seq_len=64))
    gen = Generator(model.eval(), tok)
    pieces = list(gen.stream("x", GenerationConfig(max_new_tokens=40)))
    assert pieces[:5] == ["你", "好", "，", "世", "界"]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == text == gen.generate(["x"], GenerationConfig(max_new_tokens=40))[0].text
    stopped = list(gen.stream("x", GenerationConfig(max_new_tokens=40, stop_strings=["世界"])))
    assert "".join(stopped) == "你好，"


def test_bytes_that_never_form_a_character_are_left_out(bpe_dir, monkeypatch) -> None:
    """A byte-level model may emit a lone lead byte followed by ASCII: those bytes never become a character, so
    neither the stream nor the generated text shows a U+FFFD for them; the token ids keep them."""
    from tokenizers import pre_tokenizers

    tok = load_tokenizer(bpe_dir)
    to_bytes = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    lead = to_bytes.pre_tokenize_str("你")[0][0][0]  # the first of its three bytes, alone
    byte_chars = lead + "".join(to_bytes.pre_tokenize_str("A好")[0][0]) + lead
    script = [tok.tokenizer.token_to_id(ch) for ch in byte_chars] + [tok.token_id("eos")]
    assert None not in script and "\ufffd" in tok.decode(script[:-1])

    def step(self, tokens=None):
        self.calls = getattr(self, "calls", 0) + 1
        logits = torch.full((1, tok.vocab_size), -1e4)
        logits[0, script[min(self.calls - 1, len(script) - 1)]] = 0.0
        return logits

    monkeypatch.setattr(GPTSteps, "first", step)
    monkeypatch.setattr(GPTSteps, "next", step)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, n_layers=1, n_heads=2, d_model=16, d_ff=32, max_seq_len=64))
    gen = Generator(model.eval(), tok)
    generated = gen.generate(["x"], GenerationConfig(max_new_tokens=40))[0]
    assert generated.text == "A好" and generated.token_ids == script[:-1]
    pieces = list(gen.stream("x", GenerationConfig(max_new_tokens=40)))
    assert "".join(pieces) == "A好" and all("\ufffd" not in p for p in pieces)


def test_generation_config_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="top_p"):
        GenerationConfig(top_p=0.0)
    with pytest.raises(ValueError, match="exclusive"):
        GenerationConfig(num_beams=2, do_sample=True)
    with pytest.raises(ValueError, match="num_return_sequences=3 exceeds"):
        GenerationConfig(num_beams=2, num_return_sequences=3)
    gen = Generator(_gpt(), IdsTokenizer())
    with pytest.raises(ValueError, match="max_seq_len=64"):
        gen.generate([list(range(1, 50)) + list(range(1, 20))])


@pytest.mark.parametrize("name", ["gpt", "seq2seq"])
def test_golden_outputs_of_tiny_checkpoints(name) -> None:
    """Committed tiny checkpoints (tests/fixtures/generation, made by make_generation_fixtures.py)
    decode to the recorded strings, greedy and beam: any change in decoding shows up as a diff."""
    root = FIXTURES / "generation"
    golden = json.loads((root / "golden.json").read_text(encoding="utf-8"))[name]
    model = load_model(root / name)
    gen = Generator(model, load_tokenizer(root / name))
    for case in golden:
        cfg = GenerationConfig(**case["config"])
        assert [g.text for g in gen.generate(case["inputs"], cfg)] == case["outputs"], case["config"]


def test_decoding_precision_is_chosen_at_run_time(monkeypatch) -> None:
    from lmforge.errors import UserError
    from lmforge.models import decoding

    cpu = torch.device("cpu")
    monkeypatch.setattr("lmforge.ops.cpu_features.has_bf16", lambda: False)
    assert decoding.resolve_precision("auto", cpu) == "fp32"  # bf16 is emulated, ~4x slower: the exact path
    with pytest.raises(UserError, match="needs bf16 arithmetic"):
        decoding.resolve_precision("bf16", cpu)
    assert decoding.resolve_precision("int8", cpu) == "int8"  # asked for: its inputs are rounded to bf16, no more
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)  # a GPU with bf16 (none is needed here)
    assert decoding.resolve_precision("auto", torch.device("cuda")) == "int8"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)  # an older GPU: bf16 emulated
    assert decoding.resolve_precision("auto", torch.device("cuda")) == "fp32"
    monkeypatch.setattr("lmforge.ops.cpu_features.has_bf16", lambda: True)
    assert decoding.resolve_precision("auto", cpu) == "int8"
    assert decoding.resolve_precision("bf16", cpu) == "bf16"
    with pytest.raises(UserError, match="must be one of"):
        decoding.resolve_precision("fp8", cpu)


@pytest.mark.parametrize("precision", ["int8", "int8-head", "bf16"])
def test_inexact_decoding_precisions_stay_close_to_fp32(precision, monkeypatch) -> None:
    """The first step's logits of each inexact path against fp32's (by how much a prompt's logits move), and
    that generation runs end to end with the KV cache in the path's dtype."""
    monkeypatch.setattr("lmforge.ops.cpu_features.has_bf16", lambda: True)  # correct anywhere, fast only there
    model = _gpt()
    prompts = [[5, 9, 2, 7, 11], [3, 4]]  # left padding too
    exact, fast = Generator(model, IdsTokenizer()), Generator(model, IdsTokenizer(), precision=precision)
    assert fast.precision == precision
    reference = exact._steps(prompts, 1, 4).first()
    steps = fast._steps(prompts, 1, 4)
    logits = steps.first()
    assert logits.dtype == torch.float32 and logits.shape == reference.shape
    scale = reference.abs().max()
    assert (logits - reference).abs().max() <= 0.02 * scale, precision
    assert steps.cache.keys.dtype == (torch.bfloat16 if precision == "bf16" else torch.float32)
    out = fast.generate(prompts, GenerationConfig(max_new_tokens=6))
    assert [len(o.token_ids) <= 6 for o in out] == [True, True]
    assert next(model.parameters()).dtype == torch.float32  # the source model is left as it was


def test_int8_weight_linear_is_the_linear_layer_up_to_its_rounding() -> None:
    """Per-row int8 weights with bf16 inputs: each output within the rounding bound of its row (half a step of
    the row's scale per weight, times |x|, plus bf16's relative 2^-8 on the inputs), on a (B, T, D) input."""
    from lmforge.models.decoding import Int8WeightLinear, int8_weights

    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48)
    x = torch.randn(2, 3, 64)
    fast = Int8WeightLinear(linear)
    with torch.no_grad():
        exact = linear(x)
        y = fast(x)
    assert y.shape == exact.shape and y.dtype == torch.float32
    scale = fast.scale.float()
    weight_bound = x.abs().sum(-1, keepdim=True) * scale / 2  # (B, T, out)
    input_bound = (x.abs() @ linear.weight.abs().t()) * 2**-8
    assert ((y - exact).abs() <= 1.05 * (weight_bound + input_bound) + 1e-3).all()
    model = int8_weights(_seq2seq())  # every linear layer, cross-attention's too
    assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())


def test_int8_decoding_runs_on_untied_heads_and_encoder_decoders(monkeypatch) -> None:
    monkeypatch.setattr("lmforge.ops.cpu_features.has_bf16", lambda: True)
    torch.manual_seed(2)
    untied = _gpt(tie_embeddings=False, positions="rope", norm="rmsnorm", gated_ffn=True, activation="silu")
    for model, inputs in ((untied, [[5, 9, 2], [7]]), (_seq2seq(), [[7, 3, 9, EOS], [4, EOS]])):
        exact = Generator(model, IdsTokenizer())
        fast = Generator(model, IdsTokenizer(), precision="int8")
        reference, logits = exact._steps(inputs, 1, 4).first(), fast._steps(inputs, 1, 4).first()
        assert (logits - reference).abs().max() <= 0.02 * reference.abs().max()
        assert all(len(o.token_ids) <= 5 for o in fast.generate(inputs, GenerationConfig(max_new_tokens=5)))
