"""Chatting with a GPT: the ChatML prompt of a conversation, and ``ChatSession`` (history, streamed replies).

The prompt is rendered with ``render_chat``: the tokenizer's own chat template where it has one (an imported
model's, e.g. from a GGUF file's ``tokenizer.chat_template``), else the ChatML template that ``data/tokenizer.py``
stores with the tokenizers it trains (``<|im_start|>role\ncontent<|im_end|>\n``), rendered as transformers'
``apply_chat_template`` renders it (the same sandboxed Jinja environment, the special tokens as variables), then
tokenized as a whole; ``chat_prompt_ids`` drops the oldest turns (a system message stays) until the prompt and the
reply fit the model window. Used by ``lmforge chat`` / ``generate``, the server's chat endpoint, and
the dialogue task's sampled dev replies.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable, Sequence

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from torch import nn

from lmforge.data.tokenizer import CHAT_TEMPLATE, LMTokenizer
from lmforge.errors import UserError
from lmforge.inference.config import GenerationConfig
from lmforge.inference.generate import Generator


def _raise_exception(message: str) -> None:
    raise UserError(f"the model's chat template refused the conversation: {message}")


@functools.lru_cache(maxsize=4)
def _template(source: str) -> jinja2.Template:
    # the environment transformers renders chat templates in, so both give the same text
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise_exception
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise UserError(f"the tokenizer's chat template is not valid Jinja (line {e.lineno}): {e.message}") from None


def render_chat(tok: LMTokenizer, messages: Sequence[dict], *, add_generation_prompt: bool = False) -> str:
    """The text of ``messages`` in the tokenizer's chat template (its own, or lmforge's ChatML
    ``data/tokenizer.CHAT_TEMPLATE``)."""
    if tok.chat_template is None:
        chat_tokens(tok)
    special = {f"{role}_token": token for role, token in tok.specials.items() if role in ("bos", "eos", "unk", "pad")}
    template = _template(tok.chat_template or CHAT_TEMPLATE)
    return template.render(messages=list(messages), add_generation_prompt=add_generation_prompt, **special)


def assistant_spans(tok: LMTokenizer, messages: Sequence[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of what the assistant says: each assistant message's
    text as the template writes it and the end-of-turn token that closes it (ChatML's <|im_end|>, Gemma's
    <end_of_turn>): what chat fine-tuning learns to produce. Found with the template itself: the conversation up
    to the assistant's turn with the generation prompt is a prefix of the conversation with that turn, and the
    difference is the turn, cut after its last end-of-turn token (a template's newline after it is not learnt)."""
    ends = [t for t in (tok.specials.get("im_end"), tok.specials.get("eot")) if t]
    if not ends:
        raise UserError(
            "chat fine-tuning needs an end-of-turn token for the model to learn to stop: ChatML's <|im_end|> or the "
            "tokenizer's end of turn (Gemma's <end_of_turn>)"
        )
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render_chat(tok, messages[:i], add_generation_prompt=True)
        after = render_chat(tok, messages[: i + 1])
        if not after.startswith(before):
            raise UserError(
                f"the chat template does not render turn {i} after the earlier ones (its text differs before it); "
                "chat fine-tuning needs a template that only appends"
            )
        turn = after[len(before) :]
        stop = max((turn.rfind(end) + len(end) for end in ends if end in turn), default=len(turn))
        spans.append((len(before), len(before) + stop))
    return render_chat(tok, messages), spans


def chat_tokens(tok: LMTokenizer) -> tuple[str, str]:
    start, end = tok.specials.get("im_start"), tok.specials.get("im_end")
    if start is None or end is None or tok.token_id("im_start") is None or tok.token_id("im_end") is None:
        raise UserError(
            "chat needs a tokenizer with a chat template, or with <|im_start|> and <|im_end|> (the byte-level BPE "
            "that `lmforge tokenizer train --kind bpe` and `lmforge pretrain --task clm` write); this model can "
            "only continue text: `lmforge generate --raw`"
        )
    return start, end


def chat_prompt_ids(tokenizer: LMTokenizer, history: Sequence[dict], *, limit: int) -> list[int] | None:
    """Token ids of ``history`` plus the assistant prompt, dropping the oldest turns (a system
    message stays) until at most ``limit`` tokens remain; None if even the last turn is too long."""
    history = list(history)
    system = history[:1] if history and history[0]["role"] == "system" else []
    turns = history[len(system) :]
    while True:
        text = render_chat(tokenizer, system + turns, add_generation_prompt=True)
        ids = tokenizer.encode(text, special_tokens=False)
        if len(ids) <= limit or not turns:
            return ids if len(ids) <= limit else None
        turns = turns[1:]


class ChatSession:
    """A conversation with a chat model: history, streaming replies, trimming to the model window.

    ``is_chat_model``: the model was fine-tuned on conversations (its run has task.json "chat");
    ``generate`` then wraps a prompt as a user turn instead of continuing it as plain text.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: LMTokenizer,
        *,
        is_chat_model: bool,
        system: str | None = None,
        precision: str = "fp32",
    ):
        self.model, self.tokenizer, self.is_chat_model = model, tokenizer, is_chat_model
        ends = (tokenizer.token_id("im_end"), tokenizer.token_id("eot"))
        self.turn_ends = sorted({i for i in ends if i is not None})
        self.generator = Generator(model, tokenizer, copy_weights=False, precision=precision)
        self.system = system
        self.history: list[dict] = []

    @property
    def window(self) -> int:
        return self.model.cfg.max_seq_len

    def reset(self) -> None:
        self.history = []

    def check_can_chat(self) -> None:
        """Refuse, before a conversation starts, a tokenizer with neither a chat template nor ChatML's tokens (a
        base model still continues text with ``generator``)."""
        if self.tokenizer.chat_template is None:
            chat_tokens(self.tokenizer)

    def config(self, cfg: GenerationConfig) -> GenerationConfig:
        """``cfg`` with the end-of-turn tokens (ChatML's <|im_end|>, or the tokenizer's end-of-turn token such as
        Gemma's <end_of_turn>) among the stop tokens."""
        return dataclasses.replace(cfg, stop_token_ids=sorted({*cfg.stop_token_ids, *self.turn_ends}))

    def prompt_ids(self, messages: Sequence[dict], max_new_tokens: int) -> list[int]:
        """The prompt of ``messages``, oldest turns dropped to leave ``max_new_tokens`` in the window."""
        ids = chat_prompt_ids(self.tokenizer, messages, limit=self.window - max_new_tokens)
        if ids is None:
            raise UserError(
                f"the messages do not fit the model window ({self.window} tokens) with max_new_tokens="
                f"{max_new_tokens}; shorten them or ask for fewer new tokens"
            )
        return ids

    def reply(self, text: str, cfg: GenerationConfig) -> Iterable[str]:
        """Stream the assistant's answer to ``text``; the finished answer joins the history."""
        messages = ([{"role": "system", "content": self.system}] if self.system else []) + self.history
        messages.append({"role": "user", "content": text})
        cfg = self.config(cfg)
        if cfg.seed is not None:  # reproducible, but not the same draws at every turn
            cfg = dataclasses.replace(cfg, seed=cfg.seed + len(self.history) // 2)
        ids = self.prompt_ids(messages, cfg.max_new_tokens)
        pieces = []
        for piece in self.generator.stream(ids, cfg):
            pieces.append(piece)
            yield piece
        self.history += [{"role": "user", "content": text}, {"role": "assistant", "content": "".join(pieces).strip()}]
