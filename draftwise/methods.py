"""Method registry: one place that maps a method name to its drafter factory, typed options and
the resources it needs. The CLI (generate, bench, methods), the API and the bench runner read it;
adding a method is one ``register(MethodSpec(...))`` call in the drafter's own file.

Method options live in their own namespace (``method_opts``), apart from sampling arguments: a
drafter's ``top_k`` never collides with sampling's ``top_k``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Callable

from draftwise.errors import ConfigError

NEEDS = {"draft_model": "a draft model (--draft NAME)", "datastore": "a datastore (--method-opts '{\"datastore\": PATH}')",
         "head": "a trained head"}


@dataclass(frozen=True)
class Option:
    """One method option: its type, default and help, and what values it may take.

    Every number has a range (``lo``..``hi``, inclusive): an option is a knob a server client can
    turn, and an unbounded one lets one request take the machine's memory. ``choices`` lists a
    string's valid values; ``path`` marks a file the drafter opens (a server offers only the files its
    operator allowed), ``words`` the non-path values such an option also takes (e.g. "untrained").
    """
    type: type
    default: Any
    help: str
    optional: bool = False          # None is a valid value (e.g. max_nodes: None = sized by the cost curve)
    lo: float | None = None
    hi: float | None = None
    choices: tuple[str, ...] = ()
    path: bool = False
    words: tuple[str, ...] = ()

    def __post_init__(self):
        if self.type in (int, float) and (self.lo is None or self.hi is None):
            raise ValueError(f"numeric option ({self.help!r}) needs a range: lo and hi")

    def check(self, method: str, name: str, value: Any) -> Any:
        if value is None and self.optional:
            return None
        t = self.type
        ok = isinstance(value, t) and not (t in (int, float) and isinstance(value, bool))
        if t is float and isinstance(value, int) and not isinstance(value, bool):
            value, ok = float(value), True
        if not ok:
            raise ConfigError(f"method {method!r} option {name!r} must be {t.__name__}"
                              f"{' or null' if self.optional else ''}, got {_short(value)}")
        if t in (int, float) and not (self.lo <= value <= self.hi):      # NaN fails this too
            raise ConfigError(f"method {method!r} option {name!r} must be in [{self.lo}, {self.hi}], got {value!r}")
        if self.choices and value not in self.choices:
            raise ConfigError(f"method {method!r} option {name!r} must be one of {', '.join(self.choices)}, "
                              f"got {_short(value)}")
        if t is str and (not value or len(value) > 4096 or "\x00" in value):
            raise ConfigError(f"method {method!r} option {name!r} must be a non-empty string without NUL")
        return value

    def describe(self) -> str:
        """The accepted values, for `draftwise methods`."""
        if self.type is int:
            return f"{self.lo}..{self.hi}"
        if self.type is float:
            return f"{self.lo:g}..{self.hi:g}"
        if self.choices:
            return "|".join(self.choices)
        return "path" + ("|" + "|".join(self.words) if self.words else "") if self.path else ""


def _short(value: Any) -> str:
    r = repr(value)
    return r if len(r) <= 80 else r[:77] + "..."


@dataclass(frozen=True)
class MethodSpec:
    name: str
    help: str
    factory: Callable[..., Any]             # factory(engine, **opts) -> Drafter
    options: dict[str, Option] = field(default_factory=dict)
    needs: tuple[str, ...] = ()             # keys of NEEDS
    test_opts: dict | list[dict] = field(default_factory=dict)   # tiny configurations for the parameterized tests
    sampling: bool = True                    # supports temperature > 0
    needs_if: Callable[[dict], tuple[str, ...]] | None = None   # extra needs that depend on the options
    check: Callable[[dict], None] | None = None   # constraints between options (ConfigError), after each is valid

    def requires(self, opts: dict) -> tuple[str, ...]:
        """What a configuration needs (validated opts): ``needs`` plus what ``needs_if`` adds."""
        return self.needs + (self.needs_if(opts) if self.needs_if else ())

    def validate(self, opts: dict | None) -> dict:
        """Fill defaults and check types; an unknown option is a ConfigError listing the valid ones."""
        opts = dict(opts or {})
        unknown = sorted(set(opts) - set(self.options))
        if unknown:
            valid = ", ".join(sorted(self.options)) or "none"
            raise ConfigError(f"unknown option{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} "
                              f"for method {self.name!r}; valid options: {valid}")
        out = {k: o.check(self.name, k, opts.get(k, o.default)) for k, o in self.options.items()}
        if self.check is not None:
            self.check(out)
        return out

    def paths(self, opts: dict) -> dict[str, str]:
        """The options of a validated configuration that name files (not None, not one of its words)."""
        return {k: v for k, v in opts.items() if self.options[k].path and v is not None
                and v not in self.options[k].words}


MAX_NODES = Option(int, None, "fixed draft size (null: sized from the cost curve)", optional=True, lo=1, hi=256)
VOCAB_SUBSET = Option(int, 32768, "draft logits over the K most frequent tokens (0: full vocabulary)",
                      lo=0, hi=262144)
DECAY = Option(float, 0.98, "per-step fade of the online acceptance estimates", lo=0.0, hi=1.0)

_REGISTRY: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    if spec.name in _REGISTRY and _REGISTRY[spec.name] is not spec:
        raise ValueError(f"method {spec.name!r} is registered twice")
    unknown = set(spec.needs) - set(NEEDS)
    if unknown:
        raise ValueError(f"method {spec.name!r} needs unknown resources {sorted(unknown)}")
    _REGISTRY[spec.name] = spec
    return spec


def _load_builtins() -> None:
    # each drafter module registers its methods on import
    from draftwise.drafters import auto, base, draft_model, eagle, early_exit, lookup, rasd, recycling, retrieval  # noqa: F401


def get(name: str) -> MethodSpec:
    _load_builtins()
    if name not in _REGISTRY:
        raise ConfigError(f"unknown method {name!r}; choose one of {', '.join(names())}")
    return _REGISTRY[name]


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
        need = f"  (needs {', '.join(NEEDS[n] for n in needs)}{' by default' if needs != s.needs else ''})" if needs else ""
        lines.append(f"{s.name:12s} {s.help}{need}")
        for k, o in s.options.items():
            lines.append(f"    {k:16s} {o.type.__name__:6s} {o.describe():22s} default {json.dumps(o.default):8s} "
                         f"{o.help}")
    return "\n".join(lines)
