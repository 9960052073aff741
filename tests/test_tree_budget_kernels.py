"""Unit tests: DraftTree, trie merge, budget arithmetic, the prepacked kernel, TR persistence."""
import numpy as np
import pytest
import torch

from draftwise import kernels
from draftwise.errors import CheckpointError, ConfigError
from draftwise.policies.budget import CostCurve, best_prefix
from draftwise.tree import DraftTree, merge_trees, merge_tries


def test_ancestor_mask_paths_and_select():
    t = DraftTree.from_parents([9, 1, 2, 3, 4, 5], [-1, 0, 0, 1, 3, 2])
    m = t.ancestor_mask()
    expect = torch.tensor([[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 0, 1, 0, 0, 0],
                           [1, 1, 0, 1, 0, 0], [1, 1, 0, 1, 1, 0], [1, 0, 1, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(m, expect)
    assert t.depths.tolist() == [0, 1, 1, 2, 3, 2]
    assert sorted(t.paths()) == [[0, 1, 3, 4], [0, 2, 5]]
    assert t.positions(10).tolist() == [10, 11, 11, 12, 13, 12]
    s = t.select(torch.tensor([0, 2, 5]))
    assert s.tokens.tolist() == [9, 2, 5] and s.parents.tolist() == [-1, 0, 1]
    with pytest.raises(ValueError):
        t.select(torch.tensor([0, 3]))
    with pytest.raises(ValueError):
        DraftTree(torch.tensor([1, 2]), torch.tensor([-1, 1]), torch.tensor([0, 1]))
    s.template_ids = torch.tensor([4, 5, 6])
    assert s.to("cpu") is s                          # already there: no copy
    if torch.cuda.is_available():
        g = s.to("cuda")
        assert g.tokens.is_cuda and g.to("cuda") is g and g.template_ids is s.template_ids
        assert g.to("cpu").tokens.tolist() == [9, 2, 5]


def test_trie_merge_and_tree_fusion():
    toks, pars = merge_tries(7, [[1, 2, 3], [1, 2, 4], [5]])
    assert toks == [7, 1, 2, 3, 4, 5] and pars == [-1, 0, 1, 2, 2, 0]
    a = DraftTree.from_parents(toks, pars)
    b = DraftTree.from_parents([7, 1, 2, 9, 5, 6], [-1, 0, 1, 2, 0, 4])
    f, mapping = merge_trees(a, b)
    assert mapping.tolist() == [0, 1, 2, 6, 5, 7]
    assert f.size == 8                                   # shared prefix 1-2 and 5 reuse nodes
    assert f.tokens.tolist()[:6] == toks and f.tokens.tolist()[6:] == [9, 6]
    assert f.parents.tolist()[6:] == [2, 5]


def test_budget_arithmetic():
    flat = CostCurve.flat()
    assert best_prefix([0.9, 0.5, 0.1], flat) == 3
    steep = CostCurve((1, 2, 4), (1.0, 2.0, 4.0))        # cost proportional to n: drafting never pays
    assert best_prefix([0.9, 0.5], steep) == 0
    c = CostCurve((1, 2, 4, 8), (100.0, 110.0, 130.0, 200.0))
    # m=1: 1.8/110, m=2: 2.4/120, m=3: 2.6/130 -> m=2
    assert best_prefix([0.8, 0.6, 0.2], c) == 2
    assert c.t(16) == pytest.approx(200 + 70 / 4 * 8)   # linear extrapolation
    assert best_prefix([0.8, 0.6, 0.2], c, max_nodes=1) == 1
    with pytest.raises(ConfigError):
        CostCurve((1, 2), (1.0,))


@pytest.mark.skipif(not kernels.available(), reason=f"kernels unavailable: {kernels.why_unavailable()}")
@pytest.mark.parametrize("shape", [(40, 100), (17, 64), (33, 96)])
def test_kernel_matches_float64_and_is_batch_invariant(shape):
    out_f, in_f = shape
    torch.manual_seed(0)
    w, b = torch.randn(out_f, in_f), torch.randn(out_f)
    p, bp = kernels.pack_weight(w), kernels.pad_bias(b)
    for n in (1, 2, 3, 4, 5, 6, 7, 8, 13, 16):
        x = torch.randn(n, in_f)
        y = kernels.linear(x, p, bp, out_f)
        ref = x.double() @ w.double().t() + b.double()
        assert (y.double() - ref).abs().max().item() < 1e-4
        for r in range(n):                                   # every row equals its one-row result
            assert torch.equal(y[r:r + 1], kernels.linear(x[r:r + 1].contiguous(), p, bp, out_f))


def test_recycling_save_load_roundtrip(tmp_path):
    from draftwise.drafters.recycling import TokenRecycling

    d = TokenRecycling(50, k=4)
    d.M[3] = torch.tensor([1, 2, 3, 4]); d.seen[3] = True
    d.save(tmp_path / "m.pt")
    e = TokenRecycling(50, k=4)
    e.load(tmp_path / "m.pt")
    assert torch.equal(e.M, d.M) and bool(e.seen[3])
    with pytest.raises(CheckpointError, match="vocab"):
        TokenRecycling(60, k=4).load(tmp_path / "m.pt")
    (tmp_path / "bad.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="corrupt"):
        e.load(tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="not found"):
        e.load(tmp_path / "none.pt")
    with pytest.raises(ConfigError):
        TokenRecycling(50, k=0)


def test_lookup_matching():
    from draftwise.drafters.lookup import PromptLookup, find_matches

    arr = np.array([1, 2, 3, 9, 1, 2, 3, 7, 1, 2, 3])
    assert find_matches(arr, 3, 5).tolist() == [4, 0]
    assert find_matches(arr, 4, 5).tolist() == []
    d = PromptLookup(max_depth=3, max_matches=2)
    conts = d.continuations(arr)
    assert conts == [[7, 1, 2], [9, 1, 2]]
    with pytest.raises(ConfigError):
        PromptLookup(min_ngram=3, max_ngram=2)


def test_lookup_continuations_equal_matching_each_n():
    """continuations scans the context once for the newest token and measures each match backwards: the
    same continuations, in the same order, as find_matches for each n, longest first, on random contexts."""
    from draftwise.drafters.lookup import PromptLookup, find_matches

    def by_each_n(d, arr):
        conts, seen = [], set()
        for n in range(d.max_ngram, d.min_ngram - 1, -1):
            for i in find_matches(arr, n, d.max_matches * 2):
                c = tuple(arr[i + n: i + n + d.max_depth].tolist())
                if c and c not in seen:
                    seen.add(c)
                    conts.append(list(c))
                    if len(conts) >= d.max_matches:
                        return conts
            if conts:
                break
        return conts

    rng = np.random.default_rng(5)
    for _ in range(1500):
        arr = rng.integers(0, int(rng.integers(2, 12)), int(rng.integers(0, 60)))
        hi = int(rng.integers(1, 6))
        d = PromptLookup(max_ngram=hi, min_ngram=int(rng.integers(1, hi + 1)), max_depth=int(rng.integers(1, 8)),
                         max_matches=int(rng.integers(1, 6)))
        assert d.continuations(arr) == by_each_n(d, arr)


def test_best_prefix_with_patience():
    """The plain-Python walk scores prefixes as the numpy form does: with patience at least the number of
    gains it is exact on any curve, and with 8 on falling gains over a measured CPU curve."""
    rng = np.random.default_rng(2)
    cpu = CostCurve((1, 2, 3, 4, 6, 8, 16, 64), (16.9, 17.1, 20.2, 24.5, 34.9, 44.5, 79.4, 307.0))
    for _ in range(300):
        m = int(rng.integers(0, 40))
        gains = sorted(rng.random(m) ** int(rng.integers(1, 4)), reverse=True)
        curve = CostCurve(tuple(range(1, 9)), tuple(np.cumsum(rng.random(8) * 5 + 0.1)))
        oh = float(rng.random())
        assert best_prefix(gains, curve, overhead_ms=oh, patience=max(m, 1)) == best_prefix(gains, curve, overhead_ms=oh)
        assert best_prefix(gains, cpu, overhead_ms=oh, patience=8) == best_prefix(gains, cpu, overhead_ms=oh)
        assert best_prefix(gains, cpu, max_nodes=3, patience=8) == best_prefix(gains, cpu, max_nodes=3)


def test_budget_with_context_and_overhead():
    # verification of 4 nodes is almost free after 128 tokens, dear after 2048 (attention)
    c = CostCurve((1, 4), (10.0, 11.0), context=128, ms_long=(12.0, 30.0), context_long=1024)
    assert float(c.t(4, 128)) == 11.0 and float(c.t(4, 1024)) == 30.0
    assert abs(float(c.t(4, 576)) - 20.5) < 1e-9 and float(c.t(4)) == 11.0
    gains = [0.5, 0.3, 0.2]
    assert best_prefix(gains, c, context=128) == 3
    assert best_prefix(gains, c, context=2048) == 0           # too dear at long context: plain decoding
    assert best_prefix(gains, c, context=128, overhead_ms=20.0) == 0   # drafting overhead eats the gain
    assert CostCurve.from_json(c.to_json()) == c
    with pytest.raises(ConfigError):
        CostCurve((1, 4), (10.0, 11.0), ms_long=(12.0,), context_long=1024)


@pytest.mark.skipif(not kernels.available(), reason=f"kernels unavailable: {kernels.why_unavailable()}")
def test_large_n_kernel_path_is_bit_identical_per_row():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(70, 300, generator=g)
    b = torch.randn(70, generator=g)
    P, bp = kernels.pack_weight(W), kernels.pad_bias(b)
    x = torch.randn(40, 300, generator=g)                      # 40 rows: the K-blocked path
    y = kernels.linear(x, P, bp, 70)
    for n in (1, 2, 3, 5, 11):
        assert torch.equal(kernels.linear(x[:n].contiguous(), P, bp, 70), y[:n])
    torch.testing.assert_close(y, x @ W.T + b, rtol=1e-4, atol=1e-4)


def test_online_cost_learns_the_real_pass_times_and_probes_one_node_passes():
    from draftwise.policies.budget import OnlineCost

    prior = CostCurve((1, 4, 16), (10.0, 10.0, 20.0))        # says 4 nodes cost as much as 1
    c = OnlineCost(prior, probe_every=5)
    gains = [0.2, 0.1, 0.05]
    assert best_prefix(gains, c) == 3                          # believes the prior
    for _ in range(6):
        c.observe(1, 8.0)                                      # the machine is faster than measured...
        c.observe(4, 12.0)                                     # ...and trees cost more than measured
    assert abs(float(c.t(1)) - 8.0) < 1e-9 and abs(float(c.t(4)) - 12.0) < 1e-9
    assert abs(float(c.t(16)) - 24.0) < 1e-9                   # an unseen bucket borrows the nearest ratio
    assert best_prefix(gains, c) == 0                          # 1.35 tokens for 1.5x the time: no
    assert not c.probe_due()
    for _ in range(5):
        c.observe(4, 12.0)
    assert c.probe_due()                                       # 5 passes without a one-node pass
    c.observe(1, 8.0)
    assert not c.probe_due()


def test_a_tree_size_that_looked_dear_once_is_tried_again():
    from draftwise.policies.budget import OnlineCost

    c = OnlineCost(CostCurve((1, 4), (10.0, 10.0)), probe_every=8)
    c.observe(1, 10.0)
    c.observe(4, 40.0)                                         # one slow pass (another process ran)
    gains = [0.6, 0.5, 0.4]
    assert best_prefix(gains, c) == 0                          # trees now look 4x dearer: only one-node passes
    steps = 0
    while best_prefix(gains, c) == 0:
        c.observe(1, 10.0)                                     # what the planner runs while it keeps nothing
        steps += 1
        assert steps < 40, "a tree size once measured slow is never verified again"
    assert steps > 8                                           # not before the bucket is stale
    for _ in range(8):
        c.observe(4, 10.0)                                     # tried: measured at its real cost
    assert float(c.t(4)) < 12.0 and best_prefix(gains, c) == 3
    d = OnlineCost(CostCurve((1, 4), (10.0, 10.0)), probe_every=8)
    for _ in range(20):                                        # a size that really is dear stays dear while measured
        d.observe(1, 10.0)
        d.observe(4, 40.0)
    assert abs(float(d.t(4)) - 40.0) < 1e-9


@pytest.mark.skipif(not kernels.available(), reason=f"kernels unavailable: {kernels.why_unavailable()}")
@pytest.mark.parametrize("n,H,Hkv,Dh,T", [(1, 14, 2, 64, 37), (6, 12, 2, 128, 90), (3, 9, 3, 20, 11)])
def test_native_attention_matches_sdpa_and_each_row_stands_alone(n, H, Hkv, Dh, T):
    from draftwise.models.layers import attention, native_attention

    g = torch.Generator().manual_seed(n * 100 + T)
    q = torch.randn(n, H, Dh, generator=g)
    k_all, v_all = torch.randn(Hkv, T + 9, Dh, generator=g), torch.randn(Hkv, T + 9, Dh, generator=g)
    keys, values = k_all[:, :T], v_all[:, :T]                         # a cache view: strided heads
    vis = torch.rand(n, T, generator=g) > 0.4
    vis[:, 0] = True
    mask = torch.zeros(n, T).masked_fill_(~vis, float("-inf")).repeat(H // Hkv, 1)
    for m in (None, mask):
        torch.testing.assert_close(native_attention(q, keys, values, m), attention(q, keys, values, m),
                                   rtol=1e-5, atol=2e-6)
    whole = native_attention(q, keys, values, mask)
    for r in range(n):        # alone, over its visible prefix only: the same bits (what a tree node relies on)
        last = int(vis[r].nonzero().max()) + 1
        alone = native_attention(q[r:r + 1], keys[:, :last], values[:, :last], mask[r:r + 1, :last].contiguous())
        assert torch.equal(alone[0], whole[r])
    gu = torch.randn(3, 2 * 40, generator=g) * 8
    torch.testing.assert_close(kernels.swiglu(gu), torch.nn.functional.silu(gu[:, :40]) * gu[:, 40:],
                               rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not kernels.available(), reason=f"kernels unavailable: {kernels.why_unavailable()}")
@pytest.mark.parametrize("H,Hkv,Dh,prefix", [(14, 2, 64, 37), (12, 2, 128, 90), (9, 3, 20, 8), (4, 4, 16, 3)])
def test_native_attention_of_a_scattered_path_equals_the_contiguous_one(H, Hkv, Dh, prefix):
    """A tree node's ancestors sit at scattered slots (siblings between them); decoding the same path puts
    their keys at consecutive slots. The attention must give the same bits either way (the softmax sum
    runs in lanes by rank among the visible slots): with slot-indexed lanes the 1.5B's greedy output
    changed under trees with 8-bit activations."""
    from draftwise.models.layers import native_attention

    g = torch.Generator().manual_seed(H * Dh + prefix)
    for trial in range(6):
        extra = int(torch.randint(3, 14, (1,), generator=g))           # tree slots after the prefix
        T = prefix + extra
        vis = torch.zeros(T, dtype=torch.bool)
        vis[:prefix] = True
        path = sorted(torch.randperm(extra - 1, generator=g)[: max(1, extra // 3)].tolist())
        vis[[prefix + i for i in path] + [T - 1]] = True                # ancestors and the node itself
        q = torch.randn(1, H, Dh, generator=g)
        keys, values = torch.randn(Hkv, T, Dh, generator=g) * 3, torch.randn(Hkv, T, Dh, generator=g)
        mask = torch.zeros(1, T).masked_fill_(~vis, float("-inf")).repeat(H // Hkv, 1)
        tree = native_attention(q, keys, values, mask)
        idx = vis.nonzero()[:, 0]
        seq = native_attention(q, keys[:, idx].contiguous(), values[:, idx].contiguous(), None)
        assert torch.equal(tree, seq), trial


@pytest.mark.skipif(not kernels.available(), reason=f"kernels unavailable: {kernels.why_unavailable()}")
@pytest.mark.parametrize("arch", ["qwen2", "llama", "qwen3"])
def test_whole_layer_calls_equal_the_per_op_path(tmp_path, arch):
    """kernels/layer.c runs a layer in one call: the same bits as the NATIVE glue op by op, caches included
    (qwen3's q/k norms keep the per-op path)."""
    from draftwise.models.transformer import Transformer, prefill
    from tests.conftest import make_tiny_hf

    make_tiny_hf(arch, tmp_path / arch, seed=3)
    m = Transformer.from_pretrained(tmp_path / arch, dtype=torch.float32, max_len=64)
    assert all((p is None) == (arch == "qwen3") for p in m._plans)
    toks = torch.randint(1, 90, (24,), generator=torch.Generator().manual_seed(0))
    tree = torch.tensor([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 0, 1, 0, 0], [1, 1, 0, 1, 0], [0, 0, 0, 0, 1]],
                        dtype=torch.bool)
    runs = []
    for plans in (m._plans, [None] * len(m._plans)):
        m._plans = plans
        c = m.new_cache()
        first = prefill(m, c, toks[:19]).logits
        out = m.forward(toks[19:], torch.tensor([19, 20, 20, 21, 19]), c, tree_mask=tree)
        runs.append((first, out.logits, c.k[:, :, :24].clone(), c.v[:, :, :24].clone()))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_online_cost_buckets_and_fill_by_their_definitions():
    """observe's scalar bucket is bucket(n), and an unseen bucket takes the larger ratio of its nearest
    seen neighbours (checked against a direct search on random seen patterns)."""
    import numpy as np

    from draftwise.policies.budget import OnlineCost

    for n in list(range(1, 70)) + [1000, 2047, 2048, 2049, 5000]:
        c = OnlineCost(CostCurve.flat())
        c.observe(n, 1.0)
        assert np.flatnonzero(c.seen).tolist() == [int(OnlineCost.bucket(n))] == [OnlineCost.bucket_one(n)]
        assert c.t(n) == pytest.approx(float(c.t(np.array(n))))            # the scalar path = the array path
    rng = np.random.default_rng(1)
    for _ in range(200):
        c.ratio, c.seen = rng.random(12) * 2, rng.random(12) < 0.3
        c._fill()
        seen = np.flatnonzero(c.seen)
        for i in range(12):
            near = [c.ratio[j] for j in (seen[seen <= i][-1:].tolist() + seen[seen >= i][:1].tolist())]
            assert c._filled[i] == (max(near) if near else 1.0)


def _reference_accept(tree: DraftTree, best: list[int]) -> tuple[list[int], int]:
    """Greedy acceptance by definition: walk down from the root, taking the first child whose token is the
    target's argmax at the current node, until none is (independent of verify_greedy's propagation)."""
    par, toks = tree.parents.tolist(), tree.tokens.tolist()
    path = [0]
    while True:
        kids = [i for i in range(1, len(toks)) if par[i] == path[-1] and toks[i] == best[path[-1]]]
        if not kids:
            return path, best[path[-1]]
        path.append(kids[0])


@pytest.mark.parametrize("seed", range(6))
def test_greedy_verification_accepts_the_longest_matching_path(seed):
    from draftwise.verify import verify_greedy

    g = torch.Generator().manual_seed(seed)
    for _ in range(40):
        n, V = int(torch.randint(1, 24, (1,), generator=g)), 5
        parents = [-1] + [int(torch.randint(0, i, (1,), generator=g)) for i in range(1, n)]
        tree = DraftTree.from_parents(torch.randint(0, V, (n,), generator=g).tolist(), parents)
        logits = torch.randn(n, V, generator=g)
        acc = verify_greedy(tree, logits)
        path, bonus = _reference_accept(tree, logits.argmax(-1).tolist())
        best = logits.argmax(-1).tolist()
        # every edge of the path matches the target's argmax, and the emitted tokens are the path's + the bonus
        assert all(tree.parents[j] == i and tree.tokens[j] == best[i] for i, j in zip(acc.path, acc.path[1:]))
        assert acc.bonus == best[acc.path[-1]] and acc.tokens == tree.tokens[acc.path[1:]].tolist() + [acc.bonus]
        # the deepest such path (the reference's first-match walk may stop early under repeated siblings);
        # where siblings never repeat a token, the path is unique
        assert len(acc.path) >= len(path)
        if len(set(zip(parents, tree.tokens.tolist()))) == n:
            assert acc.path == path and acc.bonus == bonus


def test_cost_curve_for_one_n_equals_the_array_form():
    c = CostCurve((1, 2, 4, 8, 64), (10.0, 11.0, 14.0, 20.0, 90.0), 128, (12.0, 13.5, 17.0, 25.0, 120.0), 1024)
    for n in (1, 2, 3, 5, 8, 40, 64, 65, 200):
        for ctx in (None, 0, 128, 600, 1024, 4000):
            assert c.t(n, ctx) == pytest.approx(float(c.t(np.array(n), ctx)), rel=1e-12)
