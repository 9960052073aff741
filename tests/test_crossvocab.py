"""A draft model with another tokenizer (crossvocab.py, draft-model's ``cross`` option): the vocabulary
map on hand-checked cases, the draft text kept equal to the committed text, and lossless greedy and
sampled decoding on tiny target/draft pairs whose tokenizers differ on purpose (other merges, other
special tokens, SentencePiece conventions with byte fallback against byte-level BPE)."""
import dataclasses
import random

import numpy as np
import pytest
import torch

from draftwise.crossvocab import DraftText, VocabBridge, _whole_chars
from draftwise.decoding import generate
from draftwise.drafters.draft_model import SPEC, DraftModel
from draftwise.errors import ConfigError
from draftwise.models.checkpoint import load_config, load_state_dict
from draftwise.models.transformer import Transformer
from draftwise.sampling import Sampling
from tests.conftest import DEVICE, make_tiny_hf
from tests.fixtures import TinyEngine

CORPUS = [
    "the quick brown fox jumps over the lazy dog. def add(a, b):\n    return a + b\n",
    "for i in range(10):\n    print(i, 'héllo wörld')  # the end\n",
    "The cat sat on the mat; then the cat ran. 你好, naïve café — done!\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n",
] * 20


def byte_level(vocab_size: int, specials: list[str]):
    """A byte-level BPE tokenizer trained here (GPT-2 conventions; every byte is a token)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                         show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=specials[0])


def sentencepiece_style(vocab_size: int, specials: list[str]):
    """A SentencePiece-style BPE ('▁' for spaces) with byte-fallback tokens <0x00>..<0xFF>."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    base = Tokenizer(models.BPE())
    base.pre_tokenizer = pre_tokenizers.Metaspace()
    base.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                          show_progress=False))
    model = json.loads(base.to_str())["model"]
    vocab = dict(model["vocab"])
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    tok = Tokenizer(models.BPE(vocab, merges, byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens(specials)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=specials[0])


@pytest.fixture(scope="module")
def toks():
    return {"target": byte_level(300, ["<|end|>", "<|user|>"]),
            "byte": byte_level(340, ["<eos>", "<|user|>", "<pad>"]),       # other merges, other specials
            "sp": sentencepiece_style(330, ["</s>", "<|user|>"])}


def bridge_of(toks, draft: str) -> VocabBridge:
    t, d = toks["target"], toks[draft]
    return VocabBridge(t, d, len(t), len(d))


# ---------------------------------------------------------------- the vocabulary map
def test_the_vocabulary_map_on_hand_checked_tokens(toks):
    b = bridge_of(toks, "sp")
    t, d = toks["target"], toks["sp"]
    the_t, the_d = t.convert_tokens_to_ids("\u0120the"), d.convert_tokens_to_ids("\u2581the")
    assert int(b.t2d[the_t]) == the_d and int(b.d2t[the_d]) == the_t          # ' the' in both conventions
    assert b.t.raw[the_t] == b.d.raw[the_d] == b" the"
    # byte 0xC3: GPT-2's stand-in 'Ã' on one side, the byte-fallback token <0xC3> on the other
    assert int(b.t2d[t.convert_tokens_to_ids("\u00c3")]) == d.convert_tokens_to_ids("<0xC3>")
    # an added token maps to the added token with the same content only
    assert int(b.t2d[t.convert_tokens_to_ids("<|user|>")]) == d.convert_tokens_to_ids("<|user|>")
    assert int(b.t2d[t.convert_tokens_to_ids("<|end|>")]) == -1
    # the map is one to one and its pairs spell the same bytes
    pairs = [(int(i), int(b.t2d[i])) for i in b.shared]
    assert len({j for _, j in pairs}) == len(pairs) == b.size > 0.25 * len(t)
    assert all(b.t.raw[i] == b.d.raw[j] for i, j in pairs)


def test_too_small_an_intersection_is_a_one_line_error(toks):
    b = bridge_of(toks, "byte")
    b.check("t", "d")                                         # a real pair passes
    b.shared = b.shared[:10]
    with pytest.raises(ConfigError, match="shares only 10 tokens.*need 25%"):
        b.check("t", "d")


def test_string_level_reencoding_and_whole_characters(toks):
    b = bridge_of(toks, "sp")
    text = "def add(a, b):\n    return a + b"
    draft_ids = toks["sp"].encode(text, add_special_tokens=False)
    assert b.t.text(b.to_target(draft_ids)).decode() in (text, " " + text)   # SentencePiece adds a prefix space
    eos = toks["sp"].convert_tokens_to_ids("<|user|>")
    assert b.to_target([*draft_ids, eos, *draft_ids])[-1] == toks["target"].convert_tokens_to_ids("<|user|>")
    assert _whole_chars("né".encode()[:-1]) == b"n" and _whole_chars("né".encode()) == "né".encode()
    assert _whole_chars("你".encode()[:2]) == b"" and _whole_chars(b"ab") == b"ab"


@pytest.mark.parametrize("draft", ["byte", "sp"])
def test_the_draft_text_spells_the_committed_text(toks, draft):
    """Token by token, in random bursts (accepted runs, then a bonus token mid-word), through split UTF-8
    characters and special tokens: the draft's tokens always spell exactly the committed text."""
    b = bridge_of(toks, draft)
    t = toks["target"]
    ids = t.encode("<|user|>" + CORPUS[2] + CORPUS[1] + "<|end|>", add_special_tokens=False)
    rng = random.Random(0)
    for trial in range(3):
        text, i = DraftText(b), 0
        while i < len(ids):
            n = rng.randint(1, 4)
            keep, feed = text.sync(ids[i:i + n])
            assert feed and keep <= len(text.ids) - len(feed) + len(feed)
            i += n
            assert b.d.text(text.ids) == b.t.text(ids[:i])
        if draft == "byte":        # whole words re-encode as the draft's tokenizer would encode the text
            whole = toks["byte"].encode(b.t.text(ids).decode(), add_special_tokens=False)
            assert text.ids == whole


# ---------------------------------------------------------------- lossless decoding on tiny pairs
def models_for(tmp_path, toks, draft: str, aligned: bool, sharpen: float = 1.0):
    """A tiny target over the target tokenizer and a draft over the other one. aligned: the draft is the
    target with its embedding and head rows moved to the draft ids of the shared tokens (it agrees with
    the target where the two tokenize alike, so accepted and rejected drafts both occur); else random.
    sharpen: the target's head (and the aligned draft's) scaled by this (fewer likely tokens, for the sampling
    test)."""
    t, d = toks["target"], toks[draft]
    make_tiny_hf("qwen2", tmp_path / "t", seed=3, vocab=len(t))
    state = load_state_dict(tmp_path / "t")
    state["lm_head.weight"] = sharpen * state["lm_head.weight"]
    target = Transformer(load_config(tmp_path / "t"), state, dtype=torch.float64, max_len=256, device=DEVICE)
    b = VocabBridge(t, d, len(t), len(d))
    if not aligned:
        make_tiny_hf("llama", tmp_path / "d", seed=4, vocab=len(d))
        return target, Transformer.from_pretrained(tmp_path / "d", dtype=torch.float64, max_len=256, device=DEVICE), b
    g = torch.Generator().manual_seed(1)
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        w = state[key]
        new = 0.08 * torch.randn(len(d), w.shape[1], generator=g, dtype=w.dtype)
        new[b.t2d[b.shared]] = w[b.shared]
        state[key] = new
    cfg = dataclasses.replace(load_config(tmp_path / "t"), vocab_size=len(d))
    return target, Transformer(cfg, state, dtype=torch.float64, max_len=256, device=DEVICE), b


def prompt_ids(toks, k: int) -> list[int]:
    return toks["target"].encode(CORPUS[k % 4][: 40 + 7 * k], add_special_tokens=False)


CONFIGS = [{"tree": "chain", "max_nodes": 4}, {"tree": "chain"}, {"tree": "opt-tree", "width": 4, "max_depth": 4},
           {"tree": "static", "max_nodes": 5}, {"tree": "chain", "cross": "string", "max_depth": 6}]


@pytest.mark.parametrize("draft", ["byte", "sp"])
@pytest.mark.parametrize("aligned", [True, False])
def test_cross_vocabulary_drafts_match_plain_greedy(tmp_path, toks, draft, aligned):
    target, dnet, b = models_for(tmp_path, toks, draft, aligned)
    eng = TinyEngine(target, dnet, b)
    taus = []
    for opts in CONFIGS:
        d = SPEC.factory(eng, **SPEC.validate({**opts, "vocab_subset": 0}))
        for k in range(3):
            prompt = prompt_ids(toks, k)
            ref, _ = generate(target, prompt, max_new_tokens=24)
            out, st = generate(target, prompt, drafter=d, max_new_tokens=24)
            assert out == ref, (opts, k)
            taus.append(st.tau)
            assert b.d.text(d.text.ids) == b.t.text((prompt + out)[:d.synced])      # the draft text follows
    if aligned:
        assert max(taus) > 1.5            # the aligned draft is accepted: both branches ran


def test_the_draft_cache_equals_a_fresh_forward_of_its_text(tmp_path, toks):
    """After partial acceptance, bonus tokens mid-word and re-syncs, the draft's rows are exactly what a
    fresh forward over its text computes (no stale row survives a re-sync)."""
    target, dnet, b = models_for(tmp_path, toks, "sp", aligned=True)
    d = DraftModel(dnet, tree="chain", max_nodes=3, bridge=b)
    prompt = prompt_ids(toks, 2)
    ref, _ = generate(target, prompt, max_new_tokens=30)
    out, st = generate(target, prompt, drafter=d, max_new_tokens=30)
    assert out == ref and st.tau > 1.2
    n = len(d.text.ids)
    assert d.cache.length == n and d.pos0 == 0
    fresh = dnet.new_cache(256)
    dnet.forward(torch.tensor(d.text.ids), torch.arange(n), fresh)
    torch.testing.assert_close(d.cache.k[:, :, :n], fresh.k[:, :, :n], rtol=0, atol=1e-10)


def test_a_draft_cache_that_would_overflow_restarts_on_the_recent_context(tmp_path, toks):
    target, dnet, b = models_for(tmp_path, toks, "byte", aligned=True)
    d = DraftModel(dnet, tree="chain", max_nodes=3, bridge=b, max_len=96)
    d.max_pos = 96
    prompt = (prompt_ids(toks, 3) * 3)[:80]
    ref, _ = generate(target, prompt, max_new_tokens=40)
    out, _ = generate(target, prompt, drafter=d, max_new_tokens=40)
    assert out == ref
    assert d.pos0 == 0 and 0 < d.synced - (len(prompt) + len(out) - d.synced) and d.cache.length < 96


def test_sampled_cross_vocabulary_drafts_keep_the_targets_distribution(tmp_path, toks):
    """Two-sample chi-square on the 3rd generated token: plain sampling vs TLI chains (q-aware rule) and
    string-level chains (deterministic rule), with a sharpened target so counts are not spread thin."""
    target, dnet, b = models_for(tmp_path, toks, "byte", aligned=True, sharpen=8.0)
    prompt = prompt_ids(toks, 1)
    n = 1200
    s = Sampling(temperature=1.0)

    def third(drafter, seed):
        out, _ = generate(target, prompt, drafter=drafter, max_new_tokens=3,
                          sampling=dataclasses.replace(s, seed=seed))
        return out[2]

    ar = [third(None, i) for i in range(n)]
    for opts in ({"tree": "chain", "max_nodes": 3}, {"tree": "chain", "cross": "string", "max_depth": 4}):
        d = DraftModel(dnet, bridge=b, **opts)
        got = [third(d, 50_000 + i) for i in range(n)]
        top = [tok for tok, _ in sorted(((t, ar.count(t) + got.count(t)) for t in set(ar) | set(got)),
                                        key=lambda kv: -kv[1])[:7]]
        ca = np.array([sum(x == t for x in ar) for t in top] + [sum(x not in top for x in ar)], dtype=float)
        cg = np.array([sum(x == t for x in got) for t in top] + [sum(x not in top for x in got)], dtype=float)
        tot = ca + cg
        m = tot > 0
        ea, eg = tot[m] * ca.sum() / tot.sum(), tot[m] * cg.sum() / tot.sum()
        stat = (((ca[m] - ea) ** 2) / ea).sum() + (((cg[m] - eg) ** 2) / eg).sum()
        assert stat < 24.32, (opts, stat)            # df <= 7, p = 0.001


def test_string_mode_needs_a_chain():
    with pytest.raises(ConfigError, match="cross 'string'"):
        SPEC.validate({"cross": "string", "tree": "opt-tree"})
    with pytest.raises(ConfigError, match="cross"):
        SPEC.validate({"cross": "bytes"})


@pytest.mark.parametrize("cross", ["tli", "string"])
def test_auto_with_a_cross_vocabulary_draft_matches_plain_greedy(tmp_path, toks, cross):
    from draftwise.drafters import auto

    target, dnet, b = models_for(tmp_path, toks, "sp", aligned=True)
    eng = TinyEngine(target, dnet, b)
    d = auto.SPEC.factory(eng, **auto.SPEC.validate({"model_cross": cross}))
    for k in range(3):
        prompt = prompt_ids(toks, k)
        ref, _ = generate(target, prompt, max_new_tokens=24)
        out, _ = generate(target, prompt, drafter=d, max_new_tokens=24)
        assert out == ref, k
    other = auto.SPEC.factory(eng, **auto.SPEC.validate({"model_cross": cross, "model_tree": "opt-tree"}))
    assert other.model.base.string is False          # string-level drafts are chains: another shape uses TLI
