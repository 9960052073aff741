"""Python side of the GGUF kernels with 8-bit activations (q8quant.c, q8gemm.c): packing a QWeight
into the q8gemm layout, the C plan of a linear, the linear itself, and activation quantization."""
from __future__ import annotations

import ctypes
from types import SimpleNamespace

import torch

from draftwise.kernels.build import library
from draftwise.kernels.linear import pack_weight

# ---------------------------------------------------------------------- GGUF blocks with 8-bit activations
# kind -> (activation blocks: 0 Q8_0/Q8_1 of 32, 1 Q8_K of 256; stored-value bias; sub-block; super-block;
# offsets: 0 none, 1 Q4_1's m, 2 Q4_K's mins). See q8.h and q8gemm.c.
Q8_KINDS = {"Q8_0": (0, 128, 32, 32, 0), "Q5_0": (0, 16, 32, 32, 0), "Q4_1": (0, 0, 32, 32, 1),
            "Q6_K": (1, 32, 16, 256, 0), "Q4_K": (1, 0, 32, 256, 2)}


def _fp16(t: torch.Tensor, what: str) -> torch.Tensor:
    h = t.half()
    if not torch.equal(h.float(), t.float()):
        raise ValueError(f"{what} are not fp16 values")
    return h


def pack_q8(w) -> SimpleNamespace:
    """One draftwise.quant.QWeight of a Q8_KINDS type -> a segment of the q8gemm layout (q8.h): values
    u = q + bias as uint8 [ceil(O/16), I/4 * 64] (nibble-packed [ceil(O/16), I/8 * 64] for the 4-bit types),
    D/M fp16 [ceil(O/16), I/SS, 16], SC/MN int8 [ceil(O/16), I/SB or I/32, 16]."""
    act, bias, SB, SS, mkind = Q8_KINDS[w.kind]
    O, I = w.shape
    if I % SS:
        raise ValueError(f"{w.kind} weight with {I} columns (not a multiple of {SS})")
    OB = (O + 15) // 16
    u = torch.zeros(OB * 16, I, dtype=torch.uint8)
    u[:O] = (w.q.to(torch.int16) + bias).to(torch.uint8)
    U = u.view(OB, 16, I // 4, 4).permute(0, 2, 1, 3).contiguous().view(OB, I // 4, 64)
    vals = 0
    if mkind:                                   # Q4_1, Q4_K: values 0..15, two steps per 64 bytes
        U = U.view(OB, I // 8, 2, 64)
        U, vals = (U[:, :, 0] | (U[:, :, 1] << 4)).contiguous(), 1
    SC = MN = M = None
    if SS == 256:
        D = pack_weight(_fp16(w.scale_f.base, f"{w.kind} scales"))
        SC = pack_weight(w.scale_f.ints)
        if mkind == 2:
            M, MN = pack_weight(_fp16(w.offset_f.base, "Q4_K mins")), pack_weight(w.offset_f.ints)
    else:
        D = pack_weight(_fp16(w.scale, f"{w.kind} scales"))
        if mkind == 1:
            M = pack_weight(_fp16(w.offset, "Q4_1 offsets"))
    return SimpleNamespace(kind=w.kind, O=O, I=I, act=act, vals=vals, bias=bias, SB=SB, SS=SS, mkind=mkind,
                           U=U, SC=SC, MN=MN, D=D, M=M)


def unpack_q8(seg, ids: torch.Tensor):
    """The QWeight of rows ``ids`` of a pack_q8 segment (a vocabulary-subset head)."""
    from draftwise.quant import Factors, QWeight

    OB, I = seg.U.shape[0], seg.I
    U = seg.U
    if seg.vals:
        U = torch.stack([U.view(OB, I // 8, 64) & 0x0F, U.view(OB, I // 8, 64) >> 4], dim=2).view(OB, I // 4, 64)
    u = U.view(OB, I // 4, 16, 4)[ids // 16, :, ids % 16].reshape(len(ids), I)
    q = (u.to(torch.int16) - seg.bias).to(torch.int8)
    pick = lambda t: None if t is None else t[ids // 16, :, ids % 16].contiguous()   # noqa: E731
    if seg.SS == 256:
        sf = Factors(pick(seg.D).float(), pick(seg.SC))
        of = Factors(pick(seg.M).float(), pick(seg.MN)) if seg.mkind == 2 else None
        return QWeight(q, sf.value(), None if of is None else of.value(), seg.SB, seg.kind, sf, of)
    return QWeight(q, pick(seg.D).float(), None if seg.M is None else pick(seg.M).float(), seg.SB, seg.kind)


class _Q8Seg(ctypes.Structure):
    _fields_ = [(f, ctypes.c_long) for f in ("O", "act", "vals", "bias", "SB", "SS", "mkind")] + \
               [(f, ctypes.c_void_p) for f in ("U", "SC", "MN", "D", "M")]


MAX_Q8_SEGMENTS = 4


class _Q8Lin(ctypes.Structure):
    _fields_ = [("I", ctypes.c_long), ("O", ctypes.c_long), ("nseg", ctypes.c_long), ("bias", ctypes.c_void_p),
                ("seg", _Q8Seg * MAX_Q8_SEGMENTS)]


def q8_plan(segs: list, bias_padded: torch.Tensor | None) -> _Q8Lin:
    """The C description (dw_q8lin_t) of a linear made of pack_q8 segments; it points at their tensors."""
    ptr = lambda t: None if t is None else t.data_ptr()     # noqa: E731
    cs = [_Q8Seg(s.O, s.act, s.vals, s.bias, s.SB, s.SS, s.mkind, ptr(s.U), ptr(s.SC), ptr(s.MN), ptr(s.D),
                 ptr(s.M)) for s in segs]
    return _Q8Lin(segs[0].I, sum(s.O for s in segs), len(segs), ptr(bias_padded), (_Q8Seg * MAX_Q8_SEGMENTS)(*cs))


def q8linear(x: torch.Tensor, plan: _Q8Lin, out: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W^T (+ b) with 8-bit activations (q8gemm.c); x [n, I] contiguous fp32 on CPU."""
    n = x.shape[0]
    if out is None:
        out = torch.empty(n, plan.O, dtype=torch.float32)
    if library().dw_q8linear(ctypes.addressof(plan), x.data_ptr(), n, out.data_ptr()):
        raise MemoryError(f"a linear over {n} rows: out of memory for its quantized activations")
    return out


def q8_quantize(x: torch.Tensor, kind: int) -> tuple[torch.Tensor, ...]:
    """x [n, I] fp32 -> (q int8 [n, I], d [n, I/B], s [n, I/32], bs16 [n, I/16], bs32 [n, I/32]) as the
    kernels quantize activations: kind 0 = Q8_0/Q8_1 (B = 32), 1 = Q8_K (B = 256). For tests."""
    x = x.contiguous()
    n, I = x.shape
    q = torch.empty(n, I, dtype=torch.int8)
    d = torch.empty(n, I // (32 if kind == 0 else 256))
    s = torch.empty(n, I // 32)
    bs16 = torch.empty(n, I // 16, dtype=torch.int32)
    bs32 = torch.empty(n, I // 32, dtype=torch.int32)
    library().dw_q8_quantize(x.data_ptr(), n, I, kind, q.data_ptr(), d.data_ptr(), s.data_ptr(), bs16.data_ptr(),
                             bs32.data_ptr())
    return q, d, s, bs16, bs32
