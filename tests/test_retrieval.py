"""Retrieval datastores, the retrieval drafter and RASD fusion: suffix-array search against brute
force, trie counts, online growth, bad datastores, budgets and fusion invariants, and losslessness
on a real tokenizer."""
import json
import random

import numpy as np
import pytest
import torch

from draftwise import datastore as D
from draftwise.decoding import generate
from draftwise.drafters.base import Context, Drafter
from draftwise.drafters.rasd import Rasd
from draftwise.drafters.retrieval import Retrieval, RetrievalSource
from draftwise.errors import CheckpointError, ConfigError
from draftwise.sampling import Sampling
from draftwise.tree import two_source_trie, weighted_trie
from tests.fixtures import TinyEngine, tiny_pair


def _docs(seed, n_docs=60, alphabet=5, max_len=40):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, alphabet, size=int(rng.integers(1, max_len))).astype(np.int32) for _ in range(n_docs)]


def _stream(docs):
    return np.concatenate([np.append(d, D.SEPARATOR) for d in docs]).astype(np.int32)


def _brute(docs, ctx, max_match, min_match, max_len):
    """Longest suffix of ctx found inside one document, and every continuation after it."""
    for n in range(min(max_match, len(ctx)), min_match - 1, -1):
        pat = list(ctx[-n:])
        conts = [list(d[i + n: i + n + max_len]) for d in docs for i in range(len(d) - n + 1) if list(d[i:i + n]) == pat]
        if conts:
            return n, sorted(tuple(c) for c in conts if c)
    return 0, []


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_suffix_array_lookup_equals_brute_force(tmp_path, seed):
    docs = _docs(seed, alphabet=3 + seed)
    D.write(_stream(docs), tmp_path / "s.dwds", "fp", 8)
    ds = D.Datastore.load(tmp_path / "s.dwds", fingerprint="fp")
    fwd = _stream(docs)[::-1]
    assert np.array_equal(np.asarray(ds.stream), fwd)
    # the suffix array sorts the reversed stream's suffixes
    sufs = [tuple(fwd[i:]) for i in np.asarray(ds.sa)]
    assert sufs == sorted(sufs)
    rng = np.random.default_rng(100 + seed)
    for _ in range(150):
        ctx = rng.integers(0, 3 + seed, size=int(rng.integers(1, 24)))
        n, conts = ds.retrieve(ctx, max_conts=10**6, max_len=6, max_match=16, min_match=2)
        bn, bconts = _brute(docs, ctx, 16, 2, 6)
        assert n == bn
        assert sorted(tuple(c) for c in conts) == bconts      # never across a document boundary


def test_retrieve_samples_at_most_max_conts_evenly(tmp_path):
    docs = [np.array([1, 2, 3, k % 7], dtype=np.int32) for k in range(700)]
    D.write(_stream(docs), tmp_path / "s.dwds", "fp", 8)
    ds = D.Datastore.load(tmp_path / "s.dwds")
    n, conts = ds.retrieve(np.array([9, 1, 2, 3]), max_conts=64, max_len=4)
    assert n == 3 and len(conts) == 64
    counts = np.bincount([c[0] for c in conts], minlength=7)
    assert counts.min() >= 8 and counts.max() <= 10                # each of the 7 continuations ~ 1/7


def test_weighted_trie_counts():
    toks, pars, counts = weighted_trie(9, [[1, 2, 3], [1, 2, 4], [1, 5], [6]], weights=[1, 1, 2, 0.5])
    assert toks == [9, 1, 2, 3, 4, 5, 6] and pars == [-1, 0, 1, 2, 2, 1, 0]
    assert counts == [4.5, 4.0, 2.0, 1.0, 1.0, 2.0, 0.5]


def test_two_source_trie_equals_weighted_tries_of_both_and_of_the_first():
    rng = random.Random(3)
    for _ in range(200):
        first = [[rng.randrange(4) for _ in range(rng.randrange(1, 6))] for _ in range(rng.randrange(0, 6))]
        second = [[rng.randrange(4) for _ in range(rng.randrange(1, 6))] for _ in range(rng.randrange(0, 6))]
        w = rng.choice([1.0, 0.5, 3.0])
        toks, pars, counts, firsts = two_source_trie(7, first, second, w)
        assert (toks, pars, counts) == weighted_trie(7, first + second, [1.0] * len(first) + [w] * len(second))
        ft, fp, fc = weighted_trie(7, first)
        assert (toks[:len(ft)], pars[:len(ft)], firsts[:len(ft)]) == (ft, fp, fc)   # first's nodes come first
        assert all(c == 0 for c in firsts[len(ft):])


@pytest.mark.parametrize("sa_dtype", [np.int32, np.int64])
def test_native_suffix_array_search_equals_the_reference(sa_dtype):
    # without the kernel library native=True falls back to the reference, and the comparison still runs
    rng = np.random.default_rng(5)
    for trial in range(1500):
        alphabet, n = int(rng.integers(2, 6)), int(rng.integers(0, 50))
        stream = rng.integers(0, alphabet, n).astype(np.int32)
        sa = D.suffix_array(stream).astype(sa_dtype)
        if trial % 5 == 0 and n:
            pat = np.concatenate([np.sort(stream)[::-1][:3], [alphabet]]).astype(np.int32)  # past every suffix
        else:
            pat = rng.integers(0, alphabet, int(rng.integers(0, 9))).astype(np.int32)
        m = int(rng.integers(1, 4))
        assert D.longest_match(stream, sa, pat, m, native=True) == D.longest_match(stream, sa, pat, m, native=False)


def test_calibration_rate_one_equals_rate():
    from draftwise.policies.opt_tree import Calibration

    c = Calibration()
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        p = torch.rand(40, generator=g, dtype=torch.float64)
        top1 = torch.rand(40, generator=g) < 0.5
        assert c.rate(top1, p).tolist() == [c.rate_one(t, q) for t, q in zip(top1.tolist(), p.tolist())]
        c.update(top1, p, torch.rand(40, generator=g) < p)


def test_online_overlay_drafts_from_earlier_text():
    ds = D.Datastore.empty(vocab_size=50)
    assert ds.retrieve(np.array([1, 2, 3]))[0] == 0
    ds.add([5, 1, 2, 3, 7, 8, 9])
    ds.add([4, 4])                                                   # too short to matter
    n, conts = ds.retrieve(np.array([0, 1, 2, 3]), max_len=3)
    assert n == 3 and conts == [[7, 8, 9]]
    assert ds.overlay_tokens == 7


def test_datastore_errors_are_clear_and_nothing_is_half_written(tmp_path):
    p = tmp_path / "s.dwds"
    D.write(_stream(_docs(0)), p, "fp", 8)
    with pytest.raises(ConfigError, match="another tokenizer"):
        D.Datastore.load(p, fingerprint="other")
    with pytest.raises(CheckpointError, match="not found"):
        D.Datastore.load(tmp_path / "missing.dwds")
    raw = p.read_bytes()
    (tmp_path / "trunc.dwds").write_bytes(raw[:-10])
    with pytest.raises(CheckpointError, match="truncated"):
        D.Datastore.load(tmp_path / "trunc.dwds")
    bad = bytearray(raw)
    bad[-5] ^= 0xFF
    (tmp_path / "flip.dwds").write_bytes(bytes(bad))
    with pytest.raises(CheckpointError, match="checksum"):
        D.Datastore.load(tmp_path / "flip.dwds")
    (tmp_path / "junk.dwds").write_bytes(b"hello world, not a datastore")
    with pytest.raises(CheckpointError, match="not a draftwise datastore"):
        D.Datastore.load(tmp_path / "junk.dwds")

    class Tok:                                                       # a tokenizer that yields nothing
        def __len__(self):
            return 10

        def __call__(self, texts, add_special_tokens=False):
            return {"input_ids": [[] for _ in texts]}

        def get_vocab(self):
            return {"a": 0}

    (tmp_path / "empty.txt").write_text("   \n")
    out = tmp_path / "e.dwds"
    with pytest.raises(ConfigError, match="no text"):
        D.build(Tok(), [str(tmp_path / "empty.txt")], out, progress=False)
    with pytest.raises(ConfigError, match="not found"):
        D.build(Tok(), [str(tmp_path / "nope")], out, progress=False)
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(ConfigError, match="line 2 is not JSON"):
        D.build(Tok(), [str(tmp_path / "bad.jsonl")], out, progress=False)
    assert not out.exists() and not list(tmp_path.glob(".e.dwds*"))


def _ctx(tokens, remaining=100):
    return Context(tokens=list(tokens), sampling=Sampling(), remaining=remaining)


def test_retrieval_drafter_keeps_its_budget_and_merges_sources(tmp_path):
    docs = [np.array([1, 2, 3, 4, 5, 6], np.int32), np.array([1, 2, 3, 4, 9, 9], np.int32),
            np.array([2, 3, 4, 7], np.int32)]
    D.write(_stream(docs), tmp_path / "s.dwds", "fp", 16)
    ds = D.Datastore.load(tmp_path / "s.dwds")
    src = RetrievalSource(ds, lookup=True)
    ctx = _ctx([3, 4, 8, 8, 2, 3, 4, 11, 12, 0, 2, 3, 4])            # the context also continues 3 4 -> 11 12
    cand = src.candidates(ctx)
    tree = cand.tree
    paths = set()
    for i in range(tree.size):
        p, j = [], i
        while j > 0:
            p.append(int(tree.tokens[j])); j = int(tree.parents[j])
        paths.add(tuple(p[::-1]))
    assert {(5, 6), (9, 9), (7,), (11, 12)} <= paths                  # 2 3 4 matched in the store: 5 6 / 9 9 / 7
    assert (tree.scores[1:] <= tree.scores[tree.parents[1:]] + 1e-6).all()  # p̂ never grows along a path
    for m in (1, 3):
        d = Retrieval(RetrievalSource(ds, lookup=True), max_nodes=m)
        t = d.propose(ctx)
        assert t.size == m + 1
    with pytest.raises(ConfigError, match="datastore, prompt lookup or online"):
        RetrievalSource(None, lookup=False, online=False)


class _StubBase(Drafter):
    """A base drafter that proposes a fixed chain and knows the draft distribution at its root
    (through the composition hook RASD reads)."""

    def __init__(self, tree, root_dist):
        self.tree, self.dists, self.calib, self.observed = tree, {0: root_dist}, None, []

    def node_dists(self):
        return self.dists

    def reset(self, ctx):
        pass

    def propose(self, ctx):
        return self.tree

    def observe(self, tree, out, accepted, ctx):
        self.observed.append((tree.size, list(accepted.path)))

    def describe(self):
        return {"method": "stub"}


def test_rasd_fusion_prunes_keeps_budget_and_base_nodes():
    from draftwise.tree import DraftTree

    base_tree = DraftTree.from_parents([0, 1, 2], [-1, 0, 1], scores=torch.tensor([1.0, 0.9, 0.8]))
    dist = torch.zeros(16, dtype=torch.float64)
    dist[1], dist[5], dist[7] = 0.7, 0.295, 0.005                       # the draft finds 7 implausible
    store = D.Datastore.empty(vocab_size=16)
    for seq in ([0, 1, 2, 3, 4], [0, 1, 6, 6], [0, 5, 5, 5], [0, 7, 8, 8]):
        store.add([9, 9] + seq)
    for budget in (0, 1, 2, 3, 10):
        r = Rasd(_StubBase(base_tree, dist), RetrievalSource(store, lookup=False), retrieval_nodes=budget, prune=0.01)
        fused = r.propose(_ctx([3, 9, 9, 0]))
        assert fused.tokens[:3].tolist() == [0, 1, 2] and fused.parents[:3].tolist() == [-1, 0, 1]
        assert fused.size <= 3 + budget
        seen = set()
        for i in range(1, fused.size):
            assert int(fused.parents[i]) < i                               # parents first
            key = (int(fused.parents[i]), int(fused.tokens[i]))
            assert key not in seen                                         # no duplicate siblings
            seen.add(key)
        assert 7 not in fused.tokens.tolist()                              # pruned by the draft
    # everything the budget allows: every retrieval path survives except the pruned one
    paths = {(1, 2, 3, 4), (1, 6, 6), (5, 5, 5)}
    for p in paths:
        node = 0
        for t in p:
            kids = [i for i in range(fused.size) if int(fused.parents[i]) == node and int(fused.tokens[i]) == t]
            assert kids, p
            node = kids[0]


def test_rasd_and_retrieval_are_lossless_on_a_real_tokenizer(tmp_path):
    """SmolLM2-135M with a datastore built from a text file by the CLI: outputs equal AR."""
    import draftwise
    from draftwise.cli import main

    text = tmp_path / "corpus.txt"
    text.write_text("def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n" * 3
                    + "The capital of France is Paris. The capital of Italy is Rome.\n")
    out = tmp_path / "c.dwds"
    assert main(["datastore", "build", "--model", "smollm2-135m-instruct", "--input", str(text), "--out", str(out),
                 "--quiet"]) == 0
    assert main(["datastore", "info", str(out)]) == 0
    eng = draftwise.load("smollm2-135m-instruct", progress=False)
    for prompt in ("def fibonacci(n):", "The capital of France is"):
        ref = eng.generate(prompt, method="ar", max_new_tokens=24)
        for method, opts in (("retrieval", {"datastore": str(out), "max_nodes": 6}),
                             ("rasd", {"base": "recycling", "datastore": str(out), "base_max_nodes": 4,
                                       "retrieval_nodes": 6})):
            r = eng.generate(prompt, method=method, method_opts=opts, max_new_tokens=24)
            assert r.token_ids == ref.token_ids, (method, prompt)
    r = eng.generate("def fibonacci(n):", method="retrieval", method_opts={"datastore": str(out), "max_nodes": 6},
                     max_new_tokens=24, guard=False)
    assert r.stats.tau > 1.5                                               # the corpus holds the answer
    other = tmp_path / "other.dwds"
    D.write(np.array([1, 2, 3], np.int32), other, "not-this-tokenizer", 10)
    with pytest.raises(ConfigError, match="another tokenizer"):
        eng.generate("hi", method="retrieval", method_opts={"datastore": str(other)}, max_new_tokens=2)


def test_rasd_with_a_draft_model_is_lossless_and_fuses(tmp_path_factory):
    target, draft = tiny_pair(tmp_path_factory.mktemp("pair"))
    from draftwise import methods

    spec = methods.get("rasd")
    d = spec.factory(TinyEngine(target, draft), **spec.validate(
        {"base": "draft-model", "base_max_nodes": 3, "retrieval_nodes": 4, "prune": 0.0}))
    rng = random.Random(5)
    sizes = []
    for seed in range(3):
        base = [rng.randrange(1, 95) for _ in range(6)]
        prompt = (base * 5)[:28]
        ref, _ = generate(target, prompt, max_new_tokens=30)
        out, st = generate(target, prompt, drafter=d, max_new_tokens=30)
        assert out == ref
        sizes += st.tree_sizes
    assert max(sizes) > 4                     # retrieval nodes were fused onto the 3-node base tree
    with pytest.raises(ConfigError, match="needs a draft model"):
        spec.factory(TinyEngine(target), **spec.validate({"base": "draft-model", "retrieval_nodes": 2}))
    with pytest.raises(ConfigError, match="base"):
        spec.factory(TinyEngine(target, draft), **spec.validate({"base": "nope", "retrieval_nodes": 2}))


def test_header_is_json_with_the_fields_info_prints(tmp_path):
    p = tmp_path / "s.dwds"
    h = D.write(_stream(_docs(1)), p, "fp", 8, model="m", sources=["a", "b"])
    raw = p.read_bytes()
    assert raw[:4] == D.MAGIC
    head = json.loads(raw[8: 8 + int.from_bytes(raw[4:8], "little")])
    assert head == h and head["documents"] == 60 and head["version"] == D.VERSION


def test_server_refuses_rasd_without_a_draft_model_up_front():
    from draftwise.server import check_method

    class NoDraft:
        draft_model = None

    with pytest.raises(ConfigError, match="needs a draft model"):
        check_method(NoDraft(), "rasd", None)
    check_method(NoDraft(), "rasd", {"base": "recycling"})
    check_method(NoDraft(), "retrieval", {"online": True})
