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
         save_every: 3, progress: false, deterministic: true, peak_tflops: 1.0}}
"""
    )
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
