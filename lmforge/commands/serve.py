"""``lmforge serve``: load the named run directories and serve them with uvicorn.

Security defaults: the server binds to loopback; any other address needs ``--api-key`` (clients send
``Authorization: Bearer KEY``). Models load only from the directories named at start-up, through
safetensors and JSON (nothing is unpickled). On SIGINT / SIGTERM uvicorn stops accepting connections,
lets in-flight requests finish (up to ``graceful_s``) and the app drains its queues.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Annotated, Literal

import tyro

from lmforge.errors import UserError
from lmforge.serve.limits import Limits

LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass
class ServeConfig:
    """Serve run directories over HTTP: JSON API (OpenAI-compatible chat and embeddings) and a web page."""

    model: Annotated[list[str], tyro.conf.UseAppendAction]
    """NAME=RUN_DIR, repeatable (--model sent=runs/cls --model chat=runs/chat); the task comes from the run."""
    host: str = "127.0.0.1"
    """Address to bind; anything but loopback requires --api-key."""
    port: int = 8000
    """Port to listen on."""
    limits: tyro.conf.OmitArgPrefixes[Limits] = field(default_factory=Limits)
    graceful_s: float = 30.0
    """On shutdown, how long in-flight requests may take to finish."""
    precision: Literal["fp32", "int8", "int8-head", "bf16", "auto"] = "fp32"
    """Decoding of chat / translation models: fp32 (exact), int8 (int8 weights), int8-head, bf16; auto: int8 where
    bf16 is fast, else fp32."""

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise UserError(f"--port {self.port}: must be between 1 and 65535")
        if not (self.graceful_s >= 0 and self.graceful_s < float("inf")):
            raise UserError(f"--graceful-s {self.graceful_s}: must be a finite number >= 0")


def parse_models(specs: list[str]) -> dict[str, str]:
    """NAME=RUN_DIR pairs as a dict; errors name the bad spec."""
    found: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise UserError(f"--model {spec!r}: expected NAME=RUN_DIR, e.g. --model sentiment=runs/cls")
        if name in found:
            raise UserError(f"--model {spec!r}: the name {name!r} is given twice")
        found[name] = path
    if not found:
        raise UserError("give at least one --model NAME=RUN_DIR")
    return found


def load_models(cfg: ServeConfig) -> dict:
    from lmforge.serve.models import load_served

    return {name: load_served(name, path, precision=cfg.precision) for name, path in parse_models(cfg.model).items()}


def run(cfg: ServeConfig) -> None:
    """Check the settings, load every model, then serve until interrupted."""
    import uvicorn

    from lmforge.serve.app import create_app
    from lmforge.serve.connections import uvicorn_settings

    limits = dataclasses.replace(cfg.limits, api_key=cfg.limits.api_key or os.environ.get("LMFORGE_API_KEY") or None)
    if cfg.host not in LOOPBACK and not limits.api_key:
        raise UserError(f"--host {cfg.host}: binding beyond loopback needs --api-key (or $LMFORGE_API_KEY)")
    app = create_app(load_models(cfg), limits)
    uvicorn.run(
        app,
        host=cfg.host,
        port=cfg.port,
        timeout_graceful_shutdown=int(cfg.graceful_s),
        **uvicorn_settings(limits),
        log_level="info",
    )
