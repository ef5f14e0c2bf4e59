"""The models a server answers with: one ``Served`` per ``--model NAME=RUN_DIR``, its task read from the run.

Every call goes through what the commands use (``Task.predict``, ``TranslationTask.translate``,
``EmbeddingTask.vectors``, ``Generator``): no model code here. Loading reads only config.json,
safetensors and tokenizer files from the directories given at start-up (nothing is unpickled).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmforge.chat import ChatSession
from lmforge.config import read_json_object
from lmforge.embed import load_embedder
from lmforge.finetune import TASK_FILE, load_finetuned
from lmforge.generate import Generation, GenerationConfig, Generator
from lmforge.models.bert import Bert
from lmforge.models.gpt import GPT
from lmforge.models.registry import read_config
from lmforge.translate import load_translation

CPU = torch.device("cpu")


@dataclass
class Served:
    """A loaded model: its name, task (classify, ner, translate, embed, chat) and what answers requests."""

    name: str
    task: str
    run_dir: str
    handler: Any
    model: torch.nn.Module
    generator: Generator | None = None
    session: ChatSession | None = None

    # --- encoders ----------------------------------------------------------------------------------
    def classify(self, examples: list[dict]) -> list[dict]:
        return self.handler.predict(self.model, examples, device=CPU)

    def ner(self, examples: list[dict]) -> list[dict]:
        return [{"entities": r["entities"]} for r in self.handler.predict(self.model, examples, device=CPU)]

    def embed(self, texts: list[str]) -> list[list[float]]:
        return self.handler.vectors(self.model, texts, device=CPU).tolist()

    def count_tokens(self, texts: list[str]) -> int:
        tok = self.handler.tokenizer if hasattr(self.handler, "tokenizer") else self.session.tokenizer
        return sum(len(tok.encode(t, special_tokens=False)) for t in texts)

    # --- decoders ----------------------------------------------------------------------------------
    def translate(self, texts: list[str], cfg: GenerationConfig) -> list[str]:
        return self.handler.translate(self.model, texts, device=CPU, generation=cfg, generator=self.generator)

    def chat_prompt(self, messages: list[dict], max_new_tokens: int) -> list[int]:
        """Token ids of the conversation plus the assistant prompt, oldest turns dropped to fit the window."""
        window = self.model.cfg.max_seq_len
        ids = self.session.task.prompt_ids(messages, limit=window - max_new_tokens)
        if ids is None:
            raise ValueError(f"messages do not fit the model window ({window} tokens) with max_tokens={max_new_tokens}")
        return ids

    def chat_config(self, cfg: GenerationConfig) -> GenerationConfig:
        stops = sorted({*cfg.stop_token_ids, self.session.task.im_end})
        return dataclasses.replace(cfg, stop_token_ids=stops)

    def complete(self, prompts: list[list[int]], cfg: GenerationConfig) -> list[Generation]:
        """Replies to several prompts decoded together (left-padded batch)."""
        return self.generator.generate(prompts, self.chat_config(cfg))

    def stream(self, prompt: list[int], cfg: GenerationConfig):
        return self.generator.stream(prompt, self.chat_config(cfg))

    def info(self) -> dict:
        return {"id": self.name, "object": "model", "owned_by": "lmforge", "task": self.task, "run_dir": self.run_dir}


def task_of(run_dir: Path) -> str:
    """The task a run directory serves: task.json's, else embed for a BERT and chat for a GPT."""
    settings_path = run_dir / TASK_FILE
    if settings_path.is_file():
        return read_json_object(settings_path, what="task file").get("task", "")
    if not (run_dir / "config.json").is_file():
        raise ValueError(f"{run_dir}: not a model or run directory (no config.json)")
    cfg = read_config(run_dir)
    return "chat" if cfg.__class__.__name__ == "GPTConfig" else "embed"


def load_served(name: str, run_dir: str | Path) -> Served:
    """Load ``run_dir`` for serving under ``name``; the task decides the endpoints that accept it."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ValueError(f"--model {name}={run_dir}: no such directory")
    task = task_of(run_dir)
    if task in ("classify", "ner"):
        handler, model = load_finetuned(run_dir)
        return Served(name, task, str(run_dir), handler, model)
    if task == "translate":
        handler, model = load_translation(run_dir)
        generator = Generator(model, handler.tgt_tok, source_tokenizer=handler.src_tok,
                              source_special_tokens=handler.source_special_tokens, copy_weights=False)  # fmt: skip
        return Served(name, task, str(run_dir), handler, model, generator=generator)
    if task == "embed":
        handler, model = load_embedder(run_dir)
        if not isinstance(model, Bert):
            raise ValueError(f"{run_dir}: embeddings come from a BERT-family model")
        return Served(name, task, str(run_dir), handler, model)
    if task == "chat":
        session = ChatSession(run_dir)
        if not isinstance(session.model, GPT):
            raise ValueError(f"{run_dir}: chat needs a GPT model")
        return Served(name, task, str(run_dir), session.task, session.model, generator=session.generator,
                      session=session)  # fmt: skip
    raise ValueError(f"{run_dir / TASK_FILE}: task {task!r} cannot be served (classify, ner, translate, embed, chat)")
