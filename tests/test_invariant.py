"""The batch-invariant Triton kernels (draftwise/kernels/invariant.py) and 16-bit decoding through them.

On the CPU they run in Triton's interpreter (conftest sets TRITON_INTERPRET=1), where the products are
IEEE fp32 dots; ``DRAFTWISE_TEST_DEVICE=cuda`` runs the same tests on a GPU with bf16 tensor-core dots.
Kernels are checked against float64 references; invariance is checked bit for bit: rows of a pass of
any n, split and sliced linears, attention over scattered visible slots against the same keys laid out
contiguously, a tree pass against one-token steps, the static (CUDA-graph) path against the eager one,
and greedy output of every registered method against plain greedy decoding in bfloat16.
"""
import math
import random

import pytest
import torch

pytest.importorskip("triton")

from draftwise import methods  # noqa: E402
from draftwise.decoding import generate  # noqa: E402
from draftwise.errors import ConfigError  # noqa: E402
from draftwise.kernels import invariant as inv  # noqa: E402
from draftwise.models.transformer import Transformer, prefill  # noqa: E402
from tests.conftest import DEVICE, make_tiny_hf  # noqa: E402
from tests.fixtures import TinyEngine, tiny_pair  # noqa: E402

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
ULP = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11, torch.float32: 2.0 ** -20}


def rand(*shape, dtype, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(device=DEVICE, dtype=dtype)


# ---------------------------------------------------------------- linear
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("splits", [1, 3])
def test_linear_matches_a_float64_reference(dtype, splits):
    for (n, out, k) in [(7, 100, 200), (1, 33, 64), (40, 130, 97)]:
        x, w, b = rand(n, k, dtype=dtype, seed=1), rand(out, k, dtype=dtype, seed=2), rand(out, dtype=dtype, seed=3)
        ref = x.double() @ w.double().T + b.double()
        y = inv.linear(x, w, b, splits)
        assert y.dtype == dtype and y.shape == (n, out)
        # one rounding to the storage type (plus fp32 accumulation, far below it)
        assert ((y.double() - ref).abs() <= ULP[dtype] * ref.abs() + 1e-5 * k ** 0.5).all()
        ynb = inv.linear(x, w, None, splits)
        assert ((ynb.double() - (ref - b.double())).abs() <= ULP[dtype] * ref.abs().max() + 1e-4).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("splits", [1, 2])
def test_linear_rows_do_not_depend_on_n(dtype, splits, monkeypatch):
    x, w, b = rand(20, 96, dtype=dtype, seed=4), rand(70, 96, dtype=dtype, seed=5), rand(70, dtype=dtype, seed=6)
    full = inv.linear(x, w, b, splits)
    for n in range(1, 21):
        assert torch.equal(inv.linear(x[:n], w, b, splits), full[:n])
        assert torch.equal(inv.linear(x[n - 1:n], w, b, splits)[0], full[n - 1])
    monkeypatch.setattr(inv, "PREFILL_ROWS", 6)         # a long pass runs in row slices: the same bits
    assert torch.equal(inv.linear(x, w, b, splits), full)
    strided = torch.zeros(20, 200, dtype=dtype, device=DEVICE)[:, 3:99]
    strided.copy_(x)                                     # a row stride other than the width
    assert torch.equal(inv.linear(strided, w, b, splits), full)


def test_splits_depend_on_the_weight_and_device_only():
    assert inv.splits_for(896, 4864, "cpu") == 1
    if DEVICE == "cuda":
        s = inv.splits_for(896, 4864, "cuda")
        assert s >= 1 and s == inv.splits_for(896, 4864, "cuda")


# ---------------------------------------------------------------- RMSNorm
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rms_norm_rounds_as_hugging_face_and_rows_do_not_depend_on_n(dtype):
    for d in (64, 1500):                                 # one block and several (NORM_BLOCK 1024)
        x, w = rand(19, d, dtype=dtype, seed=7), (rand(d, dtype=torch.float32, seed=8).abs() + 0.5).to(dtype)
        y = inv.rms_norm(x, w, 1e-6)
        xd = x.double()
        normed = xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-6)
        ref = (normed.to(dtype) * w) if dtype != torch.float32 else normed * w.double()   # LlamaRMSNorm's roundings
        tol = 0 if dtype == torch.float16 else ULP[dtype] * 2
        assert ((y.double() - ref.double()).abs() <= tol * ref.double().abs() + 1e-6).all()
        for n in (1, 5, 16, 17):
            assert torch.equal(inv.rms_norm(x[:n], w, 1e-6), y[:n])
        assert torch.equal(inv.rms_norm(x.view(19, 1, d), w, 1e-6).view(19, d), y)


# ---------------------------------------------------------------- attention
def attention_reference(q, keys, values, allowed):
    """float64 softmax attention; allowed [n, T] bool."""
    n, H, Dh = q.shape
    g = H // keys.shape[0]
    out = torch.zeros(n, H, Dh, dtype=torch.float64)
    for r in range(n):
        for h in range(H):
            s = (keys[h // g].double().cpu() @ q[r, h].double().cpu()) / math.sqrt(Dh)
            s[~allowed[r].cpu()] = -math.inf
            out[r, h] = torch.softmax(s, 0) @ values[h // g].double().cpu()
    return out.view(n, H * Dh)


def additive(allowed, g):
    return torch.zeros(allowed.shape, device=DEVICE).masked_fill_(~allowed, float("-inf")).repeat(g, 1)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_attention_matches_a_float64_reference(dtype):
    H, Hkv, Dh, T, n = 6, 2, 16, 150, 5                  # 150 slots: three key blocks of 64
    q, k, v = rand(n, H, Dh, dtype=dtype, seed=9), rand(Hkv, T, Dh, dtype=dtype, seed=10), rand(Hkv, T, Dh, dtype=dtype, seed=11)
    g = torch.Generator().manual_seed(12)
    allowed = (torch.rand(n, T, generator=g) < 0.5).to(DEVICE)
    allowed[:, 0] = True
    tol = {torch.bfloat16: 2e-2, torch.float16: 3e-3, torch.float32: 1e-5}[dtype]
    out = inv.attention(q, k, v, additive(allowed, H // Hkv))
    assert (out.double().cpu() - attention_reference(q, k, v, allowed)).abs().max() < tol
    everything = torch.ones(n, T, dtype=torch.bool, device=DEVICE)
    assert (inv.attention(q, k, v, None).double().cpu() - attention_reference(q, k, v, everything)).abs().max() < tol


def test_visible_lists_are_the_mask_compacted_in_slot_order():
    allowed = torch.tensor([[1, 0, 1, 1, 0], [0, 0, 0, 0, 1], [1, 1, 1, 1, 1]], dtype=torch.bool, device=DEVICE)
    vis = inv.visibility(additive(allowed, 3), 3)
    assert vis.count.tolist() == [3, 1, 5]
    assert [vis.idx[r, :c].tolist() for r, c in enumerate(vis.count.tolist())] == [[0, 2, 3], [4], [0, 1, 2, 3, 4]]
    assert inv.visibility(None, 3) is None and inv.visibility(vis, 3) is vis


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_attention_over_scattered_slots_equals_the_same_keys_laid_out_contiguously(dtype):
    """A tree node sees the committed prefix and its ancestors at scattered slots; the one-token step at
    its place sees the same keys contiguously. Both must give the same bits (and at any n)."""
    H, Hkv, Dh, T = 4, 2, 16, 200
    rng = random.Random(0)
    k, v = rand(Hkv, T, Dh, dtype=dtype, seed=13), rand(Hkv, T, Dh, dtype=dtype, seed=14)
    q = rand(9, H, Dh, dtype=dtype, seed=15)
    allowed = torch.zeros(9, T, dtype=torch.bool, device=DEVICE)
    for r in range(9):
        committed = rng.randrange(40, 130)               # prefix lengths across block boundaries
        allowed[r, :committed] = True
        for s in rng.sample(range(committed, T), rng.randrange(1, 8)):
            allowed[r, s] = True
    tree = inv.attention(q, k, v, additive(allowed, H // Hkv))
    for r in range(9):
        slots = allowed[r].nonzero()[:, 0]
        kc, vc = torch.zeros_like(k), torch.zeros_like(v)
        kc[:, :len(slots)], vc[:, :len(slots)] = k[:, slots], v[:, slots]
        one = inv.attention(q[r:r + 1], kc[:, :len(slots)], vc[:, :len(slots)], None)      # AR: no mask, T = count
        assert torch.equal(one[0], tree[r]), f"row {r}"
        assert torch.equal(inv.attention(q[r:r + 1], k, v, additive(allowed[r:r + 1], H // Hkv))[0], tree[r])


# ---------------------------------------------------------------- the model in bfloat16
@pytest.fixture(scope="module")
def bf16_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("inv")
    make_tiny_hf("qwen2", path, seed=11)
    return Transformer.from_pretrained(path, dtype=torch.bfloat16, max_len=256, device=DEVICE, kernels="invariant")


def test_a_tree_pass_scores_each_node_as_the_one_token_step_at_its_place(bf16_model):
    m = bf16_model
    prompt = torch.tensor([5, 17, 3, 44, 9, 60, 2, 31, 77, 12], device=DEVICE)
    path = [8, 50, 21]
    cache = m.new_cache()
    prefill(m, cache, prompt)
    steps = []
    for t in path:                                       # plain decoding: one token per pass
        steps.append(m.forward(torch.tensor([t], device=DEVICE), torch.tensor([cache.length], device=DEVICE), cache).logits[0])
        cache.commit(1)
    cache = m.new_cache()
    prefill(m, cache, prompt)
    L = cache.length
    # a tree whose path nodes sit between sibling branches: 0 = path[0], 1 = sibling, 2 = path[1] (child of 0),
    # 3 = sibling of 2, 4 = child of 1, 5 = path[2] (child of 2)
    tokens = torch.tensor([path[0], 70, path[1], 66, 40, path[2]], device=DEVICE)
    parent = [-1, -1, 0, 0, 1, 2]
    depth = [0, 0, 1, 1, 1, 2]
    mask = torch.zeros(6, 6, dtype=torch.bool)
    for i in range(6):
        j = i
        while j >= 0:
            mask[i, j] = True
            j = parent[j]
    out = m.forward(tokens, torch.tensor([L + d for d in depth], device=DEVICE), cache, tree_mask=mask.to(DEVICE))
    for node, step in zip((0, 2, 5), steps):
        assert torch.equal(out.logits[node], step)


def test_the_static_path_gives_the_eager_bits(tmp_path):
    make_tiny_hf("qwen2", tmp_path, seed=3)
    kw = dict(dtype=torch.bfloat16, max_len=256, device=DEVICE, kernels="invariant")
    eager = Transformer.from_pretrained(tmp_path, graphs="off", **kw)
    static = Transformer.from_pretrained(tmp_path, graphs="static", **kw)
    prompt = [4, 8, 15, 16, 23, 42, 7, 1]
    ref, _ = generate(eager, prompt, max_new_tokens=10)
    out, _ = generate(static, prompt, max_new_tokens=10)
    assert out == ref


PROMPT = [3, 9, 27, 81, 5, 9, 27, 4, 9, 27, 81]


@pytest.fixture(scope="module")
def bf16_pair(tmp_path_factory):
    """The tiny target and draft in bfloat16 on the invariant kernels, and the target's plain greedy output."""
    target, draft = tiny_pair(tmp_path_factory.mktemp("invpair"), dtype=torch.bfloat16, kernels="invariant")
    return target, draft, generate(target, PROMPT, max_new_tokens=14)[0]


FIRST_CASES = {}
for _label, _name, _opts in methods.test_cases():
    FIRST_CASES.setdefault(_name, _opts)     # each registered method once (its first test configuration)


@pytest.mark.parametrize("name", sorted(FIRST_CASES))
def test_every_registered_method_matches_plain_greedy_in_bfloat16(bf16_pair, name):
    target, draft, ref = bf16_pair
    spec = methods.get(name)
    d = spec.factory(TinyEngine(target, draft), **spec.validate(FIRST_CASES[name]))
    out, _ = generate(target, PROMPT, drafter=d, max_new_tokens=14, guard=False)
    assert out == ref, f"{name} diverged in bfloat16"


# ---------------------------------------------------------------- choosing the kernels
def test_kernel_modes_and_their_errors(tmp_path, monkeypatch):
    make_tiny_hf("llama", tmp_path, seed=1)
    auto = Transformer.from_pretrained(tmp_path, dtype=torch.bfloat16, max_len=64, device=DEVICE)
    assert auto.invariant == (DEVICE == "cuda")          # auto: invariant on CUDA in 16 bits only
    assert not Transformer.from_pretrained(tmp_path, max_len=64, device=DEVICE).invariant or DEVICE != "cpu"
    with pytest.raises(ConfigError, match="kernels must be one of"):
        Transformer.from_pretrained(tmp_path, max_len=64, kernels="fast")
    with pytest.raises(ConfigError, match="torch.compile"):
        Transformer.from_pretrained(tmp_path, dtype=torch.bfloat16, max_len=64, device=DEVICE, kernels="invariant",
                                    compile="glue")
    if DEVICE == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(ConfigError, match="run on CUDA"):
            Transformer.from_pretrained(tmp_path, dtype=torch.bfloat16, max_len=64, kernels="invariant")


COMPILE_SCRIPT = r"""
import os, sys
os.environ.pop("TRITON_INTERPRET", None)
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from draftwise.kernels import invariant as inv

def build(fn, types, consts, arch):
    sig = {n: "constexpr" if n in consts else types[n] for n in fn.arg_names}
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": inv.WARPS})

BM, BN, BK = inv.TILES
for arch in (80, 90):
    for kind, ptr in ((1, "*i16"), (2, "*fp16"), (0, "*fp32")):
        for dot16 in ((True, False) if kind else (False,)):
            k = build(inv._linear_kernel, dict(x=ptr, w=ptr, b=ptr, y=ptr, part="*fp32", M="i32", N="i32", K="i32",
                      sxm="i32", chunk="i32"), dict(KIND=kind, HAS_BIAS=True, SPLIT=1, DOT16=dot16, SUMDOT=False,
                                         BM=BM, BN=BN, BK=BK), arch)
            assert ("mma" in k.asm["ptx"]) == dot16, (arch, kind, dot16)     # 16-bit dots on tensor cores
        build(inv._split_sum_kernel, dict(part="*fp32", b=ptr, y=ptr, M="i32", N="i32"),
              dict(KIND=kind, HAS_BIAS=True, SPLIT=3, BM=32, BN=128), arch)
        build(inv._rms_kernel, dict(x=ptr, w=ptr, y=ptr, n="i32", D="i32", sx="i32", eps="fp32"),
              dict(KIND=kind, BM=1, BD=inv.NORM_BLOCK), arch)
        for has in (True, False):
            build(inv._attn_kernel, dict(q=ptr, k=ptr, v=ptr, o=ptr, idx="*i32", cnt="*i32", n="i32", T="i32",
                  sqn="i32", sqh="i32", skh="i32", skt="i32", svh="i32", svt="i32", sidx="i32", so="i32", G="i32",
                  Dh="i32", scale="fp32"), dict(KIND=kind, HAS_IDX=has, BM=1, BN=inv.ATTN_BLOCK, BD=128), arch)
print("compiled")
"""


def test_the_kernels_compile_for_cuda_without_a_gpu(tmp_path):
    """Every kernel variant compiles for sm_80 and sm_90 through Triton's own toolchain (no GPU needed),
    the 16-bit linears on tensor cores (mma): what the interpreter cannot check."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    r = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "compiled" in r.stdout, r.stderr[-3000:]
