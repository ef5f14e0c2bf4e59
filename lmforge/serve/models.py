"""The models a server answers with: one ``Served`` per ``--model NAME=RUN_DIR``, its task read from the run.

A run's task declares the route that serves it (``tasks.TASKS``' ``route``) and whether it is explained
(``explaining``); the app dispatches on those, never on task names. Every call goes through what the commands use
(``Task.predict``, ``TranslationTask.translate``, ``EmbeddingTask.vectors``, ``inference``'s ``Generator`` and
``ChatSession``, ``explain.targets.explain``): no model code here. Runs load through ``lmforge.rundir.load_run``
alone (no training code and no recipe is imported), reading only config.json, task.json, safetensors and
tokenizer files from the directories given at start-up.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmforge.errors import UserError
from lmforge.inference.chat import ChatSession
from lmforge.inference.config import GenerationConfig
from lmforge.inference.generate import Generation, Generator
from lmforge.rundir import Run, load_run
from lmforge.rundir.convert import converted_chat_model
from lmforge.tasks import TASKS, TaskEntry, with_capability

CPU = torch.device("cpu")
CLASSIFY, NER, TRANSLATE = "/v1/classify", "/v1/ner", "/v1/translate"
EMBEDDINGS, CHAT, COMPLETIONS = "/v1/embeddings", "/v1/chat/completions", "/v1/completions"


@dataclass
class Served:
    """A loaded model: its name, its run (task name, task, model), the route that serves it and, for decoders, the
    generator (and chat session) that answers."""

    name: str
    run: Run
    route: str
    generator: Generator | None = None
    session: ChatSession | None = None

    @property
    def entry(self) -> TaskEntry:
        return TASKS[self.run.task_name]

    @property
    def task(self) -> Any:
        return self.run.task

    @property
    def model(self) -> torch.nn.Module:
        return self.run.model

    # --- encoders ----------------------------------------------------------------------------------
    def classify(self, examples: list[dict]) -> list[dict]:
        return self.task.predict(self.model, examples, device=CPU)

    def ner(self, examples: list[dict]) -> list[dict]:
        return [{"entities": r["entities"]} for r in self.task.predict(self.model, examples, device=CPU)]

    def embed(self, texts: list[str]) -> list[list[float]]:
        return self.task.vectors(self.model, texts, device=CPU).tolist()

    def explain(self, example: dict, *, method: str, label: str | None, steps: int) -> list[dict]:
        """``explain.targets.explain`` of one input: token scores with character offsets, as JSON."""
        from lmforge.explain.targets import explain

        return [e.to_json() for e in explain(self.run, example, method=method, label=label, steps=steps)]

    def count_tokens(self, texts: list[str]) -> int:
        tok = self.session.tokenizer if self.session is not None else self.task.tokenizer
        return sum(len(tok.encode(t, special_tokens=False)) for t in texts)

    # --- decoders ----------------------------------------------------------------------------------
    def translate(self, texts: list[str], cfg: GenerationConfig) -> list[str]:
        return self.task.translate(self.model, texts, device=CPU, generation=cfg, generator=self.generator)

    def chat_prompt(self, messages: list[dict], max_new_tokens: int) -> list[int]:
        """Token ids of the conversation plus the assistant prompt, oldest turns dropped to fit the window."""
        return self.session.prompt_ids(messages, max_new_tokens)

    def chat_config(self, cfg: GenerationConfig) -> GenerationConfig:
        return self.session.config(cfg)

    def complete(self, prompts: list[list[int]], cfg: GenerationConfig) -> list[Generation]:
        """Replies to several prompts decoded together (left-padded batch)."""
        return self.generator.generate(prompts, self.chat_config(cfg))

    def completions(
        self, prompts: list[list[int]], cfg: GenerationConfig, *, echo: bool, top: int | None
    ) -> tuple[list[dict], int]:
        """OpenAI completion choices for token-id prompts, and the tokens generated: the continuation (``cfg``; none
        for 0 tokens), and with ``top`` set the log-probability of each returned token (the prompt's too when
        ``echo``; its first token has none) with the ``top`` most probable tokens at each position
        (``evals/scoring.token_logprobs``, on the fp32 model whatever the decoding precision)."""
        from lmforge.evals.scoring import token_logprobs

        tok = self.task.tokenizer
        replies = self.generator.generate(prompts, cfg) if cfg.max_new_tokens else [None] * len(prompts)
        choices, generated = [], 0
        for index, (prompt, reply) in enumerate(zip(prompts, replies, strict=True)):
            new = list(reply.token_ids) if reply is not None else []
            generated += len(new)
            text = tok.decode(new) if new else ""
            choice = {"index": index, "text": (tok.decode(prompt) if echo else "") + text, "logprobs": None}
            choice["finish_reason"] = "length" if reply is None or reply.finish_reason == "length" else "stop"
            if top is not None:
                ids, start = prompt + new, 1 if echo else len(prompt)
                scored, tops = token_logprobs(self.model, ids, start=start, top=top) if start < len(ids) else ([], [])
                shown = ids if echo else new
                choice["logprobs"] = {
                    "tokens": [tok.tokenizer.id_to_token(i) for i in shown],
                    "token_logprobs": ([None] if echo else []) + scored,
                    "top_logprobs": ([None] if echo else [])
                    + [{tok.tokenizer.id_to_token(i): lp for i, lp in row} for row in tops],
                }
            choices.append(choice)
        return choices, generated

    def stream(self, prompt: list[int], cfg: GenerationConfig):
        return self.generator.stream(prompt, self.chat_config(cfg))

    def batch_call(self) -> Callable[[list, Any], list]:
        """What the model's micro-batcher calls with the gathered items and the batch key (for decoders: the
        GenerationConfig, so that only requests with equal settings share a batch)."""
        calls: dict[str, Callable[[list, Any], list]] = {
            CLASSIFY: lambda items, _key: self.classify(items),
            NER: lambda items, _key: self.ner(items),
            EMBEDDINGS: lambda items, _key: self.embed(items),
            TRANSLATE: self.translate,
            CHAT: self.complete,
        }
        return calls[self.route]

    def info(self) -> dict:
        run_dir = str(self.run.directory)
        return {
            "id": self.name,
            "object": "model",
            "owned_by": "lmforge",
            "task": self.run.task_name,
            "run_dir": run_dir,
        }


def _translation_generator(served: Served, precision: str) -> None:
    task = served.task
    served.generator = Generator(
        served.model,
        task.tgt_tok,
        source_tokenizer=task.src_tok,
        source_special_tokens=task.source_special_tokens,
        copy_weights=False,
        precision=precision,
    )


def _chat_session(served: Served, precision: str) -> None:
    run = served.run
    chat = run.finetuned or converted_chat_model(run.directory)
    served.session = ChatSession(run.model, run.task.tokenizer, is_chat_model=chat, precision=precision)
    try:  # /v1/chat/completions renders conversations: a model that cannot is refused at start-up, not per request
        served.session.check_can_chat()
    except UserError as e:
        raise UserError(f"--model {served.name}={run.directory}: {e}") from None
    served.generator = served.session.generator


# what a route needs besides the run: decoders build their generator once, at start-up
_ROUTE_SETUP: dict[str, Callable[[Served, str], None]] = {TRANSLATE: _translation_generator, CHAT: _chat_session}


def load_served(name: str, run_dir: str | Path, *, precision: str = "fp32") -> Served:
    """Load ``run_dir`` for serving under ``name`` (``rundir.load_run``); its task's route decides the endpoint;
    ``precision`` is the decoding precision of a chat or translation model (``models/decoding.py``)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"--model {name}={run_dir}: no such directory")
    run = load_run(run_dir)
    route = TASKS[run.task_name].route
    if route is None:
        raise UserError(f"{run_dir}: task {run.task_name!r} cannot be served ({', '.join(with_capability('route'))})")
    served = Served(name, run, route)
    setup = _ROUTE_SETUP.get(route)
    if setup is not None:
        setup(served, precision)
    return served
