"""The HTTP side of the server (FastAPI): the OpenAI endpoints, the health check and the chat page.

    GET  /health                 503 while the model loads, then 200
    GET  /v1/models              the one model served
    POST /v1/chat/completions    a chat reply (the model's chat template), streamed as server-sent events or not
    POST /v1/completions         a completion of a prompt, likewise
    GET  /                       the chat page (llm/serve/static/chat.html)

Requests are checked (llm/serve/protocol.py), tokenized off the event loop, and handed to the `Engine`'s worker
thread; its events come back through the event loop's queue. A client that goes away (a closed stream, or a
non-streamed request whose connection closed) frees its row before the next decoding step.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import re
import time
import uuid
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from loguru import logger
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from llm.data.chat import encode_chat, stop_token_id
from llm.serve.engine import Engine, QueueFull
from llm.serve.engine import Request as EngineRequest
from llm.serve.protocol import APIError, Limits, Params, check_chat, check_completion, parse_json, shown

PAGE = Path(__file__).parent / "static" / "chat.html"


class ServerState:
    """What the endpoints serve: the model's name, the limits and key from the start; the engine, tokenizer and
    context once the model is loaded (`ready`); `failed` when loading failed."""

    def __init__(self, model_name: str, limits: Limits | None = None, api_key: str | None = None):
        self.model_name, self.limits, self.api_key = model_name, limits or Limits(), api_key or None
        self.engine: Engine | None = None
        self.tokenizer = None
        self.context = 0  # positions the model is meant for: prompt + completion at most
        self.created = int(time.time())
        self.failed: str | None = None

    def ready(self, engine: Engine, tokenizer, context: int) -> None:
        self.tokenizer, self.context = tokenizer, context
        self.has_template = bool(getattr(tokenizer, "chat_template", None))
        self.chat_stop = stop_token_id(tokenizer) if self.has_template else None
        self.engine = engine


def _page() -> tuple[str, str]:
    """The chat page and its Content-Security-Policy: its one inline script allowed by hash, nothing else."""
    html = PAGE.read_text(encoding="utf-8")
    scripts = re.findall(r"<script>(.*?)</script>", html, flags=re.S)
    hashes = " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(s.encode()).digest()).decode()}'" for s in scripts)
    csp = (
        f"default-src 'none'; script-src {hashes}; style-src 'unsafe-inline'; connect-src 'self'; "
        "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )
    return html, csp


def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="llm serve", docs_url=None, redoc_url=None, openapi_url=None)
    html, csp = _page()

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        message = f"{request.method} {request.url.path}: {e.detail}"
        return JSONResponse(APIError(e.status_code, message).body(), status_code=e.status_code)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        return JSONResponse(APIError(400, str(e)).body(), status_code=400)

    @app.exception_handler(Exception)
    async def crashed(request: Request, e: Exception):
        logger.exception(f"{request.method} {request.url.path} failed")
        return JSONResponse(APIError(500, f"internal error: {type(e).__name__}").body(), status_code=500)

    @app.get("/", include_in_schema=False)
    async def page():
        headers = {
            "Content-Security-Policy": csp,
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer",
        }
        return HTMLResponse(html, headers=headers)

    @app.get("/health")
    async def health():
        if state.engine is None:
            status = "failed: " + state.failed if state.failed else "loading"
            return JSONResponse({"status": status}, status_code=503)
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models(request: Request):
        _authorize(state, request)
        card = {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "llm"}
        if state.engine is not None:
            card["max_model_len"] = state.context
        return {"object": "list", "data": [card]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await _generate(state, request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _generate(state, request, chat=False)

    return app


def _authorize(state: ServerState, request: Request) -> None:
    """The Bearer key, compared in constant time, when the server has one."""
    if state.api_key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), state.api_key.encode()):
        raise APIError(401, "invalid or missing API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused (413) as soon as it is longer than `limit` bytes."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"the request body has {declared} bytes; the server takes at most {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"the request body has more than {limit} bytes; the server takes at most {limit}")
        chunks.append(chunk)
    return b"".join(chunks)


async def _generate(state: ServerState, request: Request, chat: bool):
    _authorize(state, request)
    if state.engine is None:
        raise APIError(503, "the model is still loading: retry when GET /health answers 200")
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/json":  # also keeps other web pages' plain form posts out (they cannot send JSON)
        raise APIError(400, f"Content-Type must be application/json, not {kind or 'none'!r}")
    body = parse_json(await _read_body(request, state.limits.max_body_bytes), state.limits)
    params = (check_chat if chat else check_completion)(body, state.limits)
    if params.model != state.model_name:
        raise APIError(404, f"the model {shown(params.model)} does not exist; this server has {state.model_name!r}",
                       "model", "model_not_found")  # fmt: skip
    if chat and not state.has_template:
        raise APIError(400, "this model's tokenizer has no chat template: use /v1/completions", "messages")
    ids = await run_in_threadpool(_encode, state, params, chat)
    max_tokens = _budget(state, params, len(ids), "messages" if chat else "prompt")
    stops = {state.chat_stop} if chat else {state.tokenizer.eos_token_id}
    queue: asyncio.Queue = asyncio.Queue()
    loop = asyncio.get_running_loop()

    def emit(*event) -> None:  # from the engine's thread
        try:
            loop.call_soon_threadsafe(queue.put_nowait, event)
        except RuntimeError:  # the loop has closed (the server is stopping)
            pass

    job = EngineRequest(
        ids, max_tokens, emit, frozenset(s for s in stops if s is not None), params.stop,
        params.temperature, params.top_p, params.top_k, params.seed,
    )  # fmt: skip
    try:
        state.engine.submit(job)
    except QueueFull as e:
        raise APIError(429, f"the server is busy ({e}); retry later", code="rate_limit_exceeded") from None
    reply = _Reply(state.model_name, chat)
    if params.stream:
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(_events(reply, queue, job, params), media_type="text/event-stream", headers=headers)
    return await _collect(reply, queue, job, request)


def _encode(state: ServerState, params: Params, chat: bool) -> list[int]:
    tokenizer = state.tokenizer
    if chat:
        try:
            return encode_chat(tokenizer, params.messages, add_generation_prompt=True)[0]
        except Exception as e:  # a template that refuses the conversation (e.g. roles that must alternate)
            message = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise APIError(400, f"the chat template refused the messages: {message}", "messages") from None
    return tokenizer(params.prompt, add_special_tokens=False)["input_ids"] or [tokenizer.bos_token_id]


def _budget(state: ServerState, params: Params, prompt: int, param: str) -> int:
    """max_tokens after checking the prompt against the context: the request's, or what the context leaves."""
    context = state.context
    if prompt >= context:
        raise APIError(400, f"the prompt has {prompt} tokens; the model's context is {context} tokens, and at least "
                       f"one must be left for the reply", param, "context_length_exceeded")  # fmt: skip
    if params.max_tokens is None:
        return min(state.limits.max_tokens, context - prompt)
    if prompt + params.max_tokens > context:
        raise APIError(400, f"the prompt has {prompt} tokens and max_tokens asks for {params.max_tokens} more: "
                       f"{prompt + params.max_tokens} in all, past the model's context of {context} tokens",
                       "max_tokens", "context_length_exceeded")  # fmt: skip
    return params.max_tokens


class _Reply:
    """The response objects of one request (ids, chunks, the final object)."""

    def __init__(self, model: str, chat: bool):
        self.model, self.chat, self.created = model, chat, int(time.time())
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex

    def _head(self, kind: str) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def chunk(self, text: str | None = None, finish: str | None = None, role: bool = False) -> str:
        if self.chat:
            delta = {"role": "assistant", "content": ""} if role else {} if text is None else {"content": text}
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            return _sse({**self._head("chat.completion.chunk"), "choices": [choice]})
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        return _sse({**self._head("text_completion"), "choices": [choice]})

    def usage_chunk(self, usage: dict) -> str:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return _sse({**self._head(kind), "choices": [], "usage": usage})

    def whole(self, text: str, finish: str, usage: dict) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None}
            return {**self._head("chat.completion"), "choices": [{**choice, "finish_reason": finish}], "usage": usage}
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        return {**self._head("text_completion"), "choices": [choice], "usage": usage}


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _events(reply: _Reply, queue: asyncio.Queue, job: EngineRequest, params: Params):
    """The server-sent events of a streamed reply: the role first (chat), text pieces, the finish reason, usage
    (stream_options.include_usage), an error as a final chunk, and always `data: [DONE]`."""
    try:
        if reply.chat:
            yield reply.chunk(role=True)
        while True:
            event = await queue.get()
            if event[0] == "text":
                yield reply.chunk(event[1])
            elif event[0] == "done":
                yield reply.chunk(finish=event[1])
                if params.include_usage:
                    yield reply.usage_chunk(event[2])
                break
            else:
                yield _sse(APIError(500, event[1]).body())
                break
        yield "data: [DONE]\n\n"
    finally:  # also when the client went away mid-stream: its row leaves the batch before the next step
        job.cancel()


async def _collect(reply: _Reply, queue: asyncio.Queue, job: EngineRequest, request: Request):
    """A non-streamed reply, waiting for the engine; the row is dropped if the client disconnects meanwhile."""
    parts, checked = [], time.monotonic()
    try:
        while True:
            try:
                event = await asyncio.wait_for(queue.get(), timeout=0.5)
            except asyncio.TimeoutError:
                event = None
            if time.monotonic() - checked > 0.5 or event is None:  # twice a second: is the client still there?
                checked = time.monotonic()
                if await request.is_disconnected():
                    return JSONResponse(APIError(499, "the client closed the request").body(), status_code=499)
            if event is None:
                continue
            if event[0] == "text":
                parts.append(event[1])
            elif event[0] == "done":
                return reply.whole("".join(parts), event[1], event[2])
            else:
                return JSONResponse(APIError(500, event[1]).body(), status_code=500)
    finally:
        job.cancel()
