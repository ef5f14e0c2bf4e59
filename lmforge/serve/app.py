"""The HTTP API (FastAPI) and the web page: handlers over the served models, no model code.

Endpoints: ``POST /v1/classify``, ``/v1/ner``, ``/v1/translate`` (``{"model", "input": [...]}`` ->
``{"model", "data": [...]}``), ``/v1/embeddings`` and ``/v1/chat/completions`` in OpenAI's request and
response shapes (``stream: true`` as server-sent events ending in ``data: [DONE]``), ``GET /v1/models``,
``/healthz``, ``/metrics`` (Prometheus text) and the page at ``/``. The OpenAPI schema is at
``/openapi.json``.

Errors are JSON in OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, with the field at
fault in ``param``: 413 for a body, text or input list over its limit, 422 for invalid values (e.g.
``max_tokens`` above the server's limit), 404 for an unknown model, 401 without the API key, 503 with
Retry-After when the model's queue is full, 504 past the per-request timeout. An exception while
answering is a 500 for that request only.

Limits hold for every request: the body limit counts bytes as they arrive (``BodyLimit``: a chunked
upload without Content-Length is cut at the limit, never buffered whole); every text field
must be valid Unicode (a JSON lone surrogate such as ``"\\ud800"`` is a 422 naming the field); streamed
replies take a queue slot like any other request (503 when the queue is full) and are cut at the
per-request timeout with an error event; a sampled reply with a ``seed`` is decoded alone, so it is the
same whatever else the server is answering.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator
from importlib import resources
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmforge.errors import UserError
from lmforge.inference.config import GenerationConfig
from lmforge.serve.batching import MicroBatcher, QueueFull
from lmforge.serve.limits import Limits
from lmforge.serve.models import Served


class APIError(Exception):
    """An error answered as JSON: status, message, the field at fault."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        kind: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.headers = status, message, param, kind, headers


def _error(
    status: int,
    message: str,
    *,
    param: str | None = None,
    kind: str = "invalid_request_error",
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    # a message may quote the request: lone surrogates in it would make the JSON body itself unencodable
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")
    body = {"error": {"message": message, "type": kind, "param": param, "code": status}}
    return JSONResponse(body, status_code=status, headers=headers)


BODY_CUT = "lmforge.body_cut"


class _BodyCut(Exception):
    """Raised into the app when its request body passed the limit (after the 413 was sent)."""


class BodyLimit:
    """ASGI middleware: the request body's bytes are counted as they arrive, and reading stops at the limit.

    A declared Content-Length over the limit is answered 413 before the app runs. A body without one
    (chunked) is counted message by message: the message that passes the limit makes this middleware
    send the 413 itself and raise ``_BodyCut`` into the app's read; whatever the app then sends is
    dropped and the exception is swallowed here. At most the limit plus one message is ever held.
    Written here rather than FastAPI's ``max_body_size`` (0.16x), which answers a declared oversize
    body in plain text, outside the app's JSON error shape.
    """

    def __init__(self, app, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    def _too_large(self) -> JSONResponse:
        return _error(413, f"request body exceeds {self.max_bytes} bytes", param="body")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            return await self._too_large()(scope, receive, send)
        received, started, answered = 0, False, False

        async def guarded_send(message) -> None:
            nonlocal started
            if answered:  # the 413 went out: the app's own answer to the cut body is dropped
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        async def counted_receive():
            nonlocal received, answered
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    if not started:
                        await self._too_large()(scope, receive, send)
                        answered = True
                        scope[BODY_CUT] = True  # what the client got, for the request metrics
                    raise _BodyCut
            return message

        try:
            await self.app(scope, counted_receive, guarded_send)
        except Exception:
            if not answered:
                raise


# --- request shapes -------------------------------------------------------------------------------------
def _valid_unicode(text: str) -> str:
    """JSON may carry lone surrogates ("\\ud800"), which no tokenizer can encode: refuse them by name."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise UserError(f"invalid Unicode: lone surrogate U+{ord(text[e.start]):04X} at character {e.start}") from None
    return text


Text = Annotated[str, AfterValidator(_valid_unicode)]


def _param(loc: tuple) -> str:
    """A validation error's field as ``input.1``: the body's field names and list indices, without the
    names pydantic gives the branches of a union (``str``, ``list[...]``, ``function-after[...]``)."""
    parts = [str(p) for p in loc if isinstance(p, int) or (p != "body" and "[" not in p and p not in ("str", "list"))]
    return ".".join(parts)


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields we do not use


class InputRequest(_Lenient):
    model: Text
    input: Text | list[Text | list[Text]] = Field(description="texts, or [text, text_pair] pairs (classify)")


class TranslateRequest(InputRequest):
    num_beams: int = Field(4, ge=1, le=8)
    max_tokens: int | None = Field(None, ge=1)


class EmbeddingRequest(_Lenient):
    model: Text
    input: Text | list[Text]
    encoding_format: Literal["float", "base64"] = "float"
    """base64: the float32 little-endian bytes of each vector, base64-encoded (what OpenAI's client asks for)."""


class Message(_Lenient):
    role: Literal["system", "user", "assistant"]
    content: Text


class ChatRequest(_Lenient):
    model: Text
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stream: bool = False
    stop: Text | list[Text] | None = None
    seed: int | None = Field(None, ge=0, lt=2**64, description="sampling seed: the same reply for the same seed")
    n: int = Field(1, ge=1, le=1, description="one choice per request")


# --- the app ----------------------------------------------------------------------------------------------
class _Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("lmforge_requests", "HTTP requests", ["endpoint", "status"], registry=self.registry)
        self.latency = Histogram(
            "lmforge_request_seconds",
            "Request latency",
            ["endpoint"],
            registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self.queue = Gauge("lmforge_queue_depth", "Requests waiting per model", ["model"], registry=self.registry)
        self.batch = Histogram(
            "lmforge_batch_size",
            "Items per model call",
            ["model"],
            registry=self.registry,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
        )
        self.tokens = Counter("lmforge_generated_tokens", "Generated tokens", ["model"], registry=self.registry)
        self.tokens_per_s = Gauge(
            "lmforge_tokens_per_second", "Generation speed of the last reply", ["model"], registry=self.registry
        )


def create_app(models: dict[str, Served], limits: Limits | None = None) -> FastAPI:
    """The API over ``models`` (name -> loaded model) with ``limits``."""
    limits = limits or Limits()
    metrics = _Metrics()
    batchers: dict[str, MicroBatcher] = {}
    for name, served in models.items():
        batchers[name] = MicroBatcher(
            _batch_fn(served),
            max_batch=limits.max_batch,
            max_wait_ms=limits.max_wait_ms,
            queue_size=limits.queue_size,
            on_batch=metrics.batch.labels(name).observe,
        )
        metrics.queue.labels(name).set_function(lambda b=batchers[name]: b.depth)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        for b in batchers.values():  # graceful shutdown: finish what is queued
            await b.stop()

    about = "Classification, NER, translation, embeddings and chat over lmforge run directories."
    # no /docs or /redoc: their pages load scripts from a CDN, and everything here works offline
    app = FastAPI(title="lmforge", version="1", lifespan=lifespan, description=about, docs_url=None, redoc_url=None)
    app.state.models, app.state.limits = models, limits

    @app.exception_handler(APIError)
    async def _api_error(_request: Request, e: APIError) -> JSONResponse:
        return _error(e.status, e.message, param=e.param, kind=e.kind, headers=e.headers)

    @app.exception_handler(StarletteHTTPException)  # FastAPI's and Starlette's own (body limit, bad body, 404)
    async def _http_error(_request: Request, e: StarletteHTTPException) -> JSONResponse:
        return _error(e.status_code, str(e.detail), headers=getattr(e, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, e: RequestValidationError) -> JSONResponse:
        errors = e.errors()
        # a value that fails our own check says more than "not a valid string" from another branch of a union
        first = next((x for x in errors if x["type"] == "value_error"), errors[0])
        param = _param(first["loc"])
        return _error(422, f"{param}: {first['msg']}", param=param or None)

    @app.middleware("http")
    async def _guard(request: Request, call_next):
        started = time.perf_counter()
        path = request.url.path
        endpoint = path if path.startswith("/v1/") or path in ("/healthz", "/metrics") else "page"
        if limits.api_key and path.startswith("/v1/") and not _authorised(request, limits.api_key):
            response = _error(
                401, "missing or wrong API key: send 'Authorization: Bearer KEY'", kind="authentication_error"
            )
        else:
            try:
                response = await call_next(request)
            except Exception as e:  # never take the server down
                response = _error(500, f"internal error: {type(e).__name__}: {e}", kind="server_error")
        status = 413 if request.scope.get(BODY_CUT) else response.status_code  # BodyLimit answered, not the app
        metrics.requests.labels(endpoint, str(status)).inc()
        metrics.latency.labels(endpoint).observe(time.perf_counter() - started)
        return response

    def served(name: str, task: str) -> Served:
        if name not in models:
            raise APIError(
                404, f"model {name!r} is not served; served: {', '.join(models)}", param="model", kind="not_found_error"
            )
        if models[name].task != task:
            raise APIError(400, f"model {name!r} serves {models[name].task}, not {task}", param="model")
        return models[name]

    def busy(name: str) -> APIError:
        return APIError(
            503, f"model {name!r} is busy: its queue is full", kind="overloaded_error", headers={"Retry-After": "1"}
        )

    async def submit(name: str, items: list, key: Any = None) -> list:
        try:
            return await asyncio.wait_for(batchers[name].submit(items, key), limits.timeout_s)
        except QueueFull:
            raise busy(name) from None
        except TimeoutError:
            raise APIError(504, f"no answer within {limits.timeout_s:g} s", kind="timeout_error") from None
        except ValueError as e:
            raise APIError(422, str(e)) from None

    def admit(name: str, fn) -> asyncio.Future:
        """Queue ``fn`` to run alone in the model's thread (503 when the queue is full)."""
        try:
            return batchers[name].submit_call(fn)
        except QueueFull:
            raise busy(name) from None

    async def call_alone(name: str, fn) -> Any:
        try:
            return await asyncio.wait_for(admit(name, fn), limits.timeout_s)
        except TimeoutError:
            raise APIError(504, f"no answer within {limits.timeout_s:g} s", kind="timeout_error") from None

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok", "models": len(models)}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def list_models() -> dict:
        return {"object": "list", "data": [m.info() for m in models.values()]}

    @app.post("/v1/classify")
    async def classify(req: InputRequest) -> dict:
        m = served(req.model, "classify")
        examples = [_example(x, i, pairs=True) for i, x in enumerate(_inputs(req.input, limits))]
        return {"model": m.name, "data": await submit(m.name, examples)}

    @app.post("/v1/ner")
    async def ner(req: InputRequest) -> dict:
        m = served(req.model, "ner")
        examples = [_example(x, i, pairs=False) for i, x in enumerate(_inputs(req.input, limits))]
        return {"model": m.name, "data": await submit(m.name, examples)}

    @app.post("/v1/translate")
    async def translate(req: TranslateRequest) -> dict:
        m = served(req.model, "translate")
        texts = [_example(x, i, pairs=False)["text"] for i, x in enumerate(_inputs(req.input, limits))]
        cap = _max_tokens(req.max_tokens, limits, default=m.handler.max_len)
        translations = await submit(m.name, texts, key=GenerationConfig(num_beams=req.num_beams, max_new_tokens=cap))
        return {"model": m.name, "data": [{"translation": t} for t in translations]}

    @app.post("/v1/embeddings")
    async def embeddings(req: EmbeddingRequest) -> dict:
        m = served(req.model, "embed")
        texts = [_example(x, i, pairs=False)["text"] for i, x in enumerate(_inputs(req.input, limits))]
        vectors = await submit(m.name, texts)
        n = m.count_tokens(texts)
        if req.encoding_format == "base64":
            vectors = [base64.b64encode(np.asarray(v, dtype="<f4").tobytes()).decode("ascii") for v in vectors]
        data = [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)]
        return {"object": "list", "model": m.name, "data": data, "usage": {"prompt_tokens": n, "total_tokens": n}}

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(req: ChatRequest) -> dict | StreamingResponse:
        m = served(req.model, "chat")
        for i, message in enumerate(req.messages):
            if len(message.content) > limits.max_text_chars:
                raise APIError(
                    413,
                    f"messages[{i}].content has {len(message.content)} characters; the limit is "
                    f"{limits.max_text_chars}",
                    param=f"messages.{i}.content",
                )
        default = min(128, m.model.cfg.max_seq_len // 2)  # leaves room for the conversation
        cap = _max_tokens(req.max_completion_tokens or req.max_tokens, limits, default=default)
        cfg = _sampling(req, cap)
        try:
            prompt = m.chat_prompt([msg.model_dump() for msg in req.messages], cap)
        except ValueError as e:
            raise APIError(413, str(e), param="messages") from None
        reply_id, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if req.stream:
            stream = _ChatStream(m, prompt, cfg, asyncio.get_running_loop())
            stream.work = admit(m.name, stream.produce)  # a queue slot before the response starts: 503 is a status
            events = stream.events(reply_id, created, metrics, deadline=time.monotonic() + limits.timeout_s)
            return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        started = time.perf_counter()
        if cfg.do_sample and cfg.seed is not None:  # alone: its draws must not depend on what it is batched with
            (reply,) = await call_alone(m.name, lambda: m.complete([prompt], cfg))
        else:
            (reply,) = await submit(m.name, [prompt], key=cfg)  # equal settings decode together
        seconds = time.perf_counter() - started
        metrics.tokens.labels(m.name).inc(len(reply.token_ids))
        metrics.tokens_per_s.labels(m.name).set(len(reply.token_ids) / max(seconds, 1e-9))
        return {
            "id": reply_id,
            "object": "chat.completion",
            "created": created,
            "model": m.name,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": reply.text.strip()},
                    "finish_reason": "length" if reply.finish_reason == "length" else "stop",
                }
            ],
            "usage": {
                "prompt_tokens": len(prompt),
                "completion_tokens": len(reply.token_ids),
                "total_tokens": len(prompt) + len(reply.token_ids),
            },
        }

    page = resources.files("lmforge.serve") / "static"
    app.mount("/", StaticFiles(directory=str(page), html=True), name="page")
    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes)  # outermost of ours: before any byte is parsed
    return app


def _authorised(request: Request, key: str) -> bool:
    return request.headers.get("authorization", "") == f"Bearer {key}"


def _inputs(raw: Any, limits: Limits) -> list:
    items = [raw] if isinstance(raw, str) else list(raw)
    if not items:
        raise APIError(422, "input is empty: give at least one text", param="input")
    if len(items) > limits.max_inputs:
        raise APIError(413, f"input has {len(items)} items; the limit is {limits.max_inputs}", param="input")
    for i, item in enumerate(items):
        texts = [item] if isinstance(item, str) else item
        for text in texts:
            if len(text) > limits.max_text_chars:
                raise APIError(
                    413,
                    f"input[{i}] has {len(text)} characters; the limit is {limits.max_text_chars}",
                    param=f"input[{i}]",
                )
    return items


def _example(item: Any, i: int, *, pairs: bool) -> dict:
    if isinstance(item, str):
        if not item.strip():
            raise APIError(422, f"input[{i}] is empty", param=f"input[{i}]")
        return {"text": item}
    if pairs and len(item) == 2 and all(isinstance(t, str) and t.strip() for t in item):
        return {"text": item[0], "text_pair": item[1]}
    allowed = "a text or a [text, text_pair] pair" if pairs else "a text"
    raise APIError(422, f"input[{i}] must be {allowed}", param=f"input[{i}]")


def _max_tokens(asked: int | None, limits: Limits, *, default: int) -> int:
    if asked is not None and asked > limits.max_tokens:
        raise APIError(422, f"max_tokens={asked} exceeds the server's limit of {limits.max_tokens}", param="max_tokens")
    return asked or min(default, limits.max_tokens)


def _sampling(req: ChatRequest, max_new_tokens: int) -> GenerationConfig:
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if req.temperature == 0:  # OpenAI's convention: temperature 0 is greedy
        return GenerationConfig(max_new_tokens=max_new_tokens, stop_strings=stops)
    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=True,
        temperature=req.temperature,
        top_p=req.top_p,
        stop_strings=stops,
        seed=req.seed,
    )


def _batch_fn(served: Served):
    """The function a model's micro-batcher calls with the gathered items and the batch key (for decoders: the
    GenerationConfig, so that only requests with equal settings share a batch)."""
    if served.task == "classify":
        return lambda items, _key: served.classify(items)
    if served.task == "ner":
        return lambda items, _key: served.ner(items)
    if served.task == "embed":
        return lambda items, _key: served.embed(items)
    return served.translate if served.task == "translate" else served.complete


class _ChatStream:
    """One streamed reply: ``produce`` decodes in the model's thread (admitted through the model's queue), and
    ``events`` turns the pieces into server-sent events of OpenAI's chunk shape until the reply ends, the
    deadline passes (an error event of type timeout_error) or the client goes away."""

    def __init__(self, m: Served, prompt: list[int], cfg: GenerationConfig, loop: asyncio.AbstractEventLoop) -> None:
        self.m, self.prompt, self.cfg, self.loop = m, prompt, cfg, loop
        self.pieces: asyncio.Queue = asyncio.Queue()
        self.stop = threading.Event()  # set when the stream ends early: the decoding thread stops
        self.done = object()
        self.work: asyncio.Future | None = None

    def _put(self, item) -> None:
        self.loop.call_soon_threadsafe(self.pieces.put_nowait, item)

    def produce(self) -> None:
        try:
            for piece in self.m.stream(self.prompt, self.cfg):
                if self.stop.is_set():
                    break
                self._put(piece)
        except Exception as e:  # reported in the stream, the server goes on
            self._put(e)
        self._put(self.done)

    def _chunk(self, reply_id: str, created: int, delta: dict, finish: str | None = None) -> str:
        body = {
            "id": reply_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": self.m.name,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    async def events(self, reply_id: str, created: int, metrics: _Metrics, *, deadline: float) -> AsyncIterator[str]:
        started = time.perf_counter()
        text = []
        try:
            yield self._chunk(reply_id, created, {"role": "assistant", "content": ""})
            while True:
                try:
                    item = await asyncio.wait_for(self.pieces.get(), max(deadline - time.monotonic(), 0.0))
                except TimeoutError:
                    timeout = {
                        "message": "the reply did not finish within the server's timeout",
                        "type": "timeout_error",
                    }
                    yield f"data: {json.dumps({'error': timeout})}\n\n"
                    return
                if item is self.done:
                    break
                if isinstance(item, Exception):
                    yield f"data: {json.dumps({'error': {'message': str(item), 'type': 'server_error'}})}\n\n"
                    break
                text.append(item)
                yield self._chunk(reply_id, created, {"content": item})
            n = self.m.count_tokens(["".join(text)])
            metrics.tokens.labels(self.m.name).inc(n)
            metrics.tokens_per_s.labels(self.m.name).set(n / max(time.perf_counter() - started, 1e-9))
            yield self._chunk(reply_id, created, {}, "length" if n >= self.cfg.max_new_tokens else "stop")
            yield "data: [DONE]\n\n"
        finally:
            self.stop.set()
            if self.work is not None:
                self.work.cancel()  # still queued: it never starts; running: the thread stops at the next piece
