"""The models a server answers with: one ``Served`` per ``--model NAME=RUN_DIR``, its task read from the run.

Every call goes through what the commands use (``Task.predict``, ``TranslationTask.translate``,
``EmbeddingTask.vectors``, ``inference``'s ``Generator`` and ``ChatSession``): no model code here.
Runs load through ``runs/run_dir.load_run`` alone (no training code is imported), reading only
config.json, task.json, safetensors and tokenizer files from the directories given at start-up.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmforge.errors import UserError
from lmforge.inference.chat import ChatSession
from lmforge.inference.config import GenerationConfig
from lmforge.inference.generate import Generation, Generator
from lmforge.runs.run_dir import load_run

SERVED_TASKS = ("classify", "ner", "translate", "embed", "chat")

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

    def explain(self, example: dict, *, method: str, label: str | None, steps: int) -> list[dict]:
        """``tasks/explain.explain`` of one input: token scores with character offsets, as JSON."""
        from lmforge.runs.run_dir import Run
        from lmforge.tasks.explain import explain

        finetuned = self.session.is_chat_model if self.session is not None else True
        run = Run(self.task, self.handler, self.model, Path(self.run_dir), finetuned)
        return [e.to_json() for e in explain(run, example, method=method, label=label, steps=steps)]

    def count_tokens(self, texts: list[str]) -> int:
        tok = self.handler.tokenizer if hasattr(self.handler, "tokenizer") else self.session.tokenizer
        return sum(len(tok.encode(t, special_tokens=False)) for t in texts)

    # --- decoders ----------------------------------------------------------------------------------
    def translate(self, texts: list[str], cfg: GenerationConfig) -> list[str]:
        return self.handler.translate(self.model, texts, device=CPU, generation=cfg, generator=self.generator)

    def chat_prompt(self, messages: list[dict], max_new_tokens: int) -> list[int]:
        """Token ids of the conversation plus the assistant prompt, oldest turns dropped to fit the window."""
        return self.session.prompt_ids(messages, max_new_tokens)

    def chat_config(self, cfg: GenerationConfig) -> GenerationConfig:
        return self.session.config(cfg)

    def complete(self, prompts: list[list[int]], cfg: GenerationConfig) -> list[Generation]:
        """Replies to several prompts decoded together (left-padded batch)."""
        return self.generator.generate(prompts, self.chat_config(cfg))

    def stream(self, prompt: list[int], cfg: GenerationConfig):
        return self.generator.stream(prompt, self.chat_config(cfg))

    def info(self) -> dict:
        return {"id": self.name, "object": "model", "owned_by": "lmforge", "task": self.task, "run_dir": self.run_dir}


def load_served(name: str, run_dir: str | Path, *, precision: str = "fp32") -> Served:
    """Load ``run_dir`` for serving under ``name`` (``runs/run_dir.load_run``); its task decides the endpoints;
    ``precision`` is the decoding precision of a chat or translation model (``models/decoding.py``)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"--model {name}={run_dir}: no such directory")
    run = load_run(run_dir)
    if run.name not in SERVED_TASKS:
        raise UserError(f"{run_dir}: task {run.name!r} cannot be served ({', '.join(SERVED_TASKS)})")
    served = Served(name, run.name, str(run_dir), run.task, run.model)
    if run.name == "translate":
        served.generator = Generator(
            run.model,
            run.task.tgt_tok,
            source_tokenizer=run.task.src_tok,
            source_special_tokens=run.task.source_special_tokens,
            copy_weights=False,
            precision=precision,
        )
    elif run.name == "chat":
        served.session = ChatSession(run.model, run.task.tokenizer, is_chat_model=run.finetuned, precision=precision)
        served.generator = served.session.generator
    return served
