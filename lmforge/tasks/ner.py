"""Named-entity recognition as token classification with BIO or BIOES tags (Devlin et al., 2019, §5.3).

Examples are ``{"tokens": [...], "tags": [...]}`` (CoNLL: characters for Chinese). Each token is
split into sub-tokens; the tag goes on its first sub-token and the rest are ignored (-100). The
head is a softmax over tags per token, or a linear-chain CRF over the first-sub-token scores
(log-likelihood training, Viterbi decoding, transitions such as ``O -> I-PER`` forbidden; Lample
et al., 2016). Sentences longer than the model window are cut into overlapping windows of whole
tokens; each token's prediction comes from the window where it sits farthest from an edge, so
every token is predicted with context on both sides. Predictions on raw text map entities back
to character offsets through the tokenizer's offsets.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lmforge.data.batching import length_sorted_batches, pad, padding_mask, to_device
from lmforge.data.readers import tags_problem
from lmforge.data.tokenizer import LMTokenizer, load_tokenizer
from lmforge.errors import UserError
from lmforge.metrics import entity_metrics, entity_spans, scheme_of
from lmforge.models.heads import CRF, EncoderWithHead, TokenClassifier, bio_transitions
from lmforge.models.registry import encoder_for_finetuning
from lmforge.tasks.base import IGNORE, HeadOnEncoder, LossOutput, fit_max_len, flops_d_ff, transformer_train_flops


def tag_set(examples: Sequence[dict]) -> list[str]:
    """'O' then the entity tags of the training data (by type, then prefix); malformed ones name their sentence."""
    for n, ex in enumerate(examples):
        problem = tags_problem(ex["tokens"], ex["tags"])
        if problem:
            raise UserError(f"{ex.get('source', f'train sentence {n + 1}')}: {problem}")
    entity = sorted({t for ex in examples for t in ex["tags"]} - {"O"}, key=lambda t: (t[2:], t[0]))
    if not entity:
        raise UserError("the NER training data has no entity tags (only 'O')")
    return ["O", *entity]


Window = tuple  # (ids int32 (T,), first-sub-token positions int32 (W,), tag indices int16 (W,), (sentence, s, e))


class NERTask(HeadOnEncoder):
    """Fine-tune an encoder to tag tokens with entity tags."""

    name = "ner"

    def __init__(
        self,
        tokenizer: LMTokenizer,
        tags: Sequence[str],
        *,
        max_len: int = 128,
        overlap: int | None = None,
        head: str = "crf",
        dropout: float = 0.1,
        train_examples: Sequence[dict] = (),
        dev_examples: Sequence[dict] = (),
        eval_batch_size: int = 64,
    ) -> None:
        if head not in ("softmax", "crf"):
            raise UserError(f"ner head={head!r} must be 'softmax' or 'crf'")
        overlap = max_len // 4 if overlap is None else overlap
        if not 0 <= overlap < max_len - 2:
            raise UserError(f"overlap={overlap} must be in [0, max_len - 2 = {max_len - 2})")
        ids = {r: tokenizer.token_id(r) for r in ("cls", "sep", "pad", "unk")}
        if None in ids.values():
            raise UserError("NER needs a WordPiece (BERT) tokenizer with [CLS], [SEP], [PAD] and [UNK]")
        self.tokenizer, self.tags = tokenizer, list(tags)
        self.tag_index = {t: i for i, t in enumerate(self.tags)}
        self.scheme = scheme_of(self.tags)
        self.cls_id, self.sep_id, self.pad_id, self.unk_id = (ids[r] for r in ("cls", "sep", "pad", "unk"))
        self.metaspace_id = tokenizer.tokenizer.token_to_id("\u2581") if tokenizer.kind == "unigram" else None
        self.max_len, self.overlap, self.head, self.dropout = max_len, overlap, head, dropout
        self.selection = ("f1", "max")
        self.eval_batch_size = eval_batch_size
        self.truncated: dict[str, int] = {}
        self.train_items = self.windows(train_examples, split="train")
        self.val_examples = list(dev_examples)
        self.val_items = self.windows(self.val_examples, split="dev")
        self.train_lengths = [len(w[0]) for w in self.train_items]

    # --- the fine-tuning recipe's hooks (tasks/base.py: FinetuneTask) -------------------------
    report_columns = ("f1", "precision", "recall", "loss")

    @classmethod
    def for_finetuning(cls, cfg: Any, splits: dict[str, list[dict]], run_dir: Path) -> tuple[NERTask, nn.Module]:
        """The task over ``splits`` and the pretrained encoder of ``cfg.model`` with a fresh tagging head."""
        encoder, _ = encoder_for_finetuning(cfg.model, init=cfg.init, dropout=cfg.dropout, seed=cfg.seed, purpose="NER")
        max_len = fit_max_len(cfg.max_len, encoder.cfg)
        task = cls(
            load_tokenizer(cfg.model),
            tag_set(splits["train"]),
            max_len=max_len,
            overlap=max_len // 4 if cfg.overlap is None else cfg.overlap,
            head=cfg.head,
            dropout=encoder.cfg.dropout,
            train_examples=splits["train"],
            dev_examples=splits["dev"],
        )
        return task, task.build_model(encoder)

    @classmethod
    def for_search(
        cls, tokenizer: LMTokenizer, splits: dict[str, list[dict]], *, max_len: int, dropout: float
    ) -> NERTask:
        """The task ``lmforge nas`` scores candidates on: the CRF head, windows overlapping by a quarter."""
        return cls(
            tokenizer,
            tag_set(splits["train"]),
            max_len=max_len,
            overlap=max_len // 4,
            head="crf",
            train_examples=splits["train"],
            dev_examples=splits["dev"],
            dropout=dropout,
        )

    def report_input(self, example: dict) -> dict | None:
        """The sentence as text: characters joined without spaces (Chinese), words with spaces otherwise."""
        tokens = example["tokens"]
        return {"text": "".join(tokens) if all(len(t) == 1 for t in tokens) else " ".join(tokens)}

    def report_outcome(self, example: dict, text: dict, prediction: dict) -> tuple[Any, Any]:
        """Gold and predicted entities as sorted "TYPE text" strings of the sentence's text."""
        gold = sorted(f"{k} {text['text'][s:e]}" for k, s, e in char_entities(example, self.scheme))
        guess = sorted(f"{e['type']} {e['text']}" for e in prediction["entities"])
        return gold, guess

    @classmethod
    def from_settings(cls, run_dir: Path, settings: dict) -> NERTask:
        return cls(
            load_tokenizer(run_dir),
            settings["tags"],
            max_len=settings["max_len"],
            overlap=settings["overlap"],
            head=settings["head"],
        )

    def settings(self) -> dict:
        return {
            "task": self.name,
            "tags": self.tags,
            "max_len": self.max_len,
            "overlap": self.overlap,
            "head": self.head,
        }

    # --- data --------------------------------------------------------------------------------
    def _subtokens(self, sentences: list[list[str]]) -> list[list[list[int]]]:
        """Sub-token ids of every token of every sentence; a token with none becomes [UNK]."""
        out = []
        for words, enc in zip(
            sentences,
            self.tokenizer.tokenizer.encode_batch(sentences, is_pretokenized=True, add_special_tokens=False),
            strict=True,
        ):
            pieces: list[list[int]] = [[] for _ in words]
            for token_id, word in zip(enc.ids, enc.word_ids, strict=True):
                if word is not None:
                    pieces[word].append(token_id)
            # A SentencePiece tokenizer marks every word with a metaspace; a Chinese character then becomes a bare
            # "\u2581" piece plus the character, and the tag would sit on the bare piece, the same token for
            # every character. Dropped when the word has other pieces: one piece per character, tagged itself.
            if self.metaspace_id is not None:
                pieces = [[t for t in p if t != self.metaspace_id] or p for p in pieces]
            out.append([p or [self.unk_id] for p in pieces])
        return out

    def windows(self, examples: Sequence[dict], *, split: str, need_tags: bool = True) -> list[Window]:
        """Overlapping windows of whole tokens, each at most ``max_len`` sub-tokens with [CLS] and [SEP]."""
        if not examples:
            return []
        budget = self.max_len - 2
        out: list[Window] = []
        split_count = 0
        for n, (ex, pieces) in enumerate(
            zip(examples, self._subtokens([ex["tokens"] for ex in examples]), strict=True)
        ):
            if not ex["tokens"]:
                raise UserError(f"{ex.get('source', f'{split} sentence {n + 1}')}: empty sentence")
            tags = self._tag_ids(ex, split, n) if need_tags else np.full(len(pieces), IGNORE, dtype=np.int16)
            pieces = [p[:budget] for p in pieces]  # a single token longer than the window keeps its start
            lengths = np.array([len(p) for p in pieces])
            ends = np.cumsum(lengths)  # sub-token end of each token
            starts = ends - lengths
            s, spans = 0, []
            while True:
                e = int(np.searchsorted(ends, starts[s] + budget, side="right"))  # tokens [s, e) fit
                spans.append((s, e))
                if e >= len(pieces):
                    break
                s = max(s + 1, int(np.searchsorted(starts, ends[e - 1] - self.overlap)))
            split_count += len(spans) > 1
            for s, e in spans:
                ids = [self.cls_id, *(i for p in pieces[s:e] for i in p), self.sep_id]
                positions = starts[s:e] - starts[s] + 1
                out.append(
                    (np.asarray(ids, np.int32), positions.astype(np.int32), tags[s:e].astype(np.int16), (n, s, e))
                )
        self.truncated[split] = split_count
        return out

    def _tag_ids(self, ex: dict, split: str, n: int) -> np.ndarray:
        if len(ex["tags"]) != len(ex["tokens"]):
            raise UserError(
                f"{ex.get('source', f'{split} sentence {n + 1}')}: {len(ex['tokens'])} tokens but "
                f"{len(ex['tags'])} tags"
            )
        unknown = [t for t in ex["tags"] if t not in self.tag_index]
        if unknown:
            raise UserError(
                f"{ex.get('source', f'{split} sentence {n + 1}')}: tag {unknown[0]!r} never occurs in the "
                f"training data; known tags: {', '.join(self.tags)}"
            )
        return np.array([self.tag_index[t] for t in ex["tags"]], dtype=np.int16)

    def collate(self, items: list[Window], *, generator: torch.Generator | None = None) -> dict[str, Any]:
        ids = pad([w[0] for w in items], self.pad_id)  # (B, T)
        lengths = torch.tensor([len(w[0]) for w in items])
        mask = padding_mask(lengths, ids.shape[1])  # (B, T)
        word_pos = pad([w[1] for w in items], 0)  # (B, W) first sub-token of each token
        tags = pad([w[2] for w in items], IGNORE)  # (B, W)
        word_mask = padding_mask([len(w[1]) for w in items], word_pos.shape[1]).bool()  # (B, W)
        labels = torch.full(ids.shape, IGNORE, dtype=torch.long)  # (B, T): tag on first sub-tokens, -100 elsewhere
        labels.scatter_(1, word_pos, torch.where(word_mask, tags, IGNORE))
        labels[:, 0] = IGNORE  # padded word slots point at position 0 ([CLS]); it carries no tag
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "labels": labels,
            "word_pos": word_pos,
            "word_mask": word_mask,
            "tags": tags,
            "n_targets": int((tags != IGNORE).sum()),
            "n_tokens": int(lengths.sum()),
        }

    # --- model -------------------------------------------------------------------------------
    def build_model(self, encoder: nn.Module, **_: Any) -> EncoderWithHead:
        head = TokenClassifier(encoder.cfg.d_model, len(self.tags), dropout=self.dropout)
        crf = None
        if self.head == "crf":
            # no constraint on the first tag: a window of a long sentence may begin inside an entity
            allowed, _ = bio_transitions(self.tags)
            crf = CRF(len(self.tags), allowed=allowed)
        return EncoderWithHead(encoder, head, crf=crf)

    def _scores(self, model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        return model(batch["input_ids"], attention_mask=batch["attention_mask"]).float()  # (B, T, C)

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> LossOutput:
        return LossOutput(self._loss_from_scores(model, self._scores(model, batch), batch))

    @staticmethod
    def _emissions(scores: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        """(B, T, C) scores -> (B, W, C) at each token's first sub-token."""
        return scores.gather(1, batch["word_pos"][:, :, None].expand(-1, -1, scores.shape[-1]))

    def _loss_from_scores(self, model: nn.Module, scores: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        if model.crf is None:
            return F.cross_entropy(scores.flatten(0, 1), batch["labels"].flatten(), reduction="sum")
        return -model.crf.log_likelihood(self._emissions(scores, batch), batch["tags"], batch["word_mask"]).sum()

    def metrics(self, sums: dict[str, float]) -> dict[str, float]:
        return {"loss": sums["loss_sum"] / max(sums["n_targets"], 1.0)}

    def flops(self, model: nn.Module, batch: dict[str, Any]) -> float:
        cfg = model.encoder.cfg
        B, T = batch["input_ids"].shape
        return transformer_train_flops(
            n_layers=cfg.n_layers,
            d_model=cfg.d_model,
            d_ff=flops_d_ff(cfg),
            n_tokens=B * T,
            seq_len=T,
            head_rows=B * T,
            head_flops_per_row=2 * cfg.d_model * len(self.tags),
        )

    # --- inference ---------------------------------------------------------------------------
    @torch.inference_mode()
    def _tag_windows(self, model: nn.Module, items: list[Window], device: torch.device):
        """Per window: predicted tag indices and their probabilities (W,), and the summed loss."""
        was_training = model.training
        model.eval()
        results: list[tuple[np.ndarray, np.ndarray]] = [None] * len(items)  # type: ignore[list-item]
        loss_sum = 0.0
        for index in length_sorted_batches([len(w[0]) for w in items], self.eval_batch_size):
            batch = to_device(self.collate([items[i] for i in index]), device)
            scores = self._scores(model, batch)
            emissions = self._emissions(scores, batch)  # (B, W, C)
            probs = emissions.softmax(-1)
            if batch["n_targets"]:
                loss_sum += float(self._loss_from_scores(model, scores, batch))
            if model.crf is None:
                paths = [p[: int(m.sum())] for p, m in zip(probs.argmax(-1).tolist(), batch["word_mask"], strict=True)]
            else:
                paths = model.crf.decode(emissions, batch["word_mask"])
            chosen = probs.cpu().numpy()
            for b, (k, path) in enumerate(zip(index, paths, strict=True)):
                row = np.asarray(path, dtype=np.int64)
                results[k] = (row, chosen[b, np.arange(len(row)), row])
        model.train(was_training)
        return results, loss_sum

    def _merge(self, items: list[Window], results, n_sentences: list[int]) -> list[tuple[list[str], np.ndarray]]:
        """Tags and scores per sentence, each token from the window where it is farthest from an edge."""
        tags = merge_windows(items, [row for row, _ in results], n_sentences)
        scores = merge_windows(items, [prob for _, prob in results], n_sentences)
        return [([self.tags[i] for i in t], p) for t, p in zip(tags, scores, strict=True)]

    @torch.inference_mode()
    def tag_log_probs(self, model: nn.Module, examples: Sequence[dict], *, device: torch.device) -> list[np.ndarray]:
        """Per ``{"tokens"}`` example, (n_tokens, n_tags) float32 log-probabilities of each tag at each token:
        the CRF's marginals (forward-backward) or the softmax, each token from the window where it is
        farthest from an edge (what a distillation teacher hands its student)."""
        if not examples:
            return []
        was_training = model.training
        model.eval()
        items = self.windows([{"tokens": ex["tokens"]} for ex in examples], split="teacher", need_tags=False)
        rows: list[np.ndarray] = [None] * len(items)  # type: ignore[list-item]
        for index in length_sorted_batches([len(w[0]) for w in items], self.eval_batch_size):
            batch = to_device(self.collate([items[i] for i in index]), device)
            emissions = self._emissions(self._scores(model, batch), batch)  # (B, W, C)
            if model.crf is None:
                log_p = emissions.log_softmax(-1)
            else:
                log_p = model.crf.marginals(emissions, batch["word_mask"]).clamp(min=1e-30).log()
            log_p = log_p.cpu().numpy()
            for b, k in enumerate(index):
                rows[k] = log_p[b, : len(items[k][1])]
        model.train(was_training)
        return [r.astype(np.float32) for r in merge_windows(items, rows, [len(ex["tokens"]) for ex in examples])]

    def evaluate(self, model: nn.Module, examples: Sequence[dict] | None = None, *, device: torch.device) -> dict:
        """Loss per token and strict entity-level metrics on ``examples`` (default: the dev set)."""
        examples = self.val_examples if examples is None else examples
        items = self.val_items if examples is self.val_examples else self.windows(examples, split="test")
        results, loss_sum = self._tag_windows(model, items, device)
        predicted = self._merge(items, results, [len(ex["tokens"]) for ex in examples])
        gold = [list(ex["tags"]) for ex in examples]
        out = entity_metrics(gold, [tags for tags, _ in predicted], self.scheme)
        n_tokens = sum(len(ex["tokens"]) for ex in examples)
        return {"loss": loss_sum / max(n_tokens, 1), **out}

    def predict(self, model: nn.Module, examples: Sequence[dict], *, device: torch.device) -> list[dict]:
        """Entities with character offsets for ``{"text"}`` examples (or ``{"tokens"}``: offsets into
        the tokens joined without spaces when every token is one character, else with single spaces)."""
        sentences, offsets = [], []
        for ex in examples:
            words, spans = words_with_offsets(self.tokenizer, ex)
            sentences.append({"tokens": words or ["[UNK]"]})
            offsets.append((ex.get("text") or _joined(ex["tokens"]), spans))
        items = self.windows(sentences, split="predict", need_tags=False)
        results, _ = self._tag_windows(model, items, device)
        predicted = self._merge(items, results, [len(s["tokens"]) for s in sentences])
        out = []
        for (text, spans), (tags, scores) in zip(offsets, predicted, strict=True):
            entities = []
            for kind, s, e in entity_spans(tags, self.scheme) if spans else []:
                start, end = spans[s][0], spans[e - 1][1]
                score = round(float(np.mean(scores[s:e])), 6)
                entities.append({"type": kind, "start": start, "end": end, "text": text[start:end], "score": score})
            out.append({"entities": entities, "tags": tags if spans else []})
        return out


def merge_windows(items: Sequence[Window], rows: Sequence[np.ndarray], n_sentences: list[int]) -> list[np.ndarray]:
    """Per-token rows of every window (``rows[k]``: (W, ...) for window ``k``) into per-sentence arrays, each
    token's row from the window where it sits farthest from an edge (the first such window on ties)."""
    out = [np.zeros((n, *rows[0].shape[1:]), dtype=rows[0].dtype) for n in n_sentences] if rows else []
    depth = [np.full(n, -1) for n in n_sentences]
    for (_, _, _, (sent, s, e)), row in zip(items, rows, strict=True):
        j = np.arange(s, e)
        centrality = np.minimum(j - s, e - 1 - j)
        better = centrality > depth[sent][s:e]
        out[sent][s:e][better] = row[better]
        depth[sent][s:e][better] = centrality[better]
    return out


def _joined(tokens: Sequence[str]) -> str:
    return "".join(tokens) if all(len(t) == 1 for t in tokens) else " ".join(tokens)


def words_with_offsets(tokenizer: LMTokenizer, example: dict) -> tuple[list[str], list[tuple[int, int]]]:
    """The tokens of an example and their (start, end) character offsets in its text."""
    if "tokens" in example:
        tokens, spans, pos = list(example["tokens"]), [], 0
        sep = 0 if all(len(t) == 1 for t in tokens) else 1
        for t in tokens:
            spans.append((pos, pos + len(t)))
            pos += len(t) + sep
        return tokens, spans
    text = example["text"]
    enc = tokenizer.tokenizer.encode(text, add_special_tokens=False)
    bounds: dict[int, list[int]] = {}
    for word, (start, end) in zip(enc.word_ids, enc.offsets, strict=True):
        if word is not None:
            b = bounds.setdefault(word, [start, end])
            b[0], b[1] = min(b[0], start), max(b[1], end)
    spans = [tuple(bounds[w]) for w in sorted(bounds)]
    return [text[s:e] for s, e in spans], spans


def char_entities(example: dict, scheme: str) -> list[tuple[str, int, int]]:
    """Gold entities of a ``{"tokens", "tags"}`` sentence as (type, start, end) character offsets of its text (as
    ``NERTask.report_input`` joins it)."""
    tokens = example["tokens"]
    sep = 0 if all(len(t) == 1 for t in tokens) else 1
    starts, pos = [], 0
    for t in tokens:
        starts.append(pos)
        pos += len(t) + sep
    return [(k, starts[s], starts[e - 1] + len(tokens[e - 1])) for k, s, e in entity_spans(example["tags"], scheme)]
