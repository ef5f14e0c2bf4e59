"""Atomic, verified training checkpoints and exact resume.

A checkpoint is a directory ``trainer_state/step-NNNNNNN/`` holding the model
(``model.safetensors``), the optimizer and scheduler (``optimizer.pt``, read back with
``torch.load(weights_only=True)``, which unpickles tensors and plain containers only), the RNG
states (``rng.pt``), ``state.json`` (step, tokens and FLOPs so far, best metric, data position) and
``manifest.json``: the size and SHA-256 of every other file, taken from the bytes in memory before
they were written.

Writing: every file is serialised in memory first (so the bytes needed are known and checked
against the free space before anything is written), written into ``.tmp-step-NNNNNNN/``, fsynced,
read back and compared with the manifest, then renamed into place. A kill at any moment leaves the
whole checkpoint or none; a full disk raises ``CheckpointWriteError`` (naming the directory and the
bytes needed) after removing the partial directory, and the previous checkpoints stay as they were.
The last ``keep_last`` checkpoints are kept, plus the best one, plus always the one just written and
verified: the newest good checkpoint is never pruned before a newer one has verified on disk.

Reading: ``latest`` (resume) and ``best_or_last`` / ``load_best`` (the weights a run hands on) verify
the manifest first; a checkpoint that fails is skipped with a warning naming the file and the reason,
and the newest one that verifies is used instead. Checkpoints written before manifests existed
(no ``manifest.json``) are used unverified. The manifest guards against bit rot, truncation and
half-copied directories, not against tampering (it sits beside what it describes).
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import logging
import os
import random
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save as safetensors_bytes
from torch import nn

from lmforge.errors import UserError
from lmforge.files import read_json_object
from lmforge.models.registry import check_state, read_safetensors

STATE_DIR = "trainer_state"
MANIFEST = "manifest.json"
WEIGHTS, OPTIMIZER, RNG, STATE = "model.safetensors", "optimizer.pt", "rng.pt", "state.json"
log = logging.getLogger("lmforge.checkpoint")


class CheckpointWriteError(UserError):
    """A checkpoint could not be written (disk full, quota, permissions); the earlier ones are intact."""


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
        raise UserError(f"--resume {run_dir}: no checkpoint under {Path(run_dir) / STATE_DIR}")
    if not resume and found:
        raise UserError(
            f"{run_dir} already holds checkpoints: continue it with --resume {run_dir}, or pick a new --out"
        )


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def verify(checkpoint: Path) -> str | None:
    """None when every file of ``checkpoint`` matches its manifest, else what is wrong (naming the file).

    A checkpoint without a manifest (written by an older lmforge) has nothing to be checked against: each of its
    files must at least load (a truncated optimizer.pt is skipped like a file that fails its digest).
    """
    manifest_path = checkpoint / MANIFEST
    if not manifest_path.is_file():
        return _unloadable(checkpoint)
    try:
        files = json.loads(manifest_path.read_text(encoding="utf-8"))["files"]
        expected = {str(name): (int(v["bytes"]), str(v["sha256"])) for name, v in files.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return f"{manifest_path}: unreadable manifest ({e})"
    for name, (size, digest) in expected.items():
        path = checkpoint / name
        if not path.is_file():
            return f"{path}: missing"
        if path.stat().st_size != size:
            return f"{path}: {path.stat().st_size:,} bytes, the manifest says {size:,} (truncated or overwritten)"
        if _file_sha256(path) != digest:
            return f"{path}: SHA-256 differs from the manifest (the file is corrupted)"
    return None


def _unloadable(checkpoint: Path) -> str | None:
    """What fails to load in a checkpoint without a manifest, naming the file, or None when every file loads."""
    if not (checkpoint / WEIGHTS).is_file():
        return f"{checkpoint / WEIGHTS}: missing"
    for path in sorted(p for p in checkpoint.iterdir() if p.is_file()):
        try:
            if path.suffix == ".safetensors":
                read_safetensors(path)
            elif path.suffix == ".pt":
                torch.load(path, weights_only=True, map_location="cpu")
            elif path.suffix == ".json":
                read_json_object(path, what="checkpoint file")
        except UserError as e:
            return str(e)
        except Exception as e:  # torch's and safetensors' own errors for a cut or damaged file
            return f"{path}: does not load ({type(e).__name__}: {str(e)[:200]})"
    return None


def _verified(found: list[Path]) -> Path | None:
    """The newest of ``found`` that verifies (each newer one that fails is named in a warning)."""
    for p in reversed(found):
        problem = verify(p)
        if problem is None:
            return p
        log.warning("skipping checkpoint %s: %s", p.name, problem)
    return None


def latest(run_dir: str | os.PathLike) -> Path:
    """The newest checkpoint that verifies; ValueError when there is none."""
    found = checkpoint_dirs(run_dir)
    if not found:
        raise UserError(f"{run_dir}: no checkpoint under {STATE_DIR}/ to resume from")
    good = _verified(found)
    if good is None:
        raise UserError(
            f"{Path(run_dir) / STATE_DIR}: none of the {len(found)} checkpoint(s) verifies (the newest: "
            f"{verify(found[-1])}); start a new run"
        )
    return good


def _torch_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _rng_state() -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "python": list(random.getstate()),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _write_bytes(path: Path, data: bytes) -> None:
    with path.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def save(
    run_dir: str | os.PathLike,
    *,
    model_state: dict[str, torch.Tensor],
    optim_state: dict,
    state: TrainerState,
    keep_last: int,
) -> Path:
    """Write a verified checkpoint atomically, then prune old ones (never the best, never this one)."""
    root = Path(run_dir) / STATE_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{state.step:07d}"
    tmp = root / f".tmp-step-{state.step:07d}"
    payload = {
        WEIGHTS: safetensors_bytes({k: v.detach().contiguous().cpu() for k, v in model_state.items()}),
        OPTIMIZER: _torch_bytes(optim_state),
        RNG: _torch_bytes(_rng_state()),
        STATE: json.dumps(asdict(state), indent=2).encode(),
    }
    manifest = {"files": {name: {"bytes": len(data), "sha256": _sha256(data)} for name, data in payload.items()}}
    payload[MANIFEST] = json.dumps(manifest, indent=2).encode()
    needed = sum(len(data) for data in payload.values())
    free = shutil.disk_usage(root).free
    if free < needed:
        raise CheckpointWriteError(
            f"{root}: the checkpoint of step {state.step} needs {needed:,} bytes, the disk has {free:,} free; "
            f"free some space, then continue with --resume {run_dir}"
        )
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        for name, data in payload.items():
            _write_bytes(tmp / name, data)
        _fsync_dir(tmp)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise CheckpointWriteError(
                f"{root}: no space left writing the checkpoint of step {state.step} ({needed:,} bytes needed); "
                f"the partial checkpoint was removed and the earlier ones are intact. Free some space, then continue "
                f"with --resume {run_dir}"
            ) from None
        raise CheckpointWriteError(f"{e.filename or tmp}: cannot write the checkpoint ({e.strerror})") from None
    problem = verify(tmp)
    if problem is not None:  # what was read back differs from what was written: keep everything that exists
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointWriteError(f"the checkpoint of step {state.step} did not verify after writing: {problem}")
    if final.exists():  # a re-save of the same step (e.g. Ctrl-C right after a periodic save)
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(root)
    _prune(root, keep_last=keep_last, best_step=state.best_step, newest=final)
    return final


def _prune(root: Path, *, keep_last: int, best_step: int | None, newest: Path) -> None:
    found = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-"))
    keep = set(found[-keep_last:]) if keep_last > 0 else set()
    keep.add(newest)
    if best_step is not None:
        keep.add(root / f"step-{best_step:07d}")
    for p in found:
        if p not in keep:
            shutil.rmtree(p)


def best_or_last(run_dir: str | os.PathLike, best_step: int | None) -> Path:
    """The checkpoint of ``best_step`` if it was kept and verifies, else the newest that verifies: the
    weights a finished run hands on."""
    found = checkpoint_dirs(run_dir)
    if not found:
        raise UserError(f"{run_dir}: no checkpoint under {Path(run_dir) / STATE_DIR}")
    best = next((p for p in found if best_step is not None and p.name == f"step-{best_step:07d}"), None)
    if best is not None:
        problem = verify(best)
        if problem is None:
            return best
        log.warning("the best checkpoint %s does not verify (%s): using the newest one that does", best.name, problem)
    good = _verified(found)
    if good is None:
        raise UserError(f"{Path(run_dir) / STATE_DIR}: none of the {len(found)} checkpoint(s) verifies")
    return good


def load_best(model: nn.Module, run_dir: str | os.PathLike, best_step: int | None) -> Path:
    """Load the ``best_or_last`` checkpoint's weights into ``model``; returns that checkpoint."""
    chosen = best_or_last(run_dir, best_step)
    load_model_state(model, chosen)
    return chosen


def load_model_state(model: nn.Module, checkpoint: Path) -> None:
    load_trained(model, read_safetensors(checkpoint / WEIGHTS), source=str(checkpoint / WEIGHTS))


def _frozen_base(model: nn.Module) -> set[str]:
    """The parameters of a pretrained model frozen under LoRA adapters (``models/lora.py``); none without adapters
    (a parameter a recipe merely keeps from training, such as an MLM run's unused pooler, is still saved)."""
    from lmforge.models.lora import lora_layers

    if not lora_layers(model):
        return set()
    return {name for name, p in model.named_parameters() if not p.requires_grad}


def trained_state(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What a checkpoint of ``model`` holds: its whole state, less a frozen base under adapters (only the adapters
    and the head change, so only they are saved)."""
    frozen = _frozen_base(model)
    return {k: v for k, v in state.items() if k not in frozen}


def load_trained(model: nn.Module, tensors: dict[str, torch.Tensor], *, source: str) -> None:
    """Load a checkpoint's tensors (``trained_state``) into ``model``: every tensor it lacks must be a frozen
    parameter under adapters, which keeps the value it has."""
    frozen = _frozen_base(model)
    kept = {k: v for k, v in model.state_dict().items() if k in frozen and k not in tensors}
    check_state(model, {**kept, **tensors}, source=source)
    model.load_state_dict(tensors, strict=not kept)


def load_state(checkpoint: Path) -> TrainerState:
    path = checkpoint / STATE
    data = read_json_object(path, what="trainer state")
    try:
        return TrainerState(**data)
    except TypeError as e:
        raise UserError(f"{path}: not a trainer state ({e})") from None


def load_optim_state(checkpoint: Path) -> dict:
    return torch.load(checkpoint / OPTIMIZER, weights_only=True, map_location="cpu")


def restore_rng(checkpoint: Path) -> None:
    rng = torch.load(checkpoint / RNG, weights_only=True)
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
