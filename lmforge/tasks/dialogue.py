"""Dialogue: supervised fine-tuning of a GPT on multi-turn conversations, and chat prompts.

Conversations are ``{"messages": [{"role": "system" | "user" | "assistant", "content": ...}]}``,
the format of OpenAI's chat data and of transformers' ``apply_chat_template`` (Alpaca-style rows are read as
conversations too: ``data/readers.py``). They are rendered with the model's own chat template (an imported model's,
e.g. Gemma 3's), else the ChatML template stored with lmforge's tokenizers (``data/tokenizer.py``:
``<|im_start|>role\\ncontent<|im_end|>\\n``, as Qwen does), so transformers renders exactly the same text, and the
whole rendering is tokenized at once (pieces tokenized separately can differ at the joins). The loss covers only
what the assistant says (its turn and the end-of-turn token that ends it, so the model learns to stop: ``<|im_end|>``,
Gemma's ``<end_of_turn>``), found through the template and the tokenizer's character offsets: the InstructGPT /
Alpaca recipe of masking the prompt (Ouyang et al., 2022).

Packing (``--packing``): short training conversations share rows of up to ``max_len`` tokens, placed by best-fit
decreasing (TRL's default strategy), each attending only to itself with positions from its own start
(``models/layers.packed_positions_and_mask``), so a packed row's loss is exactly the sum of its conversations'.

Evaluation: perplexity over the assistant tokens of held-out conversations, and distinct-1/2 (Li
et al., 2016) of replies sampled for their prompts.
"""

from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lmforge.data.batching import length_sorted_batches, pad, to_device
from lmforge.data.readers import read_conversations
from lmforge.data.tokenizer import LMTokenizer, load_tokenizer
from lmforge.errors import UserError
from lmforge.inference.chat import assistant_spans, chat_prompt_ids, chat_tokens
from lmforge.inference.config import GenerationConfig
from lmforge.inference.generate import Generator
from lmforge.metrics import distinct_n
from lmforge.models.gpt import GPT
from lmforge.models.registry import load_model
from lmforge.ops.linear_cross_entropy import IGNORE, linear_cross_entropy
from lmforge.tasks.base import FinetuneDefaults, LossOutput, fit_max_len, lm_metrics
from lmforge.tasks.clm import clm_train_flops

Encoded = tuple  # (token ids int32 array, is-assistant-target bool array[, segment ids int32 array when packed])


class DialogueTask(FinetuneDefaults):
    """Fine-tune a GPT to answer as the assistant of multi-turn conversations."""

    name = "chat"

    def __init__(
        self,
        tokenizer: LMTokenizer,
        *,
        max_len: int = 256,
        train_examples: Sequence[dict] = (),
        dev_examples: Sequence[dict] = (),
        eval_batch_size: int = 16,
        eval_replies: int = 40,
        eval_generation: GenerationConfig | None = None,
        packing: bool = False,
    ) -> None:
        if (train_examples or dev_examples) and tokenizer.chat_template is None:
            chat_tokens(tokenizer)  # learning from conversations needs a template, or ChatML's turn tokens
        self.tokenizer, self.max_len = tokenizer, max_len
        self.im_end = tokenizer.token_id("im_end")
        if self.im_end is None:
            self.im_end = tokenizer.token_id("eot")  # a model's own end of turn (Gemma's <end_of_turn>)
        pad_id = tokenizer.token_id("pad")
        self.pad_id = tokenizer.token_id("eos") if pad_id is None else pad_id
        self.selection = ("perplexity", "min")
        self.eval_batch_size, self.eval_replies = eval_batch_size, eval_replies
        self.eval_generation = eval_generation or GenerationConfig(
            max_new_tokens=48,
            do_sample=True,
            top_p=0.9,
            temperature=0.8,
            seed=0,
            stop_token_ids=[i for i in (self.im_end,) if i is not None],
        )
        self.truncated: dict[str, int] = {}
        self.dev_examples = list(dev_examples)
        self.train_items = self.encode(train_examples, split="train")
        self.packing: dict[str, int] = {}
        if packing and self.train_items:
            conversations = len(self.train_items)
            self.train_items = pack(self.train_items, max_len)
            self.packing = {"conversations": conversations, "rows": len(self.train_items), "row_tokens": max_len}
        self.val_items = self.encode(dev_examples, split="dev")
        self.train_lengths = [len(item[0]) for item in self.train_items]

    # --- the fine-tuning recipe's hooks (tasks/base.py: FinetuneTask) -------------------------
    report_columns = ("perplexity", "accuracy", "distinct_1", "distinct_2")
    evaluate_before: tuple[str, ...] = ("dev",)

    @classmethod
    def reader(cls, cfg: Any) -> Any:
        return read_conversations

    @classmethod
    def for_finetuning(cls, cfg: Any, splits: dict[str, list[dict]], run_dir: Path) -> tuple[DialogueTask, GPT]:
        """The task over ``splits`` and the pretrained GPT of ``cfg.model``."""
        model = load_model(cfg.model)
        if not isinstance(model, GPT):
            raise UserError(f"--model {cfg.model}: chat fine-tuning needs a GPT model directory")
        max_len = fit_max_len(cfg.max_len, model.cfg, default=model.cfg.max_seq_len)
        task = cls(
            load_tokenizer(cfg.model),
            max_len=max_len,
            train_examples=splits["train"],
            dev_examples=splits["dev"],
            packing=cfg.packing,
        )
        if not task.train_items:
            raise UserError("no training conversation has an assistant token within max_len")
        return task, model

    @classmethod
    def pretrained_settings(cls, model_cfg: Any) -> dict:
        """A pretrained GPT directory generates (and chats, without the chat fine-tuning) over its whole window."""
        return {"task": "chat", "max_len": model_cfg.max_seq_len}

    @classmethod
    def from_settings(cls, run_dir: Path, settings: dict) -> DialogueTask:
        return cls(load_tokenizer(run_dir), max_len=settings["max_len"])

    def predict(self, model: nn.Module, examples: Sequence[dict], *, device: torch.device) -> list[dict]:
        """A sampled reply to each conversation's history before its last assistant turn."""
        return [{"reply": r["reply"]} for r in self.sample_replies(model, examples)]

    def extras(self) -> dict:
        packed = {"packing": self.packing} if self.packing else {}
        return {"generation": dataclasses.asdict(self.eval_generation), **packed}

    def settings(self) -> dict:
        return {"task": self.name, "max_len": self.max_len}

    # --- data --------------------------------------------------------------------------------
    def encode(self, examples: Sequence[dict], *, split: str) -> list[Encoded]:
        """Token ids and assistant-target flags per conversation; truncated ones are counted, and
        those left with no assistant token are dropped (counted too)."""
        texts, spans = [], []
        for ex in examples:
            text, targets = assistant_spans(self.tokenizer, ex["messages"])
            texts.append(text)
            spans.append(targets)
        out, truncated, dropped = [], 0, 0
        for enc, targets in zip(
            self.tokenizer.tokenizer.encode_batch(texts, add_special_tokens=False), spans, strict=True
        ):
            ids = enc.ids[: self.max_len]
            truncated += len(enc.ids) > self.max_len
            flags = target_flags(enc.offsets[: len(ids)], targets)
            if not flags[1:].any():  # the first token is never a target (nothing precedes it)
                dropped += 1
                continue
            out.append((np.asarray(ids, dtype=np.int32), flags))
        self.truncated[split] = truncated
        self.truncated[f"{split}_dropped_no_assistant_tokens"] = dropped
        return out

    def collate(self, items: list[Encoded], *, generator: torch.Generator | None = None) -> dict[str, Any]:
        ids, labels = next_token_batch(items, self.pad_id)
        packed = {"segment_ids": pad([it[2] for it in items], 0)} if len(items[0]) == 3 else {}
        return {
            "input_ids": ids,
            "labels": labels,
            **packed,
            "n_targets": int((labels != IGNORE).sum()),
            "n_tokens": sum(len(it[0]) for it in items),
        }

    # --- loss, metrics ----------------------------------------------------------------------------
    def loss(self, model: GPT, batch: dict[str, Any]) -> LossOutput:
        # Right padding under a causal mask: real positions never see the padding after them.
        hidden = model.hidden_states(batch["input_ids"], segment_ids=batch.get("segment_ids"))  # (B, T, D)
        labels = batch["labels"].reshape(-1)
        scored = labels != IGNORE  # only the assistant's tokens meet the vocabulary (prompts and padding never do)
        rows = hidden.reshape(-1, hidden.shape[-1])[scored]
        loss_sum, correct = linear_cross_entropy(rows, model.output_weight, labels[scored])
        return LossOutput(loss_sum, {"correct": float(correct)})

    def metrics(self, sums: dict[str, float]) -> dict[str, float]:
        return lm_metrics(sums)

    def flops(self, model: GPT, batch: dict[str, Any]) -> float:
        return clm_train_flops(model.cfg, batch)

    # --- evaluation -----------------------------------------------------------------------------
    def evaluate(self, model: nn.Module, examples: Sequence[dict] | None = None, *, device: torch.device) -> dict:
        """Perplexity on the assistant tokens, and distinct-1/2 of sampled replies."""
        items = self.val_items if examples is None else self.encode(examples, split="eval")
        examples = self.dev_examples if examples is None else list(examples)
        if not items:
            return {}
        was_training = model.training
        model.eval()
        sums = {"loss_sum": 0.0, "n_targets": 0.0, "correct": 0.0}
        with torch.no_grad():
            for idx in length_sorted_batches([len(it[0]) for it in items], self.eval_batch_size):
                batch = to_device(self.collate([items[i] for i in idx]), device)
                out = self.loss(model, batch)
                sums["loss_sum"] += float(out.loss_sum)
                sums["n_targets"] += batch["n_targets"]
                sums["correct"] += out.counts["correct"]
        result: dict[str, Any] = dict(self.metrics(sums))
        replies = self.sample_replies(model, examples[: self.eval_replies])
        tokens = [r["token_ids"] for r in replies]
        result.update(distinct_1=distinct_n(tokens, 1), distinct_2=distinct_n(tokens, 2), replies=len(replies))
        result["samples"] = [{k: r[k] for k in ("prompt", "reply", "reference")} for r in replies[:5]]
        model.train(was_training)
        return result

    def sample_replies(self, model: GPT, examples: Sequence[dict]) -> list[dict]:
        """For each conversation: a reply sampled for the history before its last assistant turn
        (all prompts decoded together, left-padded, from one seeded generator)."""
        limit = model.cfg.max_seq_len - self.eval_generation.max_new_tokens
        chosen = []
        for ex in examples:
            messages = ex["messages"]
            last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
            prompt = chat_prompt_ids(self.tokenizer, messages[:last], limit=limit)
            if prompt is not None:
                chosen.append((messages[last - 1]["content"] if last else "", messages[last]["content"], prompt))
        if not chosen:
            return []
        replies = Generator(model, self.tokenizer).generate([p for _, _, p in chosen], self.eval_generation)
        return [
            {"prompt": prompt, "reply": r.text, "reference": reference, "token_ids": r.token_ids}
            for (prompt, reference, _), r in zip(chosen, replies, strict=True)
        ]


def target_flags(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> np.ndarray:
    """True at each token (given by its character ``offsets``) that lies inside one of the character ``spans``."""
    flags = np.zeros(len(offsets), dtype=bool)
    for i, (a, b) in enumerate(offsets):
        flags[i] = b > a and any(lo <= a and b <= hi for lo, hi in spans)
    return flags


def pack(items: Sequence[Encoded], row_tokens: int) -> list[Encoded]:
    """Conversations placed in rows of at most ``row_tokens`` tokens by best-fit decreasing (longest first, each
    into the fullest row it fits), concatenated with segment ids 1, 2, ... (0 is left for padding). The first token
    of a conversation is never a target, so the next-token targets never cross from one conversation to the next."""
    order = sorted(range(len(items)), key=lambda i: -len(items[i][0]))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (tokens left, row), sorted
    for i in order:
        n = len(items[i][0])
        at = bisect.bisect_left(free, (n, -1))
        if at < len(free):
            left, row = free.pop(at)
        else:
            left, row = row_tokens, len(rows)
            rows.append([])
        rows[row].append(i)
        bisect.insort(free, (left - n, row))
    packed = []
    for members in rows:
        segments = [np.full(len(items[i][0]), k + 1, dtype=np.int32) for k, i in enumerate(members)]
        packed.append(
            (
                np.concatenate([items[i][0] for i in members]),
                np.concatenate([items[i][1] for i in members]),
                np.concatenate(segments),
            )
        )
    return packed


def next_token_batch(items: Sequence[Encoded], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (B, T) token ids and their next-token targets: the following token where it is flagged as a
    target, IGNORE elsewhere (the prompt, the padding, the last position)."""
    ids = pad([it[0] for it in items], pad_id)
    labels = torch.full_like(ids, IGNORE)
    for row, (seq, flags, *_) in enumerate(items):
        targets = torch.from_numpy(seq.astype(np.int64))
        labels[row, : len(seq)] = torch.where(torch.from_numpy(flags), targets, IGNORE)
    return ids, torch.cat((labels[:, 1:], torch.full((len(items), 1), IGNORE)), dim=1)
