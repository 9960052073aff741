"""How many tokens a chain drafter drafts each step (early exit, draft model chain, EAGLE head).

Terms
- k: draft tokens this step (0: a plain decoding step; the root alone is verified).
- step cost T(k) = (k + 1) c_d + t_v(k + 1) for k >= 1: k + 1 draft forwards (the root's
  included; for early exit the first layers of every node are part of them and verification
  skips them) plus one verification pass over k + 1 nodes; T(0) = c_0 + t_v(1), where c_0 is
  what a drafter still spends on a plain step (early exit: the root's first N layers). c_d and
  c_0 are running means of timed draft work and t_v the measured verification curve corrected
  by the timed passes (``OnlineCost``).
- confidence: the draft's top probability at the position being drafted (never the drawn
  token's own probability: a sampled draw kept or dropped by its own value would no longer
  follow q, and sampling would stop being exact).

Controls (``control`` method option)
- ``fixed:K``: always K tokens.
- ``beta-ts``: Thompson sampling over a Beta(α, β) posterior of the per-token acceptance rate θ.
  Each step draws θ and drafts the k maximizing expected tokens per ms,
  E(k) / T(k) with E(k) = (1 − θ^{k+1}) / (1 − θ). After verification α += accepted,
  β += 1 if a draft token was rejected; both first decay towards the prior by ``forget`` per
  step, so the posterior follows topic changes and an idle arm (k = 0) is explored again.
- ``calibration-ts``: the draft's confidence c is mapped to an acceptance probability
  σ(w0 + w1 logit c) by Bayesian logistic regression with a Gaussian posterior over w, updated
  online (one Laplace/Newton step per observed token) with its covariance inflated by 1/forget
  per step. Each step draws w once; drafting goes on while the sampled probability that the
  whole prefix including the next token is accepted, P_{d+1}, clears the cost-derived threshold
  E_d · (T(d+1) − T(d)) / T(d): the next token's marginal tokens-per-ms must beat the step's
  average so far. At d = 0 this is the fall-back to plain decoding.
"""
from __future__ import annotations

import abc
import math

import numpy as np

from draftwise.errors import ConfigError

CONTROLS = "fixed:K | beta-ts | calibration-ts"


class StepCosts:
    """c_d (ms per draft forward), c_0 (a plain step's draft work) and t_v(n) (verification,
    OnlineCost); c_d and c_0 are running means of timed work."""

    def __init__(self, verify, draft_ms: float, plain_ms: float | None = None, alpha: float = 0.1):
        self.verify, self.draft_ms, self.alpha = verify, float(draft_ms), alpha
        self.plain_ms = float(draft_ms if plain_ms is None else plain_ms)
        self._n = [0, 0]

    def _avg(self, which: int, old: float, new: float) -> float:
        self._n[which] += 1
        a = max(self.alpha, 1.0 / self._n[which])
        return (1 - a) * old + a * new

    def observe_draft(self, forwards: int, ms: float) -> None:
        """Draft work of one step: ``forwards`` full draft forwards (0: a plain step's work)."""
        if forwards > 0:
            self.draft_ms = self._avg(0, self.draft_ms, ms / forwards)
        else:
            self.plain_ms = self._avg(1, self.plain_ms, ms)

    def step_ms(self, k, context: int | None = None) -> np.ndarray:
        """T(k) for k = 0, 1, ... (array in, array out)."""
        k = np.asarray(k, dtype=float)
        return np.where(k > 0, (k + 1) * self.draft_ms, self.plain_ms) + self.verify.t(k + 1, context)


class LengthControl(abc.ABC):
    """Base: ``plan`` once per step (an upper bound on k), ``more`` before each further token,
    ``update`` after verification with what was drafted and accepted."""

    k_max: int = 8

    @abc.abstractmethod
    def plan(self, context: int) -> int:
        """k_max for this step (0: a plain step)."""

    def more(self, d: int, conf: float) -> bool:
        """d tokens drafted; draft token d + 1, whose draft confidence is conf?"""
        return True

    def update(self, confs: list[float], accepted: int) -> None:
        """confs: confidences of the drafted tokens, in order; accepted: how many were accepted."""

    @abc.abstractmethod
    def describe(self) -> str:
        """The control's method-option spelling."""


class FixedK(LengthControl):
    def __init__(self, k: int):
        if k < 0:
            raise ConfigError(f"control fixed:K needs K >= 0, got {k}")
        self.k = self.k_max = k

    def plan(self, context: int) -> int:
        return self.k

    def describe(self) -> str:
        return f"fixed:{self.k}"


class BetaTS(LengthControl):
    def __init__(self, costs: StepCosts, k_max: int = 8, prior: tuple[float, float] = (2.0, 2.0),
                 forget: float = 0.95, seed: int = 0):
        if not 0 < forget <= 1:
            raise ConfigError(f"forget must be in (0, 1], got {forget}")
        self.costs, self.k_max, self.prior, self.forget = costs, k_max, prior, forget
        self.alpha, self.beta = prior
        self.rng = np.random.default_rng(seed)

    def best_k(self, theta: float, context: int | None = None) -> int:
        """argmax_k E(k) / T(k) over k = 0..k_max."""
        k = np.arange(self.k_max + 1)
        theta = min(theta, 1 - 1e-9)
        gain = (1 - theta ** (k + 1)) / (1 - theta)
        return int(np.argmax(gain / self.costs.step_ms(k, context)))

    def plan(self, context: int) -> int:
        return self.best_k(float(self.rng.beta(self.alpha, self.beta)), context)

    def update(self, confs: list[float], accepted: int) -> None:
        a0, b0 = self.prior
        self.alpha = a0 + self.forget * (self.alpha - a0) + accepted
        self.beta = b0 + self.forget * (self.beta - b0) + (1.0 if accepted < len(confs) else 0.0)

    def describe(self) -> str:
        return "beta-ts"


def _features(conf: float) -> np.ndarray:
    c = min(max(conf, 1e-4), 1 - 1e-4)
    return np.array([1.0, math.log(c / (1 - c))])


def _sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))


class CalibrationTS(LengthControl):
    def __init__(self, costs: StepCosts, k_max: int = 8, forget: float = 0.98, prior_var: float = 1.0, seed: int = 0):
        if not 0 < forget <= 1:
            raise ConfigError(f"forget must be in (0, 1], got {forget}")
        self.costs, self.k_max, self.forget = costs, k_max, forget
        self.mu = np.array([0.0, 1.0])              # prior: acceptance = the draft's confidence
        self.cov = np.eye(2) * prior_var
        self.rng = np.random.default_rng(seed)
        self.w = self.mu.copy()
        self._p = 1.0                               # sampled P(prefix accepted) so far
        self._e = 1.0                               # expected tokens so far (bonus included)
        self._context: int | None = None

    def prob(self, conf: float, w: np.ndarray | None = None) -> float:
        return _sigmoid(float((self.mu if w is None else w) @ _features(conf)))

    def observe(self, conf: float, accepted: bool) -> None:
        """One online Bayesian logistic update (Laplace: a Newton step on the posterior mode)."""
        x = _features(conf)
        p = _sigmoid(float(self.mu @ x))
        prec = np.linalg.inv(self.cov) + p * (1 - p) * np.outer(x, x)
        self.cov = np.linalg.inv(prec)
        self.mu = self.mu + self.cov @ x * (float(accepted) - p)

    def plan(self, context: int) -> int:
        self.w = self.rng.multivariate_normal(self.mu, self.cov)
        self._p, self._e, self._context = 1.0, 1.0, context
        return self.k_max

    def more(self, d: int, conf: float) -> bool:
        p_next = self._p * self.prob(conf, self.w)
        t = self.costs.step_ms(np.array([d, d + 1]), self._context)
        if p_next * t[0] < self._e * (t[1] - t[0]):
            return False
        self._p, self._e = p_next, self._e + p_next
        return True

    def update(self, confs: list[float], accepted: int) -> None:
        self.cov = self.cov / self.forget
        for i, c in enumerate(confs[: accepted + 1]):      # tokens after the first rejection are unobserved
            self.observe(c, i < accepted)

    def describe(self) -> str:
        return "calibration-ts"


def parse_control(text: str, costs: StepCosts | None, k_max: int, seed: int = 0) -> LengthControl:
    """``fixed:K`` | ``beta-ts`` | ``calibration-ts`` -> a control (a clear error otherwise)."""
    if k_max < 1:
        raise ConfigError(f"k_max must be >= 1, got {k_max}")
    if isinstance(text, str) and text.startswith("fixed:"):
        try:
            return FixedK(int(text[6:]))
        except ValueError:
            raise ConfigError(f"control {text!r}: K must be an integer, like fixed:3") from None
    if text in ("beta-ts", "calibration-ts"):
        if costs is None:
            raise ConfigError(f"control {text!r} needs cost curves")
        return (BetaTS if text == "beta-ts" else CalibrationTS)(costs, k_max=k_max, seed=seed)
    raise ConfigError(f"control must be one of {CONTROLS}, got {text!r}")
