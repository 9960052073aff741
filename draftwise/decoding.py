"""The one decoding loop: prefill -> (propose -> forward tree -> verify -> commit -> observe)*.

Plain autoregressive decoding is this loop with the empty drafter, so the baseline and every
method are timed by the same code.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from draftwise import kernels
from draftwise.drafters.base import Context, Drafter, Proposal
from draftwise.errors import DrafterError, PromptError
from draftwise.models.transformer import Transformer, prefill
from draftwise.policies.guard import ThroughputGuard
from draftwise.sampling import Sampling, sample, warp
from draftwise.tree import DraftTree
from draftwise.verify import verify


@dataclass
class Stats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    steps: int = 0                                   # target passes after prefill
    accept_lengths: list[int] = field(default_factory=list)   # tokens emitted per pass (bonus incl.)
    tree_sizes: list[int] = field(default_factory=list)
    proposed_by_depth: list[int] = field(default_factory=list)
    accepted_by_depth: list[int] = field(default_factory=list)
    prefill_s: float = 0.0
    draft_s: float = 0.0
    verify_s: float = 0.0
    wall_s: float = 0.0
    stop_reason: str = ""
    guard_plain_steps: int = 0                       # plain steps the throughput guard chose
    sources: dict[str, int] = field(default_factory=dict)   # accepted draft tokens per source (origin bits)

    @property
    def tau(self) -> float:
        """Mean tokens per target pass, bonus included."""
        return sum(self.accept_lengths) / len(self.accept_lengths) if self.accept_lengths else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.wall_s if self.wall_s > 0 else 0.0

    def acceptance_by_depth(self) -> list[float]:
        """Accepted / drafted nodes at depth 1, 2, ..."""
        return [a / p if p else 0.0 for a, p in zip(self.accepted_by_depth[1:], self.proposed_by_depth[1:])]

    def _record(self, tree, accepted, emitted: int) -> None:
        self.steps += 1
        self.accept_lengths.append(emitted)
        self.tree_sizes.append(tree.size)
        if tree.size > 1:
            depth_counts = torch.bincount(tree.depths[1:].cpu()).tolist()
            _grow(self.proposed_by_depth, len(depth_counts))
            for d, c in enumerate(depth_counts):
                self.proposed_by_depth[d] += c
            _grow(self.accepted_by_depth, len(depth_counts))
            for d in range(1, len(accepted.path)):
                self.accepted_by_depth[d] += 1

    def as_dict(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "new_tokens": self.new_tokens, "steps": self.steps,
                "tau": self.tau, "tokens_per_s": self.tokens_per_s, "wall_s": self.wall_s,
                "prefill_s": self.prefill_s, "draft_s": self.draft_s, "verify_s": self.verify_s,
                "mean_tree_size": sum(self.tree_sizes) / max(1, len(self.tree_sizes)),
                "acceptance_by_depth": self.acceptance_by_depth(), "stop_reason": self.stop_reason,
                "guard_plain_steps": self.guard_plain_steps, "sources": dict(self.sources)}


def _grow(xs: list[int], n: int) -> None:
    xs.extend([0] * (n - len(xs)))


class Stopper:
    """EOS, stop strings and max_new_tokens, applied to the stream of emitted tokens."""

    def __init__(self, max_new_tokens: int, eos_ids=(), stop: list[str] | None = None,
                 detok: Callable[[list[int]], str] | None = None):
        self.max_new = max_new_tokens
        self.eos = set(eos_ids)
        self.stop = [s for s in (stop or []) if s]
        if self.stop and detok is None:
            raise ValueError("stop strings need a detokenizer")
        self.detok = detok
        self.out: list[int] = []
        self.reason = ""

    def push(self, tokens: list[int]) -> list[int]:
        """Append tokens; return the part that is emitted (cut at the first stop condition)."""
        taken = []
        for t in tokens:
            if self.reason:
                break
            self.out.append(t)
            taken.append(t)
            if t in self.eos:
                self.reason = "eos"
            elif self.stop and self._hit_stop():
                self.reason = "stop"
            elif len(self.out) >= self.max_new:
                self.reason = "length"
        return taken

    def _hit_stop(self) -> bool:
        longest = max(len(s) for s in self.stop)
        tail = self.detok(self.out[-(longest + 8):])
        return any(s in tail for s in self.stop)


PREFILL_CHUNK = 512     # prompt tokens per prefill forward: a long prompt is interruptible between chunks


def decode(model: Transformer, prompt_ids: list[int], drafter: Drafter | None = None,
           sampling: Sampling = Sampling(), max_new_tokens: int = 128, eos_ids=(), stop=None,
           detok=None, stats: Stats | None = None, cache=None,
           interrupt: Callable[[], str | None] | None = None, guard=False) -> Iterator[list[int]]:
    """Yield lists of newly generated token ids until a stop condition. Lossless for any drafter.

    interrupt: called between prefill chunks and between steps; a non-empty string it returns (e.g.
    "deadline", "cancelled") ends generation there and becomes ``stats.stop_reason``. ``stats`` is
    complete (wall time, tokens/s, tau) however generation ends, a closed generator included.

    guard: the realized-throughput guard (``policies/guard.py``): plain steps while this request's
    drafting steps are measured slower than plain ones (drafters that declare ``pausable``); False
    (here the default; the Engine turns it on): the drafter proposes every step; an object with
    ``drafting()`` and ``record(...)``: that policy."""
    if not prompt_ids:
        raise PromptError("empty prompt: give at least one token")
    if max_new_tokens < 1:
        raise PromptError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if len(prompt_ids) + 1 > model.max_len:
        why = " (Mistral's sliding window; sliding-window attention is not implemented)" if model.window_capped else ""
        raise PromptError(f"prompt of {len(prompt_ids)} tokens does not fit the context of {model.max_len} tokens{why}")
    drafter = drafter or Drafter()
    stats = stats if stats is not None else Stats()
    stats.prompt_tokens = len(prompt_ids)
    lent = cache is None
    cache = model.lend_cache() if lent else cache
    try:
        g = None
        if guard and drafter.pausable and type(drafter) is not Drafter:
            g = guard if hasattr(guard, "drafting") else ThroughputGuard()
        yield from _loop(model, prompt_ids, drafter, sampling, max_new_tokens, eos_ids, stop, detok, stats, cache,
                         interrupt or _never, g)
    finally:
        if lent:
            model.give_back_cache(cache)


def _never() -> None:
    return None


def _loop(model, prompt_ids, drafter, sampling, max_new_tokens, eos_ids, stop, detok, stats, cache, interrupt,
          guard):
    t_start = time.perf_counter()
    stopper = Stopper(max_new_tokens, eos_ids, stop, detok)
    stats.stop_reason = ""
    try:
        yield from _steps(model, prompt_ids, drafter, sampling, stopper, stats, cache, interrupt, t_start,
                          guard)
    finally:                          # also when the consumer closes the generator (a deadline, a client gone)
        stats.stop_reason = stats.stop_reason or stopper.reason or "closed"
        stats.wall_s = time.perf_counter() - t_start


def _steps(model, prompt_ids, drafter, sampling, stopper, stats, cache, interrupt, t_start, guard):
    layers = tuple(drafter.needs.hidden_layers)
    max_new_tokens = stopper.max_new
    cache.truncate(0)
    g = None if sampling.greedy else sampling.generator("cpu")
    ctx = Context(list(prompt_ids), sampling, model, cache)
    with torch.inference_mode():
        drafter.reset(ctx)
        out = prefill(model, cache, torch.tensor(prompt_ids, dtype=torch.long), hidden_layers=layers,
                      chunk=PREFILL_CHUNK, interrupt=interrupt)
        if out is None:                               # interrupted between prefill chunks
            stats.stop_reason = interrupt()
            stats.prefill_s = time.perf_counter() - t_start
            return
        first = _pick(out.logits[0], sampling, g)
        stats.prefill_s = time.perf_counter() - t_start
        emitted = stopper.push([first])
        ctx.tokens.append(first)
        stats.new_tokens += len(emitted)
        yield emitted
        t0 = time.perf_counter()
        drafter.begin(ctx, out)
        stats.draft_s += time.perf_counter() - t0
        while not stopper.reason:
            if cache.length + 1 >= cache.max_len:
                stopper.reason = "context"
                break
            why = interrupt()
            if why:
                stopper.reason = why
                break
            ctx.remaining = max_new_tokens - len(stopper.out)
            t0 = time.perf_counter()
            drafting = guard is None or guard.drafting()
            if drafting:
                prop = _propose(drafter, ctx, cache)
            else:                                     # the guard's plain step: no drafter call at all
                cache.discard()
                prop = Proposal(DraftTree.root_only(ctx.root, device=ctx.device))
            tree = prop.tree
            t1 = time.perf_counter()
            mask = tree.ancestor_mask() if tree.size > 1 else None
            fwd = model.forward(tree.tokens, tree.positions(cache.length), cache, tree_mask=mask,
                                hidden_layers=layers, start_layer=prop.start_layer, hidden_in=prop.hidden_in)
            acc = verify(tree, fwd.logits, sampling, g)
            cache.commit(acc.path)
            t2 = time.perf_counter()
            ctx.tokens.extend(acc.tokens)
            ctx.last_pass = (tree.size, (t2 - t1) * 1e3)
            if drafting:
                drafter.observe(tree, fwd, acc, ctx)
            else:
                drafter.watch(tree, fwd, acc, ctx)
            t3 = time.perf_counter()
            if guard is not None:
                guard.record(drafting, len(acc.tokens), t3 - t0, tree.size)
                stats.guard_plain_steps = guard.plain_steps
            emitted = stopper.push(acc.tokens)
            stats.draft_s += (t1 - t0) + (t3 - t2)
            stats.verify_s += t2 - t1
            stats._record(tree, acc, len(acc.tokens))
            if drafting and drafter.origin_bits and tree.origin is not None and len(acc.path) > 1:
                _credit(stats.sources, drafter.origin_bits, tree.origin, acc.path)
            stats.new_tokens += len(emitted)
            yield emitted


def _credit(sources: dict[str, int], bits: dict[int, str], origin: torch.Tensor, path: list[int]) -> None:
    """Count each accepted draft node for every source whose bit its origin carries."""
    for o in origin[torch.as_tensor(path[1:], device=origin.device)].tolist():
        for bit, name in bits.items():
            if o & bit:
                sources[name] = sources.get(name, 0) + 1


def _propose(drafter: Drafter, ctx: Context, cache) -> Proposal:
    """drafter.propose plus the invariant checks that keep the loop lossless.

    The committed part of the target's cache must be untouched (length, and a fingerprint of the
    newest committed row in every layer); pending rows are dropped unless the proposal starts
    verification at a later layer, in which case they must be exactly the tree's rows.
    """
    length = cache.length
    finger = cache.k[:, 0, length - 1, 0].clone()                     # [L]
    prop = drafter.propose(ctx)
    if not isinstance(prop, Proposal):
        prop = Proposal(prop)
    tree = prop.tree.to(cache.k.device)            # drafters may live on another device
    if cache.length != length or not torch.equal(cache.k[:, 0, length - 1, 0], finger):
        raise DrafterError(f"drafter {drafter.name!r} changed the target's committed KV cache")
    if int(tree.tokens[0]) != ctx.root:
        raise DrafterError(f"drafter {drafter.name!r} proposed a tree whose root is not the newest token")
    room = cache.max_len - cache.length
    hidden_in = prop.hidden_in
    if prop.start_layer:
        if hidden_in is None or hidden_in.shape[0] != tree.size or cache.pending != tree.size:
            raise DrafterError(f"drafter {drafter.name!r} starts verification at layer {prop.start_layer} but "
                               f"left {cache.pending} pending rows and hidden states for "
                               f"{None if hidden_in is None else hidden_in.shape[0]} of {tree.size} nodes")
    cache.discard()
    if tree.size > room:   # never overflow the context: keep the nodes that fit (a parents-first prefix)
        tree = tree.select(torch.arange(room, device=tree.tokens.device))
        hidden_in = None if hidden_in is None else hidden_in[:room]
    return Proposal(tree, prop.start_layer, hidden_in)


def _pick(logits: torch.Tensor, sampling: Sampling, g) -> int:
    if sampling.greedy:
        return int(kernels.argmax_rows(logits))
    return sample(warp(logits, sampling).double().cpu(), g)


def generate(model: Transformer, prompt_ids: list[int], **kw) -> tuple[list[int], Stats]:
    stats = kw.pop("stats", None) or Stats()
    out: list[int] = []
    for piece in decode(model, prompt_ids, stats=stats, **kw):
        out.extend(piece)
    return out, stats
