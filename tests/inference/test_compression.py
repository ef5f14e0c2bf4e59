"""int8 (`lmforge quantize`) and ONNX Runtime (`lmforge export --to onnx`) copies of classify / NER runs: what
they write, that they load through load_run, and how close their outputs are to the fp32 PyTorch run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from lmforge.cli import main
from lmforge.data.builtin import load_builtin
from lmforge.data.readers import write_conll, write_jsonl
from lmforge.data.tokenizer import copy_tokenizer_files, load_tokenizer
from lmforge.errors import UserError
from lmforge.models.bert import Bert, BertConfig
from lmforge.models.registry import load_model, save_model
from lmforge.rundir import load_run

CPU = torch.device("cpu")
FAST = [
    "--training.no-progress",
    "--training.peak-tflops",
    "1",
    "--epochs",
    "0",
    "--training.max-steps",
    "30",
    "--training.eval-every",
    "0",
    "--max-len",
    "48",
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, review_wordpiece: Path) -> dict[str, Path]:
    """A classify and a NER run fine-tuned 30 steps from a tiny pre-LN BERT with bigram embeddings (so the
    exported graph covers those options), and the plain BERT directory (an embedder)."""
    root = tmp_path_factory.mktemp("compress")
    cfg = BertConfig(
        vocab_size=load_tokenizer(review_wordpiece).vocab_size,
        d_model=64,
        n_layers=2,
        n_heads=2,
        d_ff=128,
        max_seq_len=64,
        dropout=0.0,
        attn_dropout=0.0,
        pre_norm=True,
        bigram_buckets=512,
    )
    torch.manual_seed(0)
    bert = root / "bert"
    save_model(Bert(cfg), bert)
    copy_tokenizer_files(review_wordpiece, bert)
    reviews = load_builtin("reviews-sentiment")
    write_jsonl(root / "cls.jsonl", reviews["train"][:128])
    sentences = load_builtin("peoples-daily-ner")
    write_conll(root / "ner.conll", sentences["train"][:128])
    for task, data in (("classify", "cls.jsonl"), ("ner", "ner.conll")):
        args = ["finetune", task, "--model", str(bert), "--train", str(root / data), "--out", str(root / task)]
        assert main([*args, *FAST]) == 0
    return {"classify": root / "classify", "ner": root / "ner", "embed": bert, "root": root}


@pytest.fixture(scope="module")
def reviews() -> list[dict]:
    return [{"text": ex["text"]} for ex in load_builtin("reviews-sentiment")["test"][:48]]


def _padded_batch(run_dir: Path) -> dict[str, torch.Tensor]:
    """Three real reviews of different lengths, right-padded: the padded rows must not change the real ones."""
    tok = load_tokenizer(run_dir)
    texts = ["房间很干净，服务也很好，下次还来", "太差了", "一般般吧，早餐还可以，就是有点贵，位置不错"]
    ids = [tok.encode(t)[:40] for t in texts]
    T = max(len(i) for i in ids)
    input_ids = torch.tensor([i + [tok.token_id("pad")] * (T - len(i)) for i in ids])
    mask = torch.tensor([[1] * len(i) + [0] * (T - len(i)) for i in ids])
    return {"input_ids": input_ids, "attention_mask": mask}


def test_onnx_encoder_equals_pytorch_on_a_padded_batch(runs, tmp_path: Path) -> None:
    out = tmp_path / "onnx"
    assert main(["export", "--to", "onnx", str(runs["classify"]), "--out", str(out)]) == 0
    backend = json.loads((out / "backend.json").read_text())
    assert backend["backend"] == "onnx" and backend["precision"] == "fp32"
    assert not (out / "model.safetensors").exists() and (out / "encoder.onnx").is_file()
    batch = _padded_batch(runs["classify"])
    reference, onnx = load_run(runs["classify"]), load_run(out)
    with torch.inference_mode():
        want = reference.model.encoder(batch["input_ids"], attention_mask=batch["attention_mask"])
        got = onnx.model.encoder(batch["input_ids"], attention_mask=batch["attention_mask"])
    real = batch["attention_mask"].bool()
    assert got.shape == want.shape
    torch.testing.assert_close(got[real], want[real], atol=1e-4, rtol=1e-4)
    # and the task's class logits through either backend (the ONNX copy keeps the PyTorch head)
    enc = reference.task.collate(reference.task.encode([{"text": "房间很干净", "label": "pos"}] * 2, split="eval"))
    torch.testing.assert_close(
        onnx.task.logits(onnx.model, enc), reference.task.logits(reference.model, enc), atol=1e-4, rtol=1e-4
    )


def test_quantized_copy_is_int8_safetensors_and_close_to_fp32(runs, reviews, tmp_path: Path) -> None:
    out = tmp_path / "int8"
    assert main(["quantize", "--model", str(runs["classify"]), "--out", str(out)]) == 0
    backend = json.loads((out / "backend.json").read_text())
    fp32 = load_model(runs["classify"])
    linears = {n for n, m in fp32.named_modules() if isinstance(m, torch.nn.Linear)}
    assert set(backend["quantized"]) == linears and len(linears) == 2 * 4  # qkv, out, up, down per layer
    with safe_open(str(out / "model.int8.safetensors"), framework="pt") as f:
        dtypes = {k: f.get_tensor(k).dtype for k in f.keys()}  # noqa: SIM118
    assert {dtypes[f"{n}.weight_int8"] for n in linears} == {torch.int8}
    assert not [k for k in dtypes if k.endswith(".weight") and k.rsplit(".", 1)[0] in linears]

    reference, int8 = load_run(runs["classify"]), load_run(out)
    batch = _padded_batch(runs["classify"])
    with torch.inference_mode():
        want = reference.model.encoder(batch["input_ids"], attention_mask=batch["attention_mask"])
        got = int8.model.encoder(batch["input_ids"], attention_mask=batch["attention_mask"])
    real = batch["attention_mask"].bool()
    error = (got[real] - want[real]).norm() / want[real].norm()
    assert 0 < error < 0.03, error  # int8 rounding: not exact, but within 3% of the hidden states' norm
    a = reference.task.predict(reference.model, reviews, device=CPU)
    b = int8.task.predict(int8.model, reviews, device=CPU)
    gaps = [abs(x["scores"][k] - y["scores"][k]) for x, y in zip(a, b, strict=True) for k in x["scores"]]
    assert max(gaps) < 0.05, max(gaps)


def test_a_quantized_copy_reloads_bit_for_bit(runs, tmp_path: Path) -> None:
    from lmforge.inference.int8 import load_int8, quantize_encoder, save_int8

    encoder = load_model(runs["embed"])
    names = quantize_encoder(encoder)
    save_int8(encoder, tmp_path)
    (tmp_path / "config.json").write_text((runs["embed"] / "config.json").read_text())
    again = load_int8(tmp_path, names)
    batch = _padded_batch(runs["embed"])
    with torch.inference_mode():
        assert torch.equal(encoder(**batch), again(**batch))


def test_ner_copies_predict_the_same_entities_as_fp32(runs, tmp_path: Path) -> None:
    assert main(["export", "--to", "onnx", str(runs["ner"]), "--out", str(tmp_path / "onnx")]) == 0
    assert main(["quantize", "--model", str(runs["ner"]), "--out", str(tmp_path / "int8")]) == 0
    texts = [{"text": "".join(ex["tokens"])} for ex in load_builtin("peoples-daily-ner")["test"][:24]]
    fp32 = load_run(runs["ner"])
    want = fp32.task.predict(fp32.model, texts, device=CPU)
    onnx = load_run(tmp_path / "onnx")
    for g, w in zip(onnx.task.predict(onnx.model, texts, device=CPU), want, strict=True):
        assert g["tags"] == w["tags"]
        assert [(e["type"], e["start"], e["end"]) for e in g["entities"]] == [
            (e["type"], e["start"], e["end"]) for e in w["entities"]
        ]
        assert [e["score"] for e in g["entities"]] == pytest.approx([e["score"] for e in w["entities"]], abs=1e-4)
    int8 = load_run(tmp_path / "int8")
    got = int8.task.predict(int8.model, texts, device=CPU)
    same = sum(g["tags"] == w["tags"] for g, w in zip(got, want, strict=True))
    assert same >= 0.8 * len(texts), same


def test_predict_and_evaluate_take_the_copies(runs, reviews, tmp_path: Path) -> None:
    onnx8 = tmp_path / "onnx-int8"
    assert main(["export", "--to", "onnx", "--int8", str(runs["classify"]), "--out", str(onnx8)]) == 0
    assert json.loads((onnx8 / "backend.json").read_text())["precision"] == "int8"
    texts, predictions = tmp_path / "in.jsonl", tmp_path / "p.jsonl"
    write_jsonl(texts, reviews)
    assert main(["predict", "--model", str(onnx8), "--input", str(texts), "--output", str(predictions)]) == 0
    rows = [json.loads(line) for line in predictions.read_text().splitlines()]
    assert len(rows) == len(reviews) and {r["label"] for r in rows} <= {"neg", "pos"}
    labelled = tmp_path / "test.jsonl"
    write_jsonl(labelled, load_builtin("reviews-sentiment")["test"][:48])
    report = tmp_path / "eval.json"
    assert main(["evaluate", "--model", str(onnx8), "--data", str(labelled), "--output", str(report)]) == 0
    assert 0.0 <= json.loads(report.read_text())["accuracy"] <= 1.0


def _said(capsys) -> str:
    captured = capsys.readouterr()
    return captured.out + captured.err


def test_refusals_come_before_any_work(runs, tmp_path: Path, capsys) -> None:
    # a training run is never overwritten
    assert main(["quantize", "--model", str(runs["classify"]), "--out", str(runs["ner"])]) == 2
    assert "is not a compressed copy" in _said(capsys)
    # a copy is not compressed again
    first = tmp_path / "first"
    assert main(["quantize", "--model", str(runs["classify"]), "--out", str(first)]) == 0
    assert main(["quantize", "--model", str(first), "--out", str(tmp_path / "again")]) == 2
    assert "already a int8 copy" in _said(capsys)
    assert not (tmp_path / "again").exists()
    # an interrupted copy (no backend.json yet) is written again
    (first / "backend.json").unlink()
    assert main(["quantize", "--model", str(runs["classify"]), "--out", str(first)]) == 0
    assert (first / "backend.json").is_file()
    # --int8 belongs to --to onnx
    assert main(["export", "--int8", str(runs["classify"]), "--out", str(tmp_path / "hf")]) == 2
    assert "--int8 applies to --to onnx only" in _said(capsys)


def test_only_encoder_tasks_are_compressed(tmp_path: Path) -> None:
    from lmforge.rundir.compressed import write_compressed

    run = tmp_path / "mt"
    run.mkdir()
    (run / "config.json").write_text('{"lmforge_model": "seq2seq"}')
    (run / "task.json").write_text('{"task": "translate"}')
    with pytest.raises(UserError, match="takes a classify, ner or embed run"):
        write_compressed(run, tmp_path / "out", {"backend": "int8"}, lambda out: pytest.fail("no work"))


def test_int8_linear_uses_all_8_input_bits_on_vnni_cpus() -> None:
    """torch.ao's module quantizes inputs to 7 bits; ours keeps 8 where VNNI sums into 32 bits, which halves
    the input rounding error (measured against the same int8 weights in fp32). Elsewhere it keeps 7."""
    from lmforge.inference.int8 import _dynamic_linear, _quantized_linear
    from lmforge.ops.cpu_features import has_vnni

    torch.manual_seed(0)
    w, x = torch.randn(96, 256), torch.randn(64, 256)
    scale = w.abs().amax(dim=1) / 127.0
    w_int8 = torch.round(w / scale[:, None]).to(torch.int8)
    layer = _quantized_linear(w_int8, scale, None)
    assert isinstance(layer, _dynamic_linear())
    exact = x @ (w_int8.float() * scale[:, None]).T  # the int8 weights, fp32 inputs
    packed = layer._packed_params._packed_params
    errors = {
        bits: (torch.ops.quantized.linear_dynamic(x, packed, reduce_range=bits == 7) - exact).abs().mean().item()
        for bits in (7, 8)
    }
    ours = (layer(x) - exact).abs().mean().item()
    assert errors[8] < 0.7 * errors[7]  # one more bit: about half the rounding error
    assert ours == pytest.approx(errors[8 if has_vnni() else 7], rel=1e-6)
