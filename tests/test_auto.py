"""``auto``: the arm choice on hand-made rates, a useless draft model stops running, accepted tokens
are credited to their sources; (its losslessness, greedy and sampled, is in the registry-wide tests
of tests/test_core.py, with and without a draft model)."""
import pytest

from draftwise import methods
from draftwise.decoding import generate
from draftwise.policies.guard import ArmRates
from tests.fixtures import TinyEngine, tiny_pair


def test_arm_rates_run_the_faster_arm_and_retry_the_other():
    a = ArmRates(["model", "free"], trial=4, explore_every=10)
    seen = []
    for _ in range(200):
        arm = a.choose()
        seen.append(arm)
        a.record(arm, 1 if arm == "model" else 3, 0.01)          # free: 300 tok/s, model: 100
    assert seen[:8] == ["model"] * 4 + ["free"] * 4
    assert 0.85 < seen.count("free") / len(seen) < 0.97          # explored, not chosen


def test_arm_rates_follow_a_change():
    a = ArmRates(["model", "free"], trial=4, explore_every=8)
    for _ in range(60):
        arm = a.choose()
        a.record(arm, 3 if arm == "model" else 1, 0.01)
    late = []
    for _ in range(120):
        arm = a.choose()
        late.append(arm)
        a.record(arm, 1 if arm == "model" else 3, 0.01)           # the draft model stops paying
    assert late[-60:].count("free") > 50


@pytest.fixture(scope="module")
def useless_pair(tmp_path_factory):
    return tiny_pair(tmp_path_factory.mktemp("useless"), draft_seed=99)   # an unrelated draft: ~0 acceptance


def repetitive(n=40):
    base = [5, 17, 23, 42, 8, 61]
    return [base[i % 6] for i in range(n)]


def test_a_useless_draft_model_stops_running(useless_pair):
    target, draft = useless_pair
    spec = methods.get("auto")
    d = spec.factory(TinyEngine(target, draft), **spec.validate({}))
    prompt = repetitive()
    ref, _ = generate(target, prompt, max_new_tokens=120)
    out, st = generate(target, prompt, drafter=d, max_new_tokens=120)
    assert out == ref
    model_steps, free_steps = d.arms.rates["model"].steps, d.arms.rates["free"].steps
    assert model_steps + free_steps == st.steps
    assert model_steps < 0.3 * st.steps, (model_steps, free_steps)
    assert st.sources.get("recycling", 0) + st.sources.get("retrieval", 0) > st.sources.get("draft-model", 0)


def test_accepted_tokens_are_credited_to_their_sources(useless_pair):
    target, _ = useless_pair
    spec = methods.get("auto")
    d = spec.factory(TinyEngine(target), **spec.validate({}))
    out, st = generate(target, repetitive(), drafter=d, max_new_tokens=80)
    accepted = sum(st.accept_lengths) - st.steps                 # draft tokens accepted (bonus excluded)
    assert accepted > 0 and set(st.sources) <= {"recycling", "retrieval"}
    assert max(st.sources.values()) <= accepted <= sum(st.sources.values())
    assert "draft-model" not in d.describe()["sources"]


def test_auto_is_the_default_method():
    import inspect

    from draftwise.api import Engine
    from draftwise.cli import build_parser

    assert inspect.signature(Engine.generate).parameters["method"].default == "auto"
    for cmd in (["generate", "x"], ["serve"], ["chat"]):
        assert build_parser().parse_args(cmd).method == "auto"
    assert "auto" in build_parser().parse_args(["bench"]).methods.split(",")


def test_path_products_equal_the_sequential_products():
    """auto scores a node by the product of conditional rates along its path: the vectorized
    per-depth form equals the parents-first loop on random trees, bit for bit."""
    import numpy as np

    from draftwise.drafters.auto import path_products

    rng = np.random.default_rng(0)
    for n in (1, 2, 7, 40):
        parents = np.array([-1] + [int(rng.integers(0, i)) for i in range(1, n)])
        depths = np.zeros(n, dtype=np.int64)
        for i in range(1, n):
            depths[i] = depths[parents[i]] + 1
        rate = rng.random(n)
        want = np.ones(n)
        for i in range(1, n):
            want[i] = want[parents[i]] * rate[i]
        assert np.array_equal(path_products(rate, parents, depths), want)
