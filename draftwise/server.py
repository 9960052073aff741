"""OpenAI-compatible HTTP server: ``draftwise serve --model M [--method NAME]``.

Endpoints: POST /v1/chat/completions, POST /v1/completions (``stream: true`` sends OpenAI's chunk
format as server-sent events ending with ``data: [DONE]``), GET /v1/models, GET /health and
GET /metrics (Prometheus text).

Terms
- engine: one loaded model (plus draft); it serves one request at a time (batch size 1).
- worker: the thread that runs generation, so the event loop never blocks. Requests wait in
  arrival order in a bounded queue; a full queue answers 503 with Retry-After.
- job: one request's generation. Its text pieces cross from the worker to the event loop
  through an asyncio queue; ``cancel`` (a client that went away, or the deadline) stops it at
  the next decoding step and frees the engine.
- extension field ``draftwise``: in a request, ``{"method": NAME, "method_opts": {...}}`` picks the
  method for this request; in a response it reports the method, τ and tokens/s.
"""
from __future__ import annotations

import asyncio
import json
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from draftwise import methods as registry
from draftwise.decoding import Stats
from draftwise.errors import DraftwiseError

UNSUPPORTED = ("logprobs", "top_logprobs", "tools", "tool_choice", "functions", "function_call", "logit_bias",
               "best_of", "echo", "suffix", "audio", "modalities", "prediction")
MAX_STOP = 4


class RequestError(Exception):
    """A request the server refuses: HTTP status + OpenAI-style error body."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.headers = status, message, param, kind, headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": None}}


@dataclass
class Job:
    ids: list[int]
    method: str
    method_opts: dict | None
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stop: list[str] | None
    deadline: float                                   # time.monotonic() after which generation stops
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue = field(default_factory=asyncio.Queue)   # ("text", str) | ("done", dict) | ("error", str)
    cancel: threading.Event = field(default_factory=threading.Event)


class Worker:
    """Runs jobs one at a time, in arrival order, on its own thread."""

    def __init__(self, engine, max_queue: int, metrics: "Metrics"):
        self.engine, self.max_queue, self.metrics = engine, max_queue, metrics
        self.q: queue.Queue[Job] = queue.Queue()
        self.lock = threading.Lock()
        self.waiting = 0
        self.busy = False
        threading.Thread(target=self._loop, name="draftwise-worker", daemon=True).start()

    def submit(self, job: Job) -> None:
        with self.lock:
            if self.waiting >= self.max_queue:
                raise RequestError(503, f"the server is busy ({self.waiting} requests queued); retry shortly",
                                   kind="server_busy", headers={"Retry-After": "2"})
            self.waiting += 1
            self.metrics.queue.set(self.waiting)
        self.q.put(job)

    def _loop(self) -> None:
        while True:
            job = self.q.get()
            with self.lock:
                self.waiting -= 1
                self.metrics.queue.set(self.waiting)
                self.busy = True
            try:
                self._run(job)
            finally:
                self.busy = False

    def _run(self, job: Job) -> None:
        def push(item):
            job.loop.call_soon_threadsafe(job.out.put_nowait, item)

        if job.cancel.is_set():
            push(("done", {"finish_reason": "cancelled", "stats": Stats()}))
            return
        stats = Stats()
        reason = None
        gen = self.engine.stream(job.ids, method=job.method, method_opts=job.method_opts, max_new_tokens=job.max_tokens,
                                 temperature=job.temperature, top_p=job.top_p, seed=job.seed, stop=job.stop,
                                 stats=stats)
        try:
            for piece in gen:
                push(("text", piece))
                if job.cancel.is_set():
                    reason = "cancelled"
                    break
                if time.monotonic() > job.deadline:
                    reason = "deadline"
                    break
        except DraftwiseError as e:
            push(("error", str(e)))
            return
        except Exception as e:                          # noqa: BLE001 - report, keep serving
            push(("error", f"internal error: {type(e).__name__}: {e}"))
            return
        finally:
            gen.close()
        if reason is None:
            reason = "stop" if stats.stop_reason in ("eos", "stop") else "length"
        self.metrics.record(job.method, stats)
        push(("done", {"finish_reason": reason, "stats": stats}))


class Metrics:
    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge

        self.registry = CollectorRegistry()
        self.requests = Counter("draftwise_requests", "HTTP requests", ["endpoint", "status"], registry=self.registry)
        self.queue = Gauge("draftwise_queue_depth", "requests waiting for the engine", registry=self.registry)
        self.tokens = Counter("draftwise_generated_tokens", "tokens generated", ["method"], registry=self.registry)
        self.passes = Counter("draftwise_target_passes", "target forward passes", ["method"], registry=self.registry)
        self.seconds = Counter("draftwise_generation_seconds", "seconds spent generating", ["method"],
                               registry=self.registry)
        self.tps = Gauge("draftwise_tokens_per_second", "tokens/s of the latest request", ["method"],
                         registry=self.registry)
        self.tau = Gauge("draftwise_tau", "tokens per target pass of the latest request", ["method"],
                         registry=self.registry)

    def record(self, method: str, st: Stats) -> None:
        self.tokens.labels(method).inc(st.new_tokens)
        self.passes.labels(method).inc(st.steps + 1)
        self.seconds.labels(method).inc(st.wall_s)
        self.tps.labels(method).set(st.tokens_per_s)
        self.tau.labels(method).set(st.tau)

    def text(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


# ---------------------------------------------------------------------------- request parsing
def _number(body: dict, name: str, default, lo: float, hi: float, kind=(int, float)):
    v = body.get(name, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, kind) or not lo <= v <= hi:
        raise RequestError(400, f"'{name}' must be a number in [{lo}, {hi}], got {v!r}", name)
    return v


def parse(engine, body: Any, chat: bool, default_method: str, default_opts: dict | None,
          context: int) -> dict:
    """Validate an OpenAI request body; returns the job's arguments. RequestError on anything wrong."""
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object")
    model = body.get("model")
    if model is not None and model not in (engine.model_id, "default"):
        raise RequestError(400, f"unknown model {model!r}; this server serves {engine.model_id!r}", "model")
    for name in UNSUPPORTED:
        if body.get(name) not in (None, False):
            raise RequestError(400, f"'{name}' is not supported by draftwise", name)
    if body.get("n", 1) != 1:
        raise RequestError(400, "only n = 1 is supported (one completion per request)", "n")
    for name in ("presence_penalty", "frequency_penalty"):
        if body.get(name) not in (None, 0, 0.0):
            raise RequestError(400, f"'{name}' is not supported (it would change the output distribution)", name)
    if chat:
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise RequestError(400, "'messages' must be a non-empty list", "messages")
        clean = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") \
                    or not isinstance(m.get("content"), str):
                raise RequestError(400, f"messages[{i}] needs a role (system, user or assistant) and string content",
                                   "messages")
            clean.append({"role": m["role"], "content": m["content"]})
        try:
            ids = engine.encode_messages(clean)
        except DraftwiseError as e:
            raise RequestError(400, str(e), "messages") from None
    else:
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise RequestError(400, "'prompt' must be a non-empty string", "prompt")
        ids = engine.encode(prompt)
    if len(ids) >= context:
        raise RequestError(400, f"the prompt has {len(ids)} tokens; this server's context is {context}", "messages"
                           if chat else "prompt")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is None:
        max_tokens = context - len(ids)
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise RequestError(400, f"'max_tokens' must be a positive integer, got {max_tokens!r}", "max_tokens")
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and (not isinstance(stop, list) or len(stop) > MAX_STOP
                             or not all(isinstance(s, str) and s for s in stop)):
        raise RequestError(400, f"'stop' must be a string or a list of at most {MAX_STOP} non-empty strings", "stop")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise RequestError(400, f"'seed' must be an integer, got {seed!r}", "seed")
    ext = body.get("draftwise") or {}
    if not isinstance(ext, dict):
        raise RequestError(400, "'draftwise' must be an object like {\"method\": \"lookup\"}", "draftwise")
    method = ext.get("method", default_method)
    opts = ext.get("method_opts", default_opts if method == default_method else None)
    try:
        check_method(engine, method, opts)
    except DraftwiseError as e:
        raise RequestError(400, str(e), "draftwise") from None
    stream_opts = body.get("stream_options") or {}
    return {"ids": ids, "method": method, "method_opts": opts, "max_tokens": min(max_tokens, context - len(ids)),
            "temperature": float(_number(body, "temperature", 0.0, 0.0, 2.0)),
            "top_p": float(_number(body, "top_p", 1.0, 1e-9, 1.0)), "seed": seed, "stop": stop,
            "stream": bool(body.get("stream", False)),
            "include_usage": bool(isinstance(stream_opts, dict) and stream_opts.get("include_usage"))}


def check_method(engine, method: str, opts: dict | None) -> None:
    """ConfigError unless the engine can run `method` with `opts` (cheap: builds no drafter)."""
    from draftwise.errors import ConfigError

    if method in getattr(engine, "_custom", {}):
        if opts:
            raise ConfigError(f"method {method!r} is a registered instance and takes no options")
        return
    spec = registry.get(method)
    if "draft_model" in spec.requires(spec.validate(opts)) and getattr(engine, "draft_model", None) is None:
        raise ConfigError(f"method {method!r} needs a draft model; start the server with --draft NAME")


# ---------------------------------------------------------------------------- app
def create_app(engine, method: str = "ar", method_opts: dict | None = None, max_queue: int = 64,
               timeout_s: float = 600.0):
    """The FastAPI app serving ``engine``; ``method`` is the default for requests that name none."""
    check_method(engine, method, method_opts)
    metrics = Metrics()
    worker = Worker(engine, max_queue, metrics)
    context = engine.model.max_len
    app = FastAPI(title="draftwise", version="0.1")
    app.state.worker = worker

    def error(e: RequestError, endpoint: str) -> JSONResponse:
        metrics.requests.labels(endpoint, str(e.status)).inc()
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    async def completion(request: Request, chat: bool):
        endpoint = "chat" if chat else "completions"
        try:
            try:
                body = json.loads(await request.body())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise RequestError(400, f"the request body is not valid JSON: {e}") from None
            args = parse(engine, body, chat, method, method_opts, context)
            stream, include_usage = args.pop("stream"), args.pop("include_usage")
            job = Job(**args, deadline=time.monotonic() + timeout_s, loop=asyncio.get_running_loop())
            worker.submit(job)
        except RequestError as e:
            return error(e, endpoint)
        metrics.requests.labels(endpoint, "200").inc()
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        base = {"id": rid, "created": created, "model": engine.model_id}
        prompt_tokens = len(job.ids)

        def usage(st: Stats) -> dict:
            return {"prompt_tokens": prompt_tokens, "completion_tokens": st.new_tokens,
                    "total_tokens": prompt_tokens + st.new_tokens}

        def ext(st: Stats, reason: str) -> dict:
            return {"method": job.method, "tau": round(st.tau, 4), "tokens_per_s": round(st.tokens_per_s, 3),
                    "target_passes": st.steps + 1, "stopped": reason}

        def choice(text: str | None, reason: str | None, first: bool = False) -> dict:
            if chat:
                delta = {"role": "assistant", "content": ""} if first else ({} if text is None else {"content": text})
                return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}

        if not stream:
            parts = []
            try:
                while True:
                    kind, val = await job.out.get()
                    if kind == "text":
                        parts.append(val)
                    elif kind == "error":
                        return error(RequestError(500, val, kind="server_error"), endpoint)
                    else:
                        break
            except asyncio.CancelledError:
                job.cancel.set()
                raise
            st, reason = val["stats"], val["finish_reason"]
            text = "".join(parts)
            fin = "length" if reason in ("deadline", "cancelled") else reason
            if chat:
                ch = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": fin}
                obj = "chat.completion"
            else:
                ch = {"index": 0, "text": text, "logprobs": None, "finish_reason": fin}
                obj = "text_completion"
            return JSONResponse({**base, "object": obj, "choices": [ch], "usage": usage(st),
                                 "draftwise": ext(st, reason)})

        obj = "chat.completion.chunk" if chat else "text_completion"

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

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await completion(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await completion(request, chat=False)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": engine.model_id, "object": "model", "created": 0,
                                            "owned_by": "draftwise"}]}

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": engine.model_id, "queued": worker.waiting, "busy": worker.busy}

    @app.get("/metrics")
    async def prometheus():
        data, ctype = metrics.text()
        return Response(data, media_type=ctype)

    return app


def serve(engine, host: str = "127.0.0.1", port: int = 8000, **kw) -> None:
    import uvicorn

    uvicorn.run(create_app(engine, **kw), host=host, port=port, log_level="info")
