"""Dynamic micro-batching: requests gathered for a few milliseconds into one model call, off the event loop.

A request submits its items (texts) and awaits their results. One worker per model takes the first
waiting request, then keeps taking requests until the batch holds ``max_batch`` items or
``max_wait_ms`` have passed, runs the model function once on all their items in the model's single
worker thread (so the event loop keeps serving and a model never runs two batches at once) and
hands each request its slice of the results. The queue is bounded: a full queue refuses new requests
at once (the server answers 503 with Retry-After) instead of letting latency grow without limit.
The same thread also runs the model's streaming and chat work (``run``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any


class QueueFull(Exception):
    """The model's queue is full: try again later."""


@dataclass
class _Request:
    items: list
    key: Any
    future: asyncio.Future
    queued: float = field(default_factory=time.perf_counter)


class MicroBatcher:
    """Batches ``fn(items, key)`` calls of one model; requests with different ``key`` never share a batch."""

    def __init__(
        self, fn: Callable[[list, Any], list], *, max_batch: int = 32, max_wait_ms: float = 5.0, queue_size: int = 64,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:  # fmt: skip
        self.fn, self.max_batch, self.max_wait = fn, max_batch, max_wait_ms / 1000.0
        self.queue: asyncio.Queue[_Request] = asyncio.Queue(maxsize=queue_size)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lmforge-model")
        self.on_batch = on_batch
        self._held: _Request | None = None  # taken from the queue but of another key: first of the next batch
        self._worker: asyncio.Task | None = None

    def start(self) -> None:
        if self._worker is None:
            self._worker = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        """Finish what is queued, then stop the worker and its thread."""
        while not self.queue.empty() or self._held is not None:
            await asyncio.sleep(0.01)
        if self._worker is not None:
            self._worker.cancel()
        self.executor.shutdown(wait=True)

    @property
    def depth(self) -> int:
        return self.queue.qsize() + (self._held is not None)

    async def submit(self, items: list, key: Any = None) -> list:
        """Results for ``items`` (in order); raises ``QueueFull`` when the queue is full."""
        self.start()
        future = asyncio.get_running_loop().create_future()
        try:
            self.queue.put_nowait(_Request(list(items), key, future))
        except asyncio.QueueFull:
            raise QueueFull from None
        return await future

    async def run(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` in the model's thread (not batched: streaming, beam search)."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn)

    async def _next(self, timeout: float | None) -> _Request | None:
        if self._held is not None:
            request, self._held = self._held, None
            return request
        if timeout is None:
            return await self.queue.get()
        try:
            return await asyncio.wait_for(self.queue.get(), timeout)
        except TimeoutError:
            return None

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            first = await self._next(None)
            batch, size = [first], len(first.items)
            deadline = loop.time() + self.max_wait
            while size < self.max_batch:
                left = deadline - loop.time()
                if left > 0:
                    request = await self._next(left)
                else:  # the wait is over: only what is already queued joins
                    request = None if self.queue.empty() else self.queue.get_nowait()
                if request is None:
                    break
                if request.key != first.key or size + len(request.items) > self.max_batch:
                    self._held = request
                    break
                batch.append(request)
                size += len(request.items)
            live = [r for r in batch if not r.future.cancelled()]  # a timed-out request needs no answer
            if not live:
                continue
            items = [item for r in live for item in r.items]
            if self.on_batch is not None:
                self.on_batch(len(items))
            try:
                results = await loop.run_in_executor(self.executor, self.fn, items, first.key)
            except Exception as error:  # the batch fails, the server does not
                for r in live:
                    if not r.future.done():
                        r.future.set_exception(error)
                continue
            start = 0
            for r in live:
                if not r.future.done():
                    r.future.set_result(results[start : start + len(r.items)])
                start += len(r.items)
