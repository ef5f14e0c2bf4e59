"""Fault injection on checkpoints: corrupted and truncated files are skipped (the newest checkpoint that
verifies is used), pruning never removes the newest good one, a full disk is one clear error that leaves
the earlier checkpoints intact, and two runs cannot share a run directory."""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmforge.cli import main
from lmforge.data.tokenizer import load_tokenizer
from lmforge.models.registry import build_model
from lmforge.models.sizes import model_size
from lmforge.runs import session
from lmforge.tasks.mlm import MLMTask
from lmforge.train import checkpoint
from lmforge.train.loop import fit


def _model(task: MLMTask):
    torch.manual_seed(0)
    return build_model(
        dataclasses.replace(model_size("bert-tiny", vocab_size=task.vocab_size), dropout=0.0, attn_dropout=0.0)
    )


@pytest.fixture(scope="module")
def task(mlm_shards: Path, review_wordpiece: Path) -> MLMTask:
    return MLMTask(shards=str(mlm_shards), tokenizer=load_tokenizer(review_wordpiece), seq_len=64)


@pytest.fixture(scope="module")
def reference(tiny_train_config, task: MLMTask, tmp_path_factory) -> dict[int, float]:
    """Train losses of an uninterrupted 9-step run, step by step."""
    run = tmp_path_factory.mktemp("reference")
    fit(_model(task), task, tiny_train_config(save_every=3, keep_last=2, max_steps=9), run_dir=run)
    return _losses(run)


def _losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["kind"] == "train"}


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGES = [
    ("model.safetensors", _flip_a_byte),
    ("model.safetensors", _truncate),
    ("optimizer.pt", _truncate),
    ("rng.pt", _truncate),
    ("state.json", _flip_a_byte),
    ("manifest.json", _truncate),
]


@pytest.mark.parametrize(("name", "damage"), DAMAGES)
def test_a_damaged_latest_checkpoint_is_skipped_and_the_previous_one_resumes_exactly(
    tiny_train_config, task: MLMTask, reference: dict[int, float], tmp_path: Path, caplog, name: str, damage
) -> None:
    fit(_model(task), task, tiny_train_config(save_every=3, keep_last=2, max_steps=6), run_dir=tmp_path)
    assert [p.name for p in checkpoint.checkpoint_dirs(tmp_path)] == ["step-0000003", "step-0000006"]
    damage(tmp_path / checkpoint.STATE_DIR / "step-0000006" / name)
    with caplog.at_level(logging.WARNING, logger="lmforge.checkpoint"):
        fit(
            _model(task), task, tiny_train_config(save_every=3, keep_last=2, max_steps=9), run_dir=tmp_path, resume=True
        )
    assert "skipping checkpoint step-0000006" in caplog.text and name in caplog.text
    assert _losses(tmp_path) == reference  # resumed from step 3: the uninterrupted run's losses, exactly
    assert [p.name for p in checkpoint.checkpoint_dirs(tmp_path)] == ["step-0000006", "step-0000009"]
    assert checkpoint.verify(checkpoint.latest(tmp_path)) is None


def test_a_damaged_best_checkpoint_is_not_handed_on(tiny_train_config, task: MLMTask, tmp_path: Path, caplog) -> None:
    fit(_model(task), task, tiny_train_config(save_every=3, keep_last=2, max_steps=6), run_dir=tmp_path)
    best = tmp_path / checkpoint.STATE_DIR / "step-0000003"
    _flip_a_byte(best / "model.safetensors")
    with caplog.at_level(logging.WARNING, logger="lmforge.checkpoint"):
        chosen = checkpoint.load_best(_model(task), tmp_path, best_step=3)
    assert chosen.name == "step-0000006" and "step-0000003 does not verify" in caplog.text
    assert "model.safetensors" in caplog.text


def test_no_checkpoint_verifies_is_a_clear_error(tiny_train_config, task: MLMTask, tmp_path: Path) -> None:
    fit(_model(task), task, tiny_train_config(save_every=3, keep_last=2, max_steps=6), run_dir=tmp_path)
    for ckpt in checkpoint.checkpoint_dirs(tmp_path):
        _truncate(ckpt / "optimizer.pt")
    with pytest.raises(ValueError, match="none of the 2 checkpoint"):
        checkpoint.latest(tmp_path)


def test_a_legacy_checkpoint_without_manifest_still_loads(tiny_train_config, task: MLMTask, tmp_path: Path) -> None:
    fit(_model(task), task, tiny_train_config(save_every=3, keep_last=2, max_steps=3), run_dir=tmp_path)
    (checkpoint.latest(tmp_path) / checkpoint.MANIFEST).unlink()
    assert checkpoint.latest(tmp_path).name == "step-0000003"
    assert (
        fit(
            _model(task), task, tiny_train_config(save_every=3, keep_last=2, max_steps=6), run_dir=tmp_path, resume=True
        )["steps"]
        == 6
    )


def test_a_legacy_checkpoint_that_does_not_load_is_skipped_like_one_that_fails_its_manifest(
    tiny_train_config, task: MLMTask, tmp_path: Path, caplog
) -> None:
    """Without a manifest nothing says a file was cut: a truncated optimizer.pt must not end the resume in a torch
    error; the previous checkpoint is taken, with a warning naming the file."""
    fit(_model(task), task, tiny_train_config(save_every=3, keep_last=2, max_steps=6), run_dir=tmp_path)
    for ckpt in checkpoint.checkpoint_dirs(tmp_path):
        (ckpt / checkpoint.MANIFEST).unlink()
    optimizer = tmp_path / checkpoint.STATE_DIR / "step-0000006" / checkpoint.OPTIMIZER
    optimizer.write_bytes(optimizer.read_bytes()[:100])
    with caplog.at_level(logging.WARNING, logger="lmforge.checkpoint"):
        assert checkpoint.latest(tmp_path).name == "step-0000003"
    assert "skipping checkpoint step-0000006" in caplog.text and "optimizer.pt: does not load" in caplog.text


def test_pruning_keeps_the_checkpoint_just_written_even_with_keep_last_0(
    tiny_train_config, task: MLMTask, tmp_path: Path
) -> None:
    fit(
        _model(task),
        task,
        tiny_train_config(max_steps=6, save_every=2, keep_last=0),
        run_dir=tmp_path,
    )
    assert [p.name for p in checkpoint.checkpoint_dirs(tmp_path)] == ["step-0000006"]


def test_a_full_disk_is_one_clear_error_and_the_previous_checkpoint_survives(
    tiny_train_config, task: MLMTask, tmp_path: Path, monkeypatch
) -> None:
    fit(_model(task), task, tiny_train_config(save_every=3, keep_last=2, max_steps=3), run_dir=tmp_path)
    before = checkpoint.checkpoint_dirs(tmp_path)
    real_write = checkpoint._write_bytes

    def write(path: Path, data: bytes) -> None:
        if path.name == "optimizer.pt":  # the second file of the checkpoint: a partial directory exists
            path.write_bytes(data[:100])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real_write(path, data)

    monkeypatch.setattr(checkpoint, "_write_bytes", write)
    with pytest.raises(checkpoint.CheckpointWriteError) as raised:
        fit(
            _model(task), task, tiny_train_config(save_every=3, keep_last=2, max_steps=6), run_dir=tmp_path, resume=True
        )
    message = str(raised.value)
    assert str(tmp_path / checkpoint.STATE_DIR) in message and "bytes needed" in message and "--resume" in message
    assert not list((tmp_path / checkpoint.STATE_DIR).glob(".tmp-*")), "the partial checkpoint was removed"
    assert checkpoint.checkpoint_dirs(tmp_path) == before and checkpoint.verify(before[-1]) is None


def test_too_little_free_space_is_refused_before_writing(
    tiny_train_config, task: MLMTask, tmp_path: Path, monkeypatch
) -> None:
    fit(_model(task), task, tiny_train_config(save_every=3, keep_last=2, max_steps=3), run_dir=tmp_path)
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda path: usage._replace(free=1000))
    with pytest.raises(checkpoint.CheckpointWriteError, match=r"needs [\d,]+ bytes, the disk has 1,000 free"):
        fit(
            _model(task), task, tiny_train_config(save_every=3, keep_last=2, max_steps=6), run_dir=tmp_path, resume=True
        )
    assert [p.name for p in checkpoint.checkpoint_dirs(tmp_path)] == ["step-0000003"]


HOLD_LOCK = """import sys, time
from lmforge.runs import session
with session.locked(sys.argv[1]):
    print("held", flush=True)
    time.sleep(600)
"""


@pytest.fixture()
def lock_holder(tmp_path: Path):
    """Another process that holds ``tmp_path / 'run'``'s lock (killed with SIGKILL at the end)."""
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    yield run, proc
    proc.kill()
    proc.wait()


def test_a_second_run_on_a_locked_directory_fails_at_once_naming_the_holder(
    lock_holder, review_corpus: Path, capsys
) -> None:
    run, holder = lock_holder
    code = main(["pretrain", "--out", str(run), "--data.input", str(review_corpus), "--training.max-steps", "1"])
    out = capsys.readouterr().out
    assert code == 2 and f"{run} is in use by another run (pid {holder.pid}" in out
    assert sorted(p.name for p in run.iterdir()) == [session.LOCK_FILE], "nothing was written"


def test_the_lock_of_a_killed_process_is_stale_and_taken_over(lock_holder) -> None:
    run, holder = lock_holder
    with pytest.raises(session.RunDirectoryBusy), session.locked(run):
        pass
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with session.locked(run):  # the kernel dropped the dead process's lock
        assert json.loads((run / session.LOCK_FILE).read_text())["pid"] == os.getpid()


@pytest.mark.parametrize(
    "command",
    [
        ["demo", "--quick"],
        ["compare", "-c", "configs/compare/objectives-bert-tiny-zh.yaml"],
        ["nas", "-c", "configs/nas/classify-zh.yaml"],
    ],
    ids=lambda c: c[0],
)
def test_multi_stage_commands_hold_their_out_directory(lock_holder, capsys, command: list[str]) -> None:
    run, holder = lock_holder
    root = Path(__file__).resolve().parents[2]
    args = [a if not a.startswith("configs/") else str(root / a) for a in command]
    assert main([*args, "--out", str(run)]) == 2
    assert f"is in use by another run (pid {holder.pid}" in " ".join(capsys.readouterr().out.split())
    assert sorted(p.name for p in run.iterdir()) == [session.LOCK_FILE]
