"""The ``lmforge finetune chat``, ``lmforge chat`` and ``lmforge generate`` commands.

``finetune chat`` runs supervised fine-tuning of a pretrained lmforge GPT on conversations
(``tasks/dialogue.py``) through ``train.loop.fit``, keeps the checkpoint with the lowest dev
perplexity and writes a run directory that is also a GPT model directory (config.json +
model.safetensors + the tokenizer with its chat template) plus ``task.json``, results and report.
``chat`` is an interactive terminal chat with streamed replies; ``generate`` decodes one prompt.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from lmforge.config import check_range, read_json_object, write_json, write_yaml
from lmforge.data.readers import read_conversations
from lmforge.data.tokenizer import LMTokenizer, copy_tokenizer_files, load_tokenizer
from lmforge.finetune import TASK_FILE, load_splits, skipped_rows, training_for_epochs
from lmforge.generate import GenerationConfig, Generator
from lmforge.metrics import DEFINITIONS
from lmforge.models.gpt import GPT
from lmforge.models.registry import load_model, save_model
from lmforge.tasks.dialogue import DialogueTask
from lmforge.train import checkpoint
from lmforge.train.config import TrainConfig
from lmforge.train.loop import fit
from lmforge.train.optim import OptimConfig
from lmforge.train.rundir import run_session


def _chat_training() -> TrainConfig:
    return TrainConfig(
        global_batch_size=16, micro_batch_size=16, eval_every=50, save_every=50, log_every=10, patience=4,
        optim=OptimConfig(lr=3e-4, warmup_steps=30, schedule="cosine", min_lr_ratio=0.1, weight_decay=0.01),
    )  # fmt: skip


@dataclass
class ChatTrainConfig:
    """Fine-tune a GPT on conversations (JSONL {"messages": [{"role", "content"}, ...]}), loss on assistant turns."""

    out: str
    """Run directory."""
    model: str
    """Pretrained lmforge GPT directory (its tokenizer needs <|im_start|> / <|im_end|>)."""
    data: str | None = None
    """builtin:chatterbot-zh instead of --train/--dev/--test."""
    train: str | None = None
    """Training conversations."""
    dev: str | None = None
    """Dev conversations (perplexity, sampled replies); without them, 10% of --train is held out."""
    test: str | None = None
    """Test conversations, evaluated once at the end."""
    skip_bad_rows: bool = False
    """Skip malformed lines (listed in results.json) instead of stopping at the first."""
    max_len: int | None = None
    """Longest conversation in tokens (longer ones are cut); None = the model's max_seq_len."""
    epochs: float = 10.0
    """Training epochs (sets training.max_steps); 0 = use training.max_steps."""
    training: TrainConfig = field(default_factory=_chat_training)
    resume: str | None = None
    """Continue the run in this directory from its last checkpoint."""

    def __post_init__(self) -> None:
        check_range("epochs", self.epochs, at_least=0)
        check_range("max_len", self.max_len, at_least=3)  # [CLS], at least one token, [SEP]


def finetune_chat(cfg: ChatTrainConfig) -> dict:
    """Fine-tune, keep the lowest dev perplexity, evaluate dev and test; returns results.json's content."""
    started = time.perf_counter()
    run_dir = Path(cfg.out)
    with run_session(run_dir, resume=bool(cfg.resume), device=cfg.training.device) as d:
        splits, reports = load_splits(cfg, "dialogue", read_conversations)
        model = load_model(cfg.model)
        if not isinstance(model, GPT):
            raise ValueError(f"--model {cfg.model}: chat fine-tuning needs a GPT model directory")
        tok = load_tokenizer(cfg.model)
        max_len = cfg.max_len or model.cfg.max_seq_len
        if max_len > model.cfg.max_seq_len:
            raise ValueError(f"max_len={max_len} exceeds the model's max_seq_len={model.cfg.max_seq_len}")
        task = DialogueTask(tok, max_len=max_len, train_examples=splits["train"], dev_examples=splits["dev"])
        if not task.train_items:
            raise ValueError("no training conversation has an assistant token within max_len")
        training = training_for_epochs(cfg.training, cfg.epochs, len(task.train_items))
        if d.is_main:
            write_yaml(run_dir / "config.yaml", cfg)
        before = task.evaluate(model, device=d.device) if d.is_main else {}
        summary = fit(model, task, training, run_dir=run_dir, resume=bool(cfg.resume))
        results: dict = {}
        if d.is_main:
            chosen = checkpoint.load_best(model, run_dir, summary.get("best_step"))
            save_model(model, run_dir)
            copy_tokenizer_files(cfg.model, run_dir)
            write_json(run_dir / TASK_FILE, task.settings())
            results = {"before_finetuning": {"dev": before}, "dev": task.evaluate(model, device=d.device)}
            if splits.get("test"):
                results["test"] = task.evaluate(model, device=d.device, examples=splits["test"])
            results.update(
                task="chat", model=cfg.model, weights=f"{checkpoint.STATE_DIR}/{chosen.name}",
                data={"source": cfg.data or {s: getattr(cfg, s) for s in ("train", "dev", "test") if getattr(cfg, s)},
                      "conversations": {s: len(v) for s, v in splits.items()}, "training_items": len(task.train_items),
                      "truncated": dict(task.truncated), "skipped_rows": skipped_rows(reports)},
                generation=dataclasses.asdict(task.eval_generation), training=summary, definitions=DEFINITIONS,
                wall_seconds=round(time.perf_counter() - started, 2),
            )  # fmt: skip
            write_json(run_dir / "results.json", results)
            _write_report(run_dir, results)
    return results


def _write_report(run_dir: Path, r: dict) -> None:
    lines = [f"# Chat fine-tuning run `{run_dir.name}` (from {r['model']})", ""]
    lines += ["| split | perplexity | next-token accuracy | distinct-1 | distinct-2 |", "|---|---|---|---|---|"]
    rows = [("dev, before fine-tuning", r["before_finetuning"]["dev"]), ("dev", r["dev"])]
    rows += [("test", r["test"])] if "test" in r else []
    for name, m in rows:
        lines.append(f"| {name} | {m['perplexity']:.2f} | {m['accuracy']:.4f} | {m['distinct_1']:.3f} | "
                     f"{m['distinct_2']:.3f} |")  # fmt: skip
    t = r["training"]
    lines += ["", f"Training: {t['steps']} steps, {t['tokens']:,} tokens in {t['seconds'] / 60:.1f} min; "
              f"weights: {r['weights']}.", "", "Sampled dev replies:", ""]  # fmt: skip
    for s in r["dev"]["samples"]:
        lines.append(f"- user: {s['prompt']!r} -> model: {s['reply']!r} (reference: {s['reference']!r})")
    lines += ["", "![loss](loss.png)", ""]
    (run_dir / "report.md").write_text("\n".join(lines), encoding="utf-8")


# --- using a model ----------------------------------------------------------------------------------


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
    generation: GenerationConfig = field(default_factory=_chat_sampling)


@dataclass
class ChatConfig:
    """Chat in the terminal with a run directory from `lmforge finetune chat` (/reset, /quit)."""

    model: str
    """Run directory from `lmforge finetune chat` (or any GPT whose tokenizer has the chat tokens)."""
    system: str | None = None
    """A system message that starts every conversation."""
    generation: GenerationConfig = field(default_factory=_chat_sampling)


class ChatSession:
    """A conversation with a chat model: history, streaming replies, trimming to the model window."""

    def __init__(self, model_dir: str | Path, *, system: str | None = None) -> None:
        model = load_model(model_dir)
        if not isinstance(model, GPT):
            raise ValueError(f"{model_dir}: chat needs a GPT model directory")
        self.tokenizer: LMTokenizer = load_tokenizer(model_dir)
        settings_path = Path(model_dir) / TASK_FILE
        settings = read_json_object(settings_path, what="task file") if settings_path.is_file() else {}
        self.is_chat_model = settings.get("task") == "chat"
        self.task = DialogueTask(self.tokenizer, max_len=model.cfg.max_seq_len)
        self.model, self.generator = model, Generator(model, self.tokenizer, copy_weights=False)
        self.system = system
        self.history: list[dict] = []

    def reset(self) -> None:
        self.history = []

    def _config(self, cfg: GenerationConfig) -> GenerationConfig:
        stops = sorted({*cfg.stop_token_ids, self.task.im_end})
        return dataclasses.replace(cfg, stop_token_ids=stops)

    def reply(self, text: str, cfg: GenerationConfig) -> Iterable[str]:
        """Stream the assistant's answer to ``text``; the finished answer joins the history."""
        messages = ([{"role": "system", "content": self.system}] if self.system else []) + self.history
        messages.append({"role": "user", "content": text})
        cfg = self._config(cfg)
        if cfg.seed is not None:  # reproducible, but not the same draws at every turn
            cfg = dataclasses.replace(cfg, seed=cfg.seed + len(self.history) // 2)
        ids = self.task.prompt_ids(messages, limit=self.model.cfg.max_seq_len - cfg.max_new_tokens)
        if ids is None:
            raise ValueError(
                f"the message does not fit the model window ({self.model.cfg.max_seq_len} tokens) with "
                f"max_new_tokens={cfg.max_new_tokens}; shorten it or lower --generation.max-new-tokens"
            )
        pieces = []
        for piece in self.generator.stream(ids, cfg):
            pieces.append(piece)
            yield piece
        self.history += [{"role": "user", "content": text}, {"role": "assistant", "content": "".join(pieces).strip()}]


def generate_command(cfg: GenerateConfig, write: Callable[[str], None]) -> str:
    """Stream the continuation of ``cfg.prompt`` through ``write``; returns the whole text."""
    session = ChatSession(cfg.model, system=cfg.system)
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
    session = ChatSession(cfg.model, system=cfg.system)
    if not session.is_chat_model:
        write(f"note: {cfg.model} has no chat fine-tuning (task.json); replies may not follow the conversation\n")
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
