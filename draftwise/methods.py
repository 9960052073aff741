"""Method registry: one place that maps a method name to its drafter factory, typed options and
the resources it needs. The CLI (generate, bench, methods), the API, the server and the bench
runner read it. A built-in method is a ``SPEC`` (``drafters/spec.py``) in its drafter's own file,
listed in ``_load_builtins`` below; a program adds its own with ``register(MethodSpec(...))``.
"""
from __future__ import annotations

import json

from draftwise.drafters.spec import DECAY, MAX_NODES, RESOURCES, VOCAB_SUBSET, MethodSpec, Option  # noqa: F401 (the public names)
from draftwise.errors import ConfigError

_REGISTRY: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    if spec.name in _REGISTRY and _REGISTRY[spec.name] is not spec:
        raise ValueError(f"method {spec.name!r} is registered twice")
    unknown = set(spec.resources) - set(RESOURCES)
    if unknown:
        raise ValueError(f"method {spec.name!r} needs unknown resources {sorted(unknown)}")
    _REGISTRY[spec.name] = spec
    return spec


def _load_builtins() -> None:
    """Register the built-in methods (once; their modules import torch, so not at import time)."""
    if _REGISTRY.get("ar") is not None:
        return
    from draftwise.drafters import auto, base, draft_model, eagle, early_exit, lookup, rasd, recycling, retrieval

    for mod in (base, auto, recycling, lookup, retrieval, rasd, draft_model, eagle, early_exit):
        register(mod.SPEC)


def get(name: str) -> MethodSpec:
    _load_builtins()
    if name not in _REGISTRY:
        raise ConfigError(f"unknown method {name!r}; choose one of {', '.join(names())}")
    return _REGISTRY[name]


def check(method: str, opts: dict | None, has_draft: bool, custom=frozenset()) -> dict | None:
    """The validated options of ``method`` (None for a registered drafter instance in ``custom``); a
    ConfigError unless an engine with (``has_draft``) or without a draft model can run it. Cheap: opens
    no file and builds no drafter (the engine and the server both ask this first)."""
    if method in custom:
        if opts:
            raise ConfigError(f"method {method!r} is a registered instance and takes no options")
        return None
    spec = get(method)
    checked = spec.validate(opts)
    if "draft_model" in spec.requires(checked) and not has_draft:
        raise ConfigError(f"method {method!r} needs a draft model: load one with --draft NAME "
                          "(draftwise.load(..., draft=NAME))")
    return checked


def names() -> list[str]:
    _load_builtins()
    return list(_REGISTRY)


def specs() -> list[MethodSpec]:
    _load_builtins()
    return list(_REGISTRY.values())


def test_cases() -> list[tuple[str, str, dict]]:
    """(test id, method, options) for every registered method and each of its test configurations."""
    out = []
    for s in specs():
        cases = s.test_opts if isinstance(s.test_opts, list) else [s.test_opts]
        for i, o in enumerate(cases):
            label = s.name if len(cases) == 1 else f"{s.name}[{i}:{','.join(f'{k}={v}' for k, v in o.items())}]"
            out.append((label, s.name, o))
    return out


def parse_opts(text: str | None) -> dict:
    """--method-opts JSON -> dict (a clear error for bad JSON or a non-object)."""
    if not text:
        return {}
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"--method-opts is not valid JSON ({e.msg} at character {e.pos}): {text!r}") from None
    if not isinstance(d, dict):
        raise ConfigError(f"--method-opts must be a JSON object like '{{\"max_nodes\": 8}}', got {text!r}")
    return d


def describe_all() -> str:
    """The text of `draftwise methods`."""
    lines = []
    for s in specs():
        needs = s.requires(s.validate({}))
        need = f"  (needs {', '.join(RESOURCES[n] for n in needs)}{' by default' if needs != s.resources else ''})" if needs else ""
        lines.append(f"{s.name:12s} {s.help}{need}")
        for k, o in s.options.items():
            lines.append(f"    {k:16s} {o.type.__name__:6s} {o.describe():22s} default {json.dumps(o.default):8s} "
                         f"{o.help}")
    return "\n".join(lines)
