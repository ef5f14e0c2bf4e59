"""`lmforge finetune / evaluate / predict / demo` end to end on tiny models and files."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from lmforge.cli import main
from lmforge.data.builtin import load_builtin
from lmforge.data.readers import write_conll, write_jsonl
from tests.commands.test_bad_inputs import _fails

FAST = ["--training.no-progress", "--training.peak-tflops", "1", "--training.log-every", "1"]


def _review_files(directory: Path, n_train: int, n_dev: int) -> list[str]:
    """The first reviews of the built-in train / dev splits as JSONL files; returns the --train/--dev flags."""
    reviews = load_builtin("reviews-sentiment")
    write_jsonl(directory / "train.jsonl", reviews["train"][:n_train])
    write_jsonl(directory / "dev.jsonl", reviews["dev"][:n_dev])
    return ["--train", str(directory / "train.jsonl"), "--dev", str(directory / "dev.jsonl")]


def test_classify_finetune_evaluate_predict(tmp_path: Path, tiny_bert: Path) -> None:
    reviews = load_builtin("reviews-sentiment")
    write_jsonl(tmp_path / "train.jsonl", reviews["train"][:200])
    write_jsonl(tmp_path / "dev.jsonl", reviews["dev"][:60])
    (tmp_path / "test.tsv").write_text(
        "text\tlabel\n" + "".join(f"{ex['text']}\t{ex['label']}\n" for ex in reviews["test"][:60]), encoding="utf-8"
    )
    out = tmp_path / "run"
    args = [
        "finetune",
        "classify",
        "--model",
        str(tiny_bert),
        "--train",
        str(tmp_path / "train.jsonl"),
        "--dev",
        str(tmp_path / "dev.jsonl"),
        "--test",
        str(tmp_path / "test.tsv"),
        "--out",
        str(out),
        "--epochs",
        "2",
        "--max-len",
        "48",
        "--training.eval-every",
        "5",
        "--training.optim.lr",
        "1e-3",
        "--training.adversarial",
        "fgm",
        *FAST,
    ]
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["data"]["examples"] == {"train": 200, "dev": 60, "test": 60}
    assert results["data"]["truncated"]["train"] > 0  # reviews longer than 48 tokens are counted
    assert set(results["test"]) >= {"accuracy", "macro_f1", "per_class", "confusion_matrix", "loss"}
    assert "accuracy" in results["definitions"] and results["training"]["steps"] == 13
    for name in ("config.json", "model.safetensors", "head.safetensors", "task.json", "confusion.png", "report.md"):
        assert (out / name).is_file(), name
    # evaluate reproduces the test score; predict writes one line per input with probabilities
    assert (
        main(
            [
                "evaluate",
                "--model",
                str(out),
                "--data",
                str(tmp_path / "test.tsv"),
                "--output",
                str(tmp_path / "eval.json"),
            ]
        )
        == 0
    )
    evaluated = json.loads((tmp_path / "eval.json").read_text())
    assert evaluated["accuracy"] == pytest.approx(results["test"]["accuracy"])
    (tmp_path / "in.txt").write_text("质量很好，很满意\n\n太差了，退货\n", encoding="utf-8")
    assert (
        main(
            [
                "predict",
                "--model",
                str(out),
                "--input",
                str(tmp_path / "in.txt"),
                "--output",
                str(tmp_path / "out.jsonl"),
            ]
        )
        == 0
    )
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["text"] for r in rows] == ["质量很好，很满意", "太差了，退货"]
    assert all(r["label"] in ("neg", "pos") and abs(sum(r["scores"].values()) - 1) < 1e-4 for r in rows)
    # the fine-tuned encoder is a normal model directory: export works on it
    assert main(["export", str(out), "--to", "hf", "--out", str(tmp_path / "hf")]) == 0


def test_finetune_names_the_bad_row(tmp_path: Path, tiny_bert: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "train.csv").write_text("text,label\n好,pos\n差,neg\n,pos\n", encoding="utf-8")
    (tmp_path / "dev.csv").write_text("text,label\n好,pos\n还行,meh\n", encoding="utf-8")
    base = [
        "finetune",
        "classify",
        "--model",
        str(tiny_bert),
        "--train",
        str(tmp_path / "train.csv"),
        "--dev",
        str(tmp_path / "dev.csv"),
        "--epochs",
        "1",
        *FAST,
    ]
    assert main([*base, "--out", str(tmp_path / "a")]) == 2
    assert "train.csv:4: empty text" in " ".join(capsys.readouterr().out.split())
    assert main([*base, "--out", str(tmp_path / "b"), "--skip-bad-rows"]) == 2
    assert "dev.csv:3: label 'meh' never occurs in the training data" in " ".join(capsys.readouterr().out.split())


def test_limit_keeps_the_first_examples_of_each_split_and_says_so(
    tmp_path: Path, tiny_bert: Path, capsys: pytest.CaptureFixture
) -> None:
    """`--limit N` (the docs run's quick check of a recipe) trains and scores on the first N examples of each split,
    the held-out dev included, and results.json records it."""
    reviews = load_builtin("reviews-sentiment")
    write_jsonl(tmp_path / "train.jsonl", reviews["train"][:100])
    base = ["finetune", "classify", "--model", str(tiny_bert), "--epochs", "1", "--max-len", "16", *FAST]
    assert main([*base, "--data", "builtin:reviews-sentiment", "--limit", "12", "--out", str(tmp_path / "a")]) == 0
    data = json.loads((tmp_path / "a" / "results.json").read_text())["data"]
    assert data["examples"] == {"train": 12, "dev": 12, "test": 12} and data["limit"] == 12
    assert data["training_items"] == 12
    assert main([*base, "--train", str(tmp_path / "train.jsonl"), "--limit", "7", "--out", str(tmp_path / "b")]) == 0
    data = json.loads((tmp_path / "b" / "results.json").read_text())["data"]
    assert data["examples"] == {"train": 7, "dev": 7}  # 90 / 10 held out first, then the first 7 of each
    _fails(
        capsys, [*base, "--data", "builtin:reviews-sentiment", "--out", str(tmp_path / "c"), "--limit", "-1"], "limit"
    )


def test_ner_finetune_with_crf_and_predict_spans(tmp_path: Path, tiny_bert: Path) -> None:
    ner = load_builtin("peoples-daily-ner")
    write_conll(tmp_path / "train.conll", ner["train"][:80])
    write_conll(tmp_path / "dev.conll", ner["dev"][:30])
    out = tmp_path / "run"
    assert (
        main(
            [
                "finetune",
                "ner",
                "--model",
                str(tiny_bert),
                "--train",
                str(tmp_path / "train.conll"),
                "--dev",
                str(tmp_path / "dev.conll"),
                "--out",
                str(out),
                "--epochs",
                "1",
                "--max-len",
                "32",
                "--training.optim.lr",
                "1e-3",
                *FAST,
            ]
        )
        == 0
    )
    results = json.loads((out / "results.json").read_text())
    assert set(results["dev"]) >= {"f1", "precision", "recall", "per_type", "errors"}
    assert results["data"]["truncated"]["train"] > 0  # sentences over 30 characters were windowed
    assert "| type | precision |" in (out / "report.md").read_text()
    write_jsonl(tmp_path / "in.jsonl", [{"text": "江泽民在北京会见克林顿。"}])
    assert (
        main(
            [
                "predict",
                "--model",
                str(out),
                "--input",
                str(tmp_path / "in.jsonl"),
                "--output",
                str(tmp_path / "out.jsonl"),
            ]
        )
        == 0
    )
    (row,) = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert len(row["tags"]) == len("江泽民在北京会见克林顿。")
    for entity in row["entities"]:
        assert row["text"][entity["start"] : entity["end"]] == entity["text"]


def _metrics(results: dict) -> dict:
    return {data: {system: r["test"] for system, r in systems.items()} for data, systems in results["tasks"].items()}


def test_miniature_demo_end_to_end_gives_the_same_metrics_twice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from lmforge.runs import demo

    args = ["demo", "--quick", "--limit", "60", "--pretrain-steps", "60", "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "first")]) == 0
    assert "warning" not in capsys.readouterr().out
    results = json.loads((tmp_path / "first" / "results.json").read_text())
    sentiment, ner = results["tasks"]["reviews-sentiment"], results["tasks"]["peoples-daily-ner"]
    assert set(sentiment) == {"pretrained", "scratch", "tfidf-svm"}
    assert set(ner) == {"pretrained", "scratch", "dictionary"}
    for system in sentiment.values():
        assert 0.0 <= system["test"]["accuracy"] <= 1.0 and "macro_f1" in system["test"]
    for system in ner.values():
        assert {"f1", "precision", "recall", "per_type"} <= set(system["test"])
    assert results["wall_seconds"]["total"] > 0 and results["tokens_per_s"]["pretrain"] > 0
    assert results["pretraining"]["steps"] == 60
    assert results["budget"]["planned_minutes"] == demo.BUDGETS["quick"].planned_minutes
    assert results["slower_than_planned"] is False
    report = (tmp_path / "first" / "report.md").read_text()
    assert "| reviews-sentiment | accuracy |" in report and "(dictionary)" in report and "Wall time" in report

    # Budgets are steps and epochs: a second run, here on a "machine" planned to be far faster, gives the same
    # metrics (and warns that it ran slower than planned).
    monkeypatch.setitem(demo.BUDGETS, "quick", dataclasses.replace(demo.BUDGETS["quick"], planned_minutes=1e-4))
    assert main([*args, "--out", str(tmp_path / "second")]) == 0
    assert "longer than the planned" in " ".join(capsys.readouterr().out.split())
    again = json.loads((tmp_path / "second" / "results.json").read_text())
    assert again["slower_than_planned"] is True
    assert _metrics(again) == _metrics(results)


def test_finetune_resumes_from_its_run_directory(tmp_path: Path, tiny_bert: Path) -> None:
    files = _review_files(tmp_path, 64, 16)
    out = tmp_path / "run"
    common = ["--epochs", "0", "--training.global-batch-size", "8", "--training.micro-batch-size", "8", *FAST]
    assert (
        main(
            [
                "finetune",
                "classify",
                "--model",
                str(tiny_bert),
                *files,
                "--out",
                str(out),
                "--training.max-steps",
                "4",
                "--training.optim.schedule",
                "constant",
                *common,
            ]
        )
        == 0
    )
    assert main(["finetune", "classify", "--resume", str(out), "--training.max-steps", "8", *common]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["training"]["steps"] == 8
    steps = [
        json.loads(line)["step"]
        for line in (out / "metrics.jsonl").read_text().splitlines()
        if json.loads(line)["kind"] == "train"
    ]
    assert steps == list(range(1, 9))  # the second run continued at step 5


def test_early_stopping_keeps_the_best_dev_checkpoint(tmp_path: Path, tiny_bert: Path) -> None:
    files = _review_files(tmp_path, 64, 16)
    out = tmp_path / "run"
    # a learning rate too small to change the dev accuracy: the second evaluation is no better -> stop
    assert (
        main(
            [
                "finetune",
                "classify",
                "--model",
                str(tiny_bert),
                *files,
                "--out",
                str(out),
                "--epochs",
                "0",
                "--training.max-steps",
                "50",
                "--training.eval-every",
                "2",
                "--training.patience",
                "1",
                "--training.optim.lr",
                "1e-12",
                "--training.global-batch-size",
                "8",
                "--training.micro-batch-size",
                "8",
                *FAST,
            ]
        )
        == 0
    )
    results = json.loads((out / "results.json").read_text())
    assert results["training"]["steps"] == 4 and results["training"]["best_step"] == 2
    assert results["weights"] == "trainer_state/step-0000002"
    assert results["dev"]["accuracy"] == pytest.approx(results["training"]["best_dev"]["accuracy"])


@pytest.mark.parametrize("kind", ["classify", "ner"])
def test_two_process_finetuning_equals_one(tmp_path: Path, tiny_bert: Path, kind: str, run_process) -> None:
    import sys

    if kind == "classify":
        files = _review_files(tmp_path, 32, 16)
    else:
        ner = load_builtin("peoples-daily-ner")
        write_conll(tmp_path / "train.conll", ner["train"][:32])
        write_conll(tmp_path / "dev.conll", ner["dev"][:16])
        files = ["--train", str(tmp_path / "train.conll"), "--dev", str(tmp_path / "dev.conll"), "--max-len", "32"]
    args = [
        "-m",
        "lmforge",
        "finetune",
        kind,
        "--model",
        str(tiny_bert),
        *files,
        "--epochs",
        "0",
        "--training.max-steps",
        "4",
        "--training.eval-every",
        "2",
        "--training.global-batch-size",
        "8",
        "--training.micro-batch-size",
        "4",
        "--training.deterministic",
        *FAST,
    ]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    for cmd, out in (([sys.executable, *args], "one"), ([*torchrun, *args], "two")):
        run_process([*cmd, "--out", str(tmp_path / out)], timeout=300)  # OMP_NUM_THREADS=1, a private TMPDIR
    one, two = (json.loads((tmp_path / n / "results.json").read_text()) for n in ("one", "two"))
    records = [
        [json.loads(x) for x in (tmp_path / n / "metrics.jsonl").read_text().splitlines()] for n in ("one", "two")
    ]
    losses = [[r["loss"] for r in rs if r["kind"] == "train"] for rs in records]
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)
    key = "accuracy" if kind == "classify" else "f1"
    assert one["dev"][key] == pytest.approx(two["dev"][key], abs=1e-6)


@pytest.mark.parametrize("base", ["fp32", "int8"])
def test_lora_finetune_saves_peft_adapters_checkpoints_only_what_trains_and_resumes_exactly(
    tmp_path: Path, tiny_bert: Path, base: str
) -> None:
    """--lora.rank: the encoder stays frozen (its checkpoints hold the adapters and the head only), OUT/adapter/ holds
    PEFT's files, OUT/model.safetensors the merged model, and 4 + 4 resumed steps give 8 straight steps' adapters;
    with an int8 base too (rebuilt from the pretrained model on resume)."""
    import torch

    from lmforge.models.lora import load_adapter, merge_lora
    from lmforge.models.registry import load_model, read_safetensors

    files = _review_files(tmp_path, 64, 16)
    common = ["--epochs", "0", "--training.global-batch-size", "8", "--training.micro-batch-size", "8", *FAST]
    lora = ["--lora.rank", "4", "--lora.alpha", "8", "--lora.base", base]
    # a constant rate without warm-up: the schedule of a run extended on resume equals the longer run's (warm-up
    # is a share of the run's length, so 4 then 8 steps would warm up for 1 step, 8 straight for 2)
    lora += ["--training.optim.schedule", "constant", "--training.optim.warmup-steps", "0"]
    start = ["finetune", "classify", "--model", str(tiny_bert), *files, *lora, *common]
    assert main([*start, "--out", str(tmp_path / "straight"), "--training.max-steps", "8"]) == 0
    assert main([*start, "--out", str(tmp_path / "resumed"), "--training.max-steps", "4"]) == 0
    assert (
        main(["finetune", "classify", "--resume", str(tmp_path / "resumed"), "--training.max-steps", "8", *common]) == 0
    )
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    saved = read_safetensors(sorted((straight / "trainer_state").glob("step-*"))[-1] / "model.safetensors")
    assert any(".lora_A" in k for k in saved)
    assert all(".lora_" in k or not k.startswith("encoder.") for k in saved), sorted(saved)  # no frozen weight
    last = "trainer_state/step-0000008/model.safetensors"  # (the best checkpoint depends on when each run evaluated)
    a, b = read_safetensors(straight / last), read_safetensors(resumed / last)
    assert a.keys() == b.keys() == saved.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    peft_names = read_safetensors(straight / "adapter" / "adapter_model.safetensors")
    assert any(k.endswith("attention.self.query.lora_A.weight") for k in peft_names)
    pretrained = load_model(tiny_bert)
    load_adapter(pretrained, straight / "adapter")  # (an fp32 base: the int8 run merged into its dequantized base)
    merged = merge_lora(pretrained).state_dict()
    run_encoder = read_safetensors(straight / "model.safetensors")
    assert "layers.0.attn.qkv.weight" in run_encoder.keys() <= merged.keys()  # (the base also has its MLM head)
    for name, value in run_encoder.items():
        torch.testing.assert_close(value, merged[name], rtol=0, atol=1e-6 if base == "fp32" else 2e-2, msg=name)
    assert (
        run_encoder["layers.0.attn.qkv.weight"] - load_model(tiny_bert).state_dict()["layers.0.attn.qkv.weight"]
    ).abs().max() > 0
    (tmp_path / "in.txt").write_text("质量很好\n", encoding="utf-8")
    out = tmp_path / "out.jsonl"
    assert main(["predict", "--model", str(straight), "--input", str(tmp_path / "in.txt"), "--output", str(out)]) == 0
    assert json.loads(out.read_text())["text"] == "质量很好"  # the merged run loads like any other


def test_evaluate_on_labelled_data_honours_limit_and_refuses_language_model_settings(
    tmp_path: Path, tiny_bert: Path, capsys: pytest.CaptureFixture
) -> None:
    """`evaluate --data` scores the first --limit rows and says so; a language-model setting it has no use for
    (--shots, --window, ...) is refused, not ignored."""
    out = tmp_path / "run"
    args = ["finetune", "classify", "--model", str(tiny_bert), "--data", "builtin:reviews-sentiment", "--limit", "8"]
    assert main([*args, "--epochs", "1", "--max-len", "16", "--out", str(out), *FAST]) == 0
    evaluate = ["evaluate", "--model", str(out), "--data", "builtin:reviews-sentiment:dev"]
    assert main([*evaluate, "--limit", "5", "--output", str(tmp_path / "e.json")]) == 0
    scored = json.loads((tmp_path / "e.json").read_text())
    assert (scored["limit"], scored["rows"], sum(map(sum, scored["confusion_matrix"]))) == (5, 5, 5)
    capsys.readouterr()
    assert main([*evaluate, "--shots", "2", "--window", "64"]) == 2
    assert "--shots, --window: settings of language-model tasks" in " ".join(capsys.readouterr().out.split())
    assert main([*evaluate, "--limit", "0"]) == 2
