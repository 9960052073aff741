"""Request validation: an OpenAI request body -> the arguments of one job, or a RequestError.

Everything a client can get wrong is answered here, before the request is queued, as a 400 in
OpenAI's error format. File paths in ``draftwise.method_opts`` are accepted only where the operator
allowed them (the files named in the server's own method options, or under ``--allow-path``
directories), and refusals say nothing about whether a path exists.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from draftwise import methods
from draftwise.errors import ConfigError, DraftwiseError
from draftwise.sampling import Sampling

UNSUPPORTED = ("logprobs", "top_logprobs", "tools", "tool_choice", "functions", "function_call", "logit_bias",
               "best_of", "echo", "suffix", "audio", "modalities", "prediction", "reasoning_effort",
               "web_search_options")
MAX_STOP = 4
MAX_MESSAGES = 4096


class RequestError(Exception):
    """A request the server refuses: HTTP status + OpenAI-style error body."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 headers: dict | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind
        self.headers, self.code = headers or {}, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class Policy:
    """What the operator decided when starting the server."""
    method: str = "auto"                       # for requests that name none
    method_opts: dict | None = None
    context: int = 2048                       # the model's context in tokens
    allow_paths: tuple[Path, ...] = ()        # directories whose files requests may name

    def offered_files(self) -> set[str]:
        """The file values of the server's own method options: requests may name these as they are."""
        if not self.method_opts:
            return set()
        spec = methods.get(self.method)
        return set(spec.paths(spec.validate(self.method_opts)).values())


def load_body(raw: bytes) -> Any:
    """The request's JSON (a 400 for bytes that are not UTF-8 JSON, nesting too deep, huge numbers)."""
    try:
        return json.loads(raw)
    except RecursionError:
        raise RequestError(400, "the request body is nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as e:      # JSONDecodeError is a ValueError; so are 5000-digit ints
        raise RequestError(400, f"the request body is not valid JSON: {str(e)[:200]}") from None


def _number(body: dict, name: str, default, lo: float, hi: float, integer: bool = False):
    v = body.get(name, default)
    if v is None:
        return default
    if integer and isinstance(v, float) and v.is_integer() and abs(v) < 2**64:
        v = int(v)                                    # JSON Schema's integers include 20373.0
    kind = int if integer else (int, float)
    if isinstance(v, bool) or not isinstance(v, kind) or (isinstance(v, float) and not math.isfinite(v)) \
            or not lo <= v <= hi:
        raise RequestError(400, f"'{name}' must be {'an integer' if integer else 'a number'} in [{lo}, {hi}], "
                                f"got {_short(v)}", name)
    return v


def _short(v: Any) -> str:
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."


def _flag(body: dict, name: str) -> bool:
    v = body.get(name, False)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise RequestError(400, f"'{name}' must be true or false, got {_short(v)}", name)
    return v


def _content(m: dict, i: int) -> str:
    """A message's text: a string, or OpenAI's list of content parts of type text (joined by newlines)."""
    c = m.get("content")
    if isinstance(c, str):
        return c
    if isinstance(c, list) and c and all(isinstance(p, dict) for p in c):
        if any(p.get("type") != "text" or not isinstance(p.get("text"), str) for p in c):
            raise RequestError(400, f"messages[{i}]: only text content parts ({{\"type\": \"text\", \"text\": ...}}) "
                                    "are supported", "messages")
        return "\n".join(p["text"] for p in c)
    raise RequestError(400, f"messages[{i}] needs content: a string or a list of text parts", "messages")


def _prompt_ids(engine, body: dict, chat: bool) -> list[int]:
    if chat:
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs or len(msgs) > MAX_MESSAGES:
            raise RequestError(400, f"'messages' must be a non-empty list (at most {MAX_MESSAGES})", "messages")
        clean = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
                raise RequestError(400, f"messages[{i}] needs a role: system, user or assistant", "messages")
            clean.append({"role": m["role"], "content": _content(m, i)})
        try:
            return engine.encode_messages(clean)
        except DraftwiseError as e:
            raise RequestError(400, str(e), "messages") from None
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise RequestError(400, "'prompt' must be a non-empty string", "prompt")
    try:
        return engine.encode(prompt)
    except DraftwiseError as e:
        raise RequestError(400, str(e), "prompt") from None


def parse(engine, body: Any, chat: bool, policy: Policy) -> dict:
    """Validate an OpenAI request body; returns the job's arguments. RequestError on anything wrong."""
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object")
    model = body.get("model")
    if model is not None and model not in (engine.model_id, "default"):
        raise RequestError(400, f"unknown model {_short(model)}; this server serves {engine.model_id!r}", "model")
    for name in UNSUPPORTED:
        if body.get(name) not in (None, False):
            raise RequestError(400, f"'{name}' is not supported by draftwise", name)
    rf = body.get("response_format")
    if rf is not None and rf != {"type": "text"}:
        raise RequestError(400, "'response_format' is not supported (only {\"type\": \"text\"})", "response_format")
    n = body.get("n", 1)
    if n is not None and (isinstance(n, bool) or n != 1):
        raise RequestError(400, "only n = 1 is supported (one completion per request)", "n")
    for name in ("presence_penalty", "frequency_penalty"):
        if body.get(name) not in (None, 0, 0.0) or isinstance(body.get(name), bool):
            raise RequestError(400, f"'{name}' is not supported (it would change the output distribution)", name)
    stream, ctx = _flag(body, "stream"), policy.context
    stream_opts = body.get("stream_options")
    if stream_opts is not None and not isinstance(stream_opts, dict):
        raise RequestError(400, "'stream_options' must be an object", "stream_options")
    include_usage = _flag(stream_opts or {}, "include_usage") and stream      # ignored without streaming
    limits = [_number(body, name, None, 1, 2**31 - 1, integer=True) for name in ("max_completion_tokens", "max_tokens")]
    max_tokens = next((v for v in limits if v is not None), None)
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and (not isinstance(stop, list) or len(stop) > MAX_STOP
                             or not all(isinstance(s, str) and s and len(s) <= 256 for s in stop)):
        raise RequestError(400, f"'stop' must be a string or a list of at most {MAX_STOP} non-empty strings "
                                "(256 characters each)", "stop")
    temperature = float(_number(body, "temperature", 0.0, 0.0, 2.0))
    top_p = float(_number(body, "top_p", 1.0, 0.0, 1.0))
    seed = _number(body, "seed", None, 0, 2**64 - 1, integer=True)
    try:
        Sampling(temperature=temperature, top_p=top_p, seed=seed)
    except ConfigError as e:
        raise RequestError(400, str(e), "temperature" if "temperature" in str(e) else "top_p") from None
    method, opts = _method(engine, body, policy)
    ids = _prompt_ids(engine, body, chat)
    if len(ids) >= ctx:
        raise RequestError(400, f"the prompt has {len(ids)} tokens; this server's context is {ctx}",
                           "messages" if chat else "prompt")
    room = ctx - len(ids)
    return {"ids": ids, "method": method, "method_opts": opts, "max_tokens": min(max_tokens or room, room),
            "temperature": temperature, "top_p": top_p, "seed": seed, "stop": stop, "stream": stream,
            "include_usage": include_usage}


def _method(engine, body: dict, policy: Policy) -> tuple[str, dict | None]:
    ext = body.get("draftwise")
    if ext is None:
        ext = {}
    if not isinstance(ext, dict) or set(ext) - {"method", "method_opts"}:
        raise RequestError(400, "'draftwise' must be an object like {\"method\": \"lookup\", \"method_opts\": {}}",
                           "draftwise")
    method = ext.get("method")
    method = policy.method if method is None else method
    if not isinstance(method, str):
        raise RequestError(400, f"'draftwise.method' must be a string, got {_short(method)}", "draftwise")
    opts = ext.get("method_opts", policy.method_opts if method == policy.method else None)
    if opts is not None and not isinstance(opts, dict):
        raise RequestError(400, f"'draftwise.method_opts' must be an object, got {_short(opts)}", "draftwise")
    try:
        checked = check_method(engine, method, opts)
        if checked is not None:
            opts = {**(opts or {}), **_allowed_files(method, checked, policy)}
    except DraftwiseError as e:
        raise RequestError(400, str(e), "draftwise") from None
    return method, opts


def _allowed_files(method: str, opts: dict, policy: Policy) -> dict[str, str]:
    """The file options of a request, each one the operator offers (resolved to its real path)."""
    spec = methods.get(method)
    out = {}
    offered = policy.offered_files()
    for name, value in spec.paths(opts).items():
        if value in offered:
            continue
        real = _under(value, policy.allow_paths)
        if real is None:
            where = " or under its --allow-path directories" if policy.allow_paths else ""
            raise ConfigError(f"method {method!r} option {name!r}: this server opens only the files it was started "
                              f"with{where}")
        out[name] = real
    return out


def _under(value: str, dirs: tuple[Path, ...]) -> str | None:
    """value (absolute, or relative to an allowed directory) resolved inside one of dirs, else None."""
    for d in dirs:
        root = Path(os.path.realpath(d))
        p = Path(os.path.realpath(root / value))          # an absolute value replaces root
        if p == root or root in p.parents:
            return str(p)
    return None


def check_method(engine, method: str, opts: dict | None) -> dict | None:
    """``methods.check`` for this engine: validated options, or a ConfigError unless it can run them."""
    return methods.check(method, opts, getattr(engine, "draft_model", None) is not None,
                         getattr(engine, "custom_methods", frozenset()))
