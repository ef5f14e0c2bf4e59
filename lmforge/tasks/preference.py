"""Preference tuning of a decoder on pairs of replies: DPO (Rafailov et al. 2023) and ORPO (Hong et al. 2024).

Rows are a prompt (a text, or the conversation so far) with a preferred and a rejected reply (``data/readers.py``:
``read_preferences``, TRL's formats). Each reply is rendered after the prompt in the model's chat template, exactly
as the chat task renders an assistant turn (``inference/chat.assistant_spans``), and scored by the summed
log-probability of its tokens and the end-of-turn token that closes it: ``log pi(y | x)``.

- **DPO** (Rafailov et al. 2023, eq. 7): ``-log sigmoid(beta * [(log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) -
  log ref(y_l|x))])``, with conservative label smoothing (``label_smoothing`` eps: ``-(1 - eps) log sigmoid(z) - eps
  log sigmoid(-z)``, as TRL's ``sigmoid`` loss). The reference model is the model before training; its
  log-probabilities are computed once, before training, for every pair of every split, and cached in
  ``RUN_DIR/reference/`` in chunks keyed by the model and the tokens (a killed run keeps the finished chunks; a
  resumed run reads them, checked). Under adapters the policy starts as the reference, as in TRL with PEFT.
- **ORPO** (Hong et al. 2024, eq. 6-7): ``NLL(y_w) - lambda * log sigmoid(log odds(y_w) - log odds(y_l))`` with
  ``odds(y) = P(y) / (1 - P(y))`` and ``log P(y)`` the *mean* token log-probability of the reply; no reference
  model, supervised fine-tuning in the same stage (``beta`` is lambda, 0.1 as in the paper and TRL). The NLL term
  is the chosen reply's mean token loss, per pair.

Metrics are the ones TRL logs: ``rewards/chosen`` and ``rewards/rejected`` (DPO: ``beta * (log pi - log ref)``;
ORPO: ``beta * mean log P``), ``rewards/accuracies`` (the share of pairs whose chosen reward is higher),
``rewards/margins``, ``logps/chosen`` and ``logps/rejected``, and for ORPO ``nll_loss``, ``log_odds_ratio`` and
``log_odds_chosen``. Sums over pairs are kept per batch so that the loop's accumulation averages them over pairs.

A pair longer than ``max_len`` is cut, counted and reported (``truncated``): the prompt first, from the left (its
last tokens are kept, as TRL's ``keep_end``), down to what the longer reply leaves but never below half of
``max_len``; then the replies from the right. A pair whose replies are the same after the cut is dropped (counted).
The run is a chat run (``task.json``: chat): ``lmforge chat``, ``generate`` and ``serve`` use it as they use
``finetune chat``'s.
"""

from __future__ import annotations

import abc
import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import distributed as dist
from torch import nn

from lmforge.data.batching import length_sorted_batches, to_device
from lmforge.data.readers import read_preferences
from lmforge.data.tokenizer import LMTokenizer, load_tokenizer
from lmforge.errors import UserError
from lmforge.files import atomic_write
from lmforge.inference.chat import assistant_spans
from lmforge.models.gpt import GPT
from lmforge.models.registry import CONFIG_FILE, WEIGHTS_FILE, load_model
from lmforge.ops.linear_cross_entropy import IGNORE, sequence_log_likelihoods
from lmforge.tasks.base import FinetuneDefaults, LossOutput, fit_max_len
from lmforge.tasks.clm import clm_train_flops
from lmforge.tasks.dialogue import DialogueTask, next_token_batch, target_flags

logger = logging.getLogger(__name__)

REFERENCE_DIR = "reference"
ORPO_METRICS = ("nll_loss", "log_odds_ratio", "log_odds_chosen")
CHUNK = 64  # pairs per cached file of reference log-probabilities: a killed reference pass loses at most one
Encoded = tuple  # (chosen ids, chosen target flags, rejected ids, rejected flags) of one pair


class PreferenceTask(FinetuneDefaults, abc.ABC):
    """Preference tuning of a GPT: the loss of ``method`` (dpo | orpo) on pairs of replies."""

    name = "preference"
    method = ""
    needs_reference = False
    report_columns = ("loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected")

    def __init__(
        self,
        tokenizer: LMTokenizer,
        *,
        max_len: int = 512,
        beta: float = 0.1,
        label_smoothing: float = 0.0,
        splits: dict[str, Sequence[dict]] | None = None,
        eval_batch_size: int = 8,
    ) -> None:
        self.tokenizer, self.max_len, self.beta, self.label_smoothing = tokenizer, max_len, beta, label_smoothing
        pad_id = tokenizer.token_id("pad")
        self.pad_id = tokenizer.token_id("eos") if pad_id is None else pad_id
        self.selection = ("loss", "min")
        self.eval_batch_size = eval_batch_size
        self.truncated: dict[str, int] = {}
        self.chat = DialogueTask(tokenizer, max_len=max_len)  # replies sampled for prompts (predict)
        self.encoded = {split: self.encode(examples, split=split) for split, examples in (splits or {}).items()}
        self.reference: dict[bytes, tuple[float, float]] = {}
        self.train_items = self.encoded.get("train", [])
        self.val_items = self.encoded.get("dev", [])
        self.train_lengths = [max(len(it[0]), len(it[2])) for it in self.train_items]

    # --- the fine-tuning recipe's hooks (tasks/base.py: FinetuneTask) -------------------------
    @classmethod
    def reader(cls, cfg: Any) -> Any:
        return read_preferences

    @classmethod
    def for_finetuning(cls, cfg: Any, splits: dict[str, list[dict]], run_dir: Path) -> tuple[PreferenceTask, GPT]:
        """The task over ``splits`` and the GPT of ``cfg.model``; DPO's reference log-probabilities of every pair,
        from the model as loaded (before any adapter), computed or read from ``run_dir/reference/``."""
        model = load_model(cfg.model)
        if not isinstance(model, GPT):
            raise UserError(f"--model {cfg.model}: preference tuning needs a GPT model directory")
        task = cls(
            load_tokenizer(cfg.model),
            max_len=fit_max_len(cfg.max_len, model.cfg, default=512),
            beta=cfg.beta,
            label_smoothing=vars(cfg).get("label_smoothing", 0.0),  # DPO's option (ORPO's config has none)
            splits=splits,
        )
        if not task.train_items:
            raise UserError("no training pair is left to learn from (see the pairs dropped after cutting to max_len)")
        if cls.needs_reference:
            task.reference = reference_log_likelihoods(
                task, model, [it for items in task.encoded.values() for it in items], run_dir / REFERENCE_DIR, cfg.model
            )
        return task, model

    @classmethod
    def from_settings(cls, run_dir: Path, settings: dict) -> DialogueTask:
        """The run is a chat run: it loads as one."""
        return DialogueTask.from_settings(run_dir, settings)

    def settings(self) -> dict:
        return self.chat.settings()

    def extras(self) -> dict:
        return {"method": self.method, "beta": self.beta, "label_smoothing": self.label_smoothing}

    def predict(self, model: nn.Module, examples: Sequence[dict], *, device: torch.device) -> list[dict]:
        """A sampled reply to each pair's prompt."""
        conversations = [
            {"messages": [*ex["messages"], {"role": "assistant", "content": ex["chosen"]}]} for ex in examples
        ]
        return self.chat.predict(model, conversations, device=device)

    # --- data --------------------------------------------------------------------------------
    def encode_reply(self, messages: list[dict], reply: str) -> tuple[list[int], np.ndarray]:
        """Token ids of the prompt and the reply in the chat template, and the flags of the reply's tokens (its
        text and the end-of-turn token); whatever the template writes after the reply is left out."""
        text, spans = assistant_spans(self.tokenizer, [*messages, {"role": "assistant", "content": reply}])
        enc = self.tokenizer.tokenizer.encode(text, add_special_tokens=False)
        flags = target_flags(enc.offsets, spans[-1:])
        end = int(np.flatnonzero(flags)[-1]) + 1 if flags.any() else len(flags)
        return enc.ids[:end], flags[:end]

    def encode(self, examples: Sequence[dict], *, split: str) -> list[Encoded]:
        """Both replies of each pair; cut to ``max_len`` as the module docstring says, counted under ``split``."""
        out, cut_prompts, cut_replies, dropped = [], 0, 0, 0
        for ex in examples:
            c_ids, c_flags = self.encode_reply(ex["messages"], ex["chosen"])
            r_ids, r_flags = self.encode_reply(ex["messages"], ex["rejected"])
            prompt = int(np.argmax(c_flags)) if c_flags.any() else len(c_ids)  # tokens before the reply
            longest = max(len(c_ids), len(r_ids))
            if longest > self.max_len:
                reply = longest - prompt
                keep = min(prompt, max(self.max_len - reply, self.max_len // 2))
                cut_prompts += keep < prompt
                cut_replies += keep + reply > self.max_len
                c_ids, c_flags = _cut(c_ids, c_flags, prompt - keep, self.max_len)
                r_ids, r_flags = _cut(r_ids, r_flags, prompt - keep, self.max_len)
            if c_ids == r_ids or not c_flags[1:].any() or not r_flags[1:].any():
                dropped += 1
                continue
            out.append((np.asarray(c_ids, np.int32), c_flags, np.asarray(r_ids, np.int32), r_flags))
        self.truncated[split] = cut_prompts + cut_replies
        details = {"prompts_cut_from_the_left": cut_prompts, "replies_cut": cut_replies, "pairs_dropped": dropped}
        self.truncated.update({f"{split}_{what}": n for what, n in details.items() if n})
        if cut_prompts or cut_replies or dropped:
            logger.warning(
                "%s: %d of %d pairs longer than max_len=%d: %d prompts cut from the left (their last tokens kept), "
                "%d replies cut at the end, %d pairs dropped (the replies are the same once cut)",
                split,
                cut_prompts + cut_replies,
                len(examples),
                self.max_len,
                cut_prompts,
                cut_replies,
                dropped,
            )
        return out

    def reply_batch(self, items: Sequence[Encoded]) -> dict[str, Any]:
        """The chosen replies in the first B rows, the rejected ones in the next B (right-padded), their targets."""
        rows = [(it[0], it[1]) for it in items] + [(it[2], it[3]) for it in items]
        ids, labels = next_token_batch(rows, self.pad_id)
        return {"input_ids": ids, "labels": labels, "n_targets": len(items), "n_tokens": sum(len(r[0]) for r in rows)}

    def collate(self, items: list[Encoded], *, generator: torch.Generator | None = None) -> dict[str, Any]:
        """``reply_batch`` and, for DPO, the pairs' cached reference log-probabilities (B, 2)."""
        batch = self.reply_batch(items)
        if self.needs_reference:
            batch["reference"] = torch.tensor([self.reference_of(it) for it in items], dtype=torch.float64)
        return batch

    def reference_of(self, item: Encoded) -> tuple[float, float]:
        key = pair_key(item)
        if key not in self.reference:
            raise UserError("a pair has no reference log-probabilities: DPO scores only the pairs read before training")
        return self.reference[key]

    # --- loss, metrics ----------------------------------------------------------------------------
    def log_likelihoods(self, model: GPT, batch: dict[str, Any]) -> torch.Tensor:
        """(2B,) summed log-probabilities of each row's reply (right padding under the causal mask is harmless)."""
        hidden = model.hidden_states(batch["input_ids"])
        return sequence_log_likelihoods(hidden, model.output_weight, batch["labels"])

    def loss(self, model: GPT, batch: dict[str, Any]) -> LossOutput:
        logps = self.log_likelihoods(model, batch)
        pairs = batch["n_targets"]
        losses, counts = self.pair_losses(logps[:pairs], logps[pairs:], batch)
        return LossOutput(losses.sum(), counts)

    @abc.abstractmethod
    def pair_losses(self, chosen: torch.Tensor, rejected: torch.Tensor, batch: dict) -> tuple[torch.Tensor, dict]:
        """(B,) losses and the summed counts behind the metrics, from the replies' summed log-probabilities."""

    def metrics(self, sums: dict[str, float]) -> dict[str, float]:
        n = max(sums["n_targets"], 1.0)
        out = {"loss": sums["loss_sum"] / n}
        out.update({k: v / n for k, v in sums.items() if "/" in k or k in ORPO_METRICS})
        return out

    def flops(self, model: GPT, batch: dict[str, Any]) -> float:
        return clm_train_flops(model.cfg, batch)

    # --- evaluation -----------------------------------------------------------------------------
    def evaluate(self, model: nn.Module, examples: Sequence[dict] | None = None, *, device: torch.device) -> dict:
        """The loss and TRL's reward metrics on ``examples`` (default: the dev pairs)."""
        items = self.val_items if examples is None else self.encode(examples, split="eval")
        if not items:
            return {}
        was_training = model.training
        model.eval()
        sums: dict[str, float] = {"loss_sum": 0.0, "n_targets": 0.0}
        with torch.no_grad():
            for index in length_sorted_batches([max(len(it[0]), len(it[2])) for it in items], self.eval_batch_size):
                batch = to_device(self.collate([items[i] for i in index]), device)
                out = self.loss(model, batch)
                sums["loss_sum"] += float(out.loss_sum)
                sums["n_targets"] += batch["n_targets"]
                for k, v in out.counts.items():
                    sums[k] = sums.get(k, 0.0) + v
        model.train(was_training)
        return {**self.metrics(sums), "pairs": len(items)}


class DPOTask(PreferenceTask):
    """Direct Preference Optimization against the frozen starting model (Rafailov et al. 2023)."""

    name = "dpo"
    method = "dpo"
    needs_reference = True

    def pair_losses(self, chosen: torch.Tensor, rejected: torch.Tensor, batch: dict) -> tuple[torch.Tensor, dict]:
        return dpo_losses(chosen, rejected, batch["reference"].to(chosen.dtype), self.beta, self.label_smoothing)


class ORPOTask(PreferenceTask):
    """Odds-ratio preference optimization: SFT on the chosen reply plus an odds-ratio penalty (Hong et al. 2024)."""

    name = "orpo"
    method = "orpo"
    report_columns = ("loss", "nll_loss", "log_odds_ratio", "rewards/accuracies", "rewards/margins")

    def collate(self, items: list[Encoded], *, generator: torch.Generator | None = None) -> dict[str, Any]:
        batch = super().collate(items, generator=generator)
        batch["reply_tokens"] = (batch["labels"] != IGNORE).sum(1)  # (2B,): the mean log-probability's divisor
        return batch

    def pair_losses(self, chosen: torch.Tensor, rejected: torch.Tensor, batch: dict) -> tuple[torch.Tensor, dict]:
        pairs = chosen.shape[0]
        lengths = batch["reply_tokens"].to(chosen.dtype)
        return orpo_losses(chosen, rejected, lengths[:pairs], lengths[pairs:], self.beta)


def dpo_losses(
    chosen: torch.Tensor, rejected: torch.Tensor, reference: torch.Tensor, beta: float, label_smoothing: float = 0.0
) -> tuple[torch.Tensor, dict]:
    """DPO's per-pair losses from the policy's summed log-probabilities of the chosen and rejected replies (B,) and
    the reference's (B, 2), and TRL's summed metrics."""
    chosen_rewards = beta * (chosen - reference[:, 0])
    rejected_rewards = beta * (rejected - reference[:, 1])
    z = chosen_rewards - rejected_rewards
    losses = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    return losses, _reward_counts(chosen_rewards, rejected_rewards, chosen, rejected)


def orpo_losses(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    chosen_tokens: torch.Tensor,
    rejected_tokens: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, dict]:
    """ORPO's per-pair losses from the summed log-probabilities of the replies (B,) and their token counts, and
    TRL's summed metrics. ``log(1 - P)`` is computed as ``log(-expm1(log P))`` (exact where P is near 1)."""
    mean_c, mean_r = chosen / chosen_tokens, rejected / rejected_tokens
    log_odds = (mean_c - mean_r) - (torch.log(-torch.expm1(mean_c)) - torch.log(-torch.expm1(mean_r)))
    ratio = F.logsigmoid(log_odds)
    nll = -mean_c
    losses = nll - beta * ratio
    counts = _reward_counts(beta * mean_c, beta * mean_r, chosen, rejected)
    counts.update(
        nll_loss=float(nll.detach().sum()),
        log_odds_ratio=float(ratio.detach().sum()),
        log_odds_chosen=float(log_odds.detach().sum()),
    )
    return losses, counts


def _reward_counts(chosen_rewards, rejected_rewards, chosen, rejected) -> dict[str, float]:
    c, r = chosen_rewards.detach(), rejected_rewards.detach()
    return {
        "rewards/chosen": float(c.sum()),
        "rewards/rejected": float(r.sum()),
        "rewards/accuracies": float((c > r).sum()),
        "rewards/margins": float((c - r).sum()),
        "logps/chosen": float(chosen.detach().sum()),
        "logps/rejected": float(rejected.detach().sum()),
    }


def _cut(ids: list[int], flags: np.ndarray, drop_front: int, max_len: int) -> tuple[list[int], np.ndarray]:
    """The first ``drop_front`` tokens (of the prompt) dropped, then the rest cut to ``max_len``."""
    return list(ids[drop_front:][:max_len]), flags[drop_front:][:max_len]


def pair_key(item: Encoded) -> bytes:
    """What a pair's reference log-probabilities belong to: the digest of both replies' tokens and flags."""
    h = hashlib.sha256()
    for part in item:
        h.update(np.ascontiguousarray(part).tobytes())
        h.update(b"|")
    return h.digest()


def model_identity(model_dir: str | Path) -> str:
    """A digest of a model directory's config and weights file (size and its first and last MiB): what cached
    reference log-probabilities were computed with."""
    h = hashlib.sha256((Path(model_dir) / CONFIG_FILE).read_bytes())
    weights = Path(model_dir) / WEIGHTS_FILE
    size = weights.stat().st_size
    with weights.open("rb") as f:
        h.update(str(size).encode())
        h.update(f.read(1 << 20))
        f.seek(max(0, size - (1 << 20)))
        h.update(f.read(1 << 20))
    return h.hexdigest()


def reference_log_likelihoods(
    task: PreferenceTask, model: GPT, items: Sequence[Encoded], directory: Path, model_dir: str
) -> dict[bytes, tuple[float, float]]:
    """The reference model's summed log-probabilities (chosen, rejected) of every pair in ``items``, by
    ``pair_key``: read from ``directory``'s chunk files where their key matches, computed (and written, one file per
    ``CHUNK`` pairs, atomically, by the first process) otherwise."""
    unique = list({pair_key(it): it for it in items}.items())
    identity = model_identity(model_dir)
    out: dict[bytes, tuple[float, float]] = {}
    was_training = model.training
    model.eval()
    computed = 0
    for start in range(0, len(unique), CHUNK):
        chunk = unique[start : start + CHUNK]
        digest = hashlib.sha256(identity.encode() + b"".join(k for k, _ in chunk)).hexdigest()
        path = directory / f"logps-{start // CHUNK:05d}.safetensors"
        if path.is_file():
            with safe_open(str(path), framework="pt") as f:
                if (f.metadata() or {}).get("key") == digest:  # the same model and the same pairs
                    out.update(zip((k for k, _ in chunk), map(tuple, f.get_tensor("logps").tolist()), strict=True))
                    continue
        values = np.zeros((len(chunk), 2))
        with torch.no_grad():
            for index in length_sorted_batches([max(len(it[0]), len(it[2])) for _, it in chunk], task.eval_batch_size):
                batch = task.reply_batch([chunk[i][1] for i in index])
                logps = task.log_likelihoods(model, batch).double().numpy()
                values[index, 0], values[index, 1] = logps[: len(index)], logps[len(index) :]
        computed += len(chunk)
        out.update(zip((k for k, _ in chunk), map(tuple, values.tolist()), strict=True))
        if not (dist.is_available() and dist.is_initialized() and dist.get_rank() != 0):  # the first process writes
            directory.mkdir(parents=True, exist_ok=True)
            with atomic_write(path) as tmp:
                save_file({"logps": torch.from_numpy(values)}, str(tmp), metadata={"key": digest})
    model.train(was_training)
    read = len(unique) - computed
    logger.info("reference log-probabilities: %d pairs computed, %d read from %s", computed, read, directory)
    return out
