"""A command's hold on its run directory: one run at a time, checked before any work, torn down in one place.

``run_session(run_dir, resume=..., device=...)`` is what every training command runs inside:

1. an exclusive lock on ``run_dir/.lock`` (``fcntl.flock``, taken by the first process only), so a
   second run started on the same ``--out`` fails at once naming the holder instead of interleaving
   checkpoints and metrics with the first. The kernel drops a flock when its process dies, however it
   dies, so a lock file left by a killed run is stale by construction and is simply taken over;
2. ``checkpoint.check_run_dir``: a new run must not overwrite checkpoints, a resumed one needs them;
3. ``distributed.session``: the process group for the command's length (a no-op on one process).

Multi-stage commands (demo, compare, nas) hold their ``--out`` with ``holds_out_dir``.

flock, not a PID file: a PID file needs liveness checks that race with PID reuse; flock is released
by the kernel. The lock is advisory and per host (as every lock on a network file system is).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import os
import shutil
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from lmforge.errors import UserError
from lmforge.rundir.layout import check_output_dir, holds_stages_of
from lmforge.train import checkpoint, distributed

LOCK_FILE = ".lock"
_held: set[Path] = set()  # directories this process holds (a command inside another may claim its own again)


class RunDirectoryBusy(UserError):
    """Another live process holds the run directory."""


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
        return f"pid {info['pid']} on {info['host']}, `{info['command']}`, since {info['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that has not written its details yet"


START_FILES = {LOCK_FILE, "config.yaml"}
"""What a command writes into its run directory before any work: a start that fails leaves neither behind."""


@contextlib.contextmanager
def locked(run_dir: str | os.PathLike) -> Iterator[Path]:
    """Hold ``run_dir``'s lock for the block (creating the directory); RunDirectoryBusy when it is taken. When the
    block fails in a directory it created and nothing but the start's files (the lock, the recipe) is there, the
    directory is removed: a failed start leaves nothing to trip over."""
    run_dir = Path(run_dir)
    key = run_dir.resolve()
    if key in _held:
        yield run_dir
        return
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RunDirectoryBusy(
            f"{run_dir} is in use by another run ({_holder(path)}); wait for it to end, or pick another --out"
        ) from None
    try:
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": " ".join(["lmforge", *sys.argv[1:]]),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        _held.add(key)
        yield run_dir
    except BaseException:
        if created and {p.name for p in run_dir.iterdir()} <= START_FILES:
            shutil.rmtree(run_dir, ignore_errors=True)  # still locked: no other run can have started in it
        raise
    finally:
        _held.discard(key)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def holds_out_dir(command):
    """Decorator: ``command(cfg, ...)`` runs holding the lock of ``cfg.out`` (multi-stage commands: demo,
    compare, nas; each stage's own run directory is locked again by its training command), once ``cfg.out`` is
    known to be new, or this command's own earlier output (``rundir.layout.holds_stages_of``): never a model, a
    run or another command's stages."""

    @functools.wraps(command)
    def locked_command(cfg, *args, **kwargs):
        check_output_dir(cfg.out, reusable=holds_stages_of(type(cfg)))
        with locked(cfg.out):
            return command(cfg, *args, **kwargs)

    return locked_command


def _is_first_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


@contextlib.contextmanager
def run_session(run_dir: str | os.PathLike, *, resume: bool, device: str = "auto") -> Iterator[distributed.Dist]:
    """Lock ``run_dir`` (first process), check its checkpoints against ``resume``, and run the block in a
    ``distributed.session``; yields the process's ``Dist``."""
    lock = locked(run_dir) if _is_first_process() else contextlib.nullcontext()
    with lock:
        checkpoint.check_run_dir(run_dir, resume=resume)
        with distributed.session(device) as d:
            yield d
