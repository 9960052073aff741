"""EESD: partial forwards, verification from layer N, the self-distillation pipeline (features,
training, resume, saved exit layers and their errors) and the length controls."""
import json

import numpy as np
import pytest
import torch

from draftwise.decoding import generate
from draftwise.drafters.early_exit import EarlyExit, exit_layer, load_exit
from draftwise.errors import CheckpointError, ConfigError
from draftwise.policies.budget import CostCurve
from draftwise.policies.length import BetaTS, CalibrationTS, FixedK, StepCosts, parse_control
from draftwise.sampling import Sampling
from draftwise.train import pipeline as training
from draftwise.train.early_exit import train_exit
from draftwise.vocab import VocabSubset
from tests.helpers import tiny_model

VOCAB = 96


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("ee")
    m = tiny_model(root / "t", arch="qwen2", seed=11, dtype=torch.float64)
    return root, m


class ByteTokenizer:
    """Bytes -> ids in [1, 90] (enough for teacher forcing on a tiny vocabulary)."""

    def __call__(self, batch, add_special_tokens=False):
        return {"input_ids": [[b % 90 + 1 for b in t.encode()] for t in batch]}


class TinyTrainEngine:
    """An EngineView (drafters/spec.py) plus what training reads: path, eos_ids, model_id."""

    def __init__(self, model, path):
        self.model, self.path, self.tokenizer = model, path, ByteTokenizer()
        self.eos_ids, self.model_id = (0,), "tiny"
        self.draft_model, self.draft_bridge, self.shared = None, None, {}

    def draft_cost_curve(self):
        raise AssertionError("no draft model")

    def vocab_subset(self, k):
        return VocabSubset(torch.arange(k), self.model.cfg.vocab_size)

    def cost_curve(self):
        return CostCurve.flat()


def corpus(tmp_path):
    f = tmp_path / "text.txt"
    f.write_text("def add(a, b):\n    return a + b\n\n" * 60 + "the cat sat on the mat. " * 80)
    return f


# ---------------------------------------------------------------- partial forwards
def test_partial_forward_equals_the_full_models_layer_output(model_dir):
    _, m = model_dir
    toks = torch.tensor([5, 9, 2, 7, 7, 3])
    pos = torch.arange(6)
    full = m.forward(toks, pos, m.new_cache(), hidden_layers=(0, 1))
    for n in (1, 2):
        part = m.forward(toks, pos, m.new_cache(), end_layer=n)
        assert part.logits is None
        torch.testing.assert_close(part.hidden, full.layer_hidden[n - 1], rtol=0, atol=1e-12)


def test_verification_from_layer_n_equals_a_full_pass(model_dir):
    """Prefix committed; a tree whose first-N-layer rows were written while drafting (pending)
    verifies from layer N with the same logits as a full pass (float64, 1e-9)."""
    _, m = model_dir
    prompt = torch.tensor([4, 8, 15, 16, 23, 42, 7])
    tree_toks = torch.tensor([42, 3, 9, 3, 11])
    anc = torch.tensor([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 0, 1, 0, 0], [1, 1, 0, 1, 0], [1, 0, 1, 0, 1]], dtype=torch.bool)
    pos = torch.tensor([7, 8, 8, 9, 9])
    for n in (1, 2):
        c1 = m.new_cache()
        m.forward(prompt, torch.arange(7), c1)
        c1.commit(7)
        ref = m.forward(tree_toks, pos, c1, tree_mask=anc).logits
        c2 = m.new_cache()
        m.forward(prompt, torch.arange(7), c2)
        c2.commit(7)
        hs = []
        for i in range(5):       # node by node, as drafting does, each seeing its pending ancestors
            h = m.forward(tree_toks[i:i + 1], pos[i:i + 1], c2, tree_mask=anc[i:i + 1, : i + 1], end_layer=n).hidden
            c2.hold(1)
            hs.append(h)
        c2.discard()
        got = m.forward(tree_toks, pos, c2, tree_mask=anc, start_layer=n, hidden_in=torch.cat(hs)).logits
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-9)


# ---------------------------------------------------------------- length controls
def costs(draft_ms=1.0, verify_ms=10.0):
    return StepCosts(CostCurve((1, 1024), (verify_ms, verify_ms)), draft_ms)


def test_beta_ts_k_choice_hand_checked():
    b = BetaTS(costs(), k_max=8)
    # T(k) = (k + 1) + 10; E(k) = (1 - θ^(k+1)) / (1 - θ)
    assert b.best_k(0.8) == 6        # E/T: k=5 0.2306, k=6 0.2324, k=7 0.2312
    assert b.best_k(0.3) == 1        # k=0 0.0909, k=1 0.1083, k=2 0.1069
    assert b.best_k(0.05) == 0       # k=1 1.05/12 = 0.0875 < 1/11: plain decoding
    assert BetaTS(costs(), k_max=3).best_k(0.99) == 3


def test_beta_ts_posterior_update_hand_checked():
    b = BetaTS(costs(), prior=(2.0, 2.0), forget=0.5)
    b.update([0.9, 0.9, 0.9], accepted=2)      # 2 accepted, then a rejection
    assert (b.alpha, b.beta) == (4.0, 3.0)
    b.update([0.9], accepted=1)                # decay half-way to the prior, then 1 accepted, none rejected
    assert (b.alpha, b.beta) == (4.0, 2.5)
    b.update([], accepted=0)                   # a plain step: only the decay
    assert (b.alpha, b.beta) == (3.0, 2.25)


def test_calibration_update_hand_checked():
    c = CalibrationTS(costs(), forget=1.0)
    c.observe(0.5, True)                  # x = [1, logit 0.5 = 0], p = 0.5
    np.testing.assert_allclose(c.cov, np.diag([0.8, 1.0]))
    np.testing.assert_allclose(c.mu, [0.4, 1.0])
    assert abs(c.prob(0.5) - 1 / (1 + np.exp(-0.4))) < 1e-12


def test_calibration_ts_threshold_hand_checked():
    c = CalibrationTS(costs(draft_ms=1.0, verify_ms=10.0), k_max=8)
    c.plan(0)
    c.w = np.array([0.0, 1.0])                 # acceptance = confidence
    # d = 0: T(0) = 11, T(1) = 12; go on while P1 * 11 >= 1 * 1, i.e. P1 >= 1/11
    assert not c.more(0, 0.08)
    assert c.more(0, 0.5)                     # P1 = 0.5, E = 1.5
    # d = 1: T(1) = 12, T(2) = 13: need P2 * 12 >= 1.5, P2 >= 0.125, i.e. conf >= 0.25
    assert not c.more(1, 0.24)
    assert c.more(1, 0.26)


def test_calibration_learns_overconfidence():
    c = CalibrationTS(costs(), forget=1.0, seed=0)
    rng = np.random.default_rng(0)
    for _ in range(400):                       # the draft says 0.9 but is right 30% of the time
        c.update([0.9], accepted=int(rng.random() < 0.3))
    assert 0.2 < c.prob(0.9) < 0.4


def test_parse_control_errors():
    assert isinstance(parse_control("fixed:3", None, 8), FixedK)
    for bad in ("fixed:x", "thompson", "fixed:-1"):
        with pytest.raises(ConfigError):
            parse_control(bad, costs(), 8)
    with pytest.raises(ConfigError):
        parse_control("beta-ts", costs(), 0)


# ---------------------------------------------------------------- self-distillation
def test_train_save_load_and_decode_losslessly(model_dir, tmp_path):
    root, m = model_dir
    eng = TinyTrainEngine(m, root / "t")
    out = tmp_path / "exit.safetensors"
    info = train_exit(eng, 1, out, data=[str(corpus(tmp_path))], max_tokens=3000, epochs=6, batch=2, lr=3e-3,
                      vocab_subset=0, seq_len=32, topk=8, progress=False)
    json.dumps(info)                                                                    # JSON-able metadata
    hist = torch.load(tmp_path / "exit.safetensors.ckpt", weights_only=False)["history"]
    first, last = np.mean([h["loss"] for h in hist[:5]]), np.mean([h["loss"] for h in hist[-5:]])
    assert last < 0.9 * first                                                           # it learns
    assert info["val_agree"] > info["val_agree_init"]
    tensors, meta = load_exit(out, m)
    assert meta["layer"] == 1 and meta["init"] == 1          # default init: a copy of layer N
    d = EarlyExit(m, 1, FixedK(3), exit=exit_layer(m, tensors))
    for seed in range(3):
        prompt = [int(x) for x in torch.randint(1, 90, (20,), generator=torch.Generator().manual_seed(seed))]
        ref, _ = generate(m, prompt, max_new_tokens=30)
        got, st = generate(m, prompt, drafter=d, max_new_tokens=30)
        assert got == ref
        s = Sampling(temperature=0.8, seed=seed)
        assert generate(m, prompt, drafter=d, sampling=s, max_new_tokens=12)[0] == \
            generate(m, prompt, drafter=d, sampling=s, max_new_tokens=12)[0]         # seeded: reproducible


class Cycle(FixedK):
    """k = 0, 0, 3, 0, 2, 1, ...: plain steps between drafts (the owed exit rows path)."""

    def __init__(self):
        super().__init__(3)
        self.i = 0

    def plan(self, context):
        self.i += 1
        return (0, 0, 3, 0, 2, 1)[self.i % 6]


def test_plain_steps_owe_exit_rows_and_the_exit_cache_follows_the_sequence(model_dir, tmp_path):
    root, m = model_dir
    out = tmp_path / "exit.safetensors"
    train_exit(TinyTrainEngine(m, root / "t"), 1, out, data=[str(corpus(tmp_path))], max_tokens=1500, max_steps=3,
               batch=1, vocab_subset=0, seq_len=32, topk=4, progress=False)
    ex = exit_layer(m, load_exit(out, m)[0])
    d = EarlyExit(m, 1, Cycle(), exit=ex)
    prompt = [5, 9, 2, 7, 7, 3, 11, 40, 2, 9]
    ref, _ = generate(m, prompt, max_new_tokens=40)
    got, st = generate(m, prompt, drafter=d, max_new_tokens=40)
    assert got == ref and 1 in st.tree_sizes          # plain steps happened
    # the exit cache's committed rows equal an exit forward over the committed sequence
    seq = torch.tensor(prompt + got)
    n = d.cache.length
    assert n >= len(prompt) + 20
    h = m.forward(seq[:n], torch.arange(n), m.new_cache(), end_layer=1).hidden
    fresh = EarlyExit(m, 1, FixedK(1), exit=ex)
    fresh.exit_forward(h, torch.arange(n), logits=False)
    torch.testing.assert_close(d.cache.k[0, :, :n], fresh.cache.k[0, :, :n], rtol=0, atol=1e-9)


def test_interrupted_training_resumes_to_the_same_parameters(tmp_path):
    torch.manual_seed(0)
    target = torch.randn(8, 4)
    data = [(0, i) for i in range(12)]

    def make():
        return {"w": torch.zeros(8, 4)}

    def loss_of(params, stop_at=None):
        calls = {"n": 0}

        def fn(batch):
            calls["n"] += 1
            if stop_at is not None and calls["n"] == stop_at:
                raise KeyboardInterrupt
            idx = torch.tensor([r for _, r in batch])
            return ((params["w"][idx % 8] - target[idx % 8]) ** 2).mean(), {"agree": 0.0}
        return fn

    cfg = training.TrainConfig(steps=10, lr=0.05, batch=3, warmup=2, ckpt_every=4)
    ref = make()
    training.train(ref, loss_of(ref), data, data[:2], cfg, tmp_path / "a.ckpt", 1, {"run": 1}, progress=False)
    p = make()
    with pytest.raises(KeyboardInterrupt):
        training.train(p, loss_of(p, stop_at=7), data, data[:2], cfg, tmp_path / "b.ckpt", 1, {"run": 1}, progress=False)
    assert torch.load(tmp_path / "b.ckpt", weights_only=False)["step"] == 4
    p2 = make()
    res = training.train(p2, loss_of(p2), data, data[:2], cfg, tmp_path / "b.ckpt", 1, {"run": 1}, progress=False)
    assert len(res["history"]) == 10
    torch.testing.assert_close(p2["w"], ref["w"], rtol=0, atol=0)
    with pytest.raises(CheckpointError, match="another run"):
        training.train(make(), loss_of(make()), data, data[:2], cfg, tmp_path / "b.ckpt", 1, {"run": 2}, progress=False)


def test_exit_layer_errors(model_dir, tmp_path):
    root, m = model_dir
    eng = TinyTrainEngine(m, root / "t")
    with pytest.raises(CheckpointError, match="not found"):
        load_exit(tmp_path / "none.safetensors", m)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 40)
    with pytest.raises(CheckpointError, match="unreadable"):
        load_exit(bad, m)
    out = tmp_path / "e.safetensors"
    train_exit(eng, 1, out, data=[str(corpus(tmp_path))], max_tokens=1500, max_steps=2, batch=1,
               vocab_subset=0, seq_len=32, topk=4, progress=False)
    other = tiny_model(tmp_path / "o", arch="qwen2", seed=12, dtype=torch.float64)
    with pytest.raises(CheckpointError, match="not this target"):
        load_exit(out, other)
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(out.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="unreadable"):
        load_exit(trunc, m)
    with pytest.raises(ConfigError, match="--layer"):
        train_exit(eng, m.cfg.num_layers, tmp_path / "x.safetensors", data=[str(corpus(tmp_path))], progress=False)
    with pytest.raises(ConfigError, match="early-exit layer"):
        EarlyExit(m, 0, FixedK(2))
    # features computed by another model are refused
    with pytest.raises(CheckpointError, match="another model"):
        train_exit(TinyTrainEngine(other, tmp_path / "o"), 1, tmp_path / "y.safetensors",
                   data=[str(corpus(tmp_path))], max_steps=1, features=tmp_path / "e.safetensors.features",
                   vocab_subset=0, seq_len=32, topk=4, progress=False)


def test_method_options_need_an_exit_or_a_layer(model_dir, tmp_path):
    from draftwise import methods
    from tests.fixtures import TinyEngine

    _, m = model_dir
    spec = methods.get("early-exit")
    with pytest.raises(ConfigError, match="needs an exit layer"):
        spec.factory(TinyEngine(m), **spec.validate({}))
    with pytest.raises(ConfigError, match="'length' must be one of"):
        spec.factory(TinyEngine(m), **spec.validate({"layer": 1, "length": "sometimes"}))
    # the old option names still work for one release, with a warning; both names at once is an error
    with pytest.warns(FutureWarning) as seen:
        opts = spec.validate({"layer": 1, "control": "fixed:2", "k_max": 4})
    assert (opts["length"], opts["max_depth"]) == ("fixed:2", 4)
    assert {str(w.message).split("'")[5] for w in seen} == {"length", "max_depth"}   # "... 'old' is now 'new'"
    with pytest.raises(ConfigError, match="give 'length' only"):
        spec.validate({"layer": 1, "control": "fixed:2", "length": "fixed:3"})
    with pytest.raises(CheckpointError, match="not found"):
        spec.factory(TinyEngine(m), **spec.validate({"exit": str(tmp_path / "missing.safetensors")}))
