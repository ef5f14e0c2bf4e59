"""LoRA adapters (models/lora.py): PEFT, given the adapter lmforge saves and the base's Hugging Face export,
computes lmforge's logits; merging changes no output; only the adapters train; bad requests are refused."""

from __future__ import annotations

import peft
import pytest
import torch
import transformers
from torch import nn

from lmforge.errors import UserError
from lmforge.models.bert import Bert, BertConfig
from lmforge.models.convert import to_hf
from lmforge.models.gpt import GPT, GPTConfig
from lmforge.models.lora import _hf_parts, add_lora, load_adapter, lora_layers, merge_lora, save_adapter
from lmforge.models.specs import LoRASpec
from tests.models.families import DECODER_FAMILIES

VOCAB = 96
# Every adapter here holds an fp32 base, as the fp32 models it is compared with (PEFT, transformers, the plain
# base): LoRASpec's default, auto, holds it in bf16 on a CPU with native bf16 (avx512_bf16, AMX), and the
# comparisons at 1e-4 would then depend on the machine.
DECODERS = {
    **DECODER_FAMILIES,
    "gemma3": {**DECODER_FAMILIES["gemma3"], "head_dim": 16, "sliding_window": 4, "global_every": 2},
}


def _decoder(family: str) -> GPT:
    cfg = GPTConfig(vocab_size=VOCAB, max_seq_len=32, n_layers=2, n_heads=4, d_model=32, d_ff=64, **DECODERS[family])
    torch.manual_seed(0)
    return GPT(cfg).eval()


def _train_adapters_a_little(model: nn.Module) -> None:
    """B starts at zero (the adapted model is the base); give every adapter a nonzero update (DoRA's magnitudes too)."""
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.normal_(0, 0.5)
            if layer.lora_magnitude is not None:
                layer.lora_magnitude.mul_(1 + 0.2 * torch.randn_like(layer.lora_magnitude))


def _hf(model: GPT | Bert) -> nn.Module:
    hf_cfg, tensors = to_hf(model.cfg, model.state_dict(), token_ids={"pad": 0, "bos": 1, "eos": 1})
    kind = hf_cfg.pop("model_type")
    config = transformers.AutoConfig.for_model(kind, **{k: v for k, v in hf_cfg.items() if k != "architectures"})
    cls = transformers.AutoModel if isinstance(model, Bert) else transformers.AutoModelForCausalLM
    hf = cls.from_config(config, attn_implementation="eager")
    hf.load_state_dict(tensors, strict=False)
    hf.tie_weights()
    return hf.eval()


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("family", list(DECODERS))
def test_peft_loads_the_adapter_and_computes_the_same_logits(family: str, dora: bool, tmp_path) -> None:
    model = _decoder(family)
    hf = _hf(model)  # the base, before adapters
    spec = LoRASpec(rank=4, alpha=8, rslora=family == "qwen2", dora=dora, base="fp32")
    adapted = add_lora(model, spec)
    with torch.no_grad():
        ids = torch.randint(0, VOCAB, (2, 12))
        torch.testing.assert_close(model(ids), _decoder(family)(ids), atol=1e-5, rtol=1e-5)  # starts as the base
    assert len(adapted) == 2 * (5 if family != "gpt2" else 4)
    _train_adapters_a_little(model)
    save_adapter(model, spec, tmp_path / "adapter")
    peft_model = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter", is_trainable=True).eval()
    ids = torch.randint(0, VOCAB, (2, 12))
    ours, theirs = model(ids), peft_model(input_ids=ids).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    assert (ours - _decoder(family)(ids)).abs().max() > 1e-2  # the adapters change the outputs
    ours.square().mean().backward()  # the same gradients too (DoRA: the rows' norms held constant on both sides)
    theirs.square().mean().backward()
    peft_grads = {n.replace(".default", ""): p.grad for n, p in peft_model.named_parameters() if p.requires_grad}
    for name, layer in lora_layers(model).items():
        names, _, _ = _hf_parts(model, name)
        grads = {
            "lora_A.weight": layer.lora_A.grad.split(layer.rank),
            "lora_B.weight": layer.lora_B.grad.split(layer.parts),
            **({"lora_magnitude_vector.weight": layer.lora_magnitude.grad.split(layer.parts)} if dora else {}),
        }
        for key, parts in grads.items():
            for hf_name, grad in zip(names, parts, strict=True):
                expected = peft_grads.pop(f"base_model.model.{hf_name}.{key}")
                torch.testing.assert_close(grad, expected, atol=1e-5, rtol=1e-4, msg=f"{hf_name}.{key}")
    assert not peft_grads  # every PEFT parameter compared


def test_an_encoder_takes_adapters_peft_reads(tmp_path) -> None:
    """BERT: one adapter per query / key / value on lmforge's fused matrix, as PEFT puts them on BertModel."""
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=VOCAB, n_layers=2, d_model=32, n_heads=4, d_ff=64, max_seq_len=32, mlm_head=False)
    model = Bert(cfg).eval()
    hf = _hf(model)
    spec = LoRASpec(rank=2, alpha=4, base="fp32")
    add_lora(model, spec)
    assert lora_layers(model)["layers.0.attn.qkv"].parts == (32, 32, 32)
    _train_adapters_a_little(model)
    save_adapter(model, spec, tmp_path / "adapter")
    peft_model = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    ids = torch.randint(0, VOCAB, (2, 10))
    with torch.no_grad():
        ours = model(ids)
        ours = ours.last_hidden_state if hasattr(ours, "last_hidden_state") else ours
        theirs = peft_model(input_ids=ids).last_hidden_state
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_only_adapters_train_and_merging_changes_no_output(dora: bool, tmp_path) -> None:
    model = _decoder("llama")
    spec = LoRASpec(rank=4, alpha=8, targets=["layers.*.attn.qkv", "layers.1.ffn.down"], dora=dora, base="fp32")
    add_lora(model, spec)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {
        f"{layer}.{ab}"
        for layer in ("layers.0.attn.qkv", "layers.1.attn.qkv", "layers.1.ffn.down")
        for ab in ("lora_A", "lora_B", *(["lora_magnitude"] if dora else []))
    }
    _train_adapters_a_little(model)
    save_adapter(model, spec, tmp_path / "a")
    ids = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        adapted = model(ids)
        again = _decoder("llama")
        load_adapter(again, tmp_path / "a")
        torch.testing.assert_close(again(ids), adapted, rtol=0, atol=0)
        merged = merge_lora(model)
        assert not lora_layers(merged)
        assert set(merged.state_dict()) == set(_decoder("llama").state_dict())
        torch.testing.assert_close(merged(ids), adapted, atol=1e-5, rtol=1e-5)


def test_bad_adapter_requests_are_refused(tmp_path) -> None:
    with pytest.raises(UserError, match="lora.rank=-1"):
        LoRASpec(rank=-1)
    with pytest.raises(UserError, match=r"match no linear layer.*layers\.\*\.attn\.qkv"):
        add_lora(_decoder("llama"), LoRASpec(rank=2, targets=["*.q_proj"], base="fp32"))
    model = _decoder("llama")
    add_lora(model, LoRASpec(rank=2, base="fp32"))
    save_adapter(model, LoRASpec(rank=2, base="fp32"), tmp_path / "a")
    other = GPT(GPTConfig(**{**model.cfg.__dict__, "d_ff": 96}))
    with pytest.raises(UserError, match="made for a base of shape"):
        load_adapter(other, tmp_path / "a")


def test_export_merges_an_adapter_into_hf_and_gguf(tmp_path, bpe_dir) -> None:
    """export --merge ADAPTER: the Hugging Face export computes the adapted model's logits; the GGUF export of the
    same merge reads back to the merged weights (f16); an adapter made for another base is refused, nothing written."""
    import shutil

    from lmforge.cli import main
    from lmforge.data.tokenizer import load_tokenizer
    from lmforge.models.registry import load_model, save_model

    vocab = load_tokenizer(bpe_dir).vocab_size
    cfg = GPTConfig(vocab_size=vocab, max_seq_len=32, n_layers=2, n_heads=4, d_model=32, d_ff=64, **DECODERS["llama"])
    base = GPT(cfg).eval()
    save_model(base, tmp_path / "base")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(bpe_dir / name, tmp_path / "base" / name)
    adapted = load_model(tmp_path / "base")
    add_lora(adapted, LoRASpec(rank=4, alpha=8, base="fp32"))
    _train_adapters_a_little(adapted)
    save_adapter(adapted, LoRASpec(rank=4, alpha=8, base="fp32"), tmp_path / "adapter")
    args = ["export", str(tmp_path / "base"), "--merge", str(tmp_path / "adapter")]
    assert main([*args, "--to", "hf", "--out", str(tmp_path / "hf")]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(0, vocab, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids).logits, adapted(ids), atol=1e-4, rtol=1e-4)
    assert main([*args, "--to", "gguf", "--out", str(tmp_path / "m.gguf")]) == 0
    assert main(["convert", "--from-gguf", str(tmp_path / "m.gguf"), "--out", str(tmp_path / "back")]) == 0
    merged = merge_lora(adapted).state_dict()
    for name, value in load_model(tmp_path / "back").state_dict().items():
        expected = merged[name].half().float() if value.ndim == 2 else merged[name]
        torch.testing.assert_close(value, expected, rtol=0, atol=0, msg=name)
    other = GPT(GPTConfig(**{**cfg.__dict__, "d_ff": 96}))
    save_model(other, tmp_path / "other")
    shutil.copy(bpe_dir / "tokenizer.json", tmp_path / "other" / "tokenizer.json")
    out = tmp_path / "never.gguf"
    assert (
        main(
            ["export", str(tmp_path / "other"), "--merge", str(tmp_path / "adapter"), "--to", "gguf", "--out", str(out)]
        )
        == 2
    )
    assert not out.exists()


@pytest.mark.parametrize("base", ["bf16", "int8"])
def test_a_narrow_base_keeps_only_its_narrow_copy_and_trains_the_adapters(base: str) -> None:
    """--lora.base bf16 / int8: the adapted matrices are held only narrow (no fp32 copy, nothing in the state dict),
    the outputs stay within the rounding of the base, and gradients reach the adapters and the input."""
    model, reference = _decoder("llama"), _decoder("llama")
    add_lora(model, LoRASpec(rank=4, alpha=8, base=base))
    add_lora(reference, LoRASpec(rank=4, alpha=8, base="fp32"))
    layer = lora_layers(model)["layers.0.attn.qkv"]
    assert layer.weight is None and "layers.0.attn.qkv.weight" not in model.state_dict()
    ids = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        scale = reference(ids).abs().max()
        assert (model(ids) - reference(ids)).abs().max() < 0.05 * scale
    model(ids).logsumexp(-1).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)
    merged = merge_lora(model)
    assert merged.layers[0].attn.qkv.weight.dtype == torch.float32


def test_attention_for_a_few_queries_keeps_the_adapters() -> None:
    """The path that projects queries only for the positions it needs (first-token pooling) goes through the adapted
    layer rather than slicing its weight, so the adapters count there too."""
    torch.manual_seed(0)
    model = Bert(BertConfig(vocab_size=VOCAB, n_layers=1, d_model=32, n_heads=4, d_ff=64, max_seq_len=32)).eval()
    add_lora(model, LoRASpec(rank=2, alpha=4, base="fp32"))
    _train_adapters_a_little(model)
    attn, x = model.layers[0].attn, torch.randn(2, 7, 32)
    with torch.no_grad():
        torch.testing.assert_close(attn(x, queries=x[:, :1]), attn(x)[:, :1], atol=1e-5, rtol=1e-5)
