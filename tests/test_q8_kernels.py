"""8-bit-activation kernels (kernels/q8quant.c, q8gemm.c): the activation quantization equals llama.cpp's
x86 scheme (checked against an independent numpy implementation), the block dot products equal a float64
reference on the same quantized values, every ISA build gives the same bits, and each row's output does
not depend on how many rows share the call (n = 1..20 and across the large-n chunking)."""
import numpy as np
import pytest
import torch

from draftwise import kernels
from draftwise.quant import Factors, QWeight

pytestmark = pytest.mark.skipif(not kernels.available(), reason="CPU kernels unavailable")


# ---------------------------------------------------------------------- numpy references of the schemes
def ref_quant32(x: np.ndarray):
    """llama.cpp quantize_row_q8_0 / q8_1 (AVX2 path): q, d (fp16 value), s (fp16 of d * sum q)."""
    n, I = x.shape
    b = x.reshape(n, I // 32, 32).astype(np.float32)
    amax = np.abs(b).max(-1)
    d = (amax / np.float32(127)).astype(np.float32)
    with np.errstate(divide="ignore"):
        idv = np.where(amax != 0, np.float32(127) / amax, np.float32(0)).astype(np.float32)
    q = np.rint((b * idv[..., None]).astype(np.float32)).astype(np.int32)
    s = (d * q.sum(-1).astype(np.float32)).astype(np.float16).astype(np.float32)
    return q.reshape(n, I).astype(np.int8), d.astype(np.float16).astype(np.float32), s


def ref_quant256(x: np.ndarray):
    """llama.cpp quantize_row_q8_K_ref: q, d = 1 / iscale."""
    n, I = x.shape
    b = x.reshape(n, I // 256, 256).astype(np.float32)
    idx = np.abs(b).argmax(-1)
    mx = np.take_along_axis(b, idx[..., None], -1)[..., 0]
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = (np.float32(-127) / mx).astype(np.float32)
        val = ((iscale[..., None] * b).astype(np.float32) + np.float32(12582912)).astype(np.float32)
    i = (val.view(np.int32) & 0x007FFFFF) - 0x00400000
    q = np.minimum(i, 127)
    zero = mx == 0
    q[zero] = 0
    d = np.where(zero, np.float32(0), (np.float32(1) / iscale)).astype(np.float32)
    return q.reshape(n, I).astype(np.int8), d


def ref_linear(w: QWeight, x: torch.Tensor) -> np.ndarray:
    """float64 value of the block dot products on the same quantized activations."""
    act = kernels.Q8_KINDS[w.kind][0]
    xn = x.numpy()
    if act == 0:
        qa, da, sa = ref_quant32(xn)
        B = 32
    else:
        qa, da = ref_quant256(xn)
        B = 256
    n, I = xn.shape
    qa64 = qa.astype(np.float64).reshape(n, I // B, B)
    G = w.group
    scale = w.scale.double().numpy().repeat(G, 1)                              # [O, I]
    wq = (scale * w.q.double().numpy()).reshape(-1, I // B, B)                 # scale * q, exact
    y = np.einsum("rbk,obk,rb->ro", qa64, wq, da.astype(np.float64))
    if w.offset is not None:
        off = w.offset.double().numpy()                                        # [O, I / G]
        if w.kind == "Q4_1":
            y += sa.astype(np.float64) @ off.T
        else:                                                                  # Q4_K: per 32 columns
            bs = qa64.reshape(n, I // 32, 32).sum(-1) * da.astype(np.float64).repeat(256 // 32, 1)
            y += bs @ off.T
    return y


# ---------------------------------------------------------------------- random weights of each block type
def random_qweight(kind: str, O: int, I: int, g: torch.Generator) -> QWeight:
    f16 = lambda t: t.half().float()                                          # noqa: E731
    if kind in ("Q8_0", "Q5_0"):
        lo, hi = (-128, 128) if kind == "Q8_0" else (-16, 16)
        q = torch.randint(lo, hi, (O, I), generator=g).to(torch.int8)
        return QWeight(q, f16(torch.rand(O, I // 32, generator=g) * 0.02 + 1e-3), None, 32, kind)
    if kind == "Q4_1":
        q = torch.randint(0, 16, (O, I), generator=g).to(torch.int8)
        return QWeight(q, f16(torch.rand(O, I // 32, generator=g) * 0.02), f16(-torch.rand(O, I // 32, generator=g) * 0.1),
                       32, kind)
    if kind == "Q6_K":
        q = torch.randint(-32, 32, (O, I), generator=g).to(torch.int8)
        sf = Factors(f16(torch.rand(O, I // 256, generator=g) * 0.01), torch.randint(-128, 128, (O, I // 16), generator=g).to(torch.int8))
        return QWeight(q, sf.value(), None, 16, kind, sf)
    q = torch.randint(0, 16, (O, I), generator=g).to(torch.int8)                  # Q4_K
    sf = Factors(f16(torch.rand(O, I // 256, generator=g) * 0.01), torch.randint(0, 64, (O, I // 32), generator=g).to(torch.int8))
    of = Factors(-f16(torch.rand(O, I // 256, generator=g) * 0.01), torch.randint(0, 64, (O, I // 32), generator=g).to(torch.int8))
    return QWeight(q, sf.value(), of.value(), 32, kind, sf, of)


KINDS = list(kernels.Q8_KINDS)


def activations(n: int, I: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, I, generator=g) * torch.rand(n, 1, generator=g) * 3
    x[0, :37] = 0.0                                      # an all-zero block, and ties at the block maximum
    x[-1, 5] = x[-1, 9] = x[-1].abs().max() + 1
    x[-1, 300 % I] = -(x[-1].abs().max())
    return x


@pytest.mark.parametrize("I", [256, 512, 1280])
def test_activation_quantization_is_llamacpps(I):
    x = activations(7, I, seed=I)
    x[2, 64:96] = torch.tensor([0.5, -0.5, 1.5, 2.5] * 8) * (127 / 2.5) / 127 * 2.5  # halves: round to even
    for kind, ref in ((0, ref_quant32), (1, ref_quant256)):
        q, d, s, bs16, bs32 = kernels.q8_quantize(x, kind)
        r = ref(x.numpy())
        np.testing.assert_array_equal(q.numpy(), r[0])
        np.testing.assert_array_equal(d.numpy(), r[1])
        if kind == 0:
            np.testing.assert_array_equal(s.numpy(), r[2])
        qi = r[0].astype(np.int64)
        np.testing.assert_array_equal(bs16.numpy(), qi.reshape(7, -1, 16).sum(-1))
        np.testing.assert_array_equal(bs32.numpy(), qi.reshape(7, -1, 32).sum(-1))


def _run(lin_segs, x, bias=None):
    plan = kernels.q8_plan(lin_segs, bias)
    return kernels.q8linear(x.contiguous(), plan)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("O,I", [(48, 512), (37, 256), (160, 768)])
def test_block_dot_matches_float64_reference(kind, O, I):
    g = torch.Generator().manual_seed(hash((kind, O, I)) % 2**31)
    w = random_qweight(kind, O, I, g)
    x = activations(5, I, seed=O)
    y = _run([kernels.pack_q8(w)], x).double().numpy()
    ref = ref_linear(w, x)
    scale = np.abs(ref).max() + 1e-30
    assert np.abs(y - ref).max() / scale < 1e-5, (kind, np.abs(y - ref).max(), scale)


@pytest.mark.parametrize("kind", KINDS)
def test_isas_agree_bit_for_bit_and_rows_do_not_depend_on_n(kind):
    g = torch.Generator().manual_seed(7)
    w = random_qweight(kind, 80, 512, g)
    seg = kernels.pack_q8(w)
    bias = kernels.pad_bias(torch.randn(80, generator=g))
    x = activations(150, 512, seed=3)                    # > one large-n chunk of rows
    outs = {}
    old = kernels.isa()
    try:
        for isa in kernels.supported_isas():
            kernels.set_isa(isa)
            full = _run([seg], x, bias)
            for n in list(range(1, 21)) + [70]:
                torch.testing.assert_close(_run([seg], x[:n], bias), full[:n], rtol=0, atol=0)
            for r in (0, 1, 63, 64, 149):
                torch.testing.assert_close(_run([seg], x[r:r + 1], bias), full[r:r + 1], rtol=0, atol=0)
            outs[isa] = full
    finally:
        kernels.set_isa(old)
    first = next(iter(outs.values()))
    for isa, y in outs.items():
        torch.testing.assert_close(y, first, rtol=0, atol=0, msg=f"{isa} differs")


def test_mixed_segments_and_row_subsets():
    """A stacked linear of several block types equals its parts run alone; a vocabulary subset of a
    segment (unpack_q8 -> pack_q8) equals those rows of the whole."""
    g = torch.Generator().manual_seed(11)
    parts = [random_qweight("Q5_0", 64, 512, g), random_qweight("Q8_0", 32, 512, g), random_qweight("Q4_K", 48, 512, g),
             random_qweight("Q6_K", 21, 512, g)]
    segs = [kernels.pack_q8(p) for p in parts]
    x = activations(9, 512, seed=5)
    whole = _run(segs, x)
    col = 0
    for s in segs:
        torch.testing.assert_close(whole[:, col:col + s.O], _run([s], x), rtol=0, atol=0)
        col += s.O
    ids = torch.tensor([3, 47, 0, 20, 19])
    sub = kernels.pack_q8(kernels.unpack_q8(segs[2], ids))
    torch.testing.assert_close(_run([sub], x), _run([segs[2]], x)[:, ids], rtol=0, atol=0)


def test_isa_choice_from_the_environment(monkeypatch):
    from draftwise.errors import ConfigError

    monkeypatch.setattr(kernels.build, "_isa", None)
    monkeypatch.setenv(kernels.ISA_ENV, "sse2")
    with pytest.raises(ConfigError, match="must be one of"):
        kernels.isa()
    monkeypatch.setenv(kernels.ISA_ENV, "avx2")
    assert kernels.isa() == "avx2" and kernels.version().endswith("-avx2")
    monkeypatch.setattr(kernels.build, "_isa", None)
    monkeypatch.delenv(kernels.ISA_ENV)
    assert kernels.isa() == ("vnni512" if "vnni512" in kernels.supported_isas() else "avx2")
    with pytest.raises(ConfigError, match="not supported"):
        kernels.set_isa("mmx")
