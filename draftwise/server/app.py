"""The FastAPI app: routes, the guard in front of them, and ``serve``.

Endpoints: POST /v1/chat/completions, POST /v1/completions (``stream: true`` sends OpenAI's chunk
format as server-sent events ending with ``data: [DONE]``), GET /v1/models, GET /health and
GET /metrics (Prometheus text); /openapi.json publishes the request and response models.

Terms
- engine: one loaded model (plus draft); it serves one request at a time (batch size 1) on the
  worker thread, so the event loop never runs a model. Request bodies are parsed and tokenized on
  a thread too: a large body never stalls /health.
- guard: checks before any route runs: the Host header (DNS rebinding), the API key (every endpoint
  but /health), a JSON content type and the body size.
- extension field ``draftwise``: in a request, ``{"method": NAME, "method_opts": {...}}`` picks the
  method for this request; in a response it reports the method, τ and tokens/s.
"""
from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import time
import uuid
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from draftwise import methods
from draftwise.decoding import Stats
from draftwise.server import schema
from draftwise.server.requests import Policy, RequestError, check_method, load_body, parse
from draftwise.server.worker import Job, Metrics, Worker

MAX_BODY = 8 * 2**20             # bytes: ~1M tokens of text, far more than any context here
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
log = logging.getLogger("draftwise.server")


def _host_name(value: str) -> str:
    """'example.com:8000' -> 'example.com'; '[::1]:8000' -> '::1' (lower case)."""
    v = value.strip().lower()
    if v.startswith("["):
        return v[1:v.index("]")] if "]" in v else v
    return v.rsplit(":", 1)[0] if v.count(":") == 1 else v


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


class Guard:
    """ASGI middleware: Host, API key, content type and body size, answered in OpenAI's error format."""

    def __init__(self, app, host: str, api_key: str | None, allowed_hosts: tuple[str, ...], max_body: int,
                 metrics: Metrics):
        self.app, self.api_key, self.max_body, self.metrics = app, api_key, max_body, metrics
        self.any_host = "*" in allowed_hosts
        self.wildcard = host in ("0.0.0.0", "::", "")
        self.hosts = {h.lower() for h in allowed_hosts} | set(LOOPBACK_NAMES) | {host.lower()}

    def _refusal(self, scope) -> RequestError | None:
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope.get("headers", [])}
        name = _host_name(headers.get("host", ""))
        if not self.any_host and name not in self.hosts and not (self.wildcard and _is_ip(name)):
            return RequestError(400, "the Host header names a host this server does not serve (allow it with "
                                     "--allowed-host NAME)", code="invalid_host")
        path = scope.get("path", "")
        if self.api_key is not None and path != "/health":
            auth = headers.get("authorization", "")
            given = auth[7:] if auth[:7].lower() == "bearer " else ""
            if not hmac.compare_digest(given.encode(), self.api_key.encode()):
                return RequestError(401, "missing or invalid API key (send Authorization: Bearer KEY)",
                                    code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        if scope.get("method") == "POST" and path in schema.REQUESTS:
            ctype = headers.get("content-type", "").split(";")[0].strip().lower()
            if ctype != "application/json":
                return RequestError(415, "the request body must be JSON (Content-Type: application/json)")
            length = headers.get("content-length", "")
            if length.isdigit() and int(length) > self.max_body:
                return self._too_large()
        return None

    def _too_large(self) -> RequestError:
        return RequestError(413, f"the request body is larger than this server's limit of {self.max_body} bytes "
                                 "(--max-body)")

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            e = self._refusal(scope)
            if e is not None:
                self.metrics.requests.labels(scope.get("path", "")[:40], str(e.status)).inc()
                await JSONResponse(e.body(), status_code=e.status, headers=e.headers)(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 past ``limit`` bytes (also without a Content-Length)."""
    parts, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(413, f"the request body is larger than this server's limit of {limit} bytes "
                                    "(--max-body)")
        parts.append(chunk)
    return b"".join(parts)


class ClientGone(Exception):
    """The client disconnected before its answer was complete."""


async def _next(job: Job, request: Request):
    """The job's next event; a client that hung up (checked at most every 0.25 s, also while events keep
    coming) cancels the job: ClientGone."""
    while True:
        now = time.monotonic()
        if now - job.checked > 0.25:
            job.checked = now
            if await request.is_disconnected():
                job.cancel.set()
                raise ClientGone
        try:
            return await asyncio.wait_for(job.out.get(), timeout=0.25)
        except asyncio.TimeoutError:
            pass


def create_app(engine, method: str = "auto", method_opts: dict | None = None, max_queue: int = 64,
               timeout_s: float = 600.0, max_body: int = MAX_BODY, api_key: str | None = None,
               host: str = "127.0.0.1", allowed_hosts: tuple[str, ...] = (), allow_paths: tuple[str, ...] = ()):
    """The FastAPI app serving ``engine``; ``method`` is the default for requests that name none."""
    check_method(engine, method, method_opts)
    policy = Policy(method, method_opts, engine.model.max_len, tuple(Path(p) for p in allow_paths))
    metrics = Metrics()
    worker = Worker(engine, max_queue, metrics)
    app = FastAPI(title="draftwise", version="0.1", summary="OpenAI-compatible lossless speculative decoding")
    app.state.worker = worker
    app.add_middleware(Guard, host=host, api_key=api_key, allowed_hosts=tuple(allowed_hosts), max_body=max_body,
                       metrics=metrics)

    def error(e: RequestError, endpoint: str) -> JSONResponse:
        metrics.requests.labels(endpoint, str(e.status)).inc()
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    async def completion(request: Request, chat: bool):
        endpoint = "chat" if chat else "completions"
        try:
            raw = await _read_body(request, max_body)
            # JSON parsing and tokenization of a large body take seconds: off the event loop
            args = await asyncio.to_thread(lambda: parse(engine, load_body(raw), chat, policy))
            stream, include_usage = args.pop("stream"), args.pop("include_usage")
            job = Job(**args, deadline=time.monotonic() + timeout_s, loop=asyncio.get_running_loop())
            worker.submit(job)
            kind, val = await _next(job, request)          # "ready" once the drafter is built, or "reject"
            if kind == "reject":
                raise val
        except RequestError as e:
            return error(e, endpoint)
        except ClientGone:
            return Response(status_code=499)
        if kind == "done":                                 # cancelled before it started
            return Response(status_code=499)
        metrics.requests.labels(endpoint, "200").inc()
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        base = {"id": rid, "created": int(time.time()), "model": engine.model_id}
        prompt_tokens = len(job.ids)

        def usage(st: Stats) -> dict:
            return {"prompt_tokens": prompt_tokens, "completion_tokens": st.new_tokens,
                    "total_tokens": prompt_tokens + st.new_tokens}

        def ext(st: Stats, reason: str) -> dict:
            return {"method": job.method, "tau": round(st.tau, 4), "tokens_per_s": round(st.tokens_per_s, 3),
                    "target_passes": st.steps + (1 if st.new_tokens else 0), "stopped": reason,
                    "sources": dict(st.sources)}

        if not stream:
            parts = []
            try:
                while True:
                    kind, val = await _next(job, request)
                    if kind == "text":
                        parts.append(val)
                    elif kind == "error":
                        return error(RequestError(500, val, kind="server_error"), endpoint)
                    else:
                        break
            except ClientGone:
                return Response(status_code=499)
            st, reason = val["stats"], val["finish_reason"]
            if reason == "deadline" and not parts:
                return error(RequestError(504, f"the request's deadline ({timeout_s:g} s, --timeout) passed before "
                                               "the first token", kind="timeout_error"), endpoint)
            text = "".join(parts)
            fin = "length" if reason in ("deadline", "cancelled") else reason
            if chat:
                ch = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": fin}
            else:
                ch = {"index": 0, "text": text, "logprobs": None, "finish_reason": fin}
            return JSONResponse({**base, "object": "chat.completion" if chat else "text_completion", "choices": [ch],
                                 "usage": usage(st), "draftwise": ext(st, reason)})

        obj = "chat.completion.chunk" if chat else "text_completion"

        def choice(text: str | None, reason: str | None, first: bool = False) -> dict:
            if chat:
                delta = {"role": "assistant", "content": ""} if first else ({} if text is None else {"content": text})
                return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}

        def sse(d: dict) -> str:
            return f"data: {json.dumps(d)}\n\n"

        async def events():
            try:
                if chat:
                    yield sse({**base, "object": obj, "choices": [choice(None, None, first=True)]})
                while True:
                    kind, val = await job.out.get()
                    if kind == "text":
                        yield sse({**base, "object": obj, "choices": [choice(val, None)]})
                    elif kind == "error":
                        yield sse(RequestError(500, val, kind="server_error").body())
                        break
                    else:
                        st, reason = val["stats"], val["finish_reason"]
                        fin = "length" if reason in ("deadline", "cancelled") else reason
                        yield sse({**base, "object": obj, "choices": [choice(None, fin)], "draftwise": ext(st, reason)})
                        if include_usage:
                            yield sse({**base, "object": obj, "choices": [], "usage": usage(st)})
                        break
                yield "data: [DONE]\n\n"
            finally:
                job.cancel.set()         # a client that went away frees the engine at the next step

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    errors = {code: {"model": schema.ErrorResponse, "description": what} for code, what in (
        (400, "invalid request"), (401, "missing or invalid API key"), (413, "body too large"),
        (415, "not JSON"), (503, "queue full (Retry-After)"), (504, "deadline passed before the first token"))}

    def answers(model) -> dict:
        return {200: {"model": model, "description": "the completion (JSON), or with stream: true server-sent "
                                                     "events of chunks ending with data: [DONE]",
                      "content": {"text/event-stream": {"schema": {
                          "type": "object", "description": "one server-sent event: data is a chunk's JSON or [DONE]",
                          "properties": {"data": {"type": "string"}, "event": {"type": "string"}}}}}}, **errors}

    @app.post("/v1/chat/completions", responses=answers(schema.ChatCompletion))
    async def chat_completions(request: Request):
        return await completion(request, chat=True)

    @app.post("/v1/completions", responses=answers(schema.Completion))
    async def completions(request: Request):
        return await completion(request, chat=False)

    @app.get("/v1/models", response_model=schema.ModelList)
    async def models():
        return {"object": "list", "data": [{"id": engine.model_id, "object": "model", "created": 0,
                                            "owned_by": "draftwise"}]}

    @app.get("/health", response_model=schema.Health)
    async def health():
        return {"status": "ok", "model": engine.model_id, "queued": worker.waiting, "busy": worker.busy}

    @app.get("/metrics", response_class=Response,
             responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                              "description": "Prometheus text format"}})
    async def prometheus():
        data, ctype = metrics.text()
        return Response(data, media_type=ctype)

    _publish_request_models(app, secured=api_key is not None, custom=getattr(engine, "custom_methods", frozenset()),
                            has_draft=getattr(engine, "draft_model", None) is not None)
    return app


def _publish_request_models(app: FastAPI, secured: bool, custom: frozenset[str], has_draft: bool) -> None:
    """/openapi.json with the request bodies (parsed by hand, so FastAPI cannot see them) and the key scheme."""
    from fastapi.openapi.utils import get_openapi

    def build() -> dict:
        if app.openapi_schema:
            return app.openapi_schema
        doc = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
        comps = doc.setdefault("components", {}).setdefault("schemas", {})
        for path, model in schema.REQUESTS.items():
            js = model.model_json_schema(ref_template="#/components/schemas/{model}")
            comps.update(js.pop("$defs", {}))
            comps[model.__name__] = js
            doc["paths"][path]["post"]["requestBody"] = {
                "required": True, "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/"
                                                                                      f"{model.__name__}"}}}}
        method = comps["DraftwiseRequest"]["properties"]["method"]
        runnable = {sp.name for sp in methods.specs() if "draft_model" not in sp.resources or has_draft} | set(custom)
        method["anyOf"] = [{"type": "string", "enum": sorted(runnable)}, {"type": "null"}]
        err = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}
        for path, ops in doc["paths"].items():
            for op in ops.values():
                op["responses"].setdefault("400", {**err, "description": "invalid request or Host header"})
                if secured and path != "/health":
                    op["security"] = [{"bearer": []}]
                    op["responses"].setdefault("401", {**err, "description": "missing or invalid API key"})
        if secured:
            doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        app.openapi_schema = doc
        return doc

    app.openapi = build


def serve(engine, host: str = "127.0.0.1", port: int = 8000, **kw) -> None:
    import uvicorn

    if kw.get("api_key") is None and not _loopback(host):
        log.warning("draftwise: serving on %s without --api-key: anyone who can reach this address can use the "
                    "model (set --api-key or DRAFTWISE_API_KEY)", host)
        print(f"draftwise: WARNING: serving on {host} without --api-key: anyone who can reach this address can use "
              "the model (set --api-key or DRAFTWISE_API_KEY)", flush=True)
    uvicorn.run(create_app(engine, host=host, **kw), host=host, port=port, log_level="info")


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
