"""The static-shape forward (models/graphs.py): node-count buckets, padded trees and device-side
cache indexing give the same results as the plain forward, and every registered method stays
lossless on it. On CPU it runs uncaptured ("static"); with DRAFTWISE_TEST_DEVICE=cuda the same
tests run captured CUDA graphs ("on"), replayed from each shape's second use."""
import pytest
import torch

from draftwise import methods
from draftwise.decoding import generate
from draftwise.errors import ConfigError
from draftwise.models.graphs import BUCKETS, MAX_BUCKET, bucket, span
from draftwise.models.transformer import Transformer, prefill
from draftwise.tree import DraftTree
from tests.conftest import DEVICE, make_tiny_hf
from tests.fixtures import TinyEngine

MODE = "on" if DEVICE.startswith("cuda") else "static"
CASES = methods.test_cases()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(eager target, static target, static draft): the same weights, two forward paths."""
    root = tmp_path_factory.mktemp("graphs")
    make_tiny_hf("qwen2", root / "t", seed=11, vocab=96)
    make_tiny_hf("qwen2", root / "d", seed=12, vocab=96)
    load = lambda p, g: Transformer.from_pretrained(p, dtype=torch.float64, max_len=256, device=DEVICE, graphs=g)  # noqa: E731
    return load(root / "t", "off"), load(root / "t", MODE), load(root / "d", MODE)


def test_buckets_and_spans():
    assert [bucket(n) for n in (1, 2, 3, 5, 8, 9, 100, 128)] == [1, 2, 4, 8, 8, 16, 128, 128]
    assert bucket(129) is None and MAX_BUCKET == BUCKETS[-1] == 128
    assert span(0, 1, 10_000) == 256 and span(255, 1, 10_000) == 256 and span(256, 1, 10_000) == 512
    assert span(300, 128, 10_000) == 512 and span(5000, 8, 6000) == 6000      # capped by the capacity


def _both(eager, static, prompt, steps):
    """Run the same sequence of forwards (with hold/commit between them) on both models; compare."""
    caches = [m.new_cache(200) for m in (eager, static)]
    assert caches[1].capacity == 200 + MAX_BUCKET and caches[0].capacity == 200
    for m, c in zip((eager, static), caches):
        prefill(m, c, torch.tensor(prompt, device=DEVICE))
    for step in steps:
        outs = []
        n = len(step["tokens"])
        e = caches[0].end + n                # slots written by this forward
        assert caches[0].end == caches[1].end
        for m, c in zip((eager, static), caches):
            kw = dict(step["kw"])
            if "hidden_in" in kw:
                kw["hidden_in"] = kw["hidden_in"](m, c)
            pos = torch.tensor(step["pos"], device=DEVICE) + c.length
            outs.append(m.forward(torch.tensor(step["tokens"], device=DEVICE), pos, c,
                                  tree_mask=None if step.get("mask") is None else step["mask"].to(DEVICE), **kw))
            step.get("after", lambda c, n: None)(c, n)
        a, b = outs
        if a.logits is None:
            assert b.logits is None
        else:
            torch.testing.assert_close(b.logits, a.logits, rtol=0, atol=1e-10)
        torch.testing.assert_close(b.hidden, a.hidden, rtol=0, atol=1e-10)
        assert a.layer_hidden.keys() == b.layer_hidden.keys()
        for i in a.layer_hidden:
            torch.testing.assert_close(b.layer_hidden[i], a.layer_hidden[i], rtol=0, atol=1e-10)
        layers = slice(step["kw"].get("start_layer", 0), step["kw"].get("end_layer"))   # the layers written
        for t in ("k", "v"):
            ref, got = getattr(caches[0], t), getattr(caches[1], t)
            torch.testing.assert_close(got[:, :, :e - n], ref[:, :, :e - n], rtol=0, atol=1e-10)
            torch.testing.assert_close(got[layers, :, e - n:e], ref[layers, :, e - n:e], rtol=0, atol=1e-10)


def test_static_forward_equals_eager_forward(models):
    eager, static, _ = models
    tree = DraftTree.from_parents([7, 3, 9, 4, 4, 8, 2], [-1, 0, 0, 1, 2, 3, 3])
    anc, depth = tree.ancestor_mask(), tree.depths.tolist()
    hold = lambda c, n: c.hold(n)            # noqa: E731
    commit = lambda c, n: c.commit(n)        # noqa: E731
    discard = lambda c, n: c.discard()       # noqa: E731
    steps = []
    for n in (1, 3, 5, 9, 1, 2):             # chains: buckets 1, 4, 8, 16, 1, 2 (padding in all but 1, 2)
        steps.append(dict(tokens=list(range(5, 5 + n)), pos=list(range(n)), kw={}, after=commit))
    for _ in range(2):                       # a tree, twice: under CUDA graphs the second run replays
        steps.append(dict(tokens=tree.tokens.tolist(), pos=depth, mask=anc, kw={}, after=discard))
    steps.append(dict(tokens=[4], pos=[0], kw=dict(logits_rows=slice(0, 1)), after=commit))
    # a tree layer by layer through the pending region ([n, pending + n] masks)
    fed = []
    for d in range(max(depth) + 1):
        nodes = [i for i in range(tree.size) if depth[i] == d]
        steps.append(dict(tokens=tree.tokens[nodes].tolist(), pos=[depth[i] for i in nodes],
                          mask=anc[nodes][:, fed + nodes], kw=dict(compute_logits=d % 2 == 0), after=hold))
        fed += nodes
    steps.append(dict(tokens=[1, 2], pos=[0, 1], kw={}, after=discard))    # [n, n] mask over pending rows
    # early exit: the first 2 layers, then layers 2.. from given hidden states, with a hidden layer out
    steps.append(dict(tokens=[3, 8, 8], pos=[0, 1, 2], kw=dict(end_layer=2, hidden_layers=(0,)), after=hold))

    def mid(m, c):                           # the same inputs to layer 2 on both sides
        g = torch.Generator().manual_seed(1)
        return torch.randn(3, m.cfg.hidden_size, generator=g, dtype=torch.float64).to(DEVICE)
    steps.append(dict(tokens=[3, 8, 8], pos=[0, 1, 2], kw=dict(start_layer=2, hidden_in=mid, hidden_layers=(2,)),
                      after=lambda c, n: (c.discard(), c.commit(n))))
    _both(eager, static, list(range(1, 40)), steps)
    # the second pass of the same test replays every captured shape
    _both(eager, static, list(range(3, 30)), steps)
    if MODE == "on":
        assert static.static.captured > 0 and static.static.failed is None


@pytest.mark.parametrize("name,opts", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_every_registered_method_is_lossless_on_the_static_path(models, name, opts):
    eager, static, draft = models
    spec = methods.get(name)
    d = spec.factory(TinyEngine(static, draft), **spec.validate(opts))
    for seed in range(2):
        prompt = [(seed * 7 + i * 3) % 90 + 1 for i in range(25)]
        ref, _ = generate(eager, prompt, max_new_tokens=40)
        for _ in range(2):                  # twice: replays under CUDA graphs
            out, _ = generate(static, prompt, drafter=d, max_new_tokens=40)
            assert out == ref, f"{name} diverged on the static path (prompt {seed})"


def test_large_passes_and_caches_without_spare_slots_stay_eager(models):
    _, static, _ = models
    entries = len(static.static.entries)
    cache = static.new_cache(256)
    prefill(static, cache, torch.arange(1, 131, device=DEVICE) % 90)          # 130 > 128: eager
    assert len(static.static.entries) == entries
    from draftwise.models.cache import KVCache
    c = static.cfg
    bare = KVCache(c.num_layers, c.num_kv_heads, 64, c.head_dim, torch.float64, DEVICE)
    prefill(static, bare, torch.arange(1, 62, device=DEVICE))                  # 61 of 64 slots (bucket 64 fits)
    out = static.forward(torch.tensor([5, 6, 7], device=DEVICE), torch.arange(61, 64, device=DEVICE), bare)
    assert out.logits.shape == (3, 96) and bare.end == 61
    assert not [k for k in static.static.entries if k[0] == id(bare.k) and k[1] == 4]    # no room to pad: eager


def test_shapes_of_a_dead_cache_are_forgotten(models):
    _, static, _ = models
    runner = static.static
    c1 = static.new_cache(64)
    prefill(static, c1, torch.arange(1, 10, device=DEVICE))
    static.forward(torch.tensor([5], device=DEVICE), torch.tensor([9], device=DEVICE), c1)
    assert any(k[0] == id(c1.k) for k in runner.entries)
    del c1
    c2 = static.new_cache(64)
    prefill(static, c2, torch.arange(1, 10, device=DEVICE))
    static.forward(torch.tensor([5], device=DEVICE), torch.tensor([9], device=DEVICE), c2)
    live = {id(c2.k)} | {k for k, r in runner._caches.items() if r() is not None}
    assert all(k[0] in live for k in runner.entries)


def test_generate_reuses_one_cache(models):
    _, static, _ = models
    generate(static, [1, 2, 3], max_new_tokens=3)
    first = static._spare_cache
    assert first is not None and first.max_len == static.max_len
    gen = iter(generate(static, [1, 2, 3], max_new_tokens=3)[0])       # lent and given back
    assert static._spare_cache is first and list(gen)


def test_graph_mode_is_checked(tmp_path, monkeypatch):
    monkeypatch.delenv("DRAFTWISE_GRAPHS", raising=False)
    make_tiny_hf("llama", tmp_path, seed=0)
    with pytest.raises(ConfigError, match="graphs must be one of"):
        Transformer.from_pretrained(tmp_path, graphs="always")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="needs a CUDA device"):
            Transformer.from_pretrained(tmp_path, graphs="on")
    assert Transformer.from_pretrained(tmp_path).graphs == "off"          # auto on CPU
    monkeypatch.setenv("DRAFTWISE_GRAPHS", "static")                      # how a whole suite runs the static path
    assert Transformer.from_pretrained(tmp_path).graphs == "static"
    monkeypatch.setenv("DRAFTWISE_GRAPHS", "sometimes")
    with pytest.raises(ConfigError, match="DRAFTWISE_GRAPHS"):
        Transformer.from_pretrained(tmp_path)
    monkeypatch.delenv("DRAFTWISE_GRAPHS")
    monkeypatch.setenv("DRAFTWISE_NO_GRAPHS", "1")                        # the old name: one more release
    with pytest.warns(FutureWarning, match="DRAFTWISE_GRAPHS=off"):
        assert Transformer.from_pretrained(tmp_path).graphs == "off"


@pytest.mark.parametrize("mode", ["glue", "layer"])
def test_compiled_forward_equals_eager_and_keeps_rows_identical(tmp_path, mode):
    """torch.compile'd glue / whole layers (the prepacked kernel as torch.ops.draftwise.linear):
    same logits as eager within fp32 rounding and decoding unchanged. A row computed alone and the
    same row inside a chain agree only to rounding here (inductor specializes n = 1), not bit for bit
    as on the eager kernel path: one reason compile stays opt-in."""
    make_tiny_hf("qwen2", tmp_path, seed=1, vocab=96)
    load = lambda **kw: Transformer.from_pretrained(tmp_path, max_len=128, device=DEVICE, graphs="off", **kw)  # noqa: E731
    eager, comp = load(), load(compile=mode)
    prompt = [(i * 7) % 90 + 1 for i in range(20)]
    with torch.inference_mode():
        caches = [m.new_cache() for m in (eager, comp)]
        for m, c in zip((eager, comp), caches):
            prefill(m, c, torch.tensor(prompt, device=DEVICE))
        toks = torch.tensor([3, 9, 4, 4, 7], device=DEVICE)
        pos = torch.arange(20, 25, device=DEVICE)
        ref, got = (m.forward(toks, pos, c).logits for m, c in zip((eager, comp), caches))
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-4)
        one = comp.forward(toks[:1], pos[:1], caches[1]).logits
        torch.testing.assert_close(one[0], got[0], rtol=0, atol=1e-5)
    assert generate(comp, prompt, max_new_tokens=12)[0] == generate(eager, prompt, max_new_tokens=12)[0]
    with pytest.raises(ConfigError, match="compile must be one of"):
        load(compile="always")
