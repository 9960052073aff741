"""Every drafter must reproduce plain greedy decoding token for token (float64 tiny models)."""
import random

import pytest
import torch

from draftwise.decoding import generate
from draftwise.drafters.base import Drafter
from draftwise.drafters.lookup import PromptLookup
from draftwise.drafters.recycling import TokenRecycling
from draftwise.policies.budget import CostCurve
from draftwise.tree import DraftTree
from tests.helpers import tiny_model


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("m"), arch="qwen2", seed=11)


def drafters(vocab):
    return [TokenRecycling(vocab, max_nodes=12), TokenRecycling(vocab, max_nodes=40),
            TokenRecycling(vocab, cost=CostCurve.flat()), PromptLookup(max_depth=6),
            PromptLookup(max_depth=10, max_matches=3, min_ngram=1, cost=CostCurve.flat())]


def repetitive_prompt(rng, vocab, n=40):
    base = [rng.randrange(1, vocab - 1) for _ in range(6)]
    return [base[i % 6] if rng.random() < 0.7 else rng.randrange(1, vocab - 1) for i in range(n)]


@pytest.mark.parametrize("seed", range(6))
def test_drafters_match_plain_greedy(model, seed):
    rng = random.Random(seed)
    vocab = model.cfg.vocab_size
    prompt = repetitive_prompt(rng, vocab)
    ref, _ = generate(model, prompt, max_new_tokens=48)
    for d in drafters(vocab):
        out, st = generate(model, prompt, drafter=d, max_new_tokens=48)
        assert out == ref, f"{d.describe()} diverged"
        assert st.new_tokens == len(out) == 48


def test_recycling_accepts_something_and_hot_starts(model):
    vocab = model.cfg.vocab_size
    d = TokenRecycling(vocab, max_nodes=30)
    prompt = repetitive_prompt(random.Random(7), vocab)
    ref, _ = generate(model, prompt, max_new_tokens=64)
    out, st1 = generate(model, prompt, drafter=d, max_new_tokens=64)
    out2, st2 = generate(model, prompt, drafter=d, max_new_tokens=64)
    assert out == ref == out2
    assert st1.tau > 1.0
    assert st2.steps <= st1.steps        # hot start: the matrix already knows this text


def test_eos_inside_accepted_path_and_max_new_tokens_mid_path(model):
    vocab = model.cfg.vocab_size
    prompt = repetitive_prompt(random.Random(3), vocab)
    ref, _ = generate(model, prompt, max_new_tokens=60)
    # pick a token that appears late in the reference as "EOS"
    eos = ref[25]
    cut = ref.index(eos) + 1
    for d in drafters(vocab):
        out, st = generate(model, prompt, drafter=d, max_new_tokens=60, eos_ids=[eos])
        assert out == ref[:cut] and st.stop_reason == "eos"
        for m in (1, 2, 7, 13):
            out, st = generate(model, prompt, drafter=d, max_new_tokens=m)
            assert out == ref[:m] and st.stop_reason == "length"


def test_stop_strings(model):
    vocab = model.cfg.vocab_size
    detok = lambda ids: " ".join(f"t{i}" for i in ids)   # noqa: E731
    prompt = repetitive_prompt(random.Random(4), vocab)
    ref, _ = generate(model, prompt, max_new_tokens=50)
    stop = f"t{ref[20]} t{ref[21]}"
    first = next(i for i in range(1, len(ref)) if stop in detok(ref[: i + 1]))
    for d in [Drafter()] + drafters(vocab):
        out, st = generate(model, prompt, drafter=d, max_new_tokens=50, stop=[stop], detok=detok)
        assert out == ref[: first + 1] and st.stop_reason == "stop"


class WrongDrafter(Drafter):
    """Proposes garbage chains: must still be lossless (everything rejected)."""
    name = "wrong"

    def propose(self, ctx):
        return DraftTree.chain(ctx.root, [(ctx.root + i) % 90 + 1 for i in range(5)])


def test_bad_drafts_are_rejected_not_emitted(model):
    prompt = [5, 6, 7, 8]
    ref, _ = generate(model, prompt, max_new_tokens=20)
    out, st = generate(model, prompt, drafter=WrongDrafter(), max_new_tokens=20)
    assert out == ref


def test_lossless_on_fp32_fast_kernels(tmp_path):
    m = tiny_model(tmp_path, arch="llama", seed=5, dtype=torch.float32)
    prompt = repetitive_prompt(random.Random(9), m.cfg.vocab_size)
    ref, _ = generate(m, prompt, max_new_tokens=40)
    for d in drafters(m.cfg.vocab_size):
        out, _ = generate(m, prompt, drafter=d, max_new_tokens=40)
        assert out == ref
