"""torchrun on CPU (gloo): 2-process DDP equals 1 process, checkpoints move between world sizes, FSDP runs."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from lmforge.models.registry import load_model


def _recipe(tmp_path: Path, corpus: Path, tokenizer: Path, shards: Path) -> Path:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"""# distributed test recipe
task: mlm
model: {{size: bert-tiny, dropout: 0.0}}
data: {{input: [{corpus}], tokenizer: {tokenizer}, shards: {shards}, seq_len: 64}}
training: {{max_steps: 6, global_batch_size: 8, micro_batch_size: 4, log_every: 1, eval_every: 3, eval_batches: 2,
         save_every: 3, progress: false, deterministic: true, peak_tflops: 1.0,
         optim: {{warmup_steps: 100, warmup_share: 1.0}}}}
"""
    )  # the whole run inside a 100-step warm-up taken as given: the rate depends on the step only, so a 6-step run
    # resumed to 9 steps follows the 9-step run (a warm-up that is a share of the run would differ between them)
    return recipe


def _pretrain(run_process: Callable[..., str], args: list[str], processes: int) -> None:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
    cmd = [*launcher, "-m", "lmforge"] if processes > 1 else [sys.executable, "-m", "lmforge"]
    run_process([*cmd, "pretrain", *args], timeout=300)


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(
    tmp_path_factory, review_corpus: Path, review_wordpiece: Path, mlm_shards: Path, run_process
) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dist")
    recipe = _recipe(root, review_corpus, review_wordpiece, mlm_shards)
    out = {name: root / name for name in ("single", "ddp", "fsdp", "single9")}
    _pretrain(run_process, ["-c", str(recipe), "--out", str(out["single"])], 1)
    _pretrain(run_process, ["-c", str(recipe), "--out", str(out["ddp"])], 2)
    _pretrain(run_process, ["-c", str(recipe), "--out", str(out["fsdp"]), "--training.distributed", "fsdp"], 2)
    _pretrain(run_process, ["-c", str(recipe), "--out", str(out["single9"]), "--training.max-steps", "9"], 1)
    return out


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_give_the_losses_of_one(runs: dict[str, Path], strategy: str) -> None:
    one, two = _records(runs["single"]), _records(runs[strategy])
    assert [(r["kind"], r["step"]) for r in one] == [(r["kind"], r["step"]) for r in two]
    for a, b in zip(one, two, strict=True):
        assert abs(a["loss"] - b["loss"]) < 1e-5, (a, b)
    assert json.loads((runs[strategy] / "results.json").read_text())["processes"] == 2


def test_fsdp_checkpoint_loads_unsharded(runs: dict[str, Path]) -> None:
    sharded, single = load_model(runs["fsdp"]), load_model(runs["single"])
    for (name, a), (_, b) in zip(sharded.state_dict().items(), single.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=name)


def test_a_two_process_checkpoint_resumes_on_one(runs: dict[str, Path], run_process) -> None:
    _pretrain(run_process, ["--resume", str(runs["ddp"]), "--training.max-steps", "9"], 1)
    resumed, reference = _records(runs["ddp"]), _records(runs["single9"])
    assert [(r["kind"], r["step"]) for r in resumed] == [(r["kind"], r["step"]) for r in reference]
    for a, b in zip(resumed, reference, strict=True):
        assert abs(a["loss"] - b["loss"]) < 1e-5, (a, b)


SAMPLE = Path(__file__).parents[1] / "fixtures" / "tatoeba-sample.tsv"  # English TAB Chinese TAB attribution
LOOP = [
    "--epochs",
    "0",
    "--training.max-steps",
    "4",
    "--training.global-batch-size",
    "8",
    "--training.micro-batch-size",
    "4",
    "--training.log-every",
    "1",
    "--training.eval-every",
    "2",
    "--training.deterministic",
    "--training.no-progress",
    "--training.peak-tflops",
    "1",
]


def _finetune(run_process: Callable[..., str], args: list[str], processes: int, strategy: str = "ddp") -> None:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
    cmd = [*launcher, "-m", "lmforge"] if processes > 1 else [sys.executable, "-m", "lmforge"]
    run_process([*cmd, "finetune", *args, *LOOP, "--training.distributed", strategy], timeout=300)


@pytest.fixture(scope="module")
def finetune_runs(tmp_path_factory, tiny_bert: Path, run_process, tiny_seq2seq_flags: list[str]) -> dict[str, Path]:
    """A classifier (an encoder with a head) and a translation encoder-decoder, each fine-tuned on one process
    and with FSDP on two."""
    from lmforge.data.builtin import load_builtin
    from lmforge.data.readers import write_jsonl

    root = tmp_path_factory.mktemp("dist-finetune")
    reviews = load_builtin("reviews-sentiment")
    write_jsonl(root / "train.jsonl", reviews["train"][:64])
    write_jsonl(root / "dev.jsonl", reviews["dev"][:16])
    lines = SAMPLE.read_text(encoding="utf-8-sig").splitlines()
    pairs = ["\t".join(reversed(line.split("\t")[:2])) for line in lines]
    (root / "train.tsv").write_text("\n".join(pairs[:64]) + "\n", encoding="utf-8")
    (root / "dev.tsv").write_text("\n".join(pairs[64:72]) + "\n", encoding="utf-8")
    classify = [
        "classify",
        "--model",
        str(tiny_bert),
        "--train",
        str(root / "train.jsonl"),
        "--dev",
        str(root / "dev.jsonl"),
        "--max-len",
        "32",
    ]
    translate = [
        "translate",
        "--train",
        str(root / "train.tsv"),
        "--dev",
        str(root / "dev.tsv"),
        "--vocab-size",
        "300",
        "--max-len",
        "24",
        *tiny_seq2seq_flags,
        "--seq2seq.dropout",
        "0",
        "--num-beams",
        "1",
    ]
    out = {}
    for name, args in (("classify", classify), ("translate", translate)):
        for processes, strategy in ((1, "ddp"), (2, "fsdp")):
            out[f"{name}-{processes}"] = root / f"{name}-{processes}"
            _finetune(run_process, [*args, "--out", str(out[f"{name}-{processes}"])], processes, strategy)
    return out


@pytest.mark.parametrize("task", ["classify", "translate"])
def test_fsdp_fine_tuning_gives_the_losses_of_one_process(finetune_runs: dict[str, Path], task: str) -> None:
    one, two = (_records(finetune_runs[f"{task}-{n}"]) for n in (1, 2))
    train_one, train_two = ([r["loss"] for r in rs if r["kind"] == "train"] for rs in (one, two))
    assert len(train_one) == 4
    assert train_two == pytest.approx(train_one, abs=1e-5)
    results = json.loads((finetune_runs[f"{task}-2"] / "results.json").read_text())
    assert results["training"]["processes"] == 2 and results["dev"]  # the first process scored the run
