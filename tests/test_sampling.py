"""Lossless sampling: the verifier's output distribution equals the target's (chi-square tests)."""
import numpy as np
import pytest
import torch

from draftwise.errors import ConfigError
from draftwise.sampling import Sampling, warp
from draftwise.tree import DraftTree
from draftwise.verify import verify_sampling

V = 6
N_DRAWS = 100_000
# chi-square critical value, df = 5, p = 0.001 (a correct verifier fails ~1 in 1000 seeds)
CRIT_DF5 = 20.515


def chi2(counts, probs):
    exp = probs * counts.sum()
    m = exp > 0
    assert counts[~m].sum() == 0, "sampled a token with zero probability"
    return float(((counts[m] - exp[m]) ** 2 / exp[m]).sum())


def first_tokens(tree, logits, sampling, n=N_DRAWS, seed=0, q=None, n_children=0):
    g = torch.Generator().manual_seed(seed)
    probs = warp(logits, sampling).double()
    counts = np.zeros(V)
    for _ in range(n):
        if q is not None:   # a sampled draft: children drawn from q without replacement
            kids = torch.multinomial(q, n_children, replacement=False, generator=g).tolist()
            tree = DraftTree(torch.tensor([1] + kids), torch.tensor([-1] + [0] * n_children),
                             torch.tensor([0] + [1] * n_children), q=q.unsqueeze(0).repeat(n_children + 1, 1))
        counts[verify_sampling(tree, None, sampling, g, probs=probs).tokens[0]] += 1
    return counts


LOGITS = torch.tensor([[1.0, 0.2, -0.5, 2.0, 0.0, -1.0]] * 4, dtype=torch.float64)


@pytest.mark.parametrize("sampling", [Sampling(temperature=1.0), Sampling(temperature=0.7, top_k=4),
                                      Sampling(temperature=1.3, top_p=0.8)])
def test_deterministic_children_with_duplicates(sampling):
    # root with children tokens 3, 0, 3 (duplicate sibling), 5
    tree = DraftTree.from_parents([1, 3, 0, 3, 5], [-1, 0, 0, 0, 0])
    logits = LOGITS[:1].repeat(5, 1)
    p = warp(logits[0], sampling).numpy()
    counts = first_tokens(tree, logits, sampling)
    assert chi2(counts, p) < CRIT_DF5


@pytest.mark.parametrize("sampling", [Sampling(temperature=1.0), Sampling(temperature=0.8, top_p=0.9)])
def test_sampled_children_with_known_q(sampling):
    # two children drawn from q without replacement
    q = torch.tensor([0.05, 0.05, 0.5, 0.1, 0.25, 0.05], dtype=torch.float64)
    logits = LOGITS[:1].repeat(3, 1)
    p = warp(logits[0], sampling).numpy()
    counts = first_tokens(None, logits, sampling, q=q, n_children=2)
    assert chi2(counts, p) < CRIT_DF5


@pytest.mark.parametrize("sampling", [Sampling(temperature=1.0), Sampling(temperature=0.9, top_k=5)])
def test_mixed_tree_retrieval_and_sampled_children(sampling):
    """A fused tree: deterministic (retrieval) children and children drawn from q under one parent,
    one of them duplicating a retrieval token. The first emitted token must follow p."""
    q = torch.tensor([0.1, 0.3, 0.05, 0.15, 0.3, 0.1], dtype=torch.float64)
    p = warp(LOGITS[0], sampling).numpy()
    g = torch.Generator().manual_seed(7)
    probs = warp(LOGITS[:1].repeat(6, 1), sampling).double()
    counts = np.zeros(V)
    for _ in range(N_DRAWS):
        drawn = torch.multinomial(q, 2, replacement=False, generator=g).tolist()
        toks = [1, 4, *drawn, 3]                           # det 4, sampled x2, det 3
        tree = DraftTree(torch.tensor(toks), torch.tensor([-1, 0, 0, 0, 0]), torch.tensor([0, 1, 1, 1, 1]),
                         q=q.unsqueeze(0).repeat(5, 1),
                         sampled=torch.tensor([False, False, True, True, False]))
        counts[verify_sampling(tree, None, sampling, g, probs=probs).tokens[0]] += 1
    assert chi2(counts, p) < CRIT_DF5


def test_merged_tree_keeps_metadata_and_verifies():
    from draftwise.tree import merge_trees

    q = torch.softmax(torch.randn(4, V, dtype=torch.float64), -1)
    model = DraftTree(torch.tensor([1, 2, 5, 0]), torch.tensor([-1, 0, 0, 1]), torch.tensor([0, 1, 1, 2]),
                      scores=torch.tensor([1.0, 0.6, 0.3, 0.4]), q=q,
                      origin=torch.zeros(4, dtype=torch.int8))
    retrieval = DraftTree.from_parents([1, 2, 3, 4], [-1, 0, 1, 0])
    retrieval.origin = torch.ones(4, dtype=torch.int8)
    fused, mapping = merge_trees(model, retrieval)
    assert mapping.tolist() == [0, 1, 4, 5]
    assert fused.tokens.tolist() == [1, 2, 5, 0, 3, 4]
    assert fused.is_sampled().tolist() == [True, True, True, True, False, False]
    assert fused.origin.tolist() == [0, 0, 0, 0, 1, 1]
    assert torch.equal(fused.scores, torch.tensor([1.0, 0.6, 0.3, 0.4, 0.0, 0.0]))
    assert torch.equal(fused.q[:4], q)
    sub = fused.select(torch.tensor([0, 1, 4]))
    assert sub.tokens.tolist() == [1, 2, 3] and sub.is_sampled().tolist() == [True, True, False]
    assert sub.origin.tolist() == [0, 0, 1] and torch.equal(sub.q, fused.q[[0, 1, 4]])
    rev, _ = merge_trees(retrieval, model)                # sampled children may join deterministic ones
    assert rev.is_sampled().tolist() == [False, False, False, False, True, True] and torch.equal(rev.q[0], q[0])
    other = DraftTree(torch.tensor([1, 7]), torch.tensor([-1, 0]), torch.tensor([0, 1]), q=q[:2])
    with pytest.raises(ValueError, match="sampled children under one node"):
        merge_trees(model, other)                         # two different q under the root: not verifiable


def test_second_token_distribution_of_a_chain():
    # the token after an accepted first draft must follow p at that node
    s = Sampling(temperature=1.0)
    logits = torch.tensor([[0.0, 0.0, 0.0, 3.0, 0.0, 0.0],      # root: strongly predicts 3
                           [0.5, 1.5, -1.0, 0.0, 0.3, 0.2],      # after 3
                           [0.0] * 6], dtype=torch.float64)
    tree = DraftTree.chain(1, [3, 1])
    g = torch.Generator().manual_seed(1)
    counts = np.zeros(V)
    for _ in range(N_DRAWS):
        r = verify_sampling(tree, logits, s, g)
        if r.tokens[0] == 3:
            counts[r.tokens[1]] += 1
    assert chi2(counts, warp(logits[1], s).numpy()) < CRIT_DF5


def test_a_broken_rule_is_detected():
    """Sanity check of the test itself: always accepting the first child is caught."""
    s = Sampling(temperature=1.0)
    p = warp(LOGITS[0], s).numpy()
    counts = np.zeros(V)
    counts[3] = N_DRAWS * 0.5
    counts[0] = N_DRAWS * 0.5
    assert chi2(counts, p) > CRIT_DF5


def test_invalid_sampling_values():
    for kw in [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(top_k=-2), dict(top_k=1.5)]:
        with pytest.raises(ConfigError):
            Sampling(**kw)


def test_end_to_end_first_sampled_tokens_match_plain_sampling(tmp_path):
    """On a tiny model, the distribution of the 2nd generated token is the same with and without drafts."""
    from draftwise.decoding import generate
    from draftwise.drafters.recycling import TokenRecycling
    from tests.helpers import tiny_model

    m = tiny_model(tmp_path, arch="llama", seed=2, vocab=8)
    prompt = [1, 2, 3, 1, 2, 3, 1, 2]
    s = Sampling(temperature=1.0)
    counts_ar, counts_tr = np.zeros(8), np.zeros(8)
    d = TokenRecycling(8, k=4, max_nodes=6)
    n = 2000
    for i in range(n):
        out, _ = generate(m, prompt, sampling=Sampling(temperature=1.0, seed=i), max_new_tokens=3)
        counts_ar[out[2]] += 1
        out, _ = generate(m, prompt, drafter=d, sampling=Sampling(temperature=1.0, seed=10_000 + i),
                          max_new_tokens=3)
        counts_tr[out[2]] += 1
    # two-sample chi-square homogeneity test, df = 7, p = 0.001 -> 24.32
    tot = counts_ar + counts_tr
    m_ = tot > 0
    exp_ar = tot[m_] * counts_ar.sum() / tot.sum()
    exp_tr = tot[m_] * counts_tr.sum() / tot.sum()
    stat = (((counts_ar[m_] - exp_ar) ** 2) / exp_ar).sum() + (((counts_tr[m_] - exp_tr) ** 2) / exp_tr).sum()
    assert stat < 24.32
    assert s.temperature == 1.0
