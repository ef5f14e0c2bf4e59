"""GenerationConfig: how to decode (greedy, beam search, sampling) and when to stop; torch-free, so that
``lmforge generate --help`` imports no torch. Its field docstrings are the ``--help`` text."""

from __future__ import annotations

from dataclasses import dataclass, field

from lmforge.errors import UserError


@dataclass
class GenerationConfig:
    """How to decode (greedy, beam search or sampling) and when to stop."""

    max_new_tokens: int = 128
    """Most tokens to generate per sequence."""
    num_beams: int = 1
    """Beam size; 1 = greedy or sampling."""
    do_sample: bool = False
    """Sample instead of taking the most probable token."""
    temperature: float = 1.0
    """Sampling: divide the logits by this (lower = more conservative)."""
    top_k: int = 0
    """Sampling: keep only the k most probable tokens; 0 = all."""
    top_p: float = 1.0
    """Sampling: keep the smallest set of tokens whose probability reaches p; 1 = all."""
    repetition_penalty: float = 1.0
    """Divide positive (multiply negative) logits of tokens already in the sequence by this; 1 = off."""
    no_repeat_ngram_size: int = 0
    """Never repeat an n-gram of this size; 0 = off."""
    length_penalty: float = 1.0
    """Beam search: hypotheses are ranked by sum of log-probabilities / length**length_penalty."""
    early_stopping: bool = True
    """Beam search: stop a source as soon as num_beams hypotheses have ended."""
    num_return_sequences: int = 1
    """Hypotheses returned per input (at most num_beams with beam search)."""
    stop_strings: list[str] = field(default_factory=list)
    """Stop when the generated text contains one of these (greedy and sampling); it is cut off."""
    stop_token_ids: list[int] = field(default_factory=list)
    """Token ids that end a sequence, besides the tokenizer's end token."""
    seed: int | None = None
    """Sampling seed; None = torch's global generator."""
    output_scores: bool = False
    """Greedy / sampling: also sum each sequence's log-probabilities (an extra pass over the logits)."""

    def __post_init__(self) -> None:
        checks = {
            "max_new_tokens": self.max_new_tokens >= 1,
            "num_beams": self.num_beams >= 1,
            "temperature": self.temperature > 0,
            "top_k": self.top_k >= 0,
            "top_p": 0 < self.top_p <= 1,
            "repetition_penalty": self.repetition_penalty > 0,
            "no_repeat_ngram_size": self.no_repeat_ngram_size >= 0,
            "num_return_sequences": self.num_return_sequences >= 1,
        }
        allowed = {
            "max_new_tokens": ">= 1",
            "num_beams": ">= 1",
            "temperature": "> 0",
            "top_k": ">= 0",
            "top_p": "in (0, 1]",
            "repetition_penalty": "> 0",
            "no_repeat_ngram_size": ">= 0",
            "num_return_sequences": ">= 1",
        }
        for key, ok in checks.items():
            if not ok:
                raise UserError(f"generation.{key}={getattr(self, key)} must be {allowed[key]}")
        if self.num_beams > 1 and self.do_sample:
            raise UserError("generation: beam search (num_beams > 1) and do_sample are exclusive")
        if self.num_beams > 1 and self.stop_strings:
            raise UserError("generation.stop_strings apply to greedy and sampling; with beams use stop_token_ids")
        limit = self.num_beams if self.num_beams > 1 else (None if self.do_sample else 1)
        if limit is not None and self.num_return_sequences > limit:
            raise UserError(
                f"generation.num_return_sequences={self.num_return_sequences} exceeds the {limit} hypotheses "
                f"{'beam search keeps' if self.num_beams > 1 else 'greedy decoding finds'}"
            )
