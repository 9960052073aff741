"""What a method declares: its typed options (``Option``) and its spec (``MethodSpec``: name, help,
factory, options, the resources it needs, tiny test configurations). Each drafter module defines
its ``SPEC`` with these; ``draftwise.methods`` (one layer up) registers them and looks them up.

Method options live in their own namespace (``method_opts``), apart from sampling arguments: a
drafter's ``top_k`` never collides with sampling's ``top_k``.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Protocol, runtime_checkable

from draftwise.errors import ConfigError

if TYPE_CHECKING:
    from draftwise.crossvocab import VocabBridge
    from draftwise.models.transformer import Transformer
    from draftwise.policies.budget import CostCurve
    from draftwise.vocab import VocabSubset


@runtime_checkable
class EngineView(Protocol):
    """What a method factory receives: the parts of ``draftwise.api.Engine`` a drafter may use. Test
    fixtures and benchmark scripts that build drafters without an Engine implement this
    (tests/test_architecture.py checks each one)."""
    model: Transformer                       # the target
    draft_model: Transformer | None          # the draft model, when one is loaded
    draft_bridge: VocabBridge | None         # the vocabulary map, when the draft has another tokenizer
    tokenizer: Any                           # the target's tokenizer (datastore fingerprints)
    shared: dict                             # objects the engine's drafters share (loaded datastores)

    def cost_curve(self) -> CostCurve:
        """The target's measured forward cost t(n) on this machine."""

    def draft_cost_curve(self) -> CostCurve:
        """The draft model's t(n) (only called when draft_model is set)."""

    def vocab_subset(self, k: int) -> VocabSubset:
        """The k most frequent tokens of the target's vocabulary."""

RESOURCES = {"draft_model": "a draft model (--draft NAME; another tokenizer works too)",
             "datastore": "a datastore (--method-opts '{\"datastore\": PATH}')",
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
    factory: Callable[..., Any]             # factory(engine: EngineView, **opts) -> Drafter
    options: dict[str, Option] = field(default_factory=dict)
    resources: tuple[str, ...] = ()         # what an engine must have loaded: keys of RESOURCES
    test_opts: dict | list[dict] = field(default_factory=dict)   # tiny configurations for the parameterized tests
    sampling: bool = True                    # supports temperature > 0
    resources_if: Callable[[dict], tuple[str, ...]] | None = None   # more resources, depending on the options
    check: Callable[[dict], None] | None = None   # constraints between options (ConfigError), after each is valid
    renamed: dict[str, str] = field(default_factory=dict)   # old option name -> new one (accepted with a warning)

    def requires(self, opts: dict) -> tuple[str, ...]:
        """What a configuration needs (validated opts): ``resources`` plus what ``resources_if`` adds."""
        return self.resources + (self.resources_if(opts) if self.resources_if else ())

    def validate(self, opts: dict | None) -> dict:
        """Fill defaults and check types; an unknown option is a ConfigError listing the valid ones."""
        opts = dict(opts or {})
        for old, new in self.renamed.items():
            if old in opts:
                if new in opts:
                    raise ConfigError(f"method {self.name!r}: give {new!r} only ({old!r} is its old name)")
                warnings.warn(f"method {self.name!r} option {old!r} is now {new!r}; the old name goes in the "
                              "next release", FutureWarning, stacklevel=2)
                opts[new] = opts.pop(old)
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
