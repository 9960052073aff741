"""Our decoder vs Hugging Face transformers on the same weights (fp32, max |diff| <= 1e-4)."""
import pytest
import torch

from draftwise import kernels
from draftwise.models.transformer import Transformer, prefill
from tests.conftest import DEVICE, make_tiny_hf

TOL = 1e-4


def hf_logits(hf, ids):
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].to(DEVICE)


@pytest.mark.parametrize("fast", [True, False])
def test_prefill_and_incremental_match_hf(tmp_path, arch, fast):
    hf = make_tiny_hf(arch, tmp_path, seed=1, tie=(arch == "qwen2"))
    ours = Transformer.from_pretrained(tmp_path, fast=fast, device=DEVICE)
    if fast:
        assert ours.fast == (kernels.available() and DEVICE == "cpu")
    ids = [3, 17, 42, 5, 88, 12, 7, 60, 33, 2]
    ref = hf_logits(hf, ids)                                      # [n, V]
    cache = ours.new_cache(64)
    out = ours.forward(torch.tensor(ids), torch.arange(len(ids)), cache)
    assert (out.logits - ref).abs().max().item() <= TOL
    # incremental: prefill 4 then one token at a time
    cache = ours.new_cache(64)
    out = prefill(ours, cache, torch.tensor(ids[:4]))
    assert (out.logits[0] - ref[3]).abs().max().item() <= TOL
    for i in range(4, len(ids)):
        o = ours.forward(torch.tensor([ids[i]]), torch.tensor([i]), cache)
        cache.commit(1)
        assert (o.logits[0] - ref[i]).abs().max().item() <= TOL


def test_tree_forward_matches_linear_sequences(tmp_path, arch):
    hf = make_tiny_hf(arch, tmp_path, seed=2)
    ours = Transformer.from_pretrained(tmp_path, device=DEVICE)
    prompt = [5, 9, 14, 20, 31]
    # tree: 0 <- root child tokens; parents index within the tree (-1 = attached to prompt end)
    tokens = [40, 41, 50, 51, 52, 60]
    parents = [-1, -1, 0, 0, 1, 2]
    n = len(tokens)
    depth = [0] * n
    anc = torch.zeros(n, n, dtype=torch.bool)
    for i, p in enumerate(parents):
        anc[i, i] = True
        if p >= 0:
            depth[i] = depth[p] + 1
            anc[i] |= anc[p]
    cache = ours.new_cache(64)
    prefill(ours, cache, torch.tensor(prompt))
    pos = torch.tensor([len(prompt) + d for d in depth])
    out = ours.forward(torch.tensor(tokens), pos, cache, tree_mask=anc)
    for i in range(n):
        path, j = [], i
        while j >= 0:
            path.append(tokens[j]); j = parents[j]
        ref = hf_logits(hf, prompt + path[::-1])[-1]
        assert (out.logits[i] - ref).abs().max().item() <= TOL, f"node {i}"


def test_commit_keeps_exactly_the_accepted_rows(tmp_path):
    make_tiny_hf("qwen2", tmp_path, seed=3)
    ours = Transformer.from_pretrained(tmp_path, device=DEVICE)
    cache = ours.new_cache(64)
    prefill(ours, cache, torch.tensor([1, 2, 3]))
    anc = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 1, 1]], dtype=torch.bool)
    ours.forward(torch.tensor([10, 11, 12, 13]), torch.tensor([3, 4, 4, 5]), cache, tree_mask=anc)
    k_before, v_before = cache.k[:, :, 3:7].clone(), cache.v[:, :, 3:7].clone()
    prefix_k = cache.k[:, :, :3].clone()
    cache.commit([0, 2, 3])
    assert cache.length == 6
    assert torch.equal(cache.k[:, :, :3], prefix_k)
    assert torch.equal(cache.k[:, :, 3:6], k_before[:, :, [0, 2, 3]])
    assert torch.equal(cache.v[:, :, 3:6], v_before[:, :, [0, 2, 3]])
    # the committed cache continues exactly like a fresh run over the accepted tokens
    nxt = ours.forward(torch.tensor([20]), torch.tensor([6]), cache).logits[0]
    fresh = ours.new_cache(64)
    ref = ours.forward(torch.tensor([1, 2, 3, 10, 12, 13, 20]), torch.arange(7), fresh).logits[-1]
    assert (nxt - ref).abs().max().item() <= TOL
    cache.truncate(4)
    assert cache.length == 4
    with pytest.raises(ValueError):
        cache.truncate(5)


def test_partial_forward_and_resume_equals_full(tmp_path, arch):
    make_tiny_hf(arch, tmp_path, seed=4)
    ours = Transformer.from_pretrained(tmp_path, device=DEVICE)
    ids = torch.tensor([4, 8, 15, 16, 23, 42])
    pos = torch.arange(6)
    full = ours.forward(ids, pos, ours.new_cache(32), hidden_layers=(0, 1, 2))
    c = ours.new_cache(32)
    part = ours.forward(ids, pos, c, end_layer=2)
    assert part.logits is None
    assert torch.allclose(part.hidden, full.layer_hidden[1], atol=1e-6)
    rest = ours.forward(ids, pos, c, start_layer=2, hidden_in=part.hidden)
    assert (rest.logits - full.logits).abs().max().item() <= 1e-5
    some = ours.forward(ids, pos, ours.new_cache(32), logits_rows=torch.tensor([1, 4]))
    assert some.logits.shape[0] == 2
    assert (some.logits - full.logits[[1, 4]]).abs().max().item() <= 1e-5


def test_float64_runs_without_kernels(tmp_path):
    make_tiny_hf("llama", tmp_path, seed=5)
    m = Transformer.from_pretrained(tmp_path, dtype=torch.float64, device=DEVICE)
    assert not m.fast
    out = m.forward(torch.tensor([1, 2, 3]), torch.arange(3), m.new_cache(16))
    assert out.logits.dtype == torch.float64
