"""The training loop: accumulation equals the big batch, non-finite steps, interrupts, exact resume."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmforge.data.tokenizer import load_tokenizer
from lmforge.errors import UserError
from lmforge.models.registry import build_model
from lmforge.models.sizes import model_size
from lmforge.tasks.base import LossOutput
from lmforge.tasks.mlm import MLMTask
from lmforge.train import checkpoint
from lmforge.train.config import TrainConfig
from lmforge.train.loop import SHORT_RUN_STEPS, TrainingDiverged, fit, length_warnings
from lmforge.train.optim import OptimConfig, build_optimizer, lr_factor


def _model(task: MLMTask, dropout: float = 0.1):
    torch.manual_seed(0)
    cfg = dataclasses.replace(
        model_size("bert-tiny", vocab_size=task.vocab_size), dropout=dropout, attn_dropout=dropout
    )
    return build_model(cfg)


@pytest.fixture(scope="module")
def task(mlm_shards: Path, review_wordpiece: Path) -> MLMTask:
    return MLMTask(shards=str(mlm_shards), tokenizer=load_tokenizer(review_wordpiece), seq_len=64)


class _PerItemMasks:
    """MLM whose masks depend on each item alone, so any split into micro-batches sees the same masks
    (the real task draws one stream per micro-batch); the number of targets still varies per batch."""

    def __init__(self, task: MLMTask) -> None:
        self.task, self.name = task, task.name
        self.train_items, self.val_items = task.train_items, task.val_items

    def collate(self, items, *, generator):
        parts = []
        for item in items:
            g = torch.Generator()
            g.manual_seed(int(item[0][:8].sum()))
            parts.append(self.task.collate([item], generator=g))
        T = parts[0]["input_ids"].shape[1]
        return {
            "input_ids": torch.cat([p["input_ids"] for p in parts]),
            "positions": torch.cat([p["positions"] + i * T for i, p in enumerate(parts)]),
            "labels": torch.cat([p["labels"] for p in parts]),
            "n_targets": sum(p["n_targets"] for p in parts),
        }

    def loss(self, model, batch):
        return self.task.loss(model, batch)

    def metrics(self, sums):
        return self.task.metrics(sums)

    def flops(self, model, batch):
        return self.task.flops(model, batch)


def test_accumulated_micro_batches_equal_the_big_batch(tiny_train_config, task: MLMTask, tmp_path: Path) -> None:
    per_item = _PerItemMasks(task)
    results = {}
    for micro in (8, 4, 2):
        model = _model(task, dropout=0.0)  # dropout masks depend on the micro-batch shape
        fit(model, per_item, tiny_train_config(micro_batch_size=micro, max_steps=2), run_dir=tmp_path / f"m{micro}")
        results[micro] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for micro in (4, 2):
        for name, value in results[8].items():
            torch.testing.assert_close(results[micro][name], value, atol=2e-6, rtol=1e-5, msg=name)


def test_evaluation_draws_no_training_randomness(tiny_train_config, task: MLMTask, tmp_path: Path) -> None:
    """Validating every step or never trains the same weights (the demo validates at the end only)."""
    trained = {}
    for every in (1, 0):
        model = _model(task, dropout=0.1)
        fit(model, task, tiny_train_config(max_steps=4, eval_every=every), run_dir=tmp_path / f"every{every}")
        trained[every] = model.state_dict()
    for name, value in trained[1].items():
        assert torch.equal(trained[0][name], value), name


def test_summary_accounts_tokens_flops_and_writes_the_run_files(
    tiny_train_config, task: MLMTask, tmp_path: Path
) -> None:
    summary = fit(_model(task), task, tiny_train_config(max_steps=3, eval_every=2), run_dir=tmp_path)
    assert summary["steps"] == 3 and summary["tokens"] == 3 * 8 * 64
    assert summary["train_flops"] > 0 and 0 < summary["mfu"] < 1  # against the given 1 TFLOP/s peak
    assert summary["warnings"] == length_warnings(tiny_train_config(max_steps=3), len(task.train_items))
    assert "only 3 optimizer step(s)" in summary["warnings"][0]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3]
    assert {"loss", "perplexity", "accuracy"} <= set(next(r for r in records if r["kind"] == "eval"))
    for name in ("results.json", "loss.png", "lr.png"):
        assert (tmp_path / name).is_file(), name
    assert list((tmp_path / "tb").iterdir()), "TensorBoard event file"
    # save_every=0: the last step and every new best evaluation are saved (the first evaluation, at step 2, is one)
    assert [p.name for p in checkpoint.checkpoint_dirs(tmp_path)] == ["step-0000002", "step-0000003"]


class _Poisoned:
    """Wraps a task: the loss is NaN on the listed (1-based) calls, or interrupts at one."""

    def __init__(self, task: MLMTask, nan_calls=(), interrupt_call: int | None = None) -> None:
        self.task, self.nan_calls, self.interrupt_call, self.calls = task, set(nan_calls), interrupt_call, 0
        self.name, self.train_items, self.val_items = task.name, task.train_items, task.val_items

    def collate(self, items, *, generator):
        return self.task.collate(items, generator=generator)

    def loss(self, model, batch) -> LossOutput:
        self.calls += 1
        if self.calls == self.interrupt_call:
            raise KeyboardInterrupt
        out = self.task.loss(model, batch)
        return LossOutput(out.loss_sum * float("nan"), out.counts) if self.calls in self.nan_calls else out

    def metrics(self, sums):
        return self.task.metrics(sums)

    def flops(self, model, batch):
        return self.task.flops(model, batch)


def test_a_nan_step_is_skipped_and_counted(tiny_train_config, task: MLMTask, tmp_path: Path) -> None:
    model = _model(task)
    summary = fit(model, _Poisoned(task, nan_calls={2}), tiny_train_config(max_steps=4), run_dir=tmp_path)
    assert summary["skipped_steps"] == 1 and summary["steps"] == 4
    assert all(torch.isfinite(p).all() for p in model.parameters())
    kinds = [json.loads(line)["kind"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert kinds.count("skip") == 1


def test_consecutive_nan_steps_stop_with_the_last_good_checkpoint(
    tiny_train_config, task: MLMTask, tmp_path: Path
) -> None:
    cfg = tiny_train_config(max_steps=10, save_every=2, max_bad_steps=3)
    with pytest.raises(TrainingDiverged, match="3 non-finite steps in a row"):
        fit(_model(task), _Poisoned(task, nan_calls={5, 6, 7}), cfg, run_dir=tmp_path)
    last = checkpoint.latest(tmp_path)  # saved at step 6, inside the bad streak: weights still those of step 4
    assert checkpoint.load_state(last).skipped_steps == 2
    from lmforge.models.registry import read_safetensors

    assert all(torch.isfinite(t).all() for t in read_safetensors(last / "model.safetensors").values())


def test_ctrl_c_saves_a_checkpoint_that_resumes(tiny_train_config, task: MLMTask, tmp_path: Path) -> None:
    with pytest.raises(KeyboardInterrupt):
        fit(_model(task), _Poisoned(task, interrupt_call=3), tiny_train_config(max_steps=5), run_dir=tmp_path)
    assert checkpoint.checkpoint_dirs(tmp_path)[-1].name == "step-0000002"
    summary = fit(_model(task), task, tiny_train_config(max_steps=5), run_dir=tmp_path, resume=True)
    assert summary["steps"] == 5


def test_checkpoints_keep_the_last_k_and_the_best(tiny_train_config, task: MLMTask, tmp_path: Path) -> None:
    fit(_model(task), task, tiny_train_config(max_steps=8, save_every=1, keep_last=2, eval_every=1), run_dir=tmp_path)
    state = checkpoint.load_state(checkpoint.latest(tmp_path))
    names = {p.name for p in checkpoint.checkpoint_dirs(tmp_path)}
    assert {"step-0000007", "step-0000008", f"step-{state.best_step:07d}"} == names
    assert not list((tmp_path / checkpoint.STATE_DIR).glob(".tmp-*"))


def test_learning_rate_schedule_and_decay_groups(task: MLMTask) -> None:
    cfg = OptimConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1, schedule="cosine")
    assert lr_factor(0, cfg=cfg, total_steps=100) == pytest.approx(0.1)
    assert lr_factor(9, cfg=cfg, total_steps=100) == pytest.approx(1.0)
    assert lr_factor(100, cfg=cfg, total_steps=100) == pytest.approx(0.1)
    assert lr_factor(55, cfg=cfg, total_steps=100) == pytest.approx(0.55)
    linear = OptimConfig(lr=1.0, warmup_steps=0, min_lr_ratio=0.0, schedule="linear")
    assert lr_factor(25, cfg=linear, total_steps=100) == pytest.approx(0.75)
    groups = build_optimizer(_model(task), OptimConfig(weight_decay=0.1)).param_groups
    assert groups[0]["weight_decay"] == 0.1 and all(p.ndim >= 2 for p in groups[0]["params"])
    assert groups[1]["weight_decay"] == 0.0 and all(p.ndim == 1 for p in groups[1]["params"])


def test_a_short_run_warms_up_for_a_share_of_it_evaluates_often_and_says_it_is_short() -> None:
    """The small-data case: 30 rows at 32 per step for 3 epochs are 3 steps. They still reach the peak learning
    rate (warm-up is at most a quarter of the run), are evaluated min_evals times, and are warned about."""
    short = OptimConfig(lr=1.0, warmup_steps=100, min_lr_ratio=0.0, schedule="linear")
    assert short.warmup_for(8) == 2 and short.warmup_for(1000) == 100
    assert [round(lr_factor(s, cfg=short, total_steps=8), 4) for s in range(8)] == [
        0.5,
        1.0,
        1.0,
        0.8333,
        0.6667,
        0.5,
        0.3333,
        0.1667,
    ]
    as_given = dataclasses.replace(short, warmup_share=1.0)
    assert lr_factor(7, cfg=as_given, total_steps=8) == pytest.approx(0.08)  # the run ends inside its warm-up
    with pytest.raises(UserError, match="warmup_share=0"):
        OptimConfig(warmup_share=0.0)

    assert TrainConfig(max_steps=10, eval_every=200, min_evals=4).eval_interval() == 2
    assert TrainConfig(max_steps=3, eval_every=200, min_evals=4).eval_interval() == 1
    assert TrainConfig(max_steps=1000, eval_every=200, min_evals=4).eval_interval() == 200
    assert TrainConfig(max_steps=10, eval_every=200).eval_interval() == 200  # min_evals 0: as given
    assert TrainConfig(max_steps=10, eval_every=0, min_evals=4).eval_interval() == 0  # only at the end

    three = TrainConfig(max_steps=3, global_batch_size=32, micro_batch_size=32)
    (said,) = length_warnings(three, 30)
    assert "only 3 optimizer step(s) (30 training examples, 32 per step, 3.2 pass(es)" in said and "--epochs" in said
    inside = TrainConfig(max_steps=SHORT_RUN_STEPS, optim=as_given)
    (said,) = length_warnings(inside, 1000)
    assert f"ends inside its warm-up (100 steps of {SHORT_RUN_STEPS})" in said
    assert length_warnings(TrainConfig(max_steps=SHORT_RUN_STEPS), 1000) == []


def _recipe(tmp_path: Path, corpus: Path, tokenizer: Path, shards: Path) -> Path:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"""# tiny test recipe
task: mlm
model: {{size: bert-tiny}}
data: {{input: [{corpus}], tokenizer: {tokenizer}, shards: {shards}, seq_len: 64}}
training: {{max_steps: 30, global_batch_size: 8, micro_batch_size: 4, log_every: 1, eval_every: 10, eval_batches: 2,
         save_every: 5, progress: false, deterministic: true, peak_tflops: 1.0}}
"""
    )
    return recipe


def _train_losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["kind"] == "train"}


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "lmforge", "pretrain", *args]


@pytest.fixture(scope="module")
def recipe_and_whole_run(tmp_path_factory, review_corpus: Path, review_wordpiece: Path, mlm_shards: Path, run_process):
    """The 30-step CLI recipe and the train losses of its uninterrupted run."""
    root = tmp_path_factory.mktemp("cli-runs")
    recipe = _recipe(root, review_corpus, review_wordpiece, mlm_shards)
    run_process(_cli("-c", str(recipe), "--out", str(root / "whole")))
    return recipe, _train_losses(root / "whole")


# `lmforge pretrain` in a child process that sends itself SIGNAL during its AT-th training loss call: the
# signal lands at the same step on every machine, however fast (polling for a checkpoint and then signalling
# raced the run's own end).
SIGNAL_AT = """import os, signal, sys
from lmforge.cli import main
from lmforge.tasks.mlm import MLMTask
sig, at, real, calls = getattr(signal, sys.argv[1]), int(sys.argv[2]), MLMTask.loss, [0]
def loss(self, model, batch):
    calls[0] += 1
    if calls[0] == at:
        os.kill(os.getpid(), sig)
    return real(self, model, batch)
MLMTask.loss = loss
sys.exit(main(sys.argv[3:]))
"""
# 2 micro-batches a step, 2 evaluation batches at step 10: call 27 is the first of step 13
IN_STEP_13 = 27


def _signalled_run(recipe: Path, run_dir: Path, sig: str) -> tuple[int, str]:
    """(exit status, output) of the recipe's run in ``run_dir`` with ``sig`` sent during step 13."""
    cmd = [sys.executable, "-c", SIGNAL_AT, sig, str(IN_STEP_13), "pretrain", "-c", str(recipe), "--out", str(run_dir)]
    done = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    return done.returncode, done.stdout + done.stderr


def test_killed_and_resumed_run_repeats_the_uninterrupted_losses(
    tmp_path: Path, recipe_and_whole_run, run_process
) -> None:
    recipe, whole = recipe_and_whole_run
    killed = tmp_path / "killed"
    code, out = _signalled_run(recipe, killed, "SIGKILL")
    assert code == -signal.SIGKILL, out
    assert checkpoint.latest(killed).name == "step-0000010"  # killed in step 13: the last save was step 10
    run_process(_cli("--resume", str(killed)))
    resumed = _train_losses(killed)
    assert sorted(resumed) == list(range(1, 31))
    assert resumed == whole  # exact equality, step by step


def test_sigterm_saves_a_checkpoint_exits_143_without_a_traceback_and_resumes_exactly(
    tmp_path: Path, recipe_and_whole_run, run_process
) -> None:
    recipe, whole = recipe_and_whole_run
    run_dir = tmp_path / "terminated"
    code, out = _signalled_run(recipe, run_dir, "SIGTERM")  # what schedulers, docker stop and timeout send
    assert code == 128 + signal.SIGTERM, out
    assert "Traceback" not in out and "stopped by SIGTERM" in out and f"--resume {run_dir}" in out
    # the signal came during step 13: that step is finished, saved, and nothing after it ran
    assert checkpoint.latest(run_dir).name == "step-0000013"
    assert max(_train_losses(run_dir)) == 13
    run_process(_cli("--resume", str(run_dir)))
    assert _train_losses(run_dir) == whole


def test_compiled_blocks_train_like_eager(tiny_train_config, task: MLMTask, tmp_path: Path) -> None:
    eager = fit(
        _model(task, dropout=0.0), task, tiny_train_config(max_steps=3, eval_every=3), run_dir=tmp_path / "eager"
    )
    compiled = fit(
        _model(task, dropout=0.0),
        task,
        tiny_train_config(max_steps=3, eval_every=3, compile=True),
        run_dir=tmp_path / "compiled",
    )
    assert abs(compiled["best_val_loss"] - eager["best_val_loss"]) < 1e-4
    losses = [_train_losses(tmp_path / name) for name in ("eager", "compiled")]
    for step, loss in losses[0].items():
        assert abs(losses[1][step] - loss) < 1e-4, step


def test_activation_checkpointing_gives_the_same_losses(tiny_train_config, task: MLMTask, tmp_path: Path) -> None:
    """Recomputing each block in the backward pass changes no loss, dropout included (its RNG state is kept)."""
    runs = {}
    for name, recompute in (("plain", False), ("recomputed", True)):
        cfg = tiny_train_config(max_steps=3, eval_every=3, activation_checkpointing=recompute)
        runs[name] = fit(_model(task, dropout=0.1), task, cfg, run_dir=tmp_path / name)
    assert runs["recomputed"]["best_val_loss"] == pytest.approx(runs["plain"]["best_val_loss"], abs=1e-5)
    plain, recomputed = (_train_losses(tmp_path / name) for name in ("plain", "recomputed"))
    assert plain.keys() == recomputed.keys() and len(plain) == 3
    for step, loss in plain.items():
        assert recomputed[step] == pytest.approx(loss, abs=1e-5), step


@pytest.mark.parametrize("fast_bf16", [True, False])
def test_auto_precision_trains_in_bf16_only_where_the_cpu_has_it(
    tiny_train_config,
    task: MLMTask,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    fast_bf16: bool,
) -> None:
    from lmforge.train import loop

    monkeypatch.setattr(loop, "bf16_is_fast", lambda device: fast_bf16)
    caplog.set_level("INFO", logger="lmforge.train")
    assert loop.training_precision("fp32", torch.device("cpu")) == "fp32"  # an explicit choice stays
    summary = fit(_model(task), task, tiny_train_config(precision="auto"), run_dir=tmp_path)
    chosen = "bf16" if fast_bf16 else "fp32"
    assert summary["train_config"]["precision"] == chosen
    assert f"training.precision=auto: {chosen} on this cpu" in caplog.text
