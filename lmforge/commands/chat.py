"""``lmforge chat`` (an interactive terminal chat) and ``lmforge generate`` (one prompt), streamed."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from lmforge.commands._console import write_stdout
from lmforge.inference.config import GenerationConfig


def _chat_sampling() -> GenerationConfig:
    return GenerationConfig(max_new_tokens=128, do_sample=True, temperature=0.8, top_p=0.9, repetition_penalty=1.1)


@dataclass
class GenerateConfig:
    """Generate text from one prompt with a GPT model directory (a chat run directory wraps it as a user turn)."""

    model: str
    """lmforge GPT directory, or a run directory from `lmforge finetune chat`."""
    prompt: str
    """The prompt text."""
    raw: bool = False
    """With a chat model: continue the prompt as plain text instead of answering it as a user message."""
    system: str | None = None
    """With a chat model: a system message before the prompt."""
    precision: Literal["fp32", "int8", "int8-head", "bf16", "auto"] = "fp32"
    """Decoding: fp32 (exact), int8 (int8 weights), int8-head (int8 vocabulary matrix), bf16; auto: int8 where bf16
    is fast, else fp32."""
    generation: GenerationConfig = field(default_factory=_chat_sampling)


@dataclass
class ChatConfig:
    """Chat in the terminal with a run directory from `lmforge finetune chat` (/reset, /quit)."""

    model: str
    """Run directory from `lmforge finetune chat` (or any GPT whose tokenizer has the chat tokens)."""
    system: str | None = None
    """A system message that starts every conversation."""
    precision: Literal["fp32", "int8", "int8-head", "bf16", "auto"] = "fp32"
    """Decoding: fp32 (exact), int8 (int8 weights), int8-head (int8 vocabulary matrix), bf16; auto: int8 where bf16
    is fast, else fp32."""
    generation: GenerationConfig = field(default_factory=_chat_sampling)


def open_session(model_dir: str, *, system: str | None = None, precision: str = "fp32"):
    """A ``ChatSession`` over the GPT of ``model_dir`` (a chat run, or a pretrained GPT directory)."""
    from lmforge.inference.chat import ChatSession
    from lmforge.rundir import load_run
    from lmforge.rundir.convert import converted_chat_model

    run = load_run(model_dir, task="chat")  # chat and generate are the chat task's commands
    chat = run.finetuned or converted_chat_model(model_dir)
    return ChatSession(run.model, run.task.tokenizer, is_chat_model=chat, system=system, precision=precision)


def generate(cfg: GenerateConfig, write: Callable[[str], None]) -> str:
    """Stream the continuation of ``cfg.prompt`` through ``write``; returns the whole text."""
    session = open_session(cfg.model, system=cfg.system, precision=cfg.precision)
    if session.is_chat_model and not cfg.raw:
        pieces = session.reply(cfg.prompt, cfg.generation)
    else:
        pieces = session.generator.stream(cfg.prompt, cfg.generation)
    out = []
    for piece in pieces:
        write(piece)
        out.append(piece)
    return "".join(out)


def chat_loop(cfg: ChatConfig, read: Callable[[], str], write: Callable[[str], None]) -> int:
    """The interactive loop: ``read`` returns the next user line (EOFError ends); returns the turns answered."""
    session = open_session(cfg.model, system=cfg.system, precision=cfg.precision)
    session.check_can_chat()
    if not session.is_chat_model:
        write(
            f"note: {cfg.model} is not a chat model (no chat fine-tuning, not an instruction-tuned checkpoint); "
            "replies may not follow the conversation\n"
        )
    write("chat: type a message; /reset starts over, /quit ends\n")
    turns = 0
    while True:
        try:
            line = read().strip()
        except (EOFError, KeyboardInterrupt):
            write("\n")
            return turns
        if not line:
            continue
        if line in ("/quit", "/exit"):
            return turns
        if line == "/reset":
            session.reset()
            write("(history cleared)\n")
            continue
        if line.startswith("/"):
            write(f"unknown command {line!r}: /reset or /quit\n")
            continue
        write("assistant: ")
        try:
            for piece in session.reply(line, cfg.generation):
                write(piece)
        except ValueError as e:
            write(f"error: {e}")
        write("\n")
        turns += 1


def run_generate(cfg: GenerateConfig) -> None:
    generate(cfg, write_stdout)
    write_stdout("\n")


def run_chat(cfg: ChatConfig) -> None:
    def read() -> str:
        write_stdout("you: ")
        line = sys.stdin.readline()
        if not line:
            raise EOFError
        return line

    chat_loop(cfg, read, write_stdout)
