"""EAGLE-3 heads: the cached head forward against the training-time-test pass (depths 1..3),
a public checkpoint in the official layout (an independent recomputation of one step, dims and
vocabulary errors), export -> load round trip, training (loss falls, depth accuracies
reported), lossless decoding with the head drafting chains and trees."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from draftwise.decoding import generate
from draftwise.drafters import eagle3
from draftwise.drafters.eagle import Eagle, load_head
from draftwise.errors import CheckpointError, ConfigError
from draftwise.models.checkpoint import load_state_dict
from draftwise.policies.length import FixedK
from draftwise.train.eagle import HeadLoss, train_head
from tests.conftest import DEVICE
from tests.helpers import tiny_model
from tests.test_early_exit import TinyTrainEngine, corpus


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    root = tmp_path_factory.mktemp("e3")
    m = tiny_model(root / "t", arch="llama", seed=5, dtype=torch.float64)
    return root, m


@pytest.fixture(scope="module")
def trained(target, tmp_path_factory):
    root, m = target
    tmp = tmp_path_factory.mktemp("e3head")
    out = tmp / "head.safetensors"
    info = train_head(TinyTrainEngine(m, root / "t"), out, data=[str(corpus(tmp))], max_tokens=3000, epochs=6,
                      batch=2, lr=3e-3, vocab_subset=64, seq_len=32, topk=8, progress=False, arch="eagle3", ttt=3)
    return out, info


def prompts(n=3, length=20):
    return [[int(x) for x in torch.randint(1, 90, (length,), generator=torch.Generator().manual_seed(s))]
            for s in range(n)]


# ---------------------------------------------------------------- the head vs its training pass
def test_cached_chain_equals_the_training_time_test_pass(target):
    """Depth-j logits of the training pass at row i == drafting j tokens through the KV cache after
    committing rows 0..i: the mask, positions and fed-back features of training are drafting's."""
    root, m = target
    state = load_state_dict(root / "t")
    from draftwise.train.early_exit import subset_head

    class Feats:            # one chunk in memory, in the features' layout
        manifest = {"spec": {"seq_len": 12}}

        def __init__(self, d):
            self.d = d

        def get(self, s, r, k):
            return self.d[k]

    g = torch.Generator().manual_seed(0)
    S, aux = 12, eagle3.aux_layers(m.cfg.num_layers)
    toks = torch.randint(1, 90, (S,), generator=g)
    out = m.forward(toks.to(DEVICE), torch.arange(S, device=DEVICE), m.new_cache(32), hidden_layers=aux)
    d = {"tokens": toks, "top_ids": torch.randint(0, 96, (S, 4), generator=g), "top_logp": torch.full((S, 4), -1.4)}
    d.update({f"h{i}": out.layer_hidden[i].cpu() for i in aux})
    _, head_w = subset_head(TinyTrainEngine(m, root / "t"), state, 0)
    t = eagle3.init_tensors(state, eagle3.head_config(m.cfg), torch.arange(96), head_w, "random", seed=4)
    frozen = {k: t.pop(k) for k in ("lm_head.weight", "d2t", "t2d")}
    params = {k: v.float() for k, v in t.items()}         # training runs in float32
    loss = HeadLoss(m, Feats(d), head_w.float(), torch.arange(96), params, True, torch.device(DEVICE),
                    arch="eagle3", steps=3, aux=aux)
    trace = []
    loss.trace = trace
    with torch.no_grad():
        loss([(0, 0)])
    head = eagle3.Eagle3Head(m, {**{k: v.double() for k, v in params.items()}, **frozen}, eagle3.head_config(m.cfg),
                             aux, packed=False)
    fused = torch.cat([out.layer_hidden[i] for i in aux], -1)
    for i in (0, 4, 9):
        cache = head.new_cache(32)
        # rows 0..i: (g_r, x_{r+1}) at position r + 1 (training's positions are shifted by one: rotary is relative)
        h = head.forward(toks[1:i + 2].to(DEVICE), fused[:i + 1], torch.arange(1, i + 2, device=DEVICE), cache)
        cache.commit(i + 1)
        x = h[-1:]
        for j in range(3):
            if i + 1 + j >= S:
                break
            if j:
                x = head.forward(toks[i + 1 + j:i + 2 + j].to(DEVICE), x, torch.tensor([i + 1 + j], device=DEVICE),
                                 cache)
                cache.hold(1)
            torch.testing.assert_close(head.lm_head(x)[0].double(), trace[j][i].double(), rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- public checkpoints
def official_dir(tmp_path, m, K=64, bias=False, seed=0, **cfg_over):
    """A synthetic head in the official EAGLE-3 layout (independent of draftwise's own tensors)."""
    g = torch.Generator().manual_seed(seed)
    D, V = m.cfg.hidden_size, m.cfg.vocab_size
    H, Hkv, Dh, inter = 4, 2, 16, 80
    r = lambda *s: torch.randn(*s, generator=g) * 0.1       # noqa: E731
    ids = torch.sort(torch.randperm(V, generator=g)[:K]).values
    t2d = torch.zeros(V, dtype=torch.bool)
    t2d[ids] = True
    w = {"fc.weight": r(D, 3 * D), "norm.weight": 1 + r(D), "lm_head.weight": r(K, D) * 5,
         "d2t": ids - torch.arange(K), "t2d": t2d,
         "midlayer.input_layernorm.weight": 1 + r(D), "midlayer.hidden_norm.weight": 1 + r(D),
         "midlayer.post_attention_layernorm.weight": 1 + r(D),
         "midlayer.self_attn.q_proj.weight": r(H * Dh, 2 * D), "midlayer.self_attn.k_proj.weight": r(Hkv * Dh, 2 * D),
         "midlayer.self_attn.v_proj.weight": r(Hkv * Dh, 2 * D), "midlayer.self_attn.o_proj.weight": r(D, H * Dh),
         "midlayer.mlp.gate_proj.weight": r(inter, D), "midlayer.mlp.up_proj.weight": r(inter, D),
         "midlayer.mlp.down_proj.weight": r(D, inter)}
    if bias:
        w.update({"midlayer.self_attn.q_proj.bias": r(H * Dh), "midlayer.self_attn.k_proj.bias": r(Hkv * Dh),
                  "midlayer.self_attn.v_proj.bias": r(Hkv * Dh)})
    cfg = {"architectures": ["LlamaForCausalLMEagle3"], "model_type": "llama", "hidden_size": D,
           "intermediate_size": inter, "num_attention_heads": H, "num_key_value_heads": Hkv, "head_dim": Dh,
           "num_hidden_layers": 1, "rms_norm_eps": 1e-5, "rope_theta": 5000.0, "vocab_size": V,
           "draft_vocab_size": K, "attention_bias": bias,
           "eagle_config": {"eagle_aux_hidden_state_layer_ids": [1, 2, 3]}, **cfg_over}
    d = tmp_path / "head"
    d.mkdir(exist_ok=True)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in w.items()}, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps(cfg))
    return d, w, cfg


def reference_step(w, cfg, emb, fused, pos):
    """EAGLE-3's head on n rows (causal), written from the layout's definition alone (float64)."""
    eps, H, Hkv, Dh = cfg["rms_norm_eps"], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    w = {k: v.double() for k, v in w.items()}

    def rms(x, g):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * g

    def rope(x):                                                # [n, h, Dh], rotate-half convention
        inv = 1.0 / cfg["rope_theta"] ** (torch.arange(0, Dh, 2, dtype=torch.float64) / Dh)
        ang = pos.double()[:, None] * inv[None]
        cos, sin = torch.cat([ang.cos(), ang.cos()], -1)[:, None], torch.cat([ang.sin(), ang.sin()], -1)[:, None]
        x1, x2 = x[..., :Dh // 2], x[..., Dh // 2:]
        return x * cos + torch.cat([-x2, x1], -1) * sin

    n = emb.shape[0]
    x = fused.double() @ w["fc.weight"].T
    a = torch.cat([rms(emb.double(), w["midlayer.input_layernorm.weight"]), rms(x, w["midlayer.hidden_norm.weight"])], -1)
    p = "midlayer.self_attn."
    q = rope((a @ w[p + "q_proj.weight"].T + w.get(p + "q_proj.bias", 0)).view(n, H, Dh))
    k = rope((a @ w[p + "k_proj.weight"].T + w.get(p + "k_proj.bias", 0)).view(n, Hkv, Dh))
    v = (a @ w[p + "v_proj.weight"].T + w.get(p + "v_proj.bias", 0)).view(n, Hkv, Dh)
    k, v = k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1)
    s = torch.einsum("ihd,jhd->hij", q, k) / math.sqrt(Dh)
    s = s.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
    o = torch.einsum("hij,jhd->ihd", s.softmax(-1), v).reshape(n, H * Dh) @ w[p + "o_proj.weight"].T
    h = x + o
    m = rms(h, w["midlayer.post_attention_layernorm.weight"])
    h = h + (F.silu(m @ w["midlayer.mlp.gate_proj.weight"].T) * (m @ w["midlayer.mlp.up_proj.weight"].T)) \
        @ w["midlayer.mlp.down_proj.weight"].T
    logits = rms(h, w["norm.weight"]) @ w["lm_head.weight"].T                 # [n, K]
    ids = torch.arange(w["d2t"].numel()) + w["d2t"].long()
    return h, logits, ids


@pytest.mark.parametrize("bias", [False, True])
def test_public_eagle3_head_matches_an_independent_recomputation(target, tmp_path, bias):
    root, m = target
    d, w, cfg = official_dir(tmp_path, m, bias=bias)
    head = load_head(d, m)
    assert isinstance(head, eagle3.Eagle3Head) and head.aux == (0, 1, 2)
    toks = torch.tensor([3, 17, 40, 2, 9, 77], device=DEVICE)
    out = m.forward(toks, torch.arange(6, device=DEVICE), m.new_cache(16), hidden_layers=head.aux)
    fused = torch.cat([out.layer_hidden[i] for i in (0, 1, 2)], -1)[:-1]        # g_0 .. g_4
    pos = torch.arange(1, 6)
    h = head.forward(toks[1:], fused, pos.to(DEVICE), head.new_cache(16))
    rh, rl, ids = reference_step(w, cfg, m.embed[toks[1:]].cpu(), fused.cpu(), pos)
    # (rotary tables are fp32 as Hugging Face computes them: ~1e-8 off a float64 rotation)
    torch.testing.assert_close(h.cpu().double(), rh, rtol=0, atol=1e-6)
    torch.testing.assert_close(head.lm_head(h).cpu().double(), rl, rtol=0, atol=1e-6)
    assert torch.equal(head.ids, ids)
    # and it drafts losslessly (its tokens are mapped through d2t to target ids)
    sub = head.ids
    from draftwise.vocab import VocabSubset

    dr = Eagle(head, FixedK(3), max_depth=3, subset=VocabSubset(sub, m.cfg.vocab_size))
    for p in prompts(2):
        assert generate(m, p, drafter=dr, max_new_tokens=20)[0] == generate(m, p, max_new_tokens=20)[0]


@pytest.mark.parametrize("change,needle", [
    ({"config": {"vocab_size": 50}}, "vocab_size 50"),
    ({"config": {"num_hidden_layers": 2}}, "2 layers"),
    ({"config": {"target_hidden_size": 32}}, "target_hidden_size 32"),
    ({"config": {"eagle_config": {"eagle_aux_hidden_state_layer_ids": [1, 2, 9]}}}, "reads target layers"),
    ({"drop": "midlayer.hidden_norm.weight"}, "missing tensors"),
    ({"tensor": ("fc.weight", torch.zeros(64, 96))}, "fc.weight has shape"),
    ({"tensor": ("t2d", torch.zeros(50, dtype=torch.bool))}, "t2d covers 50"),
    ({"tensor": ("d2t", torch.full((64,), 500))}, "outside the target's vocabulary"),
    ({"tensor": ("d2t", torch.zeros(64, dtype=torch.long))}, "t2d and d2t disagree"),
    ({"raw_config": "{not json"}, "not a readable config"),
])
def test_public_eagle3_head_errors_are_one_line(target, tmp_path, change, needle):
    root, m = target
    d, w, cfg = official_dir(tmp_path, m)
    from safetensors.torch import save_file

    if "config" in change:
        (d / "config.json").write_text(json.dumps({**cfg, **change["config"]}))
    if "raw_config" in change:
        (d / "config.json").write_text(change["raw_config"])
    if "drop" in change or "tensor" in change:
        w = dict(w)
        w.pop(change.get("drop"), None)
        if "tensor" in change:
            w[change["tensor"][0]] = change["tensor"][1]
        save_file({k: v.contiguous() for k, v in w.items()}, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError) as e:
        load_head(d, m)
    assert needle in str(e.value) and "\n" not in str(e.value)


# ---------------------------------------------------------------- training, export
def test_training_lowers_the_loss_and_reports_depth_accuracy(trained):
    out, info = trained
    assert info["kind_of"] == "eagle-3" and info["ttt"] == 3
    for j in (2, 3):
        assert 0.0 <= info[f"val_agree_d{j}"] <= 1.0
    hist = json.loads(json.dumps(info["val_curve"]))
    assert isinstance(hist, list)
    assert info["val_agree"] > info["val_agree_init"]
    assert info["val_agree_d2"] > info["val_agree_d2_init"]


def test_trained_head_is_lossless_and_exports_to_the_official_layout(target, trained, tmp_path):
    root, m = target
    out, info = trained
    head = load_head(out, m)
    assert isinstance(head, eagle3.Eagle3Head) and head.ids.numel() == 64
    from draftwise.vocab import VocabSubset

    sub = VocabSubset(head.ids, m.cfg.vocab_size)
    chain = Eagle(head, FixedK(3), max_depth=3, subset=sub)
    tree = Eagle(head, None, tree="opt-tree", max_nodes=6, width=3, max_depth=4, subset=sub)
    for p in prompts(3):
        ar = generate(m, p, max_new_tokens=24)[0]
        assert generate(m, p, drafter=chain, max_new_tokens=24)[0] == ar
        assert generate(m, p, drafter=tree, max_new_tokens=24)[0] == ar
    from draftwise.drafters.eagle import _read_weights

    tensors, meta = _read_weights(out)
    d = eagle3.export_head(m, tensors, meta, tmp_path / "exported")
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLMEagle3"] and cfg["draft_vocab_size"] == 64
    assert cfg["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [i + 1 for i in head.aux]
    from safetensors.torch import load_file

    w = load_file(str(d / "model.safetensors"))
    assert w["d2t"].dtype == torch.int64 and w["t2d"].dtype == torch.bool
    assert {k for k in w if k.startswith("midlayer.")} >= {"midlayer.hidden_norm.weight",
                                                           "midlayer.self_attn.q_proj.weight"}
    again = load_head(d, m)                     # loads as a public head: the same drafts
    assert again.meta["source"] == "eagle3"
    toks = torch.tensor([3, 17, 40, 2], device=DEVICE)
    f = torch.randn(4, 3 * m.cfg.hidden_size, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    a = head.lm_head(head.forward(toks, f.to(DEVICE), torch.arange(4, device=DEVICE), head.new_cache(8)))
    b = again.lm_head(again.forward(toks, f.to(DEVICE), torch.arange(4, device=DEVICE), again.new_cache(8)))
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    with pytest.raises(CheckpointError, match="not an empty directory"):
        eagle3.export_head(m, tensors, meta, d)


def test_train_options_are_checked(target, tmp_path):
    root, m = target
    eng = TinyTrainEngine(m, root / "t")
    with pytest.raises(ConfigError, match="--arch"):
        train_head(eng, tmp_path / "h.safetensors", arch="eagle9")
    with pytest.raises(ConfigError, match="--ttt"):
        train_head(eng, tmp_path / "h.safetensors", arch="eagle3", ttt=0)
    with pytest.raises(ConfigError, match="--ttt needs"):
        train_head(eng, tmp_path / "h.safetensors", arch="eagle1", ttt=3)


def test_q8_0_quantizer_rounds_each_block_to_its_scale():
    """Heads on the GGUF path run as Q8_0 blocks: d = amax / 127 (fp16) per 32 values, |x - q d| <= d / 2."""
    from draftwise.quant import quantize_q8_0

    g = torch.Generator().manual_seed(0)
    w = torch.randn(5, 96, generator=g) * torch.tensor([0.01, 1.0, 30.0]).repeat_interleave(32)
    w[2, 32:64] = 0.0                                              # an all-zero block
    qw = quantize_q8_0(w)
    assert qw.kind == "Q8_0" and qw.group == 32 and qw.q.dtype == torch.int8
    assert int(qw.q.abs().max()) <= 127 and torch.equal(qw.scale.half().float(), qw.scale)
    amax = w.view(5, 3, 32).abs().amax(-1)
    torch.testing.assert_close(qw.scale, (amax / 127).half().float())
    err = (qw.dequantize() - w).abs().view(5, 3, 32).amax(-1)
    assert bool((err <= qw.scale * 0.5 + 1e-3 * qw.scale + 1e-12).all())
    assert torch.equal(qw.q[2, 32:64], torch.zeros(32, dtype=torch.int8))
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize_q8_0(torch.zeros(2, 40))
