"""Knowledge distillation of a fine-tuned teacher into a student: classification and NER (Hinton, Vinyals &
Dean 2015).

The student's loss on a labelled text is ``alpha * T^2 * KL(softmax(t / T) || softmax(s / T)) + (1 - alpha) *
hard`` and on an unlabelled text ``T^2 * KL(...)`` alone, with ``t`` and ``s`` the teacher's and the student's
scores at temperature ``T`` (the ``T^2`` keeps the soft gradients' scale independent of ``T``) and ``hard`` the
task's own loss on the gold labels. Unlabelled in-domain texts that the teacher labels are the task-specific
data augmentation that makes task distillation work (TinyBERT, Jiao et al. 2020, who generate them; here
they are the user's texts).

- Classification: ``t`` are the teacher's class logits, one row per text.
- NER: one row per token (the data's tokens: characters for Chinese), ``t`` the log of the teacher's
  posterior tag marginals (forward-backward through its CRF; its softmax without one), matched by the
  student's own marginals through its CRF, differentiable and softened by dividing every CRF score by
  ``T`` (its softmax at ``T`` without a CRF): posterior distillation (Wang et al. 2020, "Structure-Level
  Knowledge Distillation for Multilingual Sequence Labeling"). Matching the student's emissions instead,
  with the CRF's transitions added on top at decoding, did worse (docs/FINDINGS.md). Unlabelled text
  becomes tokens the way the training data's are: characters when every training token is one character,
  else whitespace-separated words.

The teacher's rows are computed once per text by ``runs/distill.py`` and cached in ``OUT/teacher/``; these
tasks read them, checked against the texts they belong to. The teacher scores texts and tokens, not ids, so
the student's tokenizer may differ from the teacher's. The run is a normal classify or NER run (task.json is
the plain task's), so predict, evaluate, serve, quantize and export take it as any other.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lmforge.data.batching import pad, padding_mask
from lmforge.data.builtin import load_builtin
from lmforge.data.readers import read_jsonl, read_text_lines, write_jsonl
from lmforge.errors import UserError
from lmforge.files import write_json
from lmforge.models.registry import read_safetensors
from lmforge.tasks.base import IGNORE, LossOutput
from lmforge.tasks.classification import ClassificationTask, label_set
from lmforge.tasks.ner import NERTask, tag_set

TEACHER_DIR = "teacher"
MANIFEST = "manifest.json"
AUGMENTED = "augmented.jsonl"  # the --augment variants, with their settings in augmented.jsonl.json
CHUNK = 2048  # texts per cached file: a killed labelling run loses at most one chunk
_SENTENCE_END = re.compile(r"(?<=[。！？!?；;])")


def soft_target_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 * KL(softmax(teacher / T) || softmax(student / T))`` per row: (..., C) scores -> (...)."""
    t = temperature
    log_p = F.log_softmax(teacher.float() / t, dim=-1)
    log_q = F.log_softmax(student.float() / t, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1) * (t * t)


def unlabelled_texts(sources: Sequence[str], *, limit: int, max_chars: int) -> list[dict]:
    """``{"text"}`` examples from .txt files (one text per line) and ``builtin:NAME`` corpora (their train
    texts), in order, at most ``limit``. Texts longer than ``max_chars`` are cut at sentence ends (then hard)."""
    out: list[dict] = []
    for source in sources:
        if source.startswith("builtin:"):
            lines = (ex["text"] for ex in load_builtin(source.removeprefix("builtin:"))["train"] if ex.get("text"))
        elif Path(source).is_file():
            lines = read_text_lines(source)
        else:
            raise UserError(f"--unlabelled {source}: no such file (a .txt with one text per line, or builtin:NAME)")
        for line in lines:
            for piece in _pieces(line.strip(), max_chars):
                if len(out) >= limit:
                    return out
                out.append({"text": piece})
    return out


def distill_examples(cfg: Any, train: Sequence[dict], run_dir: Path) -> tuple[list[dict], list[dict]]:
    """The labelled training examples and the unlabelled ones of a distillation recipe (``cfg``:
    ``DistillClassifyConfig`` or ``DistillNERConfig``): the ``--unlabelled`` texts cut to ``cfg.max_len`` (or
    128) characters, then the ``--augment`` variants of the labelled ones (made once, kept in
    ``run_dir/teacher/``). The teacher labels both, in order. For NER the unlabelled texts become
    ``{"tokens"}`` like the training sentences."""
    unlabelled = unlabelled_texts(cfg.unlabelled, limit=cfg.unlabelled_limit, max_chars=cfg.max_len or 128)
    if train and "tokens" in train[0]:
        by_character = all(len(t) == 1 for ex in train for t in ex["tokens"])
        unlabelled = [
            {"tokens": [c for c in ex["text"] if not c.isspace()] if by_character else ex["text"].split()}
            for ex in unlabelled
        ]
        unlabelled = [ex for ex in unlabelled if ex["tokens"]]
    if cfg.augment:
        unlabelled += augmented(cfg, train, run_dir / TEACHER_DIR)
    return list(train), unlabelled


def augmented(cfg: Any, train: Sequence[dict], directory: Path) -> list[dict]:
    """``cfg.augment`` MLM variants of every training example (``mlm_augment``), read from ``directory`` when a
    previous run made them with the same settings, else made and written there (atomically)."""
    source = cfg.augment_model or cfg.model
    settings = {
        "copies": cfg.augment,
        "seed": cfg.seed,
        "model": str(Path(source).resolve()),
        "labelled_sha256": texts_digest(train),
    }
    path, meta = directory / AUGMENTED, directory / (AUGMENTED + ".json")
    if path.is_file() and meta.is_file() and json.loads(meta.read_text(encoding="utf-8")) == settings:
        return list(read_jsonl(path))
    rows = mlm_augment(train, source, copies=cfg.augment, seed=cfg.seed)
    directory.mkdir(parents=True, exist_ok=True)
    write_jsonl(path, rows)
    write_json(meta, settings)
    return rows


AUGMENT_P, AUGMENT_TOP_K = 0.4, 15  # TinyBERT's p_t and K
AUGMENT_PASSES = 3  # each masks ~13% of the characters: about the 15% the MLM was pretrained on
_IDEOGRAPH = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")


@torch.inference_mode()
def mlm_augment(
    examples: Sequence[dict], model_dir: str, *, copies: int, seed: int, batch_size: int = 64
) -> list[dict]:
    """TinyBERT's data augmentation (Jiao et al. 2020, §3.3) for Chinese: ``copies`` variants of each example
    (``{"text"[, "text_pair"]}`` or ``{"tokens"}``) in which every Chinese character is, with probability 0.4,
    replaced by one of the 15 characters a masked LM ranks most probable at its place (uniformly; never
    itself). TinyBERT masks one word at a time (a pass per word: too slow on 2 cores); here the chosen
    characters are split at random into three groups, each masked together and predicted in one pass that
    sees the earlier passes' replacements: ~13% masked per pass, near the 15% the MLM was pretrained on.

    ``model_dir``: an lmforge BERT with its MLM head (e.g. the student's pretraining). Deterministic given
    ``seed``. Labels are not kept: the teacher labels the variants. Written here because no maintained
    library does masked-LM character replacement for Chinese offline (nlpaug and TextAttack wrap models
    from the Hugging Face hub)."""
    from lmforge.data.tokenizer import load_tokenizer
    from lmforge.models.bert import Bert
    from lmforge.models.registry import load_model

    model = load_model(model_dir)
    if not isinstance(model, Bert) or model.mlm_head is None:
        raise UserError(f"--augment-model {model_dir}: augmentation needs a BERT with its MLM head (a pretraining run)")
    tokenizer = load_tokenizer(model_dir)
    special = {r: tokenizer.token_id(r) for r in ("mask", "cls", "sep", "pad")}
    if None in special.values():
        raise UserError(f"--augment-model {model_dir}: its tokenizer lacks [MASK], [CLS], [SEP] or [PAD]")
    mask_id = special["mask"]
    vocab = tokenizer.tokenizer.get_vocab()
    allowed = torch.zeros(len(vocab), dtype=torch.bool)
    allowed[[i for t, i in vocab.items() if len(t) == 1 and _IDEOGRAPH.match(t)]] = True
    window = model.cfg.max_seq_len - 2
    generator = torch.Generator().manual_seed(seed)
    fields = [f for f in ("tokens", "text", "text_pair") if examples and f in examples[0]]
    out = [dict(ex) for ex in examples for _ in range(copies)]
    for field in fields:
        pieces = [list(ex[field]) if ex.get(field) else [] for ex in out]  # characters (or NER tokens)
        groups = []  # per variant: {index in pieces: the pass that replaces it}
        for chars, enc in zip(pieces, _encode(tokenizer, pieces), strict=True):
            eligible = [w for w in _single_pieces(enc, window) if _IDEOGRAPH.fullmatch(chars[w])]
            draw = torch.rand(len(eligible), generator=generator).tolist()
            when = torch.randint(AUGMENT_PASSES, (len(eligible),), generator=generator).tolist()
            groups.append({w: g for w, r, g in zip(eligible, draw, when, strict=True) if r < AUGMENT_P})
        for step in range(AUGMENT_PASSES):  # each pass sees the characters the earlier passes put in
            jobs = []  # (variant, ids, [(position in ids, index in pieces)])
            for v, enc in enumerate(_encode(tokenizer, pieces)):
                first = _single_pieces(enc, window)
                chosen = sorted((first[w] + 1, w) for w, g in groups[v].items() if g == step)
                if chosen:
                    jobs.append((v, [special["cls"], *enc.ids[:window], special["sep"]], chosen))
            for start in range(0, len(jobs), batch_size):
                part = jobs[start : start + batch_size]
                ids = pad([j[1] for j in part], special["pad"])
                original = ids.clone()
                rows = torch.tensor([b for b, j in enumerate(part) for _ in j[2]])
                cols = torch.tensor([pos for j in part for pos, _ in j[2]])
                ids[rows, cols] = mask_id
                select = rows * ids.shape[1] + cols  # ascending: rows in order, positions ascending in a row
                mask = padding_mask([len(j[1]) for j in part], ids.shape[1])
                logits = model.mlm_logits(model(ids, attention_mask=mask, select=select)).float()
                logits = logits.masked_fill(~allowed, float("-inf"))
                logits[torch.arange(len(cols)), original[rows, cols]] = float("-inf")  # never the character itself
                top = logits.topk(AUGMENT_TOP_K, dim=-1).indices  # (N, K)
                picks = top[torch.arange(len(cols)), torch.randint(AUGMENT_TOP_K, (len(cols),), generator=generator)]
                k = 0
                for v, _, chosen in part:
                    for _, w in chosen:
                        pieces[v][w] = tokenizer.tokenizer.id_to_token(int(picks[k]))
                        k += 1
        for ex, chars in zip(out, pieces, strict=True):
            if ex.get(field):
                ex[field] = chars if field == "tokens" else "".join(chars)
    return [{k: v for k, v in ex.items() if k not in ("label", "tags", "source")} for ex in out]


def _encode(tokenizer, pieces: list[list[str]]) -> list:
    return tokenizer.tokenizer.encode_batch(
        [p or ["[UNK]"] for p in pieces], is_pretokenized=True, add_special_tokens=False
    )


def _single_pieces(enc, window: int) -> dict[int, int]:
    """index in the pieces -> its position among the ids, for pieces that are one sub-token inside the window."""
    positions: dict[int, list[int]] = {}
    for pos, word in enumerate(enc.word_ids[:window]):
        if word is not None:
            positions.setdefault(word, []).append(pos)
    return {w: ps[0] for w, ps in positions.items() if len(ps) == 1}


def _pieces(text: str, max_chars: int) -> list[str]:
    if len(text) <= max_chars:
        return [text] if text else []
    pieces, current = [], ""
    for sentence in _SENTENCE_END.split(text):
        if current and len(current) + len(sentence) > max_chars:
            pieces.append(current)
            current = ""
        current += sentence
        while len(current) > max_chars:
            pieces.append(current[:max_chars])
            current = current[max_chars:]
    return [p for p in [*pieces, current] if p.strip()]


def texts_digest(examples: Sequence[dict]) -> str:
    """SHA-256 of the texts (text pairs, or token lists) in order: what a teacher cache belongs to."""
    h = hashlib.sha256()
    for ex in examples:
        key = ex["tokens"] if "tokens" in ex else [ex["text"], ex.get("text_pair")]
        h.update(json.dumps(key, ensure_ascii=False).encode())
    return h.hexdigest()


def read_teacher_rows(run_dir: Path, examples: Sequence[dict], labels: list[str]) -> list[np.ndarray]:
    """The cached teacher rows of ``examples``, one (rows, C) array per example (one row per text for
    classification, per token for NER), checked to be for these texts and labels."""
    directory = run_dir / TEACHER_DIR
    path = directory / MANIFEST
    if not path.is_file():
        raise UserError(f"{directory}: no teacher logits; `lmforge distill` computes them before training")
    manifest = json.loads(path.read_text(encoding="utf-8"))
    if manifest.get("texts_sha256") != texts_digest(examples) or manifest.get("labels") != labels:
        raise UserError(f"{path}: the cached teacher logits are for other texts or labels; use a new --out")
    chunks = [directory / f"chunk-{i:05d}.safetensors" for i in range(manifest["chunks"])]
    missing = [c.name for c in chunks if not c.is_file()]
    if missing:
        raise UserError(f"{directory}: teacher logits incomplete (missing {missing[:3]}); run `lmforge distill` again")
    out: list[np.ndarray] = []
    for c in chunks:
        tensors = read_safetensors(c)
        logits, rows = tensors["logits"].numpy(), tensors["rows"].numpy()
        if logits.ndim != 2 or logits.shape[1] != len(labels) or rows.sum() != len(logits):
            raise UserError(f"{c}: logits of shape {logits.shape} for {rows.sum()} rows of {len(labels)} labels")
        out.extend(np.split(logits, np.cumsum(rows)[:-1]))
    if len(out) != len(examples) or any(len(r) != _rows(ex) for r, ex in zip(out, examples, strict=True)):
        raise UserError(f"{directory}: teacher rows for {len(out)} texts do not match the {len(examples)} texts")
    return out


def _rows(example: dict) -> int:
    return len(example["tokens"]) if "tokens" in example else 1


class _Distilled:
    """What both distilled tasks add: the loss mix, and the run report's ``distillation`` entry."""

    temperature: float
    alpha: float
    n_unlabelled: int
    teacher: str

    def _teacher_data(self, cfg: Any, train: Sequence[dict], run_dir: Path, labels: list[str]):
        """The labelled and unlabelled examples and the cached teacher rows of each (in that order); keeps the
        loss settings of ``cfg``."""
        labelled, unlabelled = distill_examples(cfg, train, run_dir)
        rows = read_teacher_rows(run_dir, [*labelled, *unlabelled], labels)
        self.temperature, self.alpha, self.teacher = cfg.temperature, cfg.alpha, cfg.teacher
        self.n_unlabelled = len(unlabelled)
        return labelled, unlabelled, rows

    def extras(self) -> dict:
        entry = {"teacher": self.teacher, "temperature": self.temperature, "alpha": self.alpha}
        return {"distillation": {**entry, "unlabelled": self.n_unlabelled}}


class DistilledClassification(_Distilled, ClassificationTask):
    """ClassificationTask whose training items carry the teacher's logits; unlabelled items have label -1."""

    name = "classify"

    @classmethod
    def teacher_labels(cls, train: list[dict]) -> tuple[list[str], str]:
        """The labels the teacher must have (the training data's) and the task.json key it keeps them under."""
        return label_set(train), "labels"

    @staticmethod
    def teacher_rows(run: Any, chunk: list[dict]) -> list[np.ndarray]:
        """The teacher run's class logits, one (1, C) row per text."""
        return list(run.task.class_logits(run.model, chunk, device=torch.device("cpu"))[:, None, :])

    @classmethod
    def for_finetuning(cls, cfg: Any, splits: dict[str, list[dict]], run_dir: Path):
        task, model = super().for_finetuning(cfg, splits, run_dir)
        _, unlabelled, teacher = task._teacher_data(cfg, splits["train"], run_dir, task.labels)
        items = [*task.train_items, *task.encode(unlabelled, split="unlabelled", need_labels=False)]
        task.train_items = [(*item, teacher[i][0]) for i, item in enumerate(items)]  # one row per text
        task.train_lengths = [len(item[0]) for item in task.train_items]
        return task, model

    def collate(self, items: list, *, generator: torch.Generator | None = None) -> dict[str, Any]:
        batch = super().collate(items, generator=generator)
        if items and len(items[0]) == 4:  # training items; dev items have no teacher logits
            batch["teacher"] = torch.from_numpy(np.stack([it[3] for it in items]))
        return batch

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> LossOutput:
        if "teacher" not in batch:
            return super().loss(model, batch)
        logits = self.logits(model, batch).float()
        labels = batch["labels"]
        labelled = labels >= 0
        soft = soft_target_loss(logits, batch["teacher"], self.temperature)
        hard = F.cross_entropy(logits, labels.clamp(min=0), reduction="none")
        per_text = torch.where(labelled, self.alpha * soft + (1 - self.alpha) * hard, soft)
        correct = ((logits.argmax(-1) == labels) & labelled).sum()
        return LossOutput(per_text.sum(), {"correct": float(correct), "labelled": float(labelled.sum())})

    def metrics(self, sums: dict[str, float]) -> dict[str, float]:
        n = max(sums["n_targets"], 1.0)
        return {"loss": sums["loss_sum"] / n, "accuracy": sums.get("correct", 0.0) / max(sums.get("labelled", n), 1.0)}


class DistilledNER(_Distilled, NERTask):
    """NERTask whose training windows carry the teacher's per-token rows; unlabelled windows have no tags."""

    name = "ner"

    @classmethod
    def teacher_labels(cls, train: list[dict]) -> tuple[list[str], str]:
        """The tags the teacher must have (the training data's) and the task.json key it keeps them under."""
        return tag_set(train), "tags"

    @staticmethod
    def teacher_rows(run: Any, chunk: list[dict]) -> list[np.ndarray]:
        """The teacher run's tag log-marginals, one (words, C) row per sentence."""
        return run.task.tag_log_probs(run.model, chunk, device=torch.device("cpu"))

    @classmethod
    def for_finetuning(cls, cfg: Any, splits: dict[str, list[dict]], run_dir: Path):
        task, model = super().for_finetuning(cfg, splits, run_dir)
        labelled, unlabelled, teacher = task._teacher_data(cfg, splits["train"], run_dir, task.tags)
        extra = [
            (*w[:3], (w[3][0] + len(labelled), *w[3][1:]))
            for w in task.windows(unlabelled, split="unlabelled", need_tags=False)
        ]
        task.train_items = [(*w, teacher[w[3][0]][w[3][1] : w[3][2]]) for w in [*task.train_items, *extra]]
        task.train_lengths = [len(w[0]) for w in task.train_items]
        return task, model

    def collate(self, items: list, *, generator: torch.Generator | None = None) -> dict[str, Any]:
        batch = super().collate(items, generator=generator)
        if items and len(items[0]) == 5:  # training windows; dev windows have no teacher rows
            teacher = torch.zeros((*batch["word_mask"].shape, len(self.tags)))
            for b, w in enumerate(items):
                teacher[b, : len(w[4])] = torch.from_numpy(w[4])
            batch["teacher"] = teacher
            batch["n_targets"] = int(batch["word_mask"].sum())  # every token has a soft target
        return batch

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> LossOutput:
        if "teacher" not in batch:
            return super().loss(model, batch)
        emissions = self._emissions(self._scores(model, batch), batch)  # (B, W, C)
        mask = batch["word_mask"]
        t = self.temperature
        if model.crf is None:
            soft = soft_target_loss(emissions, batch["teacher"], t)
        else:  # the student's own tag marginals through its CRF, softened like the teacher's
            log_q = model.crf.log_marginals(emissions, mask, temperature=t)
            log_p = F.log_softmax(batch["teacher"].float() / t, dim=-1)
            soft = (log_p.exp() * (log_p - log_q)).sum(-1) * (t * t)
        soft = (soft * mask).sum(1)  # (B,)
        labelled = (batch["tags"] != IGNORE).any(1)
        if model.crf is None:
            hard = F.cross_entropy(emissions.transpose(1, 2), batch["tags"].long(), reduction="none").sum(1)
        else:
            tags = torch.where(labelled[:, None], batch["tags"], 0)
            hard = -model.crf.log_likelihood(emissions, tags, mask)
        per_window = torch.where(labelled, self.alpha * soft + (1 - self.alpha) * hard, soft)
        return LossOutput(per_window.sum())
