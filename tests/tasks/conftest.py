"""Fixtures of the task tests: a tiny GPT that chats (preference tuning, packed chat fine-tuning)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lmforge.data.tokenizer import load_tokenizer, save_tokenizer
from lmforge.models.gpt import GPT, GPTConfig
from lmforge.models.registry import save_model


@pytest.fixture(scope="module")
def chat_gpt(tmp_path_factory: pytest.TempPathFactory, review_bpe: Path) -> Path:
    """A tiny GPT with a ChatML tokenizer (lmforge's BPE has the turn tokens)."""
    directory = tmp_path_factory.mktemp("chat-gpt")
    tok = load_tokenizer(review_bpe)
    torch.manual_seed(0)
    save_model(
        GPT(GPTConfig(vocab_size=tok.vocab_size, n_layers=2, n_heads=2, d_model=32, d_ff=64, max_seq_len=64)), directory
    )
    save_tokenizer(tok, directory)
    return directory
