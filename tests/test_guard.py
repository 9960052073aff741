"""The realized-throughput guard: its decisions on hand-made timings, and in the loop a drafter made
to lose (slow, never accepted) is paused while one that wins keeps drafting; outputs stay plain
decoding's."""
import time

import torch

from draftwise.decoding import generate
from draftwise.drafters.base import Drafter
from draftwise.policies.guard import ThroughputGuard
from draftwise.tree import DraftTree
from tests.helpers import tiny_model


def run(guard: ThroughputGuard, steps: int, draft_tokens: float, draft_s: float, plain_s: float) -> list[bool]:
    """Feed the guard steps with fixed costs; returns its choices."""
    out = []
    for i in range(steps):
        d = guard.drafting()
        out.append(d)
        if d:
            guard.record(True, int(draft_tokens) + (i % 2 if draft_tokens % 1 else 0), draft_s)
        else:
            guard.record(False, 1, plain_s)
    return out


def test_losing_drafting_is_paused_with_growing_backoff():
    g = ThroughputGuard()
    choices = run(g, 400, draft_tokens=1, draft_s=0.012, plain_s=0.010)     # 83 vs 100 tokens/s
    assert choices[:4] == [True, True, True, False]                          # drafts at once; a probe for the baseline
    assert sum(choices) < 0.15 * len(choices)                                # mostly plain
    runs, cur = [], 0
    for c in choices[2:]:
        if c:
            if cur:
                runs.append(cur)
            cur = 0
        else:
            cur += 1
    pauses = [r for r in runs if r > 1]                                      # (one-step runs are probes)
    assert pauses[0] >= 8 and max(pauses) > pauses[0]                        # backoff grows


def test_winning_drafting_keeps_drafting_with_rare_probes():
    g = ThroughputGuard()
    choices = run(g, 400, draft_tokens=2.5, draft_s=0.013, plain_s=0.010)   # ~190 vs 100 tokens/s
    assert sum(choices) > 0.9 * len(choices) and g.plain_steps < 25


def test_drafting_that_stops_paying_is_caught():
    g = ThroughputGuard()
    first = run(g, 100, draft_tokens=2.5, draft_s=0.013, plain_s=0.010)
    later = run(g, 300, draft_tokens=1, draft_s=0.013, plain_s=0.010)
    assert sum(first) > 90 and sum(later) < 0.25 * len(later)
    assert not all(later[:50])                               # the first pause comes within ~30 steps


class SlowWrong(Drafter):
    """Proposes 4 tokens nobody accepts, slowly: drafting loses."""
    name = "slow-wrong"

    def __init__(self):
        self.proposed = 0

    def propose(self, ctx):
        self.proposed += 1
        time.sleep(0.004)
        root = ctx.root
        return DraftTree.chain(root, [(root + k) % 90 + 1 for k in (7, 11, 13, 17)])


def test_a_losing_drafter_is_paused_in_the_loop_and_the_output_is_unchanged(tmp_path):
    m = tiny_model(tmp_path, arch="llama", seed=3, dtype=torch.float32)
    prompt = list(range(1, 20))
    ref, _ = generate(m, prompt, max_new_tokens=120)
    d = SlowWrong()
    out, st = generate(m, prompt, drafter=d, max_new_tokens=120, guard=True)
    assert out == ref
    assert st.guard_plain_steps > 0.7 * st.steps and d.proposed < 0.3 * st.steps
    d2 = SlowWrong()
    out, st = generate(m, prompt, drafter=d2, max_new_tokens=120, guard=False)
    assert out == ref and st.guard_plain_steps == 0 and d2.proposed == st.steps


def test_steps_that_draft_nothing_are_no_evidence():
    g = ThroughputGuard()
    for _ in range(50):                                  # the drafter found nothing to propose: one node
        assert g.drafting()
        g.record(True, 1, 0.0101, nodes=1)
    assert g.plain_steps == 0                            # no evidence, so no pause and no probe needed


def test_a_cheap_drafter_gets_more_patience_than_a_slow_one():
    """Steps that accept nothing pause drafting once they have wasted one plain step's time: a
    drafter whose steps cost 5x a plain step is stopped after its first such steps, one costing
    1.1x only after about ten."""
    def first_pause(draft_s):
        g = ThroughputGuard()
        for i in range(200):
            d = g.drafting()
            g.record(d, 1, draft_s if d else 0.010)
            if g.plain_left > 1:
                return i
        return None

    slow, cheap = first_pause(0.050), first_pause(0.011)
    assert slow is not None and cheap is not None and slow <= 5 and cheap >= 10


def test_a_clear_winner_is_probed_rarely():
    g = ThroughputGuard()
    choices = run(g, 600, draft_tokens=4, draft_s=0.013, plain_s=0.010)     # ~300 vs 100 tokens/s
    assert g.plain_steps <= 10 and sum(choices) > 0.98 * len(choices)


def test_a_burst_after_a_dry_spell_is_not_paused_away():
    """Bursty gains (copying): slow stretches with some acceptance do not pause a drafter that pays overall."""
    g = ThroughputGuard()
    choices = []
    for i in range(300):
        d = g.drafting()
        choices.append(d)
        burst = (i // 10) % 3 == 0                       # 10 steps of copying, then 20 of slow going
        g.record(d, (4 if burst else 1 + (i % 4 == 0)) if d else 1, 0.012 if d else 0.010)
    assert sum(choices) > 0.85 * len(choices)
