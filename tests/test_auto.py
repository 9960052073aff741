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
    d.choose_arm = lambda rate, lag=0: arms.append(choose(rate, lag)) or arms[-1]     # record every step's arm
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


def test_fused_scores_equal_their_definition():
    """auto scores a node by the product of conditional rates along its path (raw), scaled by its origin's
    factor (clipped to [0.25, 2]) and capped by every ancestor's score and 1: the one-pass form equals that
    definition, walked ancestor by ancestor, on random trees."""
    import random

    from draftwise.drafters.auto import fused_scores

    rng = random.Random(0)
    for n in (1, 2, 7, 40):
        parents = [-1] + [rng.randrange(i) for i in range(1, n)]
        rate = [1.0] + [rng.uniform(-0.2, 1.3) for _ in range(1, n)]      # out-of-range rates are clipped
        bits = [0] + [rng.choice([1, 2, 3]) for _ in range(1, n)]
        factor = [1.0] + [rng.uniform(0.0, 3.0) for _ in range(3)]
        raw, score, depth = fused_scores(rate, bits, parents, factor)

        def chain(i):                                              # i and its ancestors, root excluded
            out = []
            while i > 0:
                out.append(i)
                i = parents[i]
            return out

        want_raw = [1.0] * n
        for i in range(n):
            for a in reversed(chain(i)):
                want_raw[i] *= min(max(rate[a], 0.0), 1.0)
        for i in range(n):
            caps = [1.0] + [want_raw[a] * min(max(factor[bits[a]], 0.25), 2.0) for a in chain(i)]
            assert abs(raw[i] - want_raw[i]) < 1e-12 and depth[i] == len(chain(i))
            assert abs(score[i] - min(caps)) < 1e-12


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
    assert d.choose_arm(32.0) == "model"                          # ... or not enough more to leave the model arm
    seen = [d.choose_arm(50.0) for _ in range(6 * d.explore_every)]
    e = d.explore_every                                           # explored for two steps (the switch, one counted)
    assert seen[e:e + 2] == ["model", "model"] and "model" not in seen[:e]
    assert seen[3 * e + 2:3 * e + 4] == ["model", "model"]        # that exploration lost: the next comes 2e later
    assert seen.count("model") == 4
    assert d.choose_arm(32.0) == "free"                           # from the free arm, 30 tokens/s must beat 32 x 1.1
    lagging = [d.choose_arm(50.0, lag=d.explore_lag + 1) for _ in range(d.max_explore_every + 1)]
    assert "model" not in lagging                                 # no exploration while its catch-up is long ...
    assert d.choose_arm(50.0, lag=d.explore_lag) == "model"       # ... one as soon as it is short
    assert d.choose_arm(20.0, lag=10_000) == "model"              # a winning model arm runs whatever its lag


def test_calibrated_scores_scale_by_origin_and_stay_parents_first():
    from draftwise.drafters.auto import fused_scores

    parents = [-1, 0, 0, 1, 3]
    rate = [1.0, 0.6, 0.3, 5 / 6, 0.8]                             # raw: 0.6, 0.3, 0.5, 0.4
    bits = [0, 1, 2, 2, 1]                                         # 1 recycling only, 2 retrieval only
    raw, s, _ = fused_scores(rate, bits, parents, [1.0, 0.5, 2.0, 1.0])
    assert s[0] == 1.0 and s[1] == 0.3 and abs(s[2] - 0.6) < 1e-12   # scaled by their origin's factor
    assert s[3] == 0.3 and abs(s[4] - 0.2) < 1e-12                  # 1.0 capped at its parent; 0.2 below it
    assert all(s[i] <= s[parents[i]] for i in range(1, 5))
    assert fused_scores(rate, bits, parents, [1.0, 0.01, 9.0, 1.0])[1][1] == 0.6 * 0.25   # clipped


def test_recycling_best_candidates_are_the_best_valid_template_nodes():
    """The free arm reads recycling's k best template nodes as lists: the same tokens and estimates as the
    full template arrays, exactly the top-k by estimate among the nodes whose rows exist, parents first."""
    import numpy as np
    import torch

    from draftwise.drafters.base import Context
    from draftwise.drafters.recycling import TokenRecycling

    rng = np.random.default_rng(3)
    for trial in range(20):
        rec = TokenRecycling(50, k=4, template_nodes=40)
        rec.M.copy_(torch.from_numpy(rng.integers(0, 50, (50, 4))))
        rec.seen.copy_(torch.from_numpy(rng.random(50) < 0.8))
        ids = torch.from_numpy(rng.integers(0, 41, 60))
        rec.record(ids, torch.from_numpy(rng.random(60) < 0.5))
        ctx = Context([int(rng.integers(0, 50))], None, None, None)
        toks, est = rec.candidate_arrays(ctx)
        k = int(rng.integers(1, 40))
        got_ids, got_toks, got_pars, got_est = rec.best_candidates(ctx, k)
        order = np.argsort(-rec.estimates().numpy()[1:], kind="stable")[:k] + 1
        want = sorted([0] + [int(i) for i in order if est[i] > 0])
        assert got_ids == want
        assert got_toks == toks[want].tolist() and got_est == est[want].tolist()
        assert all(got_ids[p] == rec.parents[i] for i, p in zip(got_ids[1:], got_pars[1:]))
        p0, a0 = rec.proposed.clone(), rec.accepted.clone()
        hit = [bool(x) for x in rng.random(len(got_ids)) < 0.5]
        rec.record(torch.tensor(got_ids), torch.tensor(hit))
        want_p, want_a = rec.proposed.clone(), rec.accepted.clone()
        rec.proposed.copy_(p0), rec.accepted.copy_(a0)
        rec.record_lists(got_ids, hit)                             # the list form of record
        assert torch.equal(rec.proposed, want_p) and torch.equal(rec.accepted, want_a)


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
    d.choose_arm = lambda rate, lag=0: arms.append(choose(rate, lag)) or arms[-1]
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


def _auto_with_store(model, docs, tmp_path):
    import numpy as np

    from draftwise import datastore as D
    from draftwise.drafters.auto import Auto
    from draftwise.drafters.recycling import TokenRecycling
    from draftwise.drafters.retrieval import RetrievalSource
    from draftwise.policies.budget import CostCurve, OnlineCost

    stream = np.concatenate([np.append(np.asarray(d, np.int32), D.SEPARATOR) for d in docs]).astype(np.int32)
    D.write(stream, tmp_path / "s.dwds", "fp", model.cfg.vocab_size)
    source = RetrievalSource(D.Datastore.load(tmp_path / "s.dwds"), lookup=True)
    d = Auto(TokenRecycling(model.cfg.vocab_size, device="cpu"), source, OnlineCost(CostCurve.flat()))
    queried = []
    cands = source.candidates
    source.candidates = lambda ctx, use_store=True: queried.append(use_store) or cands(ctx, use_store)
    return d, queried


def test_a_datastore_that_proposes_nothing_accepted_is_queried_only_on_probes(useless_pair, tmp_path):
    import random

    target, _ = useless_pair
    rng = random.Random(0)
    prompt = [rng.randrange(target.cfg.vocab_size) for _ in range(30)]
    ref, _ = generate(target, prompt, max_new_tokens=200)
    # the store holds every 2-gram of the prompt and the answer, each followed by tokens the target never picks
    docs = [[a, b] + [(b * 7 + j) % target.cfg.vocab_size for j in range(1, 6)] for a, b in zip(ref, ref[1:])]
    d, queried = _auto_with_store(target, docs, tmp_path)
    out, _ = generate(target, prompt, drafter=d, max_new_tokens=200)
    assert out == ref
    g = d.store_gate
    assert g.queries >= g.trial and g.value < g.cost
    late = queried[g.trial + 8:]
    assert len(late) > 20 and sum(late) <= len(late) / g.probe_every + 1   # probes only


def test_a_datastore_that_holds_the_answer_stays_queried(useless_pair, tmp_path):
    target, _ = useless_pair
    prompt = [3, 9, 27, 4, 12, 36]
    ref, _ = generate(target, prompt, max_new_tokens=100)
    d, queried = _auto_with_store(target, [prompt + ref], tmp_path)
    out, st = generate(target, prompt, drafter=d, max_new_tokens=100)
    assert out == ref and all(queried) and st.sources.get("retrieval", 0) > 50
    assert d.store_gate.value > d.store_gate.cost


def test_the_datastore_query_is_sized_by_the_cost_curve(useless_pair, tmp_path):
    from draftwise.drafters.auto import affordable_nodes, store_query
    from draftwise.policies.budget import CostCurve

    cpu = CostCurve((1, 2, 4, 6, 8, 16), (15.0, 15.5, 19.0, 29.0, 38.0, 75.0))    # the 0.5B on a 2-core EPYC
    assert affordable_nodes(cpu, 80) == 5                  # root + 5: t(6) = 29 <= 2 x t(1) < t(7) = 33.5
    assert affordable_nodes(cpu, 3) == 3
    assert store_query(cpu, None) == (40, 6)
    assert store_query(CostCurve.flat(), None) == (64, 16)  # a GPU-like curve: REST's 64 x 16
    assert store_query(cpu, 1) == (16, 4)                  # a fixed max_nodes decides instead

    target, _ = useless_pair
    prompt = [3, 9, 27, 4, 12, 36]
    ref, _ = generate(target, prompt, max_new_tokens=40)
    d, _ = _auto_with_store(target, [prompt + ref], tmp_path)
    store, calls = d.source.store, []
    retrieve = store.retrieve
    store.retrieve = lambda arr, conts, length, match: calls.append((conts, length)) or retrieve(arr, conts, length, match)
    d.source.max_conts, d.source.store_len = 7, 3
    out, _ = generate(target, prompt, drafter=d, max_new_tokens=40)
    assert out == ref and calls and set(calls) == {(7, 3)}
    assert all(len(c) <= 3 for c in retrieve(prompt + ref[:5], 7, 3, 16)[1])


def test_auto_store_options_reach_the_retrieval_source(useless_pair, tmp_path):
    import numpy as np

    from draftwise import datastore as D
    from draftwise.vocab import fingerprint

    class Tok:
        def get_vocab(self):
            return {}

    target, _ = useless_pair
    eng = TinyEngine(target)
    eng.tokenizer = Tok()
    D.write(np.asarray([1, 2, 3, 4, 5, D.SEPARATOR], np.int32), tmp_path / "s.dwds", fingerprint(eng.tokenizer),
            target.cfg.vocab_size)
    spec = methods.get("auto")
    d = spec.factory(eng, **spec.validate({"datastore": str(tmp_path / "s.dwds"), "store_conts": 5, "store_len": 2}))
    assert (d.source.max_conts, d.source.store_len, d.source.max_len) == (5, 2, 16)   # context lookup stays 16 deep
    d = spec.factory(eng, **spec.validate({"datastore": str(tmp_path / "s.dwds")}))
    assert (d.source.max_conts, d.source.store_len) == (64, 16)                         # a flat curve: REST's sizes
