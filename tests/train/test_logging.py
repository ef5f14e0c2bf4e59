"""train/logging.py: metrics.jsonl on resume."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from lmforge.train.logging import RunLogger


def test_a_record_cut_off_by_a_kill_is_dropped_on_resume_with_a_warning(tmp_path: Path, caplog) -> None:
    """A kill mid-write leaves half a line last in metrics.jsonl: resuming drops it (and the records past the
    checkpoint's step) instead of failing on it."""
    records = [json.dumps({"kind": "train", "step": s, "loss": 1.0 / s}) for s in (1, 2, 3)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(records) + '\n{"kind": "train", "st', encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="lmforge.train"):
        logger = RunLogger(tmp_path, main=True, total_steps=4, start_step=2, progress=False)
    logger.metrics.close()
    kept = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["step"] for r in kept] == [1, 2] and "cut off mid-line" in caplog.text
