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
- probe: a plain step taken while drafting, so the plain rate stays current (every ``probe_every``
  drafting steps, and two at the start).
- backoff: after drafting loses, this many plain steps before a trial of ``trial`` drafting steps;
  it doubles each time a trial loses again (up to ``max_backoff``), resets when drafting wins.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class _Rate:
    tokens: float = 0.0
    seconds: float = 0.0
    steps: int = 0

    def add(self, tokens: int, seconds: float, decay: float) -> None:
        self.tokens = self.tokens * decay + tokens
        self.seconds = self.seconds * decay + seconds
        self.steps += 1

    @property
    def value(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


class ThroughputGuard:
    """Decides per step whether the loop drafts; ``record`` after each step with what it cost."""

    def __init__(self, margin: float = 0.02, trial: int = 10, probe_every: int = 24, backoff: int = 16,
                 max_backoff: int = 256, decay: float = 0.97):
        self.margin, self.trial, self.probe_every, self.first_backoff = margin, trial, probe_every, backoff
        self.max_backoff, self.decay = max_backoff, decay
        self.draft, self.plain = _Rate(), _Rate()
        self.backoff = backoff
        self.plain_left = 2                    # start with two plain steps: the baseline of this request
        self.trial_left = trial
        self.since_probe = 0
        self.plain_steps = 0                   # plain steps the guard chose (probes included)

    def drafting(self) -> bool:
        """Whether the next step drafts."""
        if self.plain_left > 0:
            return False
        if self.since_probe >= self.probe_every:
            self.since_probe = 0
            self.plain_left = 1                # one probe
            return False
        return True

    def record(self, drafted: bool, tokens: int, seconds: float) -> None:
        if not drafted:
            self.plain.add(tokens, seconds, self.decay)
            self.plain_steps += 1
            self.plain_left -= 1
            if self.plain_left == 0:
                self.draft = _Rate()           # a new trial is judged on its own steps
                self.trial_left = self.trial
            return
        self.draft.add(tokens, seconds, self.decay)
        self.since_probe += 1
        self.trial_left -= 1
        if self.trial_left > 0 or self.plain.steps == 0:
            return
        if self.draft.value < self.plain.value * (1.0 - self.margin):
            self.plain_left = self.backoff     # drafting loses in this request: plain steps for a while
            self.backoff = min(self.max_backoff, self.backoff * 2)
        else:
            self.backoff = self.first_backoff


class ArmRates:
    """Realized-rate choice among named ways of drafting (a drafter's "arms", e.g. with and without a
    draft model): each arm first runs ``trial`` steps, then the arm with the most tokens per second over
    its recent steps runs, and every ``explore_every`` steps the best other arm runs once, so a choice
    that stopped paying (or started to) is noticed."""

    def __init__(self, arms: list[str], trial: int = 6, explore_every: int = 16, decay: float = 0.85):
        self.arms, self.trial, self.explore_every, self.decay = list(arms), trial, explore_every, decay
        self.rates = {a: _Rate() for a in self.arms}
        self.since_explore = 0

    def choose(self) -> str:
        for a in self.arms:
            if self.rates[a].steps < self.trial:
                return a
        ranked = sorted(self.arms, key=lambda a: -self.rates[a].value)
        if len(ranked) > 1 and self.since_explore >= self.explore_every:
            self.since_explore = 0
            return ranked[1]
        self.since_explore += 1
        return ranked[0]

    def record(self, arm: str, tokens: int, seconds: float) -> None:
        self.rates[arm].add(tokens, seconds, self.decay)
