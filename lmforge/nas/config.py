"""The configs of ``lmforge nas`` (torch-free, so ``lmforge nas --help`` imports no torch); the search is
``nas/run.py``."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from lmforge.config import check_range
from lmforge.errors import UserError
from lmforge.nas.space import SearchSpace
from lmforge.tasks import SEARCH_TASKS
from lmforge.train.config import TrainConfig, loop_defaults


@dataclass
class LatencySettings:
    """How latency is measured and modelled."""

    measure: int = 40
    """Random architectures of the space measured (the baselines are measured too)."""
    held_out: float = 0.25
    """Share of the measured architectures held out of the fit to report the model's error."""
    warmup: int = 3
    """Untimed forward passes before timing."""
    repeats: int = 15
    """Timed forward passes; the median is kept."""


@dataclass
class SupernetSettings:
    """Strategy 1: the weight-sharing supernet."""

    epochs: float = 3.0
    """Sandwich-rule training epochs."""
    n_random: int = 2
    """Random sub-networks per step besides the largest and the smallest."""
    candidates: int = 120
    """Distinct architectures scored with inherited weights."""
    population: int = 24
    """NSGA-II population size."""


@dataclass
class TrialSettings:
    """Strategy 2: multi-trial search, each trial a brief training."""

    n_trials: int = 10
    """Finished (complete or pruned) trials the study should hold."""
    epochs: float = 1.0
    """Training epochs per trial."""
    evals: int = 4
    """Dev evaluations per trial: the median pruner's decision points."""


def _training() -> TrainConfig:
    return loop_defaults(batch=32, every=0, log_every=20, lr=1e-3, warmup=30, schedule="linear", keep_last=1)


@dataclass
class NASConfig:
    """Search architectures for a fine-tuning task: accuracy vs latency measured on this machine."""

    out: str = "runs/nas"
    """Output directory; finished stages found there are kept and the search continues."""
    task: Literal[SEARCH_TASKS] = "classify"  # type: ignore[valid-type]
    """The task candidates are judged on."""
    data: str | None = "builtin:reviews-sentiment"
    """builtin:NAME, or None with --train/--dev/--test files."""
    train: str | None = None
    """Training file (classify: CSV/TSV/JSONL; ner: CoNLL/JSONL)."""
    dev: str | None = None
    """Dev file (the search's metric); without one 10% of train is held out."""
    test: str | None = None
    """Test file for the retrained picks."""
    skip_bad_rows: bool = False
    """Skip malformed rows (reported) instead of stopping at the first."""
    limit: int = 0
    """Use only the first N examples of each split (0 = all): a quick check of a recipe, not a result."""
    tokenizer: str | None = None
    """Directory with a WordPiece tokenizer.json; None = train one on the training texts."""
    vocab_size: int = 8000
    """Vocabulary size of a tokenizer trained here."""
    init: str = "scratch"
    """scratch, or a pretrained lmforge BERT directory shaped like the space's largest architecture."""
    max_len: int = 128
    """Longest input in sub-tokens."""
    strategies: list[Literal["supernet", "multi-trial"]] = field(default_factory=lambda: ["supernet", "multi-trial"])
    """Search strategies to run."""
    space: SearchSpace = field(default_factory=SearchSpace)
    latency: LatencySettings = field(default_factory=LatencySettings)
    supernet: SupernetSettings = field(default_factory=SupernetSettings)
    trials: TrialSettings = field(default_factory=TrialSettings)
    retrain_epochs: float = 3.0
    """Epochs when retraining the picks and the baseline from scratch; 0 = no retraining."""
    dropout: float = 0.0
    """Dropout of every candidate."""
    training: TrainConfig = field(default_factory=_training)

    def __post_init__(self) -> None:
        check_range("limit", self.limit, at_least=0)
        if not self.strategies:
            raise UserError("strategies: choose at least one of supernet, multi-trial")
        if self.space.family != "bert":
            raise UserError(
                f"space.family={self.space.family!r}: `lmforge nas` searches encoders for classify / ner; GPT spaces "
                "are measured and modelled by lmforge.nas.latency but not yet searched"
            )
        if self.init != "scratch" and not (Path(self.init) / "config.json").is_file():
            raise UserError(f"init={self.init!r}: expected 'scratch' or an lmforge BERT directory with config.json")
