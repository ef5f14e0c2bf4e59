"""``Limits``: what one request may ask for, batching, timeouts and the API key (torch-free: ``lmforge serve
--help`` and the server's config import no model code)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from lmforge.errors import UserError


@dataclass
class Limits:
    """What one request may ask for, how requests are batched and timed out, and the API key."""

    max_body_bytes: int = 1_000_000
    """Largest request body (413 beyond)."""
    max_text_chars: int = 2000
    """Longest text or message (413 beyond)."""
    max_inputs: int = 64
    """Most texts in one request (413 beyond)."""
    max_tokens: int = 256
    """Largest max_tokens a request may ask for (422 beyond)."""
    max_batch: int = 32
    """Most texts per model call when batching requests."""
    max_wait_ms: float = 5.0
    """How long the first request of a batch waits for others."""
    queue_size: int = 64
    """Requests waiting per model before new ones get 503 + Retry-After."""
    timeout_s: float = 30.0
    """Per-request timeout (504 beyond)."""
    body_timeout_s: float = 10.0
    """Longest wait for the next piece of a request body (408 beyond: a client that declares more than it sends
    holds no connection for long)."""
    header_timeout_s: float = 10.0
    """Longest wait for a request's headers, from the connection's opening or its previous reply (408 and the
    connection closed beyond: a client sending its headers a line at a time cannot hold a connection)."""
    max_connections: int = 256
    """Most connections served at once (503 beyond), so slow clients cannot take every file descriptor."""
    api_key: str | None = None
    """Require 'Authorization: Bearer KEY' on /v1/, /metrics (default: $LMFORGE_API_KEY when set)."""

    def __post_init__(self) -> None:
        whole = ("max_body_bytes", "max_text_chars", "max_inputs", "max_tokens", "max_batch", "queue_size")
        for name in (*whole, "max_connections"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise UserError(f"--{name.replace('_', '-')} {value}: must be a whole number >= 1")
        for name in ("max_wait_ms", "timeout_s", "body_timeout_s", "header_timeout_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0) or (name != "max_wait_ms" and value == 0):
                raise UserError(f"--{name.replace('_', '-')} {value}: must be a finite number > 0 (max-wait-ms: >= 0)")
