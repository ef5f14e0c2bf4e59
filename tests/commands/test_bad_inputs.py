"""Every bad input a user can bring gets one clear error naming the file (and line, key or value), exit
status 2, no traceback, and nothing written: each case here raised a traceback or did the wrong thing
before (see the reliability issue's table)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmforge.cli import main
from lmforge.data.builtin import load_builtin
from lmforge.data.readers import write_jsonl

FAST = [
    "--training.no-progress",
    "--training.peak-tflops",
    "1",
    "--epochs",
    "0",
    "--training.max-steps",
    "2",
    "--training.eval-every",
    "0",
    "--max-len",
    "32",
]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad-inputs")
    reviews = load_builtin("reviews-sentiment")
    write_jsonl(root / "train.jsonl", reviews["train"][:40])
    (root / "empty.csv").write_text("")
    (root / "blank.tsv").write_text("\n\n")
    huge = "好" * 140_000  # over the csv module's default 128 Ki-character field limit
    rows = "".join(f"评论{i},{'pos' if i % 2 else 'neg'}\n" for i in range(20))
    (root / "huge-field.csv").write_text(f'text,label\n"{huge}",pos\n{rows}', encoding="utf-8")
    (root / "unseen-label.csv").write_text("text,label\n还行,neutral\n很好,pos\n", encoding="utf-8")
    (root / "number-text.jsonl").write_text('{"text": 123, "label": "pos"}\n{"text": "好", "label": "neg"}\n')
    (root / "broken.yaml").write_text("model: {size: bert-tiny\ntraining:\n  max_steps: 3\n")
    (root / "a-directory").mkdir()
    (root / "texts.txt").write_text("房间很干净\n太差了\n", encoding="utf-8")
    return {p.name: p for p in root.iterdir()}


def _fails(capsys, args: list[str], *expected: str) -> str:
    try:
        code = main(args)
    except SystemExit as e:  # tyro reports a value its dataclass refused as a usage error (exit 2)
        code = e.code
    out = capsys.readouterr()
    text = " ".join((out.out + out.err).split())
    assert code == 2, text
    assert "Traceback" not in text
    for piece in expected:
        assert piece in text, text
    return text


def _classify(tiny_bert: Path, out: Path, *extra: str) -> list[str]:
    return ["finetune", "classify", "--model", str(tiny_bert), "--out", str(out), *FAST, *extra]


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("empty.csv", "empty.csv: empty file"),
        ("blank.tsv", "blank.tsv: empty file"),
        ("a-directory", "a-directory: is a directory"),
        ("number-text.jsonl", "number-text.jsonl:1: text must be a string, not int"),
    ],
)
def test_a_bad_training_file_is_named_before_anything_is_written(
    capsys, tmp_path: Path, tiny_bert: Path, files: dict[str, Path], name: str, expected: str
) -> None:
    out = tmp_path / "run"
    _fails(capsys, _classify(tiny_bert, out, "--train", str(files[name])), expected)
    assert not (out / "config.yaml").exists() and not (out / "trainer_state").exists()


def test_a_field_over_the_csv_modules_default_limit_is_read(tmp_path: Path, files: dict[str, Path]) -> None:
    from lmforge.data.readers import read_labelled

    examples, _ = read_labelled(files["huge-field.csv"])
    assert len(examples) == 21 and len(examples[0]["text"]) == 140_000


def test_a_label_seen_only_in_test_is_refused_before_training_and_the_directory_stays_usable(
    capsys, tmp_path: Path, tiny_bert: Path, files: dict[str, Path]
) -> None:
    out = tmp_path / "run"
    args = _classify(tiny_bert, out, "--train", str(files["train.jsonl"]))
    _fails(
        capsys, [*args, "--test", str(files["unseen-label.csv"])], "unseen-label.csv:2: label 'neutral' never occurs"
    )
    assert not out.exists(), "a failed start leaves no directory behind (no .lock, no config.yaml)"
    assert main(args) == 0  # the same --out is fine for the corrected run


def test_a_start_that_fails_after_writing_its_recipe_leaves_nothing(
    capsys, tmp_path: Path, tiny_bert: Path, files: dict[str, Path]
) -> None:
    """The recipe is written, then the model is found too small for --max-len: neither .lock nor config.yaml stays,
    so nothing looks like a run that could be resumed."""
    out = tmp_path / "run"
    args = [*_classify(tiny_bert, out, "--train", str(files["train.jsonl"])), "--max-len", "100000"]
    _fails(capsys, args, "exceeds the model's max_seq_len")
    assert not out.exists()
    kept = tmp_path / "kept"
    (kept / "notes").mkdir(parents=True)
    _fails(capsys, [*_classify(tiny_bert, kept, "--train", str(files["train.jsonl"])), "--max-len", "100000"], "max")
    assert (kept / "notes").is_dir(), "a directory the user made is never removed"


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--training.device", "tpu"], "training.device='tpu' is not a device"),
        (["--epochs", "-1"], "epochs=-1.0 must be >= 0"),
        (["--max-len", "1"], "max_len=1 must be >= 3"),
        (["--dropout", "1.5"], "dropout=1.5 must be >= 0 and < 1"),
        (["--training.keep-last", "-1"], "training.keep_last=-1 must be >= 0"),
    ],
)
def test_bad_values_are_refused_naming_the_key(
    capsys, tmp_path: Path, tiny_bert: Path, files: dict[str, Path], flags: list[str], expected: str
) -> None:
    _fails(capsys, [*_classify(tiny_bert, tmp_path / "run", "--train", str(files["train.jsonl"])), *flags], expected)
    assert not (tmp_path / "run").exists()


def test_a_yaml_syntax_error_names_the_file_line_and_column(capsys, files: dict[str, Path]) -> None:
    _fails(capsys, ["finetune", "classify", "-c", str(files["broken.yaml"])], "broken.yaml:2:9: not valid YAML")


@pytest.fixture(scope="module")
def classify_run(tmp_path_factory, tiny_bert: Path, files: dict[str, Path]) -> Path:
    out = tmp_path_factory.mktemp("classify") / "run"
    assert main(_classify(tiny_bert, out, "--train", str(files["train.jsonl"]))) == 0
    return out


def test_predict_refuses_a_directory_or_its_own_input_as_output(
    capsys, tmp_path: Path, classify_run: Path, files: dict[str, Path]
) -> None:
    predict = ["predict", "--model", str(classify_run), "--input"]
    _fails(capsys, [*predict, str(files["texts.txt"]), "--output", str(files["a-directory"])], "is a directory")
    assert not list(files["a-directory"].parent.glob("*.tmp")), "no stray temporary file"
    texts = tmp_path / "texts.txt"
    texts.write_text("房间很干净\n", encoding="utf-8")
    _fails(capsys, [*predict, str(texts), "--output", str(texts)], "is the input file")
    assert texts.read_text(encoding="utf-8") == "房间很干净\n", "the input was not overwritten"


@pytest.mark.parametrize("name", ["task.json", "config.json"])
def test_an_invalid_json_file_of_a_run_names_the_file_and_line(
    capsys, tmp_path: Path, classify_run: Path, files: dict[str, Path], name: str
) -> None:
    import shutil

    run = tmp_path / "run"
    shutil.copytree(classify_run, run)
    (run / name).write_text('{"task": "classify",\n')
    _fails(
        capsys,
        ["predict", "--model", str(run), "--input", str(files["texts.txt"]), "--output", str(tmp_path / "p.jsonl")],
        f"{name}:2:1: not valid JSON",
    )


def test_an_invalid_state_json_on_resume_names_the_file(capsys, tmp_path: Path, classify_run: Path) -> None:
    import shutil

    from lmforge.train import checkpoint

    run = tmp_path / "run"
    shutil.copytree(classify_run, run)
    for ckpt in checkpoint.checkpoint_dirs(run):
        (ckpt / checkpoint.MANIFEST).unlink()  # as written by an older lmforge: nothing to verify against
        (ckpt / "state.json").write_text("{\n")
    _fails(
        capsys,
        ["finetune", "classify", "--resume", str(run), "--training.max-steps", "4"],
        "state.json:2:1: not valid JSON",
    )
    results = json.loads((run / "results.json").read_text())
    assert results["training"]["steps"] == 2, "the finished run was left as it was"


# --- the second reliability pass (issue 31): each refused before any work, naming the value, without a traceback


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--training.optim.lr", "nan"], "optim.lr=nan must be a finite positive number"),
        (["--training.optim.lr", "inf"], "optim.lr=inf must be a finite positive number"),
    ],
)
def test_a_learning_rate_that_is_not_a_number_is_refused(
    capsys, tmp_path: Path, tiny_bert: Path, files: dict[str, Path], args: list[str], expected: str
) -> None:
    _fails(capsys, [*_classify(tiny_bert, tmp_path / "run", "--train", str(files["train.jsonl"])), *args], expected)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["embed", "--batch-size", "0"], "--batch-size 0: must be >= 1"),
        (["translate", "--batch-size", "0"], "each must be >= 1"),
        (["translate", "--length-penalty", "nan"], "--length-penalty nan: must be a finite number"),
        (["explain", "--text", " "], "--text is empty"),
        (["serve", "--port", "70000"], "--port 70000: must be between 1 and 65535"),
        (["serve", "--queue-size", "0"], "--queue-size 0: must be a whole number >= 1"),
        (["serve", "--max-body-bytes", "-1"], "--max-body-bytes -1: must be a whole number >= 1"),
    ],
)
def test_bad_command_values_are_refused_before_any_model_loads(
    capsys, tmp_path: Path, classify_run: Path, files: dict[str, Path], args: list[str], expected: str
) -> None:
    command, *flags = args
    where = {
        "embed": ["--model", str(classify_run), "--input", str(files["texts.txt"]), "--output", str(tmp_path / "v")],
        "translate": [
            "--model",
            str(classify_run),
            "--input",
            str(files["texts.txt"]),
            "--output",
            str(tmp_path / "t"),
        ],
        "explain": ["--model", str(classify_run), "--output", str(tmp_path / "why.jsonl")],
        "serve": ["--model", f"m={classify_run}"],
    }[command]
    _fails(capsys, [command, *where, *flags], expected)


def test_evaluate_refuses_no_examples_and_a_corpus_of_another_task(capsys, tmp_path: Path, classify_run: Path) -> None:
    header_only = tmp_path / "empty.csv"
    header_only.write_text("text,label\n", encoding="utf-8")
    evaluate = ["evaluate", "--model", str(classify_run), "--data"]
    _fails(capsys, [*evaluate, str(header_only)], "no examples")
    _fails(
        capsys, [*evaluate, "builtin:peoples-daily-ner"], "a ner corpus; a classify run takes builtin:reviews-sentiment"
    )


def test_a_diverging_run_is_the_users_error_not_a_bug(capsys, tmp_path: Path, tiny_bert: Path, files) -> None:
    """An lr so high that every step overflows: exit 2 with what diverged and what to try, no 'internal error'."""
    args = _classify(tiny_bert, tmp_path / "run", "--train", str(files["train.jsonl"]))
    flags = [
        "--training.optim.lr",
        "1e30",
        "--training.max-bad-steps",
        "2",
        "--epochs",
        "0",
        "--training.max-steps",
        "6",
    ]
    said = _fails(capsys, [*args, *flags], "non-finite steps in a row", "Lower training.optim.lr")
    assert "internal error" not in said


def test_resume_with_an_equals_sign_resumes_that_directory(tmp_path: Path) -> None:
    from lmforge.cli import parse
    from lmforge.files import write_yaml
    from lmforge.runs.config import PretrainConfig

    run = tmp_path / "run"
    run.mkdir()
    write_yaml(run / "config.yaml", PretrainConfig(out=str(run)))
    _, cfg = parse(["pretrain", f"--resume={run}"])
    assert cfg.out == str(run) and cfg.resume is True


def test_a_recipe_with_a_key_given_twice_is_refused_naming_both_lines(capsys, tmp_path: Path) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("out: runs/x\nepochs: 1\nepochs: 2\n", encoding="utf-8")
    _fails(capsys, ["finetune", "classify", "-c", str(recipe)], "key 'epochs' is given twice (lines 2 and 3)")


def test_predict_keeps_a_gold_label_and_names_the_prediction_apart(tmp_path: Path, classify_run: Path) -> None:
    labelled = tmp_path / "gold.jsonl"
    write_jsonl(labelled, [{"text": "房间很干净", "label": "pos"}, {"text": "太差了", "label": "neg"}])
    out = tmp_path / "p.jsonl"
    assert main(["predict", "--model", str(classify_run), "--input", str(labelled), "--output", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["label"] for r in rows] == ["pos", "neg"], "the gold labels are kept"
    assert all(r["predicted_label"] in ("pos", "neg") and "scores" in r for r in rows)


@pytest.mark.parametrize("rows", [1, 2])
def test_a_file_too_small_to_hold_out_a_dev_split_says_so(capsys, tmp_path: Path, tiny_bert: Path, rows: int) -> None:
    train = tmp_path / "tiny.jsonl"
    write_jsonl(train, [{"text": "好", "label": "pos"}, {"text": "差", "label": "neg"}][:rows])
    _fails(capsys, _classify(tiny_bert, tmp_path / "run", "--train", str(train)), "Give --dev FILE, or more rows")
