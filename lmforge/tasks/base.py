"""The Task protocol: what differs between objectives, so that the training loop never does.

A task owns its data (``train_items`` / ``val_items``: sequences the loop samples from), turns a
list of items into a batch (``collate``, which records the batch's number of prediction targets
as ``n_targets`` so the loop can normalise accumulated gradients), computes the summed loss
(``loss``), turns summed counts into metrics (``metrics``) and counts its FLOPs (``flops``).
Fine-tuning tasks (``FinetuneTask``) also build their head, evaluate and predict.

The fused linear + cross-entropy that language-model heads use is an operator, not part of the
protocol: ``lmforge/ops/linear_cross_entropy.py``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from lmforge.errors import UserError
from lmforge.ops.linear_cross_entropy import IGNORE

__all__ = [
    "IGNORE",
    "Evaluates",
    "ExplainsExamples",
    "FinetuneTask",
    "GroupsByLength",
    "LossOutput",
    "OpensPretrained",
    "PretrainTask",
    "Searchable",
    "SelectsByMetric",
    "Task",
    "lm_metrics",
    "transformer_train_flops",
]


@dataclass
class LossOutput:
    """Summed loss over a batch's targets and any other summed counts (e.g. correct predictions)."""

    loss_sum: Tensor
    counts: dict[str, float] = field(default_factory=dict)


@runtime_checkable
class Task(Protocol):
    """What the training loop needs of every task."""

    name: str
    train_items: Sequence[Any]
    val_items: Sequence[Any]

    def collate(self, items: list[Any], *, generator: torch.Generator) -> dict[str, Any]: ...

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> LossOutput: ...

    def metrics(self, sums: dict[str, float]) -> dict[str, float]: ...

    def flops(self, model: nn.Module, batch: dict[str, Any]) -> float: ...


# --- optional capabilities the loop checks with isinstance -------------------------------------------------
@runtime_checkable
class Evaluates(Protocol):
    """The loop scores the dev set with the task's own ``evaluate`` (else: the loss on ``val_items``)."""

    def evaluate(self, model: nn.Module, examples: Sequence[dict] | None = None, *, device: torch.device) -> dict: ...


@runtime_checkable
class SelectsByMetric(Protocol):
    """``selection``: the dev metric and direction (``("f1", "max")``) that early stopping and the best checkpoint
    follow (else: the dev loss, lower is better)."""

    selection: tuple[str, str]


@runtime_checkable
class GroupsByLength(Protocol):
    """``train_lengths``: one length per training item, so the loop batches items of similar length (None:
    random batches)."""

    train_lengths: Sequence[int] | None


@runtime_checkable
class PretrainTask(Task, Protocol):
    """A pretraining objective (``runs/pretrain.py``): the freshly initialised model it trains and the task over
    the token shards."""

    @classmethod
    def pretraining_model(cls, model_cfg: Any, electra: Any) -> nn.Module: ...

    @classmethod
    def for_pretraining(cls, cfg: Any, tok: Any, shards: Any, entry: Any) -> Any: ...


class FinetuneTask(Task, Evaluates, SelectsByMetric, GroupsByLength, Protocol):
    """A task that the fine-tuning recipe (``runs/finetune.py``) trains and ``rundir.load_run`` rebuilds
    (classify, ner, translate, chat, embed). Every one implements all of it, explicitly.

    - ``reader(cfg)``: ``read(path, *, skip_bad_rows)`` for the task's files (None: its TASKS entry's
      ``files``); ``prepare_splits(cfg, splits)``: the splits as the task trains on them;
    - ``for_finetuning(cfg, splits, run_dir)``: the task over the data and the model to train, built
      from ``cfg`` (``FinetuneConfig.task_settings()``: the task's own settings, the seed, never the recipe's
      files, loop or run directory) and its pretrained ``cfg.model``.
    - ``settings()`` -> what ``task.json`` stores; ``from_settings(run_dir, settings)`` rebuilds the task.
    - ``split_model(model)`` -> (the model directory's model, the head's tensors or None) and
      ``assemble(base)``, its inverse, which puts an (untrained) head back on the loaded model.
    - ``evaluate(model, examples=None, *, device)``: metrics on ``examples`` (default: the dev set),
      the very code ``lmforge evaluate`` runs; ``evaluate_test`` is the once-only final evaluation
      (translation decodes it with beam search); ``evaluate_before``: the splits also scored before
      training; ``predict(model, examples, *, device)``: one dict per example.
    - ``report_columns``: the metrics of the console table and report.md; ``extras()``: what
      results.json records about the task beyond its metrics; ``truncated``: per split, how many
      examples were cut to ``max_len``.
    """

    report_columns: tuple[str, ...]
    evaluate_before: tuple[str, ...]
    truncated: dict[str, int]

    @classmethod
    def reader(cls, cfg: Any) -> Any: ...

    @classmethod
    def prepare_splits(cls, cfg: Any, splits: dict[str, list[dict]]) -> dict[str, list[dict]]: ...

    @classmethod
    def for_finetuning(cls, cfg: Any, splits: dict[str, list[dict]], run_dir: Any) -> tuple[Any, nn.Module]: ...

    @classmethod
    def from_settings(cls, run_dir: Any, settings: dict) -> Any: ...

    def settings(self) -> dict: ...

    def assemble(self, base: nn.Module) -> nn.Module: ...

    def split_model(self, model: nn.Module) -> tuple[nn.Module, dict | None]: ...

    def evaluate_test(self, model: nn.Module, examples: Sequence[dict], *, device: torch.device) -> dict: ...

    def predict(self, model: nn.Module, examples: Sequence[dict], *, device: torch.device) -> list[dict]: ...

    def extras(self) -> dict: ...


# --- optional capabilities of fine-tuning tasks (their TASKS entries say which) ------------------------------
@runtime_checkable
class OpensPretrained(Protocol):
    """A pretrained model directory (no task.json) of the family in the task's TASKS entry (``opens_pretrained``)
    loads as this task, with these settings."""

    @classmethod
    def pretrained_settings(cls, model_cfg: Any) -> dict: ...


@runtime_checkable
class ExplainsExamples(Protocol):
    """A fine-tune's report explains its first correct and wrong test examples (``explain/report.py``):
    ``report_input(example)`` is the input to explain (None: passed over), ``report_outcome(example, input,
    prediction)`` is (gold, predicted) in a form that compares equal when the prediction is right."""

    def report_input(self, example: dict) -> dict | None: ...

    def report_outcome(self, example: dict, text: dict, prediction: dict) -> tuple[Any, Any]: ...


@runtime_checkable
class Searchable(Protocol):
    """``lmforge nas`` scores candidate encoders on this task (TASKS ``searchable``): the task over the data,
    without a model (each candidate brings its own encoder)."""

    @classmethod
    def for_search(cls, tokenizer: Any, splits: dict[str, list[dict]], *, max_len: int, dropout: float) -> Any: ...


def encoder_head_state(model: nn.Module) -> dict[str, Tensor]:
    """The tensors of an ``EncoderWithHead`` outside its encoder (the head, the CRF), on the CPU."""
    return {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if not k.startswith("encoder.")}


def fit_max_len(max_len: int | None, cfg: Any, *, default: int = 128) -> int:
    """``max_len``, or min(default, the model's window) when None; a ValueError past the window."""
    chosen = max_len or min(default, cfg.max_seq_len)
    if chosen > cfg.max_seq_len:
        raise UserError(f"max_len={chosen} exceeds the model's max_seq_len={cfg.max_seq_len}")
    return chosen


def lm_metrics(sums: dict[str, float]) -> dict[str, float]:
    """Mean loss per target (nats), perplexity = exp(loss), and top-1 accuracy of the predictions."""
    n = max(sums["n_targets"], 1.0)
    loss = sums["loss_sum"] / n
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "accuracy": sums.get("correct", 0.0) / n}


def flops_d_ff(cfg: Any) -> int:
    """The feed-forward width to count FLOPs with: a gated feed-forward has three matrices, not two."""
    return cfg.d_ff * 3 // 2 if cfg.gated_ffn else cfg.d_ff


def transformer_train_flops(
    *, n_layers: int, d_model: int, d_ff: int, n_tokens: int, seq_len: int, head_rows: int, head_flops_per_row: float
) -> float:
    """Training FLOPs (forward + backward = 3x forward) of one batch.

    Per token and layer: the four attention projections (8 D^2, counted at full width), the
    feed-forward (4 D F, or 6 D F when gated: pass the effective ``d_ff``), and attention
    scores + weighted values (4 T D). The head costs ``head_flops_per_row`` per predicted row
    (2 D V for a vocabulary projection). Embedding look-ups are free.
    """
    per_token = n_layers * (8 * d_model * d_model + 4 * d_model * d_ff + 4 * seq_len * d_model)
    return 3.0 * (per_token * n_tokens + head_flops_per_row * head_rows)


class FinetuneDefaults:
    """The parts of ``FinetuneTask`` that most tasks share; a task overrides what it does differently."""

    evaluate_before: tuple[str, ...] = ()

    @classmethod
    def reader(cls, cfg: Any) -> Any:
        """``read(path, *, skip_bad_rows)`` for the task's files; None = the classify / NER readers."""
        return None

    @classmethod
    def prepare_splits(cls, cfg: Any, splits: dict[str, list[dict]]) -> dict[str, list[dict]]:
        """The splits as the task trains on them (e.g. a built-in corpus's fields renamed)."""
        return splits

    def assemble(self, base: nn.Module) -> nn.Module:
        return base

    def split_model(self, model: nn.Module) -> tuple[nn.Module, dict | None]:
        return model, None

    def evaluate_test(self, model: nn.Module, examples: Sequence[dict], *, device: torch.device) -> dict:
        return self.evaluate(model, examples, device=device)  # type: ignore[attr-defined]

    def extras(self) -> dict:
        return {}


class HeadOnEncoder(FinetuneDefaults):
    """A task head on a BERT encoder (classify, ner): the model directory holds the encoder, the head goes to
    head.safetensors. The task defines ``build_model(encoder)``."""

    def assemble(self, base: nn.Module) -> nn.Module:
        return self.build_model(base)  # type: ignore[attr-defined]

    def split_model(self, model: nn.Module) -> tuple[nn.Module, dict | None]:
        return model.encoder, encoder_head_state(model)
