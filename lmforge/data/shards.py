"""Pretraining token shards: streaming write, memmap read, fixed-length windows for packing.

``prepare`` tokenizes corpora in batches with the tokenizers library (its Rust encoder uses every
core), appends each document's ids followed by a separator ([SEP] for WordPiece, <|endoftext|>
for BPE) to flat binary shards (uint16 when the vocabulary fits, else uint32), and records where
each document starts. A document goes to the validation split when a hash of its text falls
under ``val_fraction``, so the split is stable however the corpus is streamed. With
``whole_word`` it also stores, per token, whether a jieba word starts there (Chinese whole-word
masking, Cui et al., 2019: "Pre-Training with Whole Word Masking for Chinese BERT").
``meta.json`` is written last: its presence means the shards are complete, and its fingerprint
(inputs, tokenizer, options) lets a re-run on the same inputs reuse them.

Packing follows RoBERTa's FULL-SENTENCES: training sequences are consecutive windows of the
token stream, crossing document boundaries at the separators.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from lmforge.data.readers import corpus_texts
from lmforge.data.tokenizer import LMTokenizer, load_tokenizer
from lmforge.errors import UserError
from lmforge.files import read_json_object, write_json

log = logging.getLogger(__name__)
META = "meta.json"
FORMAT_VERSION = 1


@dataclass
class PrepareConfig:
    """Tokenize corpora into token shards for pretraining."""

    tokenizer: str
    """Tokenizer directory (from `lmforge tokenizer train`)."""
    out: str
    """Directory to write the shards into."""
    input: list[str] = field(default_factory=lambda: ["builtin:pretrain-zh"])
    """Corpora: text files (one document per line), .jsonl files (field --jsonl-field) or builtin:NAME."""
    jsonl_field: str = "text"
    """Field holding the text in .jsonl inputs."""
    val_fraction: float = 0.01
    """Fraction of documents held out for validation (chosen by a hash of the text)."""
    whole_word: bool = False
    """Also store jieba word starts, for whole-word masking (task wwm-mlm)."""
    batch_docs: int = 2000
    """Documents per batch-encoding call."""
    shard_tokens: int = 1 << 28
    """Tokens per shard file at most (documents are never split across shards)."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.val_fraction < 1.0:
            raise UserError(f"val_fraction={self.val_fraction} must be in [0, 1)")


def _fingerprint(cfg: PrepareConfig) -> str:
    h = hashlib.sha256()
    for spec in cfg.input:
        h.update(spec.encode())
        if not spec.startswith("builtin:"):
            st = Path(spec).stat()
            h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
    h.update(Path(cfg.tokenizer, "tokenizer.json").read_bytes())
    options = {k: v for k, v in asdict(cfg).items() if k not in ("out", "input", "tokenizer", "batch_docs")}
    h.update(json.dumps({**options, "format": FORMAT_VERSION}, sort_keys=True).encode())
    return h.hexdigest()[:16]


def _is_val(text: str, fraction: float) -> bool:
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < fraction


class _SplitWriter:
    """Appends documents to the shards of one split."""

    def __init__(self, directory: Path, dtype: np.dtype, shard_tokens: int, whole_word: bool) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.dir, self.dtype, self.limit, self.whole_word = directory, dtype, shard_tokens, whole_word
        self.shards: list[dict] = []
        self.doc_starts: list[list[int]] = []
        self._open_new()

    def _open_new(self) -> None:
        i = len(self.shards)
        self.shards.append({"tokens": f"tokens-{i:05d}.bin", "n_tokens": 0, "n_docs": 0})
        self.doc_starts.append([])
        self.tokens = (self.dir / self.shards[-1]["tokens"]).open("wb")
        self.words = (self.dir / f"word_starts-{i:05d}.bin").open("wb") if self.whole_word else None

    def add(self, ids: list[int], word_starts: list[int] | None) -> None:
        shard = self.shards[-1]
        if shard["n_tokens"] and shard["n_tokens"] + len(ids) > self.limit:
            self._close()
            self._open_new()
            shard = self.shards[-1]
        self.doc_starts[-1].append(shard["n_tokens"])
        self.tokens.write(np.asarray(ids, dtype=self.dtype).tobytes())
        if self.words is not None:
            self.words.write(np.asarray(word_starts, dtype=np.uint8).tobytes())
        shard["n_tokens"] += len(ids)
        shard["n_docs"] += 1

    def _close(self) -> None:
        for f in (self.tokens, self.words):
            if f is not None:
                f.flush()
                os.fsync(f.fileno())
                f.close()
        i = len(self.shards) - 1
        np.save(self.dir / f"doc_starts-{i:05d}.npy", np.asarray(self.doc_starts[-1], dtype=np.int64))

    def finish(self) -> dict:
        self._close()
        return {
            "shards": self.shards,
            "n_tokens": sum(s["n_tokens"] for s in self.shards),
            "n_docs": sum(s["n_docs"] for s in self.shards),
        }


def _word_starts(tok: LMTokenizer, text: str, offsets: list[tuple[int, int]], ids: list[int]) -> list[int]:
    """1 where a jieba word starts at the token, else 0 (WordPiece ## pieces continue their word)."""
    import jieba

    boundaries = set()
    position = 0
    for word in jieba.cut(text):
        boundaries.add(position)
        position += len(word)
    pieces = tok.tokenizer
    out = []
    for (start, _), i in zip(offsets, ids, strict=True):
        continuation = pieces.id_to_token(i).startswith("##") if tok.kind == "wordpiece" else False
        out.append(int(start in boundaries and not continuation))
    return out


def _batches(texts: Iterator[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for text in texts:
        batch.append(text)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def prepare(cfg: PrepareConfig, *, progress: bool = True) -> Path:
    """Write (or reuse) the token shards described by ``cfg``; returns the shard directory."""
    out = Path(cfg.out)
    fingerprint = _fingerprint(cfg)
    meta_path = out / META
    if meta_path.is_file():
        meta = read_json_object(meta_path, what="shard metadata")
        if meta.get("fingerprint") == fingerprint:
            log.info("reusing token shards in %s (same inputs, tokenizer and options)", out)
            return out
        meta_path.unlink()  # stale: rebuild below
    tok = load_tokenizer(cfg.tokenizer)
    separator = tok.token_id("sep") if tok.kind == "wordpiece" else tok.token_id("eos")
    if separator is None:
        raise UserError(f"{cfg.tokenizer}: the tokenizer has no [SEP] / <|endoftext|> token to separate documents")
    if cfg.whole_word:
        try:
            import jieba
        except ImportError:
            raise UserError("whole-word masking segments words with jieba: pip install 'lmforge[data]'") from None
        jieba.setLogLevel(logging.WARNING)
    dtype = np.dtype(np.uint16 if tok.vocab_size <= 2**16 else np.uint32)
    writers = {s: _SplitWriter(out / s, dtype, cfg.shard_tokens, cfg.whole_word) for s in ("train", "val")}
    started, n_tokens = time.perf_counter(), 0
    bar = _progress() if progress else None
    task = bar.add_task("prepare", total=None) if bar else None
    try:
        for batch in _batches(corpus_texts(cfg.input, jsonl_field=cfg.jsonl_field), cfg.batch_docs):
            encodings = tok.tokenizer.encode_batch(batch, add_special_tokens=False)
            for text, enc in zip(batch, encodings, strict=True):
                if not enc.ids:
                    continue
                words = [*_word_starts(tok, text, enc.offsets, enc.ids), 1] if cfg.whole_word else None
                writers["val" if _is_val(text, cfg.val_fraction) else "train"].add([*enc.ids, separator], words)
                n_tokens += len(enc.ids) + 1
            if bar:
                rate = n_tokens / max(time.perf_counter() - started, 1e-9)
                bar.update(task, description=f"prepare: {n_tokens:,} tokens, {rate:,.0f} tokens/s")
    finally:
        if bar:
            bar.stop()
    splits = {s: w.finish() for s, w in writers.items()}
    if splits["train"]["n_tokens"] == 0:
        raise UserError(f"no text in {cfg.input}: the shards would be empty")
    meta = {
        "format": FORMAT_VERSION,
        "fingerprint": fingerprint,
        "dtype": dtype.name,
        "vocab_size": tok.vocab_size,
        "separator": separator,
        "tokenizer_kind": tok.kind,
        "whole_word": cfg.whole_word,
        "inputs": cfg.input,
        "splits": splits,
        "seconds": round(time.perf_counter() - started, 2),
    }
    write_json(meta_path, meta)
    log.info("wrote %s tokens (%s validation) to %s", f"{n_tokens:,}", f"{splits['val']['n_tokens']:,}", out)
    return out


def _progress():
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    bar = Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), transient=True)
    bar.start()
    return bar


class TokenWindows:
    """Fixed-length windows over the token stream of one split, read through memmaps.

    Window ``i`` of shard ``s`` covers tokens ``[i * stride, i * stride + length)``; windows never
    cross shard files. ``length`` may exceed ``stride`` by one so causal-LM windows overlap by the
    one token that is both the last target of a window and the first input of the next.
    """

    def __init__(self, directory: str | os.PathLike, split: str, *, length: int, stride: int | None = None) -> None:
        directory = Path(directory)
        meta_path = directory / META
        if not meta_path.is_file():
            raise UserError(f"{directory}: no {META}; prepare shards with `lmforge prepare`")
        self.meta = read_json_object(meta_path, what="shard metadata")
        self.length, self.stride = length, stride or length
        self.tokens, self.word_starts, self.counts = [], [], []
        for i, shard in enumerate(self.meta["splits"][split]["shards"]):
            if shard["n_tokens"] == 0:
                continue
            self.tokens.append(np.memmap(directory / split / shard["tokens"], dtype=self.meta["dtype"], mode="r"))
            if self.meta["whole_word"]:
                self.word_starts.append(
                    np.memmap(directory / split / f"word_starts-{i:05d}.bin", dtype=np.uint8, mode="r")
                )
            self.counts.append(max(0, (shard["n_tokens"] - self.length) // self.stride + 1))
        self.offsets = np.cumsum([0, *self.counts])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def _locate(self, i: int) -> tuple[int, int]:
        if not 0 <= i < len(self):
            raise IndexError(f"window {i} of {len(self)}")
        shard = int(np.searchsorted(self.offsets, i, side="right") - 1)
        return shard, (i - int(self.offsets[shard])) * self.stride

    def __getitem__(self, i: int) -> np.ndarray:
        shard, start = self._locate(i)
        return np.asarray(self.tokens[shard][start : start + self.length], dtype=np.int64)

    def word_starts_at(self, i: int) -> np.ndarray:
        if not self.word_starts:
            raise UserError("these shards have no word starts: prepare them with --whole-word")
        shard, start = self._locate(i)
        return np.asarray(self.word_starts[shard][start : start + self.length], dtype=np.bool_)
