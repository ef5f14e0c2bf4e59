"""Dynamic micro-batching: requests gathered for a few milliseconds into one model call, off the event loop.

A request submits its items (texts) and awaits their results. One worker per model takes the first
waiting request, then keeps taking requests until the batch holds ``max_batch`` items or
``max_wait_ms`` have passed, runs the model function once on all their items in the model's single
worker thread (so the event loop keeps serving and a model never runs two batches at once) and
hands each request its slice of the results. The queue is bounded: a full queue refuses new requests
at once (the server answers 503 with Retry-After) instead of letting latency grow without limit.

Work that must not share a batch (a streamed reply, a seeded sampled reply, whose random draws must
not depend on what else is decoded with it) is admitted through the same queue with ``submit_call``
and runs alone in the same thread, in queue order: every request, streamed or not, takes a queue slot,
gets 503 when there is none, and waits behind the same requests.
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
    call: Callable[[], Any] | None = None  # run alone (not batched) when set
    queued: float = field(default_factory=time.perf_counter)


class MicroBatcher:
    """Batches ``fn(items, key)`` calls of one model; requests with different ``key`` never share a batch."""

    def __init__(
        self,
        fn: Callable[[list, Any], list],
        *,
        max_batch: int = 32,
        max_wait_ms: float = 5.0,
        queue_size: int = 64,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
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

    def submit_call(self, fn: Callable[[], Any]) -> asyncio.Future:
        """Admit ``fn`` to run alone in the model's thread, in queue order; returns the future of its result
        (cancel it to withdraw ``fn`` while it still waits). Raises ``QueueFull`` at once when the queue is full."""
        self.start()
        future = asyncio.get_running_loop().create_future()
        try:
            self.queue.put_nowait(_Request([], None, future, call=fn))
        except asyncio.QueueFull:
            raise QueueFull from None
        return future

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
            if first.call is not None:
                await self._run_alone(first)
                continue
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
                if request.call is not None or request.key != first.key or size + len(request.items) > self.max_batch:
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

    async def _run_alone(self, request: _Request) -> None:
        if request.future.cancelled():  # withdrawn (timed out, client gone) while it waited
            return
        try:
            result = await asyncio.get_running_loop().run_in_executor(self.executor, request.call)
        except Exception as error:
            if not request.future.done():
                request.future.set_exception(error)
            return
        if not request.future.done():
            request.future.set_result(result)
