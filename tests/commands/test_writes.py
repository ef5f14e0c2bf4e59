"""One rule for every command that writes (issue 31): into a new directory, its own kind of output, or files that
are not its inputs, not inside a model or run directory and not each other. Each case is refused before any work,
naming what is there, and leaves every byte of what was there as it was."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

from lmforge.cli import main
from lmforge.data.readers import write_jsonl
from lmforge.files import write_yaml
from lmforge.rundir.layout import holds_stages_of
from lmforge.runs.config import CompareConfig, DemoConfig

FAST = ["--training.no-progress", "--training.peak-tflops", "1", "--training.eval-every", "0", "--max-len", "32"]


@pytest.fixture(scope="module")
def dirs(cue_texts, tmp_path_factory: pytest.TempPathFactory, tiny_bert: Path) -> dict[str, Path]:
    """A pretrained BERT directory (a copy of the shared one), a classify run fine-tuned from it, and a text file."""
    root = tmp_path_factory.mktemp("writes")
    model = root / "bert"
    shutil.copytree(tiny_bert, model)
    write_jsonl(root / "train.jsonl", cue_texts(64, 1))
    run = root / "run"
    args = ["finetune", "classify", "--model", str(model), "--train", str(root / "train.jsonl"), "--out", str(run)]
    assert main([*args, "--epochs", "1", *FAST]) == 0
    compare = root / "compare"  # what `lmforge compare` leaves at the top of its --out
    compare.mkdir()
    write_yaml(compare / "config.yaml", CompareConfig(out=str(compare)))
    return {"model": model, "run": run, "texts": root / "train.jsonl", "root": root, "compare": compare}


def _fingerprint(directory: Path) -> dict[str, str]:
    """Every file's SHA-256, but the run's lock (it records which process last held the directory)."""
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


CASES = {
    "finetune into its own pretrained model": (
        ["finetune", "classify", "--model", "{model}", "--train", "{texts}", "--out", "{model}"],
        "holds the input",
    ),
    "finetune into a finished run": (
        ["finetune", "classify", "--model", "{model}", "--train", "{texts}", "--out", "{run}"],
        "already holds checkpoints",
    ),
    "pretrain into a model directory": (["pretrain", "--out", "{model}", "--data.input", "{texts}"], "already holds"),
    "distil into the student's model": (
        ["distill", "classify", "--teacher", "{run}", "--model", "{model}", "--train", "{texts}", "--out", "{model}"],
        "holds the input",
    ),
    "export a run onto itself": (["export", "{run}", "--to", "hf", "--out", "{run}"], "holds the input"),
    "export over another model": (["export", "{run}", "--to", "hf", "--out", "{model}"], "already holds"),
    "convert a checkpoint over a run": (
        ["convert", "--builtin", "multilingual-e5-small", "--out", "{run}"],
        "already holds a 'classify' run",
    ),
    "convert over a run": (["convert", "--from-hf", "{model}", "--out", "{run}"], "already holds a 'classify' run"),
    "quantize over a model": (["quantize", "--model", "{run}", "--out", "{model}"], "is not a compressed copy"),
    "evaluate into the run's results": (
        ["evaluate", "--model", "{run}", "--data", "{texts}", "--output", "{run}/results.json"],
        "inside",
    ),
    "evaluate metrics named like their plot": (
        ["evaluate", "--model", "{run}", "--data", "{texts}", "--output", "{root}/m.png"],
        "also writes .png",
    ),
    "explain named like its page": (
        ["explain", "--model", "{run}", "--text", "好", "--output", "{root}/why.html"],
        "also writes .html",
    ),
    "predict into a run": (
        ["predict", "--model", "{run}", "--input", "{texts}", "--output", "{model}/predictions.jsonl"],
        "inside",
    ),
    "embed into a model": (["embed", "--model", "{model}", "--input", "{texts}", "--output", "{model}/v"], "inside"),
    "train a tokenizer into a model": (
        ["tokenizer", "train", "--input", "{texts}", "--out", "{model}"],
        "already holds",
    ),
    "prepare shards into a run": (
        ["prepare", "--input", "{texts}", "--tokenizer", "{model}", "--out", "{run}"],
        "already holds a 'classify' run",
    ),
    "export a corpus into a run": (["data", "export", "reviews-sentiment", "--out", "{run}"], "already holds"),
    "demo into a run": (["demo", "--quick", "--out", "{run}"], "already holds a 'classify' run"),
    "compare into a model": (["compare", "--out", "{model}"], "already holds a model directory"),
    "nas into a run": (["nas", "--out", "{run}"], "already holds a 'classify' run"),
    "nas into a comparison": (["nas", "--out", "{compare}"], "already holds a training run"),
    "translate over its input": (
        ["translate", "--model", "{run}", "--input", "{texts}", "--output", "{texts}"],
        "is the input file",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_command_never_writes_over_a_model_a_run_an_input_or_its_own_output(
    case: str, dirs: dict[str, Path], capsys
) -> None:
    args, message = CASES[case]
    before = {name: _fingerprint(d) for name, d in dirs.items() if d.is_dir()}
    texts = dirs["texts"].read_bytes()
    assert main([a.format(**dirs) for a in args]) == 2
    said = capsys.readouterr()
    assert message in said.out + said.err, said.out + said.err
    assert {name: _fingerprint(d) for name, d in dirs.items() if d.is_dir()} == before
    assert dirs["texts"].read_bytes() == texts


def test_a_multi_stage_command_reuses_its_own_output_and_no_other(dirs: dict[str, Path]) -> None:
    """compare and nas rerun in their own --out (finished stages are reused), and in no other command's."""
    from lmforge.nas.config import NASConfig

    assert holds_stages_of(CompareConfig)(dirs["compare"])
    assert not holds_stages_of(NASConfig)(dirs["compare"])
    assert not holds_stages_of(DemoConfig)(dirs["compare"])
    assert not holds_stages_of(CompareConfig)(dirs["run"])  # a run's recipe is a fine-tuning config
