"""The realized-throughput guard: inside one request, draft only while drafting is measured to pay.

Every method's drafter plans with estimates (a cost curve measured once, acceptance rates learned
online). The guard checks the result instead: it times the steps the loop really runs and, when
the drafting steps of this request deliver fewer tokens per second than plain one-token steps,
switches the loop to plain steps for a while, then tries drafting again. It never changes what is
emitted (a plain step is a one-node tree, verified like any other), only which steps draft.

Terms
- draft step: a step with the drafter's proposal (its propose + target pass + observe timed).
- plain step: a root-only tree and no drafter call (what plain decoding does).
- rate: tokens emitted per second over recent steps of one kind (sums decayed by 0.97 per step,
  a memory of ~30 steps: long enough that a drafter whose gains come in bursts — copying from the
  context — is not paused between bursts, short enough to follow the context and the clock).
- probe: a plain step taken while drafting, so the plain rate is known and stays current: the first
  after ``first_probe`` drafting steps (a request starts drafting at once: plain steps at the start
  cost a fast drafter the most), then every ``probe_every`` drafting steps, or every
  ``probe_every_winning`` while drafting is clearly winning (``clear_win``): a probe costs what the
  drafting step it replaces would have gained.
- pause: when drafting steps that accepted nothing at all have cost ``quick`` plain steps more than
  plain decoding would have (a slow drafter stops after one or two such steps, a cheap one gets
  several), or once ``trial`` drafting steps deliver fewer tokens/s than plain steps (by ``margin``),
  the next ``backoff`` steps are plain; the backoff doubles each time drafting loses again (up to
  ``max_backoff``) and resets when it wins; after a loss, the next trials are judged after ``retrial``
  steps.
  During a pause the drafter's ``watch`` hook still sees every pass (Token Recycling keeps learning),
  so a pause does not starve the drafter that would end it.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class _Rate:
    tokens: float = 0.0
    seconds: float = 0.0
    steps: int = 0
    steps_weight: float = 0.0            # decayed step count: tokens == steps_weight means one per step

    def add(self, tokens: int, seconds: float, decay: float) -> None:
        self.tokens = self.tokens * decay + tokens
        self.seconds = self.seconds * decay + seconds
        self.steps_weight = self.steps_weight * decay + 1
        self.steps += 1

    @property
    def value(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


class ThroughputGuard:
    """Decides per step whether the loop drafts; ``record`` after each step with what it cost."""

    def __init__(self, margin: float = 0.02, trial: int = 16, retrial: int = 6, quick: float = 1.0,
                 probe_every: int = 24, probe_every_winning: int = 96, clear_win: float = 1.25, first_probe: int = 3,
                 backoff: int = 8, max_backoff: int = 128, decay: float = 0.97):
        self.margin, self.trial, self.retrial, self.quick, self.probe_every = margin, trial, retrial, quick, probe_every
        self.probe_every_winning, self.clear_win = probe_every_winning, clear_win
        self.first_backoff, self.max_backoff, self.decay = backoff, max_backoff, decay
        self.draft, self.plain = _Rate(), _Rate()
        self.backoff = backoff
        self.judge_after = trial               # drafting steps before drafting is judged (shorter after a loss)
        self.plain_left = 0                    # plain steps still to run (a pause, or a probe)
        self.since_probe = probe_every - first_probe   # the first probe after first_probe drafting steps
        self.plain_steps = 0                   # plain steps the guard chose (probes included)

    def drafting(self) -> bool:
        """Whether the next step drafts."""
        if self.plain_left > 0:
            return False
        every = self.probe_every
        if self.plain.steps and self.draft.value > self.plain.value * self.clear_win:
            every = self.probe_every_winning   # clearly winning: the baseline needs fewer checks
        if self.since_probe >= every:
            self.since_probe = 0
            self.plain_left = 1                # one probe
            return False
        return True

    def record(self, drafted: bool, tokens: int, seconds: float, nodes: int = 2) -> None:
        """One step: whether it drafted, tokens emitted, its time, the nodes verified. A drafting step
        whose drafter proposed nothing (one node) costs what a plain step does: no evidence either way."""
        if drafted and nodes <= 1:
            return
        if not drafted:
            self.plain.add(tokens, seconds, self.decay)
            self.plain_steps += 1
            self.plain_left -= 1
            if self.plain_left == 0 and self.draft.steps and self._losing():
                self.draft = _Rate()           # after a pause, drafting is judged on its own new steps
            return
        self.draft.add(tokens, seconds, self.decay)
        self.since_probe += 1
        if self.plain.steps == 0:
            return
        n = self.draft.steps
        plain_s = self.plain.seconds / self.plain.tokens       # one plain step emits one token
        nothing = self.draft.tokens <= self.draft.steps_weight + 1e-9
        wasted = self.draft.seconds - self.draft.tokens * plain_s    # time beyond plain decoding's for these tokens
        if (nothing and wasted >= self.quick * plain_s) or (n >= self.judge_after and self._losing()):
            self.plain_left = self.backoff     # drafting loses in this request: plain steps for a while
            self.backoff = min(self.max_backoff, self.backoff * 2)
            self.judge_after = self.retrial    # it lost once here: later trials are judged sooner
        elif n >= self.trial:
            self.backoff, self.judge_after = self.first_backoff, self.trial

    def _losing(self) -> bool:
        return self.draft.value < self.plain.value * (1.0 - self.margin)


class ArmRates:
    """Realized tokens per second of named ways of drafting (a drafter's "arms", e.g. with and without a
    draft model), each over its own recent steps (decayed by ``decay`` per step of that arm); an arm
    has been tried once it has ``trial`` steps. The drafter decides which arm runs (``auto``: per step,
    against the other arm's expected rate)."""

    def __init__(self, arms: list[str], trial: int = 6, decay: float = 0.85):
        self.arms, self.trial, self.decay = list(arms), trial, decay
        self.rates = {a: _Rate() for a in self.arms}

    def record(self, arm: str, tokens: int, seconds: float) -> None:
        self.rates[arm].add(tokens, seconds, self.decay)


class SourceGate:
    """Whether one optional draft source (auto's datastore) is queried this step: it is while the time its
    accepted tokens save pays for the time it takes.

    value: the accepted tokens this source decided (the caller's call: for auto's datastore, nodes no context
    match proposed whose rate was the datastore's), times the ms per emitted token of the steps
    around them (a token more per step at T ms and τ tokens a step saves about T / τ); cost: the source's own
    ms that step. Both are averaged over the steps that queried it (decayed by ``decay`` per query). After
    ``trial`` queries the source is skipped while value < cost, except every ``probe_every``-th step, so a
    source that starts to pay later (a request whose text the datastore holds) is queried again."""

    def __init__(self, trial: int = 16, probe_every: int = 8, decay: float = 0.97):
        self.trial, self.probe_every, self.decay = trial, probe_every, decay
        self.value = self.cost = 0.0                  # decayed sums, ms
        self.queries = 0
        self.skipped = 0                              # steps skipped since the last query

    def open(self) -> bool:
        """Whether to query the source this step."""
        if self.queries < self.trial or self.value >= self.cost or self.skipped + 1 >= self.probe_every:
            self.skipped = 0
            return True
        self.skipped += 1
        return False

    def record(self, gained_tokens: int, ms_per_token: float, cost_ms: float) -> None:
        """One step that queried the source: the accepted tokens it decided, and its own time."""
        self.value = self.value * self.decay + gained_tokens * ms_per_token
        self.cost = self.cost * self.decay + cost_ms
        self.queries += 1
