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
- ``ddd`` (EAGLE-2's dynamic draft depth, AdaEAGLE's baseline): draft while the cumulative
  log-probability of the drafted tokens (their draft confidences) stays >= ``threshold``
  (default -0.6).
- ``ldlp``: AdaEAGLE's lightweight draft-length predictor (``LDLP``) reads the embedding of the
  root and the target's final-norm feature of the last committed token (``see``) and predicts
  k = clamp(round(LDLP), 0, k_max) before any draft work; k = 0 is a plain step.
- ``ldlp-ddd``: k from the LDLP, then further tokens only while the cumulative log-probability
  stays >= ``threshold``.
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
LENGTHS = "fixed:K | ddd | ldlp | ldlp-ddd | beta-ts | calibration-ts"
LDLP_KIND = "draftwise-ldlp"


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
    costs: StepCosts | None = None      # the step costs a cost-aware control learns from (the drafter feeds them)

    def see(self, token: int, feature) -> None:
        """Before ``plan``: the root token and the target's final-norm feature [D] of the last
        committed token (what a feature-reading control such as the LDLP predicts from)."""

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
        self.max_trace = 2.0 * prior_var
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
        if not confs:        # nothing drafted, nothing learnt: no forgetting either (it would inflate cov unboundedly)
            return
        self.cov = self.cov / self.forget
        trace = float(np.trace(self.cov))
        if trace > self.max_trace:                         # forgetting never makes it vaguer than the prior
            self.cov = self.cov * (self.max_trace / trace)
        for i, c in enumerate(confs[: accepted + 1]):      # tokens after the first rejection are unobserved
            self.observe(c, i < accepted)

    def describe(self) -> str:
        return "calibration-ts"


class DDD(LengthControl):
    """Stop when the cumulative draft log-probability would fall below ``threshold``."""

    def __init__(self, threshold: float = -0.6, k_max: int = 8):
        if threshold > 0:
            raise ConfigError(f"the DDD threshold is a log-probability (<= 0), got {threshold}")
        self.threshold, self.k_max, self._logp = threshold, k_max, 0.0

    def plan(self, context: int) -> int:
        self._logp = 0.0
        return self.k_max

    def more(self, d: int, conf: float) -> bool:
        lp = self._logp + math.log(max(conf, 1e-12))
        if lp < self.threshold:
            return False
        self._logp = lp
        return True

    def describe(self) -> str:
        return "ddd"


# ---------------------------------------------------------------------- LDLP (AdaEAGLE)
LDLP_BLOCKS = 3


def ldlp_init(dim_in: int, hidden: int = 256, seed: int = 0) -> dict:
    """Parameters of the LDLP: input standardisation (mu, sd, filled from the training set), a
    linear map to ``hidden``, 3 residual blocks (x + W2 silu(W1 x)), a linear read-out to a scalar."""
    import torch

    g = torch.Generator().manual_seed(seed)
    def w(o, i, scale=1.0):
        return torch.randn(o, i, generator=g) * scale / math.sqrt(i)
    p = {"mu": torch.zeros(dim_in), "sd": torch.ones(dim_in), "w_in": w(hidden, dim_in), "b_in": torch.zeros(hidden),
         "w_out": w(1, hidden, 0.1), "b_out": torch.zeros(1)}
    for i in range(LDLP_BLOCKS):
        p[f"b{i}.w1"], p[f"b{i}.b1"] = w(hidden, hidden), torch.zeros(hidden)
        p[f"b{i}.w2"], p[f"b{i}.b2"] = w(hidden, hidden, 0.1), torch.zeros(hidden)
    return p


def ldlp_forward(p: dict, x):
    """x [n, 2D] = [embedding of the root ⊕ feature of the last committed token] -> [n] lengths."""
    import torch.nn.functional as F

    h = F.linear((x - p["mu"]) / p["sd"], p["w_in"], p["b_in"])
    for i in range(LDLP_BLOCKS):
        h = h + F.linear(F.silu(F.linear(h, p[f"b{i}.w1"], p[f"b{i}.b1"])), p[f"b{i}.w2"], p[f"b{i}.b2"])
    return F.linear(F.silu(h), p["w_out"], p["b_out"]).squeeze(-1)


def save_ldlp(path, params: dict, meta: dict) -> None:
    from draftwise.parts import save_tensors

    save_tensors(path, params, LDLP_KIND, meta)


def load_ldlp(path, fingerprint: str, head_id: str | None = None) -> tuple[dict, dict]:
    """(params, meta) of a saved LDLP, checked against the target (and the head it was labelled with)."""
    from pathlib import Path

    from draftwise.errors import CheckpointError
    from draftwise.parts import read_tensors

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"LDLP {path} not found (train one: draftwise train ldlp --model M --head HEAD --out {path})")
    params, meta = read_tensors(path, "LDLP")
    if meta.get("kind") != LDLP_KIND:
        raise CheckpointError(f"{path} is not a draftwise LDLP")
    if meta.get("fingerprint") != fingerprint:
        raise CheckpointError(f"LDLP {path} was trained for {meta.get('model', 'another model')} "
                              f"(fingerprint {meta.get('fingerprint')}), not this target ({fingerprint})")
    if head_id is not None and meta.get("head_id") not in (None, head_id):
        raise CheckpointError(f"LDLP {path} was labelled with another draft head ({meta.get('head_id')}, "
                              f"this head {head_id}): retrain it with draftwise train ldlp --head")
    want = set(ldlp_init(2, 2))
    if set(params) != want or params["w_in"].shape[1] != params["mu"].numel():
        raise CheckpointError(f"LDLP {path} is missing tensors or has inconsistent shapes")
    return params, meta


class LDLPControl(LengthControl):
    """AdaEAGLE: k from the LDLP (``see`` gives its input); with ``threshold`` (ldlp-ddd) drafting
    goes on past k while the cumulative log-probability stays >= threshold."""

    def __init__(self, params: dict, embed, k_max: int = 8, threshold: float | None = None):
        import torch

        self.p = {k: v.to(device=embed.device, dtype=torch.float32) for k, v in params.items()}
        if self.p["w_in"].shape[1] != 2 * embed.shape[1]:
            raise ConfigError(f"this LDLP reads {self.p['w_in'].shape[1] // 2}-dim features; the target has "
                              f"{embed.shape[1]}")
        self.embed, self.k_max, self.threshold = embed, k_max, threshold
        self._x = None
        self._k, self._logp = 0, 0.0
        self.predicted: list[int] = []

    def see(self, token: int, feature) -> None:
        import torch

        self._x = torch.cat([self.embed[token].float(), feature.float()])[None]   # [1, 2D]

    def predict(self) -> int:
        if self._x is None:
            return self.k_max
        k = float(ldlp_forward(self.p, self._x)[0])
        return int(min(max(round(k), 0), self.k_max))

    def plan(self, context: int) -> int:
        self._k, self._logp = self.predict(), 0.0
        self.predicted.append(self._k)
        return self._k if self.threshold is None else self.k_max

    def more(self, d: int, conf: float) -> bool:
        lp = self._logp + math.log(max(conf, 1e-12))
        if d >= self._k and (self.threshold is None or lp < self.threshold):
            return False
        self._logp = lp
        return True

    def describe(self) -> str:
        return "ldlp" if self.threshold is None else "ldlp-ddd"


def check_name(text: str | None, names: str, what: str, k_max: int) -> None:
    """A length control's name is one of ``names`` (LENGTHS or CONTROLS), fixed:K with 1 <= K <= k_max:
    checked when options are validated, before anything loads."""
    if text is None:
        return
    valid = [n.strip() for n in names.split("|")]
    if text.startswith("fixed:"):
        k = text[6:]
        if not (k.isdigit() and 1 <= int(k) <= k_max):
            raise ConfigError(f"{what} {text!r}: K must be an integer in [1, {k_max}] (k_max), like fixed:3")
    elif text not in valid:
        raise ConfigError(f"{what} must be one of {names}, got {text[:40]!r}")


def parse_length(text: str, costs: StepCosts | None, k_max: int, ldlp: tuple[dict, object] | None = None,
                 threshold: float = -0.6, seed: int = 0) -> LengthControl:
    """``fixed:K`` | ``ddd`` | ``ldlp`` | ``ldlp-ddd`` | ``beta-ts`` | ``calibration-ts`` -> a control.
    ldlp: (LDLP parameters, the target's embedding [V, D]) for the LDLP controls."""
    if text == "ddd":
        return DDD(threshold, k_max)
    if text in ("ldlp", "ldlp-ddd"):
        if ldlp is None:
            raise ConfigError(f"length {text!r} needs an LDLP (method option 'ldlp': PATH, trained by "
                              f"draftwise train ldlp)")
        if threshold > 0:
            raise ConfigError(f"the DDD threshold is a log-probability (<= 0), got {threshold}")
        return LDLPControl(ldlp[0], ldlp[1], k_max, threshold if text == "ldlp-ddd" else None)
    if isinstance(text, str) and (text.startswith("fixed:") or text in ("beta-ts", "calibration-ts")):
        return parse_control(text, costs, k_max, seed)
    raise ConfigError(f"length must be one of {LENGTHS}, got {text!r}")


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
