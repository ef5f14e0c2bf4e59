"""Golden first losses: the first 5 training steps of mlm, clm, electra, classify and ner under a fixed seed.

A refactor that changes numerics (initialisation order, masking draws, batch order, loss normalisation)
changes these losses and fails here. The recorded values are in ``tests/fixtures/golden/first_losses.json``;
regenerate them only when a change of numerics is intended: ``LMFORGE_WRITE_GOLDEN=1 pytest
tests/train/test_golden_losses.py`` (and say why in the commit). Runs are fp32 on the CPU with one thread,
so the numbers are machine-independent up to the last bits of a float32 matmul (hence rel=1e-4). Each
pretraining run prepares its own shards (never the session's shard fixtures: rewriting a file that other
tests hold memory-mapped would crash them with SIGBUS).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from lmforge.cli import main
from lmforge.data.builtin import load_builtin
from lmforge.data.readers import write_conll, write_jsonl

GOLDEN = Path(__file__).parents[1] / "fixtures" / "golden" / "first_losses.json"
STEPS = 5
LOOP = [
    "--max-steps",
    str(STEPS),
    "--log-every",
    "1",
    "--eval-every",
    "0",
    "--no-progress",
    "--peak-tflops",
    "1",
    "--global-batch-size",
    "8",
    "--micro-batch-size",
    "4",
    "--precision",
    "fp32",
    "--device",
    "cpu",
    "--optim.lr",
    "2e-3",
    "--optim.warmup-steps",
    "1",
]


def _loop(prefix: str) -> list[str]:
    return [f"--{prefix}.{a[2:]}" if a.startswith("--") else a for a in LOOP]


def _first_losses(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["kind"] == "train"][:STEPS]


def _pretrain(task: str, out: Path, tokenizer: Path, corpus: Path, size: str) -> list[float]:
    assert (
        main(
            [
                "pretrain",
                "--out",
                str(out),
                "--task",
                task,
                "--data.tokenizer",
                str(tokenizer),
                "--data.input",
                str(corpus),
                "--data.val-fraction",
                "0.02",
                "--data.seq-len",
                "32",
                "--model.size",
                size,
                "--model.n-layers",
                "2",
                "--model.d-model",
                "32",
                "--model.d-ff",
                "64",
                "--model.n-heads",
                "2",
                *_loop("training"),
            ]
        )
        == 0
    )
    return _first_losses(out)


def _finetune(kind: str, out: Path, model: Path, train: Path) -> list[float]:
    assert (
        main(
            [
                "finetune",
                kind,
                "--model",
                str(model),
                "--train",
                str(train),
                "--out",
                str(out),
                "--epochs",
                "0",
                "--max-len",
                "32",
                *_loop("training"),
            ]
        )
        == 0
    )
    return _first_losses(out)


@pytest.fixture(scope="module")
def losses(tmp_path_factory, review_wordpiece, review_bpe, review_corpus, tiny_bert) -> dict[str, list[float]]:
    tmp = tmp_path_factory.mktemp("golden")
    write_jsonl(tmp / "reviews.jsonl", load_builtin("reviews-sentiment")["train"][:64])
    write_conll(tmp / "ner.conll", load_builtin("peoples-daily-ner")["train"][:64])
    return {
        "mlm": _pretrain("mlm", tmp / "mlm", review_wordpiece, review_corpus, "bert-tiny"),
        "electra": _pretrain("electra", tmp / "electra", review_wordpiece, review_corpus, "bert-tiny"),
        "clm": _pretrain("clm", tmp / "clm", review_bpe, review_corpus, "gpt-tiny"),
        "classify": _finetune("classify", tmp / "classify", tiny_bert, tmp / "reviews.jsonl"),
        "ner": _finetune("ner", tmp / "ner", tiny_bert, tmp / "ner.conll"),
    }


def test_first_losses_match_the_recorded_ones(losses: dict[str, list[float]]) -> None:
    if os.environ.get("LMFORGE_WRITE_GOLDEN") == "1":
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_text(json.dumps(losses, indent=1) + "\n", encoding="utf-8")
    recorded = json.loads(GOLDEN.read_text(encoding="utf-8"))
    assert sorted(recorded) == sorted(losses)
    for name, values in losses.items():
        assert len(values) == STEPS, name
        assert values == pytest.approx(recorded[name], rel=1e-4), name
