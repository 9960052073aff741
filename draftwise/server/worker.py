"""The worker thread that runs generation, and the server's Prometheus metrics.

Terms
- job: one request's generation. Its events cross from the worker to the event loop through an
  asyncio queue: first ("ready", None) once the method's drafter is built, or ("reject",
  RequestError) when the request cannot run (bad options, a file that will not load, a deadline
  that passed while it waited); then ("text", str)* and ("done", {...}) or ("error", str).
- cancel: set when the client went away; the deadline and cancel are checked between prefill
  chunks and between decoding steps, so either frees the engine within one step.
"""
from __future__ import annotations

import asyncio
import queue
import threading
import time
from dataclasses import dataclass, field

from draftwise.decoding import Stats
from draftwise.errors import DraftwiseError
from draftwise.server.requests import RequestError


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
    out: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancel: threading.Event = field(default_factory=threading.Event)
    checked: float = 0.0                              # when the event loop last asked if the client is there

    def interrupt(self) -> str | None:
        """Why generation must stop now, if it must."""
        if self.cancel.is_set():
            return "cancelled"
        if time.monotonic() > self.deadline:
            return "deadline"
        return None


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

        why = job.interrupt()
        if why == "cancelled":
            push(("done", {"finish_reason": "cancelled", "stats": Stats()}))
            return
        if why == "deadline":
            self.metrics.expired.inc()
            push(("reject", RequestError(504, "the request's deadline (--timeout) passed while it waited in the "
                                              "queue", kind="timeout_error")))
            return
        try:
            self.engine.drafter(job.method, job.method_opts)      # build (or reuse) it before answering 200
        except DraftwiseError as e:
            push(("reject", RequestError(400, str(e), "draftwise")))
            return
        except Exception as e:                                    # noqa: BLE001 - report, keep serving
            push(("reject", RequestError(500, f"internal error: {type(e).__name__}", kind="server_error")))
            return
        push(("ready", None))
        stats = Stats()
        gen = self.engine.stream(job.ids, method=job.method, method_opts=job.method_opts, max_new_tokens=job.max_tokens,
                                 temperature=job.temperature, top_p=job.top_p, seed=job.seed, stop=job.stop,
                                 stats=stats, interrupt=job.interrupt)
        try:
            for piece in gen:
                push(("text", piece))
        except DraftwiseError as e:
            push(("error", str(e)))
            return
        except Exception as e:                          # noqa: BLE001 - report, keep serving
            push(("error", f"internal error: {type(e).__name__}: {e}"))
            return
        finally:
            gen.close()
        reason = {"eos": "stop", "stop": "stop", "deadline": "deadline", "cancelled": "cancelled"}.get(
            stats.stop_reason, "length")
        self.metrics.record(job.method, stats)
        push(("done", {"finish_reason": reason, "stats": stats}))


class Metrics:
    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge

        self.registry = CollectorRegistry()
        self.requests = Counter("draftwise_requests", "HTTP requests", ["endpoint", "status"], registry=self.registry)
        self.queue = Gauge("draftwise_queue_depth", "requests waiting for the engine", registry=self.registry)
        self.expired = Counter("draftwise_expired_in_queue", "requests whose deadline passed while queued",
                               registry=self.registry)
        self.tokens = Counter("draftwise_generated_tokens", "tokens generated", ["method"], registry=self.registry)
        self.passes = Counter("draftwise_target_passes", "target forward passes", ["method"], registry=self.registry)
        self.seconds = Counter("draftwise_generation_seconds", "seconds spent generating", ["method"],
                               registry=self.registry)
        self.tps = Gauge("draftwise_tokens_per_second", "tokens/s of the latest request", ["method"],
                         registry=self.registry)
        self.tau = Gauge("draftwise_tau", "tokens per target pass of the latest request", ["method"],
                         registry=self.registry)
        self.sources = Counter("draftwise_accepted_draft_tokens", "accepted draft tokens per source",
                               ["method", "source"], registry=self.registry)

    def record(self, method: str, st: Stats) -> None:
        self.tokens.labels(method).inc(st.new_tokens)
        self.passes.labels(method).inc(st.steps + (1 if st.new_tokens else 0))
        self.seconds.labels(method).inc(st.wall_s)
        self.tps.labels(method).set(st.tokens_per_s)
        self.tau.labels(method).set(st.tau)
        for source, n in st.sources.items():
            self.sources.labels(method, source).inc(n)

    def text(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
