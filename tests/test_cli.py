"""The `lmforge` command: help for every command, recipes validate, errors name the key, tiny runs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

from lmforge.cli import COMMANDS, config_class, main
from lmforge.config import load_yaml
from lmforge.data.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
# Which command each folder of configs/ feeds.
STAGES = {
    "tokenizer": "tokenizer train",
    "pretrain": "pretrain",
    "classify": "finetune classify",
    "ner": "finetune ner",
    "translate": "finetune translate",
    "chat": "finetune chat",
    "nas": "nas",
    "compare": "compare",
}


def test_top_level_help_lists_every_command(capsys: pytest.CaptureFixture) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert f"lmforge {name}" in out


def test_unknown_command_fails(capsys: pytest.CaptureFixture) -> None:
    assert main(["pretrian"]) == 2
    assert "unknown command" in capsys.readouterr().out


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_has_help(name: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_:
        main([*name.split(), "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert f"lmforge {name}" in out and "--" in out


def test_console_script_runs(run_process) -> None:
    assert "--from-hf" in run_process([sys.executable, "-m", "lmforge", "convert", "--help"], timeout=120)


@pytest.mark.parametrize("recipe", sorted((ROOT / "configs").rglob("*.yaml")), ids=lambda p: p.name)
def test_every_recipe_validates(recipe: Path, tmp_path: Path) -> None:
    stage = recipe.relative_to(ROOT / "configs").parts[0]
    assert stage in STAGES, f"{recipe}: no command registered for configs/{stage}/"
    cls = config_class(STAGES[stage])
    text = recipe.read_text(encoding="utf-8")
    assert text.startswith("#"), f"{recipe}: the header comment says what the recipe reached"
    data = yaml.safe_load(text)
    data.setdefault("out", "unused")  # recipes leave the output directory to the command line
    if stage in ("classify", "ner", "chat"):
        data.setdefault("model", "unused")  # ... and fine-tuning recipes the pretrained model
    path = tmp_path / recipe.name
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    load_yaml(cls, path)


def test_recipe_with_unknown_key_names_file_and_key(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("input: [x.txt]\nvocab_sise: 100\n")
    assert main(["tokenizer", "train", "--config", str(recipe), "--out", str(tmp_path / "o")]) == 2
    out = " ".join(capsys.readouterr().out.split())
    assert "bad.yaml" in out and "vocab_sise" in out and "vocab_size" in out


def test_recipe_with_bad_value_names_allowed_values(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("input: [x.txt]\nkind: sentencepiece\n")
    assert main(["tokenizer", "train", "--config", str(recipe), "--out", str(tmp_path / "o")]) == 2
    out = " ".join(capsys.readouterr().out.split())
    assert "'kind'" in out and "sentencepiece" in out and "'wordpiece', 'bpe'" in out


def test_tokenizer_train_end_to_end_with_overrides(tmp_path: Path, mixed_corpus: Path) -> None:
    recipe = tmp_path / "tok.yaml"
    recipe.write_text(f"# test recipe\ninput: [{mixed_corpus}]\nkind: bpe\nvocab_size: 400\n")
    out = tmp_path / "tok"
    assert main(["tokenizer", "train", "--config", str(recipe), "--out", str(out), "--vocab-size", "300"]) == 0
    tok = load_tokenizer(out)
    assert tok.kind == "bpe" and tok.vocab_size == 300  # the recipe alone gives 321
    resolved = load_yaml(config_class("tokenizer train"), out / "tokenizer_train.yaml")
    assert resolved.vocab_size == 300 and resolved.input == [str(mixed_corpus)]


def test_tokenizer_train_reads_jsonl(tmp_path: Path) -> None:
    data = tmp_path / "d.jsonl"
    data.write_text('{"body": "你好世界"}\n{"body": "天安门"}\n', encoding="utf-8")
    out = tmp_path / "tok"
    assert (
        main(
            [
                "tokenizer",
                "train",
                "--input",
                str(data),
                "--jsonl-field",
                "body",
                "--out",
                str(out),
                "--vocab-size",
                "50",
            ]
        )
        == 0
    )
    assert load_tokenizer(out).encode("你好", special_tokens=False) == [
        load_tokenizer(out).tokenizer.token_to_id(c) for c in "你好"
    ]


def test_tokenizer_train_names_the_bad_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "你好"}\n{"text": 3}\n', encoding="utf-8")
    assert main(["tokenizer", "train", "--input", str(data), "--out", str(tmp_path / "o")]) == 2
    assert "d.jsonl:2" in " ".join(capsys.readouterr().out.split())


def test_data_list_prints_sizes(
    capsys: pytest.CaptureFixture, tatoeba_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LMFORGE_DATA", str(tmp_path))  # the poems are not fetched there
    assert main(["data", "list", "--path", str(tatoeba_path)]) == 0
    out = " ".join(capsys.readouterr().out.split())
    for name in ("reviews-sentiment", "peoples-daily-ner", "pretrain-zh", "tatoeba-cmn-en", "13,890"):
        assert name in out
    # the corpora still to fetch are said once, after the table, with the command (no error text above it)
    assert "is missing" not in out and out.index("Built-in corpora") < out.index("tang-poems, tang-verse: not fetched")
    assert "tang-poems, tang-verse: not fetched yet; `lmforge data fetch tang-poems` downloads it once" in out


def test_data_export_writes_files(tmp_path: Path) -> None:
    assert main(["data", "export", "chatterbot-zh", "--out", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dev.jsonl", "test.jsonl", "train.jsonl"]


def test_pretrain_end_to_end_from_a_text_file(tmp_path: Path, review_corpus: Path) -> None:
    out = tmp_path / "run"
    args = [
        "pretrain",
        "--out",
        str(out),
        "--data.input",
        str(review_corpus),
        "--data.vocab-size",
        "800",
        "--data.seq-len",
        "32",
        "--model.size",
        "bert-tiny",
        "--model.dropout",
        "0",
        "--training.max-steps",
        "40",
        "--training.global-batch-size",
        "16",
        "--training.micro-batch-size",
        "16",
        "--training.eval-every",
        "10",
        "--training.eval-batches",
        "4",
        "--training.save-every",
        "20",
        "--training.optim.lr",
        "2e-3",
        "--training.optim.warmup-steps",
        "5",
        "--training.no-progress",
        "--training.peak-tflops",
        "1",
    ]
    assert main(args) == 0
    for name in (
        "config.yaml",
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "metrics.jsonl",
        "results.json",
        "report.md",
        "loss.png",
        "tokenizer/tokenizer.json",
        "data/meta.json",
    ):
        assert (out / name).is_file(), name
    evals = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [10, 20, 30, 40]
    assert evals[-1]["loss"] < evals[0]["loss"] - 0.5  # validation loss falls
    from lmforge.models.registry import load_model

    assert load_model(out).cfg.vocab_size == load_tokenizer(out).vocab_size
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["training"]["max_steps"] == 40 and resolved["data"]["seq_len"] == 32
    # A second run into the same directory must not clobber it.
    assert main(args) == 2


def test_pretrain_rejects_a_task_that_does_not_fit_the_model(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["pretrain", "--out", str(tmp_path), "--task", "clm", "--model.size", "bert-tiny"]) == 2
    assert "task='clm' needs a GPT size" in " ".join(capsys.readouterr().out.split())


def test_resume_needs_a_run_directory(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["pretrain", "--resume", str(tmp_path)]) == 2
    assert "no config.yaml" in " ".join(capsys.readouterr().out.split())  # rich wraps at the terminal width


def test_resume_means_that_directory(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """--resume RUN_DIR continues RUN_DIR itself: an --out naming another directory is refused before any work."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("out: run\nmodel: unused\ntrain: t.jsonl\n", encoding="utf-8")
    code = main(["finetune", "classify", "--resume", str(run), "--out", str(tmp_path / "other")])
    assert code == 2
    text = " ".join(capsys.readouterr().out.split())
    assert f"--resume {run} continues that run in place" in text
    assert not (tmp_path / "other").exists()


def test_a_bug_shows_its_traceback(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """Only a UserError is a one-line user error (exit 2); anything else is a bug: traceback, exit 1."""
    import lmforge.commands.data as data_command

    def broken(cfg) -> None:
        raise ValueError("an internal invariant failed")

    monkeypatch.setattr(data_command, "run_list", broken)
    assert main(["data", "list"]) == 1
    captured = capsys.readouterr()
    assert "Traceback" in captured.err and "an internal invariant failed" in captured.err
    assert "bug in lmforge" in captured.out


@pytest.mark.parametrize("command", ["evaluate", "predict"])
def test_evaluate_and_predict_refuse_other_runs_before_loading(command: str, tmp_path: Path, capsys) -> None:
    """A chat model is not scored by `lmforge evaluate` / `predict`: one line naming the directory and what it is."""
    gpt = ROOT / "tests" / "fixtures" / "generation" / "gpt"
    (tmp_path / "in.txt").write_text("你好\n", encoding="utf-8")
    flag = "--data" if command == "evaluate" else "--input"
    args = [command, "--model", str(gpt), flag, str(tmp_path / "in.txt")]
    args += ["--output", str(tmp_path / "out.jsonl")] if command == "predict" else []
    assert main(args) == 2
    text = " ".join(capsys.readouterr().out.split())
    assert f"{gpt}: lmforge {command}" in text and "a pretrained model directory (no task.json)" in text


def test_data_files_on_the_command_line_replace_the_recipe_corpus(tmp_path: Path) -> None:
    from lmforge.cli import parse

    recipe = ["finetune", "translate", "-c", "configs/translate/seq2seq-tiny-zh-en.yaml", "--out", "runs/mt"]
    _, cfg = parse([*recipe, "--train", "pairs.tsv", "--dev", "dev.tsv"])
    assert cfg.data is None and (cfg.train, cfg.dev) == ("pairs.tsv", "dev.tsv")
    _, cfg = parse(recipe)
    assert cfg.data == "builtin:tatoeba-cmn-en" and cfg.train is None
    own = tmp_path / "own.yaml"
    own.write_text("train: mine.csv\ndev: mine-dev.csv\n", encoding="utf-8")
    _, cfg = parse(
        ["finetune", "classify", "-c", str(own), "--model", "m", "--out", "o", "--data", "builtin:reviews-sentiment"]
    )
    assert cfg.data == "builtin:reviews-sentiment" and cfg.train is None and cfg.dev is None


def test_max_steps_given_is_honoured_and_given_with_epochs_is_refused(tmp_path: Path) -> None:
    from lmforge.cli import parse
    from lmforge.errors import UserError

    command = ["finetune", "classify", "--model", "m", "--train", "t.csv", "--out", "o"]
    assert parse(command)[1].epochs == 3.0  # the default length: 3 epochs
    _, cfg = parse([*command, "--training.max-steps", "20"])
    assert cfg.epochs == 0 and cfg.training.max_steps == 20
    assert parse([*command, "--epochs", "0.00", "--training.max-steps", "20"])[1].training.max_steps == 20
    with pytest.raises(UserError, match="--epochs 2 and --training.max-steps 20 both set the length of the run"):
        parse([*command, "--epochs", "2", "--training.max-steps", "20"])
    recipe = tmp_path / "steps.yaml"
    recipe.write_text("training:\n  max_steps: 30\n", encoding="utf-8")
    _, cfg = parse([*command, "-c", str(recipe)])
    assert cfg.epochs == 0 and cfg.training.max_steps == 30
    both = tmp_path / "both.yaml"
    both.write_text("epochs: 2\ntraining:\n  max_steps: 30\n", encoding="utf-8")
    with pytest.raises(UserError, match="epochs 2 and .*both.yaml: training.max_steps 30 both set the length"):
        parse([*command, "-c", str(both)])
