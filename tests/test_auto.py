"""``auto``: the per-step arm choice on hand-made rates, a useless draft model stops running, accepted tokens
are credited to their sources; (its losslessness, greedy and sampled, is in the registry-wide tests
of tests/test_core.py, with and without a draft model)."""
import pytest

from draftwise import methods
from draftwise.decoding import generate
from tests.fixtures import TinyEngine, tiny_pair


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
    arms = []
    choose = d.choose_arm
    d.choose_arm = lambda rate: arms.append(choose(rate)) or arms[-1]     # record every step's arm
    out, st = generate(target, prompt, drafter=d, max_new_tokens=120)
    assert out == ref and len(arms) == st.steps
    trial = d.arms.trial + 1                      # its trial (the first step's catch-up is not counted) ...
    assert arms[:trial] == ["model"] * trial and len(arms) > trial + 8
    assert "model" not in arms[trial:trial + d.explore_every], arms     # ... then it does not run
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


def test_the_model_arm_runs_only_where_it_beats_the_free_tree(useless_pair):
    """Per step, the draft model runs when its realized rate beats the free tree's expected rate, after
    its trial steps, and at least every explore_every steps."""
    target, draft = useless_pair
    spec = methods.get("auto")
    d = spec.factory(TinyEngine(target, draft), **spec.validate({}))
    assert [d.choose_arm(1e9) for _ in range(d.arms.trial)] == ["model"] * d.arms.trial   # its trial first
    for _ in range(d.arms.trial):
        d.arms.record("model", 3, 0.1)                            # the draft model delivers 30 tokens/s
    assert d.choose_arm(20.0) == "model"                          # the free tree expects less this step
    seen = [d.choose_arm(50.0) for _ in range(3 * d.explore_every)]
    e = d.explore_every                                           # explored for two steps (the switch, one counted)
    assert seen.count("model") == 4 and seen[e:e + 2] == ["model", "model"] and "model" not in seen[:e]


def test_calibrated_scores_scale_by_origin_and_stay_parents_first():
    import numpy as np

    from draftwise.drafters.auto import calibrated

    parents = np.array([-1, 0, 0, 1, 3])
    depths = np.array([0, 1, 1, 2, 3])
    raw = np.array([1.0, 0.6, 0.3, 0.5, 0.4])
    bits = np.array([0, 1, 2, 2, 1], dtype=np.int8)                # 1 recycling only, 2 retrieval only
    s = calibrated(raw, bits, np.array([1.0, 0.5, 2.0, 1.0]), parents, depths)
    assert s[0] == 1.0 and s[1] == 0.3 and s[2] == 0.6            # scaled by their origin's factor
    assert s[3] == 0.3 and s[4] == 0.2                            # 1.0 capped at its parent; 0.2 below it
    assert np.all(s[1:] <= s[parents[1:]])
    assert calibrated(raw, bits, np.array([1.0, 0.01, 9.0, 1.0]), parents, depths)[1] == 0.6 * 0.25   # clipped


@pytest.mark.parametrize("head", ["untrained", "untrained-eagle3"])
def test_an_eagle_head_in_auto_keeps_every_committed_tokens_feature(useless_pair, head):
    """With an EAGLE head as the model arm, the head must hold the target's feature of every committed token
    in order, whichever arm drafted the step (free-arm steps reach it through ``watch``, retrieval nodes
    accepted below its chain through ``extended``); a misaligned feature would only slow drafting, so this
    checks the features themselves against one full forward of the committed text."""
    import torch

    from draftwise.drafters import eagle3

    target, _ = useless_pair
    spec = methods.get("auto")
    d = spec.factory(TinyEngine(target), **spec.validate({"head": head, "head_length": "fixed:2"}))
    prompt = repetitive(30)
    arms = []
    choose = d.choose_arm
    d.choose_arm = lambda rate: arms.append(choose(rate)) or arms[-1]
    out, st = generate(target, prompt, drafter=d, max_new_tokens=60, guard=False)
    assert out == generate(target, prompt, max_new_tokens=60)[0]
    assert {"model", "free"} <= set(arms)                          # both arms ran
    e = d.model.base
    text = prompt + out[:-1]                                       # what the target's cache holds at the end
    assert e.nf == len(text)
    full = target.forward(torch.tensor(text), torch.arange(len(text)), target.new_cache(),
                          hidden_layers=tuple(e.needs.hidden_layers))
    want = e.net.fuse(full, None) if isinstance(e.net, eagle3.Eagle3Head) else full.hidden
    assert torch.allclose(e.feats[:e.nf], want.to(e.feats.dtype), atol=1e-6)
    assert d.describe()["sources"][-1] == "eagle" and set(st.sources) <= {"recycling", "retrieval", "eagle"}
