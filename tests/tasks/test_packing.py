"""Packed chat fine-tuning (``--packing``): rows of several conversations give each one exactly the hidden states it
gets alone (every decoder family, Gemma 3's sliding window included), so a packed batch's loss is the sum of its
conversations' losses; best-fit decreasing fills rows without splitting or losing a conversation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lmforge.cli import main
from lmforge.data.builtin import load_builtin
from lmforge.data.readers import write_jsonl
from lmforge.data.tokenizer import load_tokenizer
from lmforge.models.gpt import GPT, GPTConfig
from lmforge.models.registry import load_model
from lmforge.tasks.dialogue import DialogueTask, pack
from tests.commands.test_bad_inputs import _fails
from tests.models.families import DECODER_FAMILIES

FAMILIES = {
    **DECODER_FAMILIES,
    "gemma3": {**DECODER_FAMILIES["gemma3"], "head_dim": 16, "sliding_window": 4, "global_every": 2},
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_packed_sequence_gets_the_hidden_states_it_gets_alone(family: str) -> None:
    cfg = GPTConfig(vocab_size=50, max_seq_len=32, n_layers=2, n_heads=4, d_model=32, d_ff=64, **FAMILIES[family])
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    sequences = [torch.randint(0, 50, (n,)) for n in (7, 3, 9)]
    row = torch.cat(sequences)[None]
    segments = torch.cat([torch.full((len(s),), k + 1) for k, s in enumerate(sequences)])[None]
    with torch.no_grad():
        packed = model.hidden_states(row, segment_ids=segments)[0]
        alone = torch.cat([model.hidden_states(s[None])[0] for s in sequences])
        unpacked = model.hidden_states(row)[0]
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(unpacked[7:], alone[7:], atol=1e-3)  # without segments the later ones see the first


def test_best_fit_decreasing_fills_rows_without_losing_or_splitting_a_conversation() -> None:
    lengths = [9, 2, 5, 7, 3, 1, 8, 4]
    items = [(np.arange(n, dtype=np.int32) + 100 * i, np.ones(n, dtype=bool)) for i, n in enumerate(lengths)]
    rows = pack(items, 10)
    # 39 tokens in the fewest rows: 9+1, 8+2, 7+3, 5+4 (each short one where it leaves the least room)
    assert sorted(len(ids) for ids, _, _ in rows) == [9, 10, 10, 10]
    found = []
    for ids, flags, segments in rows:
        assert len(ids) == len(flags) == len(segments) and flags.all()
        for k in np.unique(segments):
            part = ids[segments == k]
            assert (np.diff(part) == 1).all()  # one conversation, whole and in order
            found.append(int(part[0]) // 100)
    assert sorted(found) == list(range(len(lengths)))


def test_packed_batches_lose_exactly_what_the_conversations_lose_alone(chat_gpt: Path) -> None:
    conversations = load_builtin("chatterbot-zh")["train"][:24]
    tok, model = load_tokenizer(chat_gpt), load_model(chat_gpt).eval()
    alone = DialogueTask(tok, max_len=64, train_examples=conversations)
    packed = DialogueTask(tok, max_len=64, train_examples=conversations, packing=True)
    assert len(packed.train_items) < len(alone.train_items) == packed.packing["conversations"] == 24
    assert packed.packing["rows"] == len(packed.train_items) and max(packed.train_lengths) <= 64
    with torch.no_grad():
        a, b = (task.collate(task.train_items) for task in (alone, packed))
        assert a["n_targets"] == b["n_targets"] and a["n_tokens"] == b["n_tokens"]
        torch.testing.assert_close(packed.loss(model, b).loss_sum, alone.loss(model, a).loss_sum)


def test_finetune_chat_with_packing_reports_its_rows(tmp_path: Path, chat_gpt: Path) -> None:
    write_jsonl(tmp_path / "chat.jsonl", load_builtin("chatterbot-zh")["train"][:40])
    out = tmp_path / "run"
    loop = ["--epochs", "0", "--training.max-steps", "2", "--training.eval-every", "0", "--training.no-progress"]
    args = ["finetune", "chat", "--model", str(chat_gpt), "--train", str(tmp_path / "chat.jsonl"), "--packing"]
    assert main([*args, "--max-len", "64", "--out", str(out), *loop]) == 0
    results = json.loads((out / "results.json").read_text())
    packing, conversations = results["packing"], results["data"]["examples"]["train"]  # some held out as dev
    assert packing["conversations"] == conversations and packing["rows"] < conversations
    assert packing["row_tokens"] == 64


def test_packing_without_a_row_length_is_refused(tmp_path: Path, chat_gpt: Path, capsys) -> None:
    write_jsonl(tmp_path / "chat.jsonl", load_builtin("chatterbot-zh")["train"][:8])
    args = ["finetune", "chat", "--model", str(chat_gpt), "--train", str(tmp_path / "chat.jsonl"), "--packing"]
    _fails(capsys, [*args, "--out", str(tmp_path / "run")], "--packing needs --max-len")
    assert not (tmp_path / "run").exists()
