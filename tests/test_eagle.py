"""EAGLE head + AdaEAGLE: the head's cached forward vs its training pass, training (loss falls,
resume), saved and public-format heads and their errors, LDLP labels and the length policies
(hand-checked), lossless decoding with every length policy."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from draftwise.decoding import generate
from draftwise.drafters.eagle import Eagle, load_head, untrained_head
from draftwise.errors import CheckpointError, ConfigError
from draftwise.models.checkpoint import load_state_dict
from draftwise.parts import model_fingerprint
from draftwise.policies.length import DDD, FixedK, LDLPControl, ldlp_forward, ldlp_init, load_ldlp, parse_length, save_ldlp
from draftwise.sampling import Sampling
from draftwise.train.eagle import HeadLoss, init_head, train_head
from draftwise.train.ldlp import asymmetric_l1, collect_labels, fit_ldlp
from tests.conftest import DEVICE
from tests.helpers import tiny_model
from tests.test_early_exit import TinyTrainEngine, corpus


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("eagle")
    m = tiny_model(root / "t", arch="qwen2", seed=11, dtype=torch.float64)
    return root, m


@pytest.fixture(scope="module")
def trained(model_dir, tmp_path_factory):
    root, m = model_dir
    tmp = tmp_path_factory.mktemp("head")
    out = tmp / "head.safetensors"
    info = train_head(TinyTrainEngine(m, root / "t"), out, data=[str(corpus(tmp))], max_tokens=3000, epochs=6,
                      batch=2, lr=3e-3, vocab_subset=0, seq_len=32, topk=8, progress=False)
    return out, info


def prompts(n=3, length=20):
    return [[int(x) for x in torch.randint(1, 90, (length,), generator=torch.Generator().manual_seed(s))]
            for s in range(n)]


# ---------------------------------------------------------------- the head's forward
def test_cached_head_forward_equals_the_training_pass(model_dir):
    """Row by row through the KV cache (drafting) == the whole sequence at once (training)."""
    root, m = model_dir
    state = load_state_dict(root / "t")
    p = init_head(state, m.cfg, "random", seed=3)
    from draftwise.drafters.eagle import head_from_tensors

    head = head_from_tensors(m, p, {}, "test", packed=False)
    toks = torch.tensor([5, 9, 2, 7, 7, 3, 11, 40], device=DEVICE)
    feats = torch.randn(8, m.cfg.hidden_size, dtype=torch.float64).to(DEVICE)
    whole = head.forward(toks, feats, torch.arange(8, device=DEVICE), head.new_cache(16))
    cache = head.new_cache(16)
    rows = []
    for i in range(8):
        rows.append(head.forward(toks[i:i + 1], feats[i:i + 1], torch.tensor([i], device=DEVICE), cache))
        cache.commit(1)
    torch.testing.assert_close(torch.cat(rows), whole, rtol=0, atol=1e-10)
    # the training pass computes the same function (float32 there)
    from draftwise.models.layers import build_layer, layer_forward
    from draftwise.train.pipeline import ChunkOps

    ops = ChunkOps(m, 8, torch.arange(m.cfg.vocab_size), DEVICE)
    L = build_layer(m.cfg, lambda n, required=True: p[n].double().to(DEVICE), "layers.0.", packed=False)
    x = F.linear(torch.cat([m.embed[toks], feats], -1), p["fc.weight"].double().to(DEVICE),
                 p["fc.bias"].double().to(DEVICE))
    z = layer_forward(m.cfg, L, x, ops.cos.double(), ops.sin.double(), lambda k, v: (k, v), ops.mask(8).double())
    torch.testing.assert_close(z, whole, rtol=0, atol=1e-6)


def test_untrained_head_passes_the_feature_into_the_last_layer(model_dir):
    _, m = model_dir
    h = untrained_head(m)
    assert h.layer is m.layers[-1]
    f = torch.randn(1, m.cfg.hidden_size, dtype=torch.float64).to(DEVICE)
    x = h.fc(torch.cat([m.embed[torch.tensor([4], device=DEVICE)], f], -1))
    torch.testing.assert_close(x, f)


# ---------------------------------------------------------------- training
def test_training_learns_saves_and_decodes_losslessly(model_dir, trained):
    _, m = model_dir
    out, info = trained
    json.dumps(info)
    hist = torch.load(str(out) + ".ckpt", weights_only=False)["history"]
    first, last = np.mean([h["loss"] for h in hist[:5]]), np.mean([h["loss"] for h in hist[-5:]])
    assert last < 0.8 * first
    assert info["val_agree"] > info["val_agree_init"]
    assert info["init"] == "last" and info["val_reg"] > 0 and info["val_ce"] > 0
    head = load_head(out, m)
    assert head.layer.attn_norm is not None and head.meta["head_id"] == info["head_id"] == head.id
    for length in ("fixed:1", "fixed:4", "ddd"):
        d = Eagle(head, parse_length(length, None, 5))
        for p in prompts():
            ref, _ = generate(m, p, max_new_tokens=30)
            assert generate(m, p, drafter=d, max_new_tokens=30)[0] == ref
            for n in (1, 4):
                assert generate(m, p, drafter=d, max_new_tokens=n)[0] == ref[:n]


def test_first_draft_token_is_the_teacher_forced_prediction(model_dir, trained):
    """Decode-time pairing == training pairing: each step's first draft token equals the head's
    read-out at row r - 1 of a teacher-forced pass over the final sequence (pairs (f_i, x_{i+1}),
    true features), r the root's index."""
    _, m = model_dir
    head = load_head(trained[0], m)
    d = Eagle(head, FixedK(3))
    d.log = []
    p = prompts(1)[0]
    out, _ = generate(m, p, drafter=d, max_new_tokens=30)
    seq = torch.tensor(p + out)
    f = m.forward(seq, torch.arange(len(seq)), m.new_cache()).hidden                   # [S, D] final-norm
    z = head.forward(seq[1:], f[:-1], torch.arange(1, len(seq)), head.new_cache(64))    # row i: (f_i, x_{i+1})
    pred = head.lm_head(z).argmax(-1)                                                   # token at i + 2
    r = len(p)                                                                          # first root
    for root, _, drafted, accepted in d.log:
        assert seq[r] == root
        if drafted:
            assert drafted[0] == int(pred[r - 1])
        r += accepted + 1


def test_head_training_resumes_from_its_checkpoint(model_dir, tmp_path, monkeypatch):
    root, m = model_dir
    eng = TinyTrainEngine(m, root / "t")
    kw = dict(data=[str(corpus(tmp_path))], max_tokens=2000, max_steps=12, batch=1, vocab_subset=0, seq_len=32,
              topk=4, progress=False)
    train_head(eng, tmp_path / "a.safetensors", **kw)
    calls = {"n": 0}
    real = HeadLoss.__call__

    def flaky(self, batch):
        calls["n"] += torch.is_grad_enabled()     # training steps (validation runs without gradients)
        if calls["n"] == 11:                      # a checkpoint every 10 steps
            raise KeyboardInterrupt
        return real(self, batch)

    monkeypatch.setattr(HeadLoss, "__call__", flaky)
    with pytest.raises(KeyboardInterrupt):
        train_head(eng, tmp_path / "b.safetensors", **kw)
    assert torch.load(tmp_path / "b.safetensors.ckpt", weights_only=False)["step"] == 10
    monkeypatch.setattr(HeadLoss, "__call__", real)
    train_head(eng, tmp_path / "b.safetensors", **kw)
    a, b = load_head(tmp_path / "a.safetensors", m), load_head(tmp_path / "b.safetensors", m)
    torch.testing.assert_close(b.fc.weight, a.fc.weight, rtol=0, atol=0)


# ---------------------------------------------------------------- saved heads: errors
def test_head_file_errors(model_dir, trained, tmp_path):
    root, m = model_dir
    with pytest.raises(CheckpointError, match="not found"):
        load_head(tmp_path / "nope.safetensors", m)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 40)
    with pytest.raises(CheckpointError, match="unreadable"):
        load_head(bad, m)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(trained[0].read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="unreadable"):
        load_head(cut, m)
    other = tiny_model(tmp_path / "o", arch="qwen2", seed=12, dtype=torch.float64)
    with pytest.raises(CheckpointError, match="fingerprint"):
        load_head(trained[0], other)
    with pytest.raises(ConfigError, match="needs a draft head"):
        from draftwise import methods
        from tests.fixtures import TinyEngine

        methods.get("eagle").factory(TinyEngine(m), **methods.get("eagle").validate({}))


# ---------------------------------------------------------------- public EAGLE-1/2 heads
def write_public_eagle(path, m, seed=0, **over):
    """A synthetic head in the official EAGLE-1/2 layout: config.json + pytorch_model.bin with
    fc (2D -> D, bias), layers.0.* without input_layernorm, and embed_tokens (ignored)."""
    c = m.cfg
    D, Dh, H, Hkv, inter = c.hidden_size, c.head_dim, c.num_heads, c.num_kv_heads, m.layers[0].down.in_features
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.1      # noqa: E731
    sd = {"fc.weight": r(D, 2 * D), "fc.bias": r(D), "embed_tokens.weight": r(c.vocab_size, D),
          "layers.0.self_attn.q_proj.weight": r(H * Dh, D), "layers.0.self_attn.k_proj.weight": r(Hkv * Dh, D),
          "layers.0.self_attn.v_proj.weight": r(Hkv * Dh, D), "layers.0.self_attn.o_proj.weight": r(D, H * Dh),
          "layers.0.mlp.gate_proj.weight": r(inter, D), "layers.0.mlp.up_proj.weight": r(inter, D),
          "layers.0.mlp.down_proj.weight": r(D, inter), "layers.0.post_attention_layernorm.weight": 1 + r(D)}
    sd.update(over)
    path.mkdir(parents=True, exist_ok=True)
    torch.save({k: v for k, v in sd.items() if v is not None}, path / "pytorch_model.bin")
    cfg = {"architectures": ["LlamaForCausalLM"], "hidden_size": D, "intermediate_size": inter,
           "num_attention_heads": H, "num_key_value_heads": Hkv, "num_hidden_layers": 1, "vocab_size": c.vocab_size,
           "rms_norm_eps": c.rms_norm_eps, "rope_theta": c.rope_theta, "bias": True}
    (path / "config.json").write_text(json.dumps(cfg))
    return sd


def test_public_eagle_head_loads_computes_eagle_math_and_decodes(tmp_path):
    m = tiny_model(tmp_path / "llama", arch="llama", seed=4, dtype=torch.float64)
    sd = write_public_eagle(tmp_path / "eagle", m)
    head = load_head(tmp_path / "eagle", m)
    assert head.layer.attn_norm is None and head.meta["source"] == "eagle"
    # one token, empty cache: attention = its own value; EAGLE-1: fc(cat(embedding, feature)), no input norm
    tok, f = torch.tensor([7], device=DEVICE), torch.randn(1, m.cfg.hidden_size, dtype=torch.float64).to(DEVICE)
    sdd = {k: v.double().to(DEVICE) for k, v in sd.items()}
    x = F.linear(torch.cat([m.embed[tok], f], -1), sdd["fc.weight"], sdd["fc.bias"])
    v = F.linear(x, sdd["layers.0.self_attn.v_proj.weight"]).view(1, m.cfg.num_kv_heads, -1)
    v = v.repeat_interleave(m.cfg.num_heads // m.cfg.num_kv_heads, dim=1).reshape(1, -1)
    x = x + F.linear(v, sdd["layers.0.self_attn.o_proj.weight"])
    h = F.rms_norm(x, (x.shape[-1],), sdd["layers.0.post_attention_layernorm.weight"], m.cfg.rms_norm_eps)
    ref = x + F.linear(F.silu(F.linear(h, sdd["layers.0.mlp.gate_proj.weight"])) *
                       F.linear(h, sdd["layers.0.mlp.up_proj.weight"]), sdd["layers.0.mlp.down_proj.weight"])
    got = head.forward(tok, f, torch.tensor([0], device=DEVICE), head.new_cache(4))
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-10)
    d = Eagle(head, FixedK(3))
    for p in prompts(2):
        assert generate(m, p, drafter=d, max_new_tokens=25)[0] == generate(m, p, max_new_tokens=25)[0]
    # the weights file alone (config beside it) and model.safetensors load too
    assert load_head(tmp_path / "eagle" / "pytorch_model.bin", m).layer.attn_norm is None


def test_public_head_errors(tmp_path):
    m = tiny_model(tmp_path / "llama", arch="llama", seed=4, dtype=torch.float64)
    D = m.cfg.hidden_size
    write_public_eagle(tmp_path / "a", m, **{"layers.0.mlp.down_proj.weight": None})
    with pytest.raises(CheckpointError, match="missing tensors"):
        load_head(tmp_path / "a", m)
    write_public_eagle(tmp_path / "b", m, **{"fc.weight": torch.zeros(D, 3 * D)})
    with pytest.raises(CheckpointError, match="shape"):
        load_head(tmp_path / "b", m)
    write_public_eagle(tmp_path / "c", m, **{"midlayer.hidden_norm.weight": torch.ones(D)})
    with pytest.raises(CheckpointError, match="EAGLE-3"):
        load_head(tmp_path / "c", m)
    write_public_eagle(tmp_path / "d", m)
    cfg = json.loads((tmp_path / "d" / "config.json").read_text())
    cfg["hidden_size"] = 4096
    (tmp_path / "d" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="hidden_size 4096"):
        load_head(tmp_path / "d", m)
    (tmp_path / "e").mkdir()
    with pytest.raises(CheckpointError, match="holds no EAGLE head"):
        load_head(tmp_path / "e", m)


# ---------------------------------------------------------------- LDLP and length policies
def test_ldlp_labels_are_the_agreeing_prefix_of_the_draft(model_dir, trained):
    """Each logged step's label = the longest prefix of the head's k_max draft that equals the
    target's own greedy continuation (recomputed here from plain decoding)."""
    _, m = model_dir
    d = Eagle(load_head(trained[0], m), FixedK(4))
    d.log = []
    for p in prompts(3):
        start = len(d.log)
        ref, _ = generate(m, p, max_new_tokens=40)
        generate(m, p, drafter=d, max_new_tokens=40)
        pos = 0                                       # index in ref of each step's root
        for root, _, drafted, accepted in d.log[start:]:
            assert root == ref[pos]
            lcp = 0
            while lcp < len(drafted) and pos + 1 + lcp < len(ref) and drafted[lcp] == ref[pos + 1 + lcp]:
                lcp += 1
            assert accepted == lcp
            pos += accepted + 1
    assert any(a > 0 for *_, a in d.log) and any(a < len(k) for _, _, k, a in d.log)


def test_collect_labels_keeps_full_steps_and_times_the_head(model_dir, trained):
    root, m = model_dir
    eng = TinyTrainEngine(m, root / "t")
    lab = collect_labels(eng, load_head(trained[0], m), prompts(2), k_max=3, max_new_tokens=30, vocab_subset=0,
                         progress=False)
    n = lab["labels"].numel()
    assert n > 5 and lab["feats"].shape == (n, m.cfg.hidden_size) and lab["tokens"].shape == (n,)
    assert float(lab["labels"].max()) <= 3 and lab["draft_ms"] > 0


def test_asymmetric_l1_and_ldlp_control_hand_checked():
    pred, lab = torch.tensor([1.0, 3.0]), torch.tensor([2.0, 2.0])
    assert float(asymmetric_l1(pred, lab, 3.0)) == pytest.approx((3 * 1 + 1) / 2)
    p = ldlp_init(4, hidden=8)
    for k in p:
        p[k] = torch.zeros_like(p[k])
    p["sd"] = torch.ones(4)
    emb = torch.zeros(10, 2)
    for value, k in ((2.4, 2), (2.6, 3), (-1.0, 0), (40.0, 5)):
        p["b_out"] = torch.tensor([value])
        c = LDLPControl(p, emb, k_max=5)
        c.see(3, torch.zeros(2))
        assert c.plan(0) == k
    # ldlp: exactly k tokens; ldlp-ddd: k, then on while the cumulative log-probability >= threshold
    p["b_out"] = torch.tensor([1.0])
    c = LDLPControl(p, emb, k_max=5)
    c.see(3, torch.zeros(2))
    assert c.plan(0) == 1 and c.more(0, 0.1) and not c.more(1, 0.99)
    c = LDLPControl(p, emb, k_max=5, threshold=-0.6)
    c.see(3, torch.zeros(2))
    assert c.plan(0) == 5
    assert c.more(0, 0.9) and c.more(1, 0.8)                   # log .9 + log .8 = -0.33
    assert not c.more(2, 0.7)                                  # -0.33 + log .7 = -0.69 < -0.6
    dd = DDD(-0.6, 8)
    dd.plan(0)
    assert dd.more(0, 0.9) and dd.more(1, 0.8) and not dd.more(2, 0.7)
    dd.plan(0)
    assert not dd.more(0, 0.5)                                 # log .5 = -0.69: a plain step


def test_fit_ldlp_learns_a_length_and_lambda_pushes_it_up():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(600, 6, generator=g)
    y = (x[:, 0] > 0).float() * 4                              # length 4 when feature 0 is positive, else 0
    p = fit_ldlp(x, y, 1.0, steps=400, hidden=16)
    pred = ldlp_forward(p, x)
    assert float(((pred > 2) == (y > 2)).float().mean()) > 0.9
    noisy = torch.where(torch.rand(600, generator=g) < 0.5, torch.full_like(y, 4.0), torch.zeros_like(y))
    lo = ldlp_forward(fit_ldlp(x, noisy, 1.0, steps=300, hidden=16), x).mean()
    hi = ldlp_forward(fit_ldlp(x, noisy, 4.0, steps=300, hidden=16), x).mean()
    assert float(hi) > float(lo) + 1.0                         # under-prediction costs more: longer drafts


def test_every_length_policy_is_lossless_and_ldlp_files_are_checked(model_dir, trained, tmp_path):
    _, m = model_dir
    head = load_head(trained[0], m)
    p = ldlp_init(2 * m.cfg.hidden_size, hidden=16)
    p["b_out"] = torch.tensor([2.0])
    fp = model_fingerprint(m)
    save_ldlp(tmp_path / "l.safetensors", p, {"fingerprint": fp, "head_id": head.id})
    params, _ = load_ldlp(tmp_path / "l.safetensors", fp, head.id)
    for length in ("fixed:2", "ddd", "ldlp", "ldlp-ddd"):
        d = Eagle(head, parse_length(length, None, 5, (params, m.embed)))
        for pr in prompts(2):
            assert generate(m, pr, drafter=d, max_new_tokens=25)[0] == generate(m, pr, max_new_tokens=25)[0]
        s = Sampling(temperature=0.9, seed=1)                   # sampled: seeded runs reproduce
        assert generate(m, pr, drafter=d, sampling=s, max_new_tokens=12)[0] == \
            generate(m, pr, drafter=d, sampling=s, max_new_tokens=12)[0]
    with pytest.raises(CheckpointError, match="another draft head"):
        load_ldlp(tmp_path / "l.safetensors", fp, "0" * 16)
    with pytest.raises(CheckpointError, match="fingerprint"):
        load_ldlp(tmp_path / "l.safetensors", "f" * 16)
    with pytest.raises(CheckpointError, match="not found"):
        load_ldlp(tmp_path / "none.safetensors", fp)
    with pytest.raises(ConfigError, match="needs an LDLP"):
        parse_length("ldlp", None, 5)
    with pytest.raises(ConfigError, match="length must be one of"):
        parse_length("sometimes", None, 5)


def test_training_prompts_come_from_training_sources_only():
    from draftwise.train.ldlp import training_prompts

    class Enc:
        seen: list = []

        def encode(self, text, chat=False):
            self.seen.append(text)
            return [len(text) % 90, 1, 2]

    e = Enc()
    out = training_prompts(e, 6)
    assert len(out) == 6 and all(isinstance(t, int) for p in out for t in p)
    assert any(t.startswith("Complete the following Python function") for t in e.seen)
    assert not any("HumanEval" in t for t in e.seen)
