"""What chat fine-tuning learns from a conversation (inference/chat.assistant_spans): each assistant turn and the
end-of-turn token that closes it, found with the model's own template — lmforge's ChatML and Gemma 3's format."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, models

from lmforge.data.tokenizer import GEMMA3_CHAT_TEMPLATE, LMTokenizer, load_tokenizer
from lmforge.inference.chat import assistant_spans

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "你好"},
    {"role": "assistant", "content": "你好！"},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": " 4 "},
]


def _learnt(text: str, spans: list[tuple[int, int]]) -> list[str]:
    return [text[a:b] for a, b in spans]


def test_chatml_turns_and_their_end_token(bpe_dir: Path) -> None:
    text, spans = assistant_spans(load_tokenizer(bpe_dir), CHAT)
    assert _learnt(text, spans) == ["你好！<|im_end|>", " 4 <|im_end|>"]
    assert text.endswith(" 4 <|im_end|>\n")  # the template's newline after the end token is not learnt


def test_gemma_turns_and_their_end_token() -> None:
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<end_of_turn>": 3, "<start_of_turn>": 4}
    tok = LMTokenizer(
        Tokenizer(models.BPE(vocab, [])),
        "bpe",
        {"bos": "<bos>", "eos": "<eos>", "pad": "<pad>", "eot": "<end_of_turn>"},
        chat_template=GEMMA3_CHAT_TEMPLATE,
    )
    text, spans = assistant_spans(tok, CHAT)
    assert text.startswith("<bos><start_of_turn>user\nBe brief.\n\n你好<end_of_turn>\n<start_of_turn>model\n")
    assert _learnt(text, spans) == ["你好！<end_of_turn>", "4<end_of_turn>"]  # Gemma's template trims the content
