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


def build(name, target, draft):
    spec = methods.get(name)
    return spec.factory(TinyEngine(target, draft), **spec.validate(spec.test_opts))


def prompt_of(seed, vocab=96, n=30):
    rng = random.Random(seed)
    base = [rng.randrange(1, vocab - 1) for _ in range(5)]
    return [base[i % 5] if rng.random() < 0.7 else rng.randrange(1, vocab - 1) for i in range(n)]


# ---------------------------------------------------------------- every registered method
@pytest.mark.parametrize("name", methods.names())
def test_every_registered_method_matches_plain_greedy(pair, name):
    target, draft = pair
    d = build(name, target, draft)
    for seed in range(3):
        prompt = prompt_of(seed)
        ref, _ = generate(target, prompt, max_new_tokens=40)
        out, st = generate(target, prompt, drafter=d, max_new_tokens=40)
        assert out == ref, f"{name} diverged on prompt {seed}"
        for m in (1, 5):                                    # max_new_tokens cuts inside a draft
            assert generate(target, prompt, drafter=d, max_new_tokens=m)[0] == ref[:m]


def test_draft_model_accepts_and_rejects(pair):
    target, draft = pair
    d = build("draft", target, draft)
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


@pytest.mark.parametrize("name", [m for m in methods.names() if methods.get(m).sampling])
def test_every_registered_method_samples_the_target_distribution(tmp_path_factory, name):
    from tests.conftest import make_tiny_hf  # noqa: F401  (fixtures build on it)
    from tests.fixtures import VOCAB  # noqa: F401

    target, draft = _small_pair(tmp_path_factory)
    s = Sampling(temperature=1.0)
    prompt = [1, 2, 3, 1, 2, 3, 1, 2]
    p = exact_third_token(target, prompt, s)
    d = build(name, target, draft)
    counts = np.zeros(p.size)
    n = 1500
    for i in range(n):
        out, _ = generate(target, prompt, drafter=d, sampling=Sampling(temperature=1.0, seed=i), max_new_tokens=3)
        counts[out[2]] += 1
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
    """After every verdict: the draft cache equals a fresh prefill of the committed tokens."""

    checks = 0

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


@pytest.mark.parametrize("noise", ["close", "unrelated"])
def test_catch_up_cache_follows_the_committed_sequence(tmp_path, noise):
    target, draft = tiny_pair(tmp_path, draft_seed=None if noise == "close" else 9)
    for k in (1, 3, 5):
        d = CheckedDraftModel(draft, k=k)
        for seed in range(2):
            prompt = prompt_of(seed)
            ref, _ = generate(target, prompt, max_new_tokens=25)
            out, st = generate(target, prompt, drafter=d, max_new_tokens=25,
                               sampling=Sampling() if seed == 0 else Sampling(temperature=0.0))
            assert out == ref
    assert CheckedDraftModel.checks > 20


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
    assert methods.get("draft").validate({"min_prob": 0})["min_prob"] == 0.0     # int accepted for float
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
        eng.generate("hi", method="draft", max_new_tokens=2)
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

    d = Spy(draft, k=3, subset=subset)
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
    ids = torch.tensor([5, 17, 0, 95, 40])
    x = torch.randn(3, m.cfg.hidden_size)
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


# ---------------------------------------------------------------- OPT-Tree
def test_opt_tree_growth_scores_stop_rule_and_selection():
    from draftwise.policies.opt_tree import grow, top_nodes

    K = 5
    dist = torch.tensor([[0.6, 0.25, 0.1, 0.04, 0.01]])
    calls = []

    def layer(tree, nodes):
        calls.append(list(nodes))
        assert all(int(tree.depths[n]) == len(calls) for n in nodes)     # one forward per layer
        return dist.repeat(len(nodes), 1)

    tree, top1, p = grow(7, dist, layer, width=3, max_depth=10, delta=0.2)
    assert top1.numel() == p.numel() == tree.size and bool(top1[0])
    d = tree.depths
    # every node's score is the product of the probabilities along its path
    for i in range(1, tree.size):
        par = int(tree.parents[i])
        p = float(dist[0, int(tree.tokens[i])])
        assert abs(float(tree.scores[i]) - float(tree.scores[par]) * p) < 1e-6
    # the layer that failed the δ test was never fed to the draft (no wasted forward)
    assert len(calls) == int(d.max()) - 1
    assert all(int(d[n]) < int(d.max()) for c in calls for n in c)
    keep = top_nodes(tree, 4)
    sub = tree.select(keep)                                    # closed under parents, or select raises
    assert sub.size == 5 and float(sub.scores[1:].min()) >= float(torch.sort(tree.scores[1:], descending=True).values[3]) - 1e-7
    assert K == dist.shape[1]


def test_opt_tree_on_the_tiny_pair_accepts_several_tokens(pair):
    from draftwise.drafters.draft_model import OptTreeDraft

    target, draft = pair
    d = OptTreeDraft(draft, width=4, max_depth=6, delta=0.01, max_nodes=8, calibrate=False)
    prompt = prompt_of(1)
    ref, _ = generate(target, prompt, max_new_tokens=40)
    out, st = generate(target, prompt, drafter=d, max_new_tokens=40)
    assert out == ref and st.tau > 1.5 and max(st.tree_sizes) == 9


def test_opt_tree_calibration_learns_acceptance_rates(pair):
    from draftwise.drafters.draft_model import OptTreeDraft
    from draftwise.policies.opt_tree import Calibration

    c = Calibration(buckets=10, prior_weight=4.0)
    top, p = torch.tensor([True, False]), torch.tensor([0.35, 0.35], dtype=torch.float64)
    assert torch.allclose(c.rate(top, p), p)                            # prior: the probability itself
    for _ in range(50):
        c.update(torch.tensor([True, False]), torch.tensor([0.33, 0.38], dtype=torch.float64),
                 torch.tensor([True, False]))
    r = c.rate(top, p)
    assert r[0] > 0.9 and r[1] < 0.05                                   # top choices accepted, others not
    target, draft = pair
    d = OptTreeDraft(draft, width=4, max_depth=6, delta=0.01, max_nodes=8)
    out, _ = generate(target, prompt_of(1), drafter=d, max_new_tokens=30)
    assert out == generate(target, prompt_of(1), max_new_tokens=30)[0]
    assert d.calib.proposed.sum() > 0 and d.calib.accepted.sum() <= d.calib.proposed.sum()
