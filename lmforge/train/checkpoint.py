"""Atomic training checkpoints and exact resume.

A checkpoint is a directory ``trainer_state/step-NNNNNNN/`` holding the model
(``model.safetensors``), the optimizer and scheduler (``optimizer.pt``, read back with
``torch.load(weights_only=True)``, which unpickles tensors and plain containers only), the RNG
states (``rng.pt``) and ``state.json`` (step, tokens and FLOPs so far, best metric, data
position). It is written into a temporary directory, every file fsynced, then renamed into
place, so a kill at any moment leaves either the whole checkpoint or none. The last ``keep_last``
checkpoints are kept, plus the best one.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from lmforge.models.registry import check_state, read_safetensors

STATE_DIR = "trainer_state"


@dataclass
class TrainerState:
    """Everything about a run's progress that is not a tensor."""

    step: int = 0
    tokens: int = 0
    flops: float = 0.0
    seconds: float = 0.0
    skipped_steps: int = 0
    bad_in_a_row: int = 0
    best_metric: float | None = None
    best_step: int | None = None
    samples_seen: int = 0
    evals_since_best: int = 0


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync(path: Path) -> None:
    with path.open("rb") as f:
        os.fsync(f.fileno())


def checkpoint_dirs(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / STATE_DIR
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-"))


def check_run_dir(run_dir: str | os.PathLike, *, resume: bool) -> None:
    """A new run must not overwrite checkpoints; a resumed one needs them. Raises ValueError saying which."""
    found = checkpoint_dirs(run_dir)
    if resume and not found:
        raise ValueError(f"--resume {run_dir}: no checkpoint under {Path(run_dir) / STATE_DIR}")
    if not resume and found:
        raise ValueError(
            f"{run_dir} already holds checkpoints: continue it with --resume {run_dir}, or pick a new --out"
        )


def latest(run_dir: str | os.PathLike) -> Path:
    found = checkpoint_dirs(run_dir)
    if not found:
        raise ValueError(f"{run_dir}: no checkpoint under {STATE_DIR}/ to resume from")
    return found[-1]


def save(
    run_dir: str | os.PathLike,
    *,
    model_state: dict[str, torch.Tensor],
    optim_state: dict,
    state: TrainerState,
    keep_last: int,
) -> Path:
    """Write a checkpoint atomically and prune old ones (never the best)."""
    root = Path(run_dir) / STATE_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{state.step:07d}"
    tmp = root / f".tmp-step-{state.step:07d}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file({k: v.detach().contiguous().cpu() for k, v in model_state.items()}, str(tmp / "model.safetensors"))
    torch.save(optim_state, tmp / "optimizer.pt")
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    rng = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "python": list(random.getstate()),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    torch.save(rng, tmp / "rng.pt")
    (tmp / "state.json").write_text(json.dumps(asdict(state), indent=2), encoding="utf-8")
    for f in tmp.iterdir():
        _fsync(f)
    _fsync_dir(tmp)
    if final.exists():  # a re-save of the same step (e.g. Ctrl-C right after a periodic save)
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(root)
    _prune(root, keep_last=keep_last, best_step=state.best_step)
    return final


def _prune(root: Path, *, keep_last: int, best_step: int | None) -> None:
    found = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-"))
    keep = set(found[-keep_last:]) if keep_last > 0 else set()
    if best_step is not None:
        keep.add(root / f"step-{best_step:07d}")
    for p in found:
        if p not in keep:
            shutil.rmtree(p)


def best_or_last(run_dir: str | os.PathLike, best_step: int | None) -> Path:
    """The checkpoint of ``best_step`` if it was kept, else the last one: the weights a finished run hands on."""
    found = checkpoint_dirs(run_dir)
    if not found:
        raise ValueError(f"{run_dir}: no checkpoint under {Path(run_dir) / STATE_DIR}")
    return next((p for p in found if best_step is not None and p.name == f"step-{best_step:07d}"), found[-1])


def load_best(model: nn.Module, run_dir: str | os.PathLike, best_step: int | None) -> Path:
    """Load the ``best_or_last`` checkpoint's weights into ``model``; returns that checkpoint."""
    chosen = best_or_last(run_dir, best_step)
    load_model_state(model, chosen)
    return chosen


def load_model_state(model: nn.Module, checkpoint: Path) -> None:
    tensors = read_safetensors(checkpoint / "model.safetensors")
    check_state(model, tensors, source=str(checkpoint / "model.safetensors"))
    model.load_state_dict(tensors)


def load_state(checkpoint: Path) -> TrainerState:
    return TrainerState(**json.loads((checkpoint / "state.json").read_text(encoding="utf-8")))


def load_optim_state(checkpoint: Path) -> dict:
    return torch.load(checkpoint / "optimizer.pt", weights_only=True, map_location="cpu")


def restore_rng(checkpoint: Path) -> None:
    rng = torch.load(checkpoint / "rng.pt", weights_only=True)
    torch.set_rng_state(rng["torch"])
    kind, keys, pos, has_gauss, gauss = rng["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = rng["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def finished_or_run(run_dir: str | os.PathLike, run: Callable[[], dict], *, finished: str) -> dict:
    """A multi-stage command's stage: the results of an earlier run in ``run_dir`` whose results.json has
    the key ``finished`` (written last, so only a completed run has it), else ``run()``'s (an unfinished
    run directory is removed first: the stage starts over)."""
    run_dir = Path(run_dir)
    done = run_dir / "results.json"
    if done.is_file():
        earlier = json.loads(done.read_text(encoding="utf-8"))
        if finished in earlier:
            return earlier
    shutil.rmtree(run_dir, ignore_errors=True)
    return run()
