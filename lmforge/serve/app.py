"""The HTTP API (FastAPI) and the web page: handlers over the served models, no model code.

Endpoints: ``POST /v1/classify``, ``/v1/ner``, ``/v1/translate`` (``{"model", "input": [...]}`` ->
``{"model", "data": [...]}``), ``/v1/explain`` (``{"model", "input", "method", "label", "steps"}``: token
attributions, ``explain/``), ``/v1/embeddings``, ``/v1/chat/completions`` and ``/v1/completions`` (decoders;
with ``echo`` and ``logprobs`` the prompt's token log-probabilities, what lm-evaluation-harness's
``local-completions`` scores with) in OpenAI's request and response shapes (chat's ``stream: true`` as server-sent
events ending in ``data: [DONE]``), ``GET /v1/models``, ``/healthz``, ``/metrics`` (Prometheus text) and the
page at ``/``. The OpenAPI schema is at ``/openapi.json``.

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
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.routing import APIRoute
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmforge.errors import UserError
from lmforge.inference.config import GenerationConfig
from lmforge.serve.batching import MicroBatcher, QueueFull
from lmforge.serve.errors import BODY_CUT, APIError, BodyLimit, error_response
from lmforge.serve.limits import Limits
from lmforge.serve.models import CHAT, CLASSIFY, COMPLETIONS, EMBEDDINGS, NER, TRANSLATE, Served
from lmforge.serve.schema import (
    ChatRequest,
    CompletionRequest,
    EmbeddingRequest,
    ExplainRequest,
    InputRequest,
    TranslateRequest,
    param_path,
)

__all__ = ["Limits", "create_app"]


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


class _Gateway:
    """The served models with their batchers and limits: how a handler reaches a model (404 / 400 / 503 / 504)."""

    def __init__(self, models: dict[str, Served], limits: Limits, metrics: _Metrics) -> None:
        self.models, self.limits, self.metrics = models, limits, metrics
        self.batchers: dict[str, MicroBatcher] = {}
        for name, served in models.items():
            self.batchers[name] = MicroBatcher(
                served.batch_call(),
                max_batch=limits.max_batch,
                max_wait_ms=limits.max_wait_ms,
                queue_size=limits.queue_size,
                on_batch=metrics.batch.labels(name).observe,
            )
            metrics.queue.labels(name).set_function(lambda b=self.batchers[name]: b.depth)

    def served(self, name: str, route: str | None = None) -> Served:
        """The model called ``name``, which must be served on ``route`` (None: any model)."""
        if name not in self.models:
            served = ", ".join(self.models)
            raise APIError(
                404, f"model {name!r} is not served; served: {served}", param="model", kind="not_found_error"
            )
        m = self.models[name]
        if route is not None and m.route != route:
            raise APIError(400, f"model {name!r} serves {m.route} ({m.run.task_name}), not {route}", param="model")
        return m

    def _busy(self, name: str) -> APIError:
        return APIError(
            503, f"model {name!r} is busy: its queue is full", kind="overloaded_error", headers={"Retry-After": "1"}
        )

    def _timeout(self) -> APIError:
        return APIError(504, f"no answer within {self.limits.timeout_s:g} s", kind="timeout_error")

    async def submit(self, name: str, items: list, key: Any = None) -> list:
        """Answers to ``items``, batched with other requests of the same model and ``key``."""
        try:
            return await asyncio.wait_for(self.batchers[name].submit(items, key), self.limits.timeout_s)
        except QueueFull:
            raise self._busy(name) from None
        except TimeoutError:
            raise self._timeout() from None
        except ValueError as e:
            raise APIError(422, str(e)) from None

    def admit(self, name: str, fn) -> asyncio.Future:
        """Queue ``fn`` to run alone in the model's thread (503 when the queue is full)."""
        try:
            return self.batchers[name].submit_call(fn)
        except QueueFull:
            raise self._busy(name) from None

    async def call_alone(self, name: str, fn) -> Any:
        try:
            return await asyncio.wait_for(self.admit(name, fn), self.limits.timeout_s)
        except TimeoutError:
            raise self._timeout() from None

    async def stop(self) -> None:
        for b in self.batchers.values():  # graceful shutdown: finish what is queued
            await b.stop()


def create_app(models: dict[str, Served], limits: Limits | None = None) -> FastAPI:
    """The API over ``models`` (name -> loaded model) with ``limits``."""
    limits = limits or Limits()
    gateway = _Gateway(models, limits, _Metrics())

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        await gateway.stop()

    about = "Classification, NER, translation, embeddings and chat over lmforge run directories."
    # no /docs or /redoc: their pages load scripts from a CDN, and everything here works offline
    app = FastAPI(title="lmforge", version="1", lifespan=lifespan, description=about, docs_url=None, redoc_url=None)
    app.state.models, app.state.limits = models, limits
    _add_error_handlers(app)
    _add_guard(app, gateway)
    _add_info_routes(app, gateway)
    _add_encoder_routes(app, gateway)
    _add_explain_route(app, gateway)
    _add_chat_route(app, gateway)
    _add_completions_route(app, gateway)
    page = resources.files("lmforge.serve") / "static"
    app.mount("/", StaticFiles(directory=str(page), html=True), name="page")
    app.add_middleware(
        BodyLimit, max_bytes=limits.max_body_bytes, read_timeout_s=limits.body_timeout_s
    )  # outermost of ours: before any byte is parsed
    return app


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _apierror_response(_request: Request, e: APIError) -> JSONResponse:
        return error_response(e.status, e.message, param=e.param, kind=e.kind, headers=e.headers)

    @app.exception_handler(StarletteHTTPException)  # FastAPI's and Starlette's own (body limit, bad body, 404)
    async def _httperror_response(_request: Request, e: StarletteHTTPException) -> JSONResponse:
        return error_response(e.status_code, str(e.detail), headers=getattr(e, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, e: RequestValidationError) -> JSONResponse:
        errors = e.errors()
        if errors[0]["type"] == "json_invalid":  # its location is a character offset in the body, not a field
            at = errors[0]["loc"][-1]
            return error_response(422, f"the body is not valid JSON (at character {at}): {errors[0]['msg']}")
        # a value that fails our own check says more than "not a valid string" from another branch of a union
        first = next((x for x in errors if x["type"] == "value_error"), errors[0])
        param = param_path(first["loc"])
        return error_response(422, f"{param}: {first['msg']}", param=param or None)


def _add_guard(app: FastAPI, gateway: _Gateway) -> None:
    """The API key, a 500 for a request that raised (never the server), and the request metrics."""
    limits, metrics = gateway.limits, gateway.metrics

    @app.middleware("http")
    async def _guard(request: Request, call_next):
        started = time.perf_counter()
        path = request.url.path
        endpoint = path if path.startswith("/v1/") or path in ("/healthz", "/metrics") else "page"
        guarded = path.startswith("/v1/") or path == "/metrics"  # the models' paths and the server's load
        if limits.api_key and guarded and not _authorised(request, limits.api_key):
            message = "missing or wrong API key: send 'Authorization: Bearer KEY'"
            response = error_response(401, message, kind="authentication_error")
        elif request.method != "POST" and path in _post_only(app):  # else the page's static files answer 404
            response = error_response(405, f"{path} takes POST", headers={"Allow": "POST"})
        else:
            try:
                response = await call_next(request)
            except Exception as e:  # never take the server down
                response = error_response(500, f"internal error: {type(e).__name__}: {e}", kind="server_error")
        status = 413 if request.scope.get(BODY_CUT) else response.status_code  # BodyLimit answered, not the app
        metrics.requests.labels(endpoint, str(status)).inc()
        metrics.latency.labels(endpoint).observe(time.perf_counter() - started)
        return response


def _post_only(app: FastAPI) -> set[str]:
    """The paths of the API's POST routes."""
    return {r.path for r in app.routes if isinstance(r, APIRoute) and r.methods == {"POST"}}


def _add_info_routes(app: FastAPI, gateway: _Gateway) -> None:
    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok", "models": len(gateway.models)}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(gateway.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def list_models() -> dict:
        return {"object": "list", "data": [m.info() for m in gateway.models.values()]}


def _add_encoder_routes(app: FastAPI, gateway: _Gateway) -> None:
    limits = gateway.limits

    @app.post(CLASSIFY)
    async def classify(req: InputRequest) -> dict:
        m = gateway.served(req.model, CLASSIFY)
        examples = [_example(x, i, pairs=True) for i, x in enumerate(_inputs(req.input, limits))]
        return {"model": m.name, "data": await gateway.submit(m.name, examples)}

    @app.post(NER)
    async def ner(req: InputRequest) -> dict:
        m = gateway.served(req.model, NER)
        examples = [_example(x, i, pairs=False) for i, x in enumerate(_inputs(req.input, limits))]
        return {"model": m.name, "data": await gateway.submit(m.name, examples)}

    @app.post(TRANSLATE)
    async def translate(req: TranslateRequest) -> dict:
        m = gateway.served(req.model, TRANSLATE)
        texts = [_example(x, i, pairs=False)["text"] for i, x in enumerate(_inputs(req.input, limits))]
        cap = _max_tokens(req.max_tokens, limits, default=m.task.max_len)
        key = GenerationConfig(num_beams=req.num_beams, max_new_tokens=cap)
        translations = await gateway.submit(m.name, texts, key=key)
        return {"model": m.name, "data": [{"translation": t} for t in translations]}

    @app.post(EMBEDDINGS)
    async def embeddings(req: EmbeddingRequest) -> dict:
        m = gateway.served(req.model, EMBEDDINGS)
        texts = [_example(x, i, pairs=False)["text"] for i, x in enumerate(_inputs(req.input, limits))]
        vectors = await gateway.submit(m.name, texts)
        n = m.count_tokens(texts)
        if req.encoding_format == "base64":
            vectors = [base64.b64encode(np.asarray(v, dtype="<f4").tobytes()).decode("ascii") for v in vectors]
        data = [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)]
        return {"object": "list", "model": m.name, "data": data, "usage": {"prompt_tokens": n, "total_tokens": n}}


def _add_explain_route(app: FastAPI, gateway: _Gateway) -> None:
    limits = gateway.limits

    @app.post("/v1/explain")
    async def explain(req: ExplainRequest) -> dict:
        m = gateway.served(req.model)
        explaining = m.entry.explaining
        if explaining is None:
            raise APIError(400, f"model {req.model!r} ({m.run.task_name}) is not explained", param="model")
        if isinstance(req.input, list) and not req.input:
            raise APIError(422, "input is empty: give a text (or a [text, text_pair] pair)", param="input")
        items = _inputs([req.input], limits)
        example = _example(items[0], 0, pairs=explaining.inputs != "text")
        if explaining.inputs == "pair" and "text_pair" not in example:
            raise APIError(
                422, "an embedding model explains the similarity of two texts: [text, text_pair]", param="input"
            )
        if not explaining.label and req.label is not None:
            raise APIError(
                422, f"label is for classification models; {req.model!r} serves {m.run.task_name}", param="label"
            )
        try:
            data = await gateway.call_alone(
                m.name, lambda: m.explain(example, method=req.method, label=req.label, steps=req.steps)
            )
        except UserError as e:
            raise _as_api_error(e) from None
        return {"model": m.name, "method": req.method, "data": data}


def _as_api_error(e: UserError) -> APIError:
    """A refusal of the explainer in the API's words: the command line's --method / --label / --baseline are the
    request's fields method / label / baseline (named in ``param``)."""
    message, param = str(e), None
    for field in ("method", "label", "baseline", "steps"):
        if f"--{field}" in message:
            message, param = message.replace(f"--{field}", field), param or field
    return APIError(422, message, param=param)


def _add_chat_route(app: FastAPI, gateway: _Gateway) -> None:
    limits, metrics = gateway.limits, gateway.metrics

    @app.post(CHAT, response_model=None)
    async def chat(req: ChatRequest) -> dict | StreamingResponse:
        m = gateway.served(req.model, CHAT)
        _check_message_sizes(req, limits)
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
            stream.work = gateway.admit(m.name, stream.produce)  # a queue slot before the response: 503 is a status
            events = stream.events(reply_id, created, metrics, deadline=time.monotonic() + limits.timeout_s)
            return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        started = time.perf_counter()
        if cfg.do_sample and cfg.seed is not None:  # alone: its draws must not depend on what it is batched with
            (reply,) = await gateway.call_alone(m.name, lambda: m.complete([prompt], cfg))
        else:
            (reply,) = await gateway.submit(m.name, [prompt], key=cfg)  # equal settings decode together
        seconds = time.perf_counter() - started
        metrics.tokens.labels(m.name).inc(len(reply.token_ids))
        metrics.tokens_per_s.labels(m.name).set(len(reply.token_ids) / max(seconds, 1e-9))
        return _completion(reply_id, created, m.name, prompt, reply)


def _add_completions_route(app: FastAPI, gateway: _Gateway) -> None:
    limits = gateway.limits

    @app.post(COMPLETIONS)
    async def completions(req: CompletionRequest) -> dict:
        m = gateway.served(req.model)
        if not m.entry.language_model:
            what = f"model {req.model!r} serves {m.route} ({m.run.task_name}), not {COMPLETIONS}"
            raise APIError(400, what, param="model")
        prompts = _prompt_ids(req, m, limits)
        if req.max_tokens == 0 and not req.echo:
            message = "max_tokens=0 generates nothing: pass echo=true to score the prompt"
            raise APIError(422, message, param="max_tokens")
        _max_tokens(req.max_tokens, limits, default=0)  # 422 above the server's limit
        window = m.model.cfg.max_seq_len
        for i, prompt in enumerate(prompts):
            if len(prompt) + req.max_tokens > window:
                what = f"prompt[{i}] has {len(prompt)} tokens; with max_tokens={req.max_tokens} it passes the window"
                raise APIError(413, f"{what} of {window} tokens", param="prompt")
        cfg = _sampling(req, req.max_tokens)
        choices, n_new = await gateway.call_alone(
            m.name, lambda: m.completions(prompts, cfg, echo=req.echo, top=req.logprobs)
        )
        n_prompt = sum(len(p) for p in prompts)
        return {
            "id": f"cmpl-{uuid.uuid4().hex[:24]}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": m.name,
            "choices": choices,
            "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_new, "total_tokens": n_prompt + n_new},
        }


def _prompt_ids(req: CompletionRequest, m: Served, limits: Limits) -> list[list[int]]:
    """The prompts as token-id lists: texts encoded (with the tokenizer's special tokens, as a text prompt is read
    elsewhere), ids checked against the vocabulary; at most ``limits.max_inputs`` prompts."""
    raw = req.prompt
    prompts = [raw] if isinstance(raw, str) or (raw and isinstance(raw[0], int)) else list(raw)
    if not prompts:
        raise APIError(422, "prompt is empty: give a text or token ids", param="prompt")
    if len(prompts) > limits.max_inputs:
        raise APIError(413, f"prompt has {len(prompts)} items; the limit is {limits.max_inputs}", param="prompt")
    tok, vocab = m.task.tokenizer, m.model.cfg.vocab_size
    out = []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, str):
            if len(prompt) > limits.max_text_chars:
                what = f"prompt[{i}] has {len(prompt)} characters; the limit is {limits.max_text_chars}"
                raise APIError(413, what, param="prompt")
            prompt = tok.encode(prompt, special_tokens=True)
        bad = next((t for t in prompt if not 0 <= t < vocab), None)
        if bad is not None:
            raise APIError(422, f"prompt[{i}] has token id {bad}; ids are 0..{vocab - 1}", param="prompt")
        if not prompt:
            raise APIError(422, f"prompt[{i}] is empty", param="prompt")
        out.append(list(prompt))
    return out


def _check_message_sizes(req: ChatRequest, limits: Limits) -> None:
    for i, message in enumerate(req.messages):
        if len(message.content) > limits.max_text_chars:
            raise APIError(
                413,
                f"messages[{i}].content has {len(message.content)} characters; the limit is {limits.max_text_chars}",
                param=f"messages.{i}.content",
            )


def _completion(reply_id: str, created: int, model: str, prompt: list[int], reply) -> dict:
    """A chat.completion object in OpenAI's shape."""
    n_prompt, n_reply = len(prompt), len(reply.token_ids)
    finish = "length" if reply.finish_reason == "length" else "stop"
    choice = {"index": 0, "message": {"role": "assistant", "content": reply.text.strip()}, "finish_reason": finish}
    usage = {"prompt_tokens": n_prompt, "completion_tokens": n_reply, "total_tokens": n_prompt + n_reply}
    return {
        "id": reply_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [choice],
        "usage": usage,
    }


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


def _sampling(req: ChatRequest | CompletionRequest, max_new_tokens: int) -> GenerationConfig:
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
