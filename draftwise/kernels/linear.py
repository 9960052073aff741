"""Python side of the fp32-activation kernels: prepacked fp32 linears (gemm.c), GGUF blocks with fp32
activations (qgemm.c), the fused non-matmul steps and row reductions (ops.c) and a whole decoder
layer in one call (layer.c)."""
from __future__ import annotations

import ctypes
from types import SimpleNamespace

import torch

from draftwise.kernels.build import library


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """[O, I] weight (or per-group scales) -> prepacked [ceil(O/16), I, 16] (zero-padded rows)."""
    out_features, in_features = weight.shape
    blocks = (out_features + 15) // 16
    padded = weight.new_zeros(blocks * 16, in_features)
    padded[:out_features] = weight
    return padded.view(blocks, 16, in_features).transpose(1, 2).contiguous()


def huge_page_copies(tensors: list[torch.Tensor]) -> tuple[list[torch.Tensor], object | None]:
    """Copies of CPU tensors laid out in one anonymous mapping advised for transparent huge pages
    (Linux ``madvise(MADV_HUGEPAGE)``): the kernels stream every weight once per call, and 2 MiB pages
    save the page walks of 4 KiB ones (10% at one token on the 0.5B's GGUF weights, measured). Returns
    (copies in order, the mapping to keep alive), or the tensors themselves and None where the OS has
    no such advice."""
    import mmap

    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is None or not tensors or any(t.device.type != "cpu" for t in tensors):
        return tensors, None
    offs, total = [], 0
    for t in tensors:
        offs.append(total)
        total += (t.numel() * t.element_size() + 63) // 64 * 64
    huge = 2 << 20
    try:
        mm = mmap.mmap(-1, total + huge, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        mm.madvise(advice)
    except (OSError, ValueError):
        return tensors, None
    buf = torch.frombuffer(mm, dtype=torch.uint8)
    base = (-buf.data_ptr()) % huge                     # start on a 2 MiB boundary
    out = []
    for t, o in zip(tensors, offs):
        nb = t.numel() * t.element_size()
        c = buf[base + o: base + o + nb].view(t.dtype).view(t.shape)
        c.copy_(t)
        out.append(c)
    return out, mm


def pad_bias(bias: torch.Tensor) -> torch.Tensor:
    out = bias.new_zeros(((bias.numel() + 15) // 16) * 16)
    out[: bias.numel()] = bias
    return out


def linear(x: torch.Tensor, packed: torch.Tensor, bias_padded: torch.Tensor | None,
           out_features: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W^T (+ b) with a prepacked weight. x: [n, I] contiguous fp32 on CPU."""
    lib = library()
    assert lib is not None
    n, in_features = x.shape
    if out is None:
        out = torch.empty(n, out_features, dtype=x.dtype)
    lib.dw_linear(x.data_ptr(), n, in_features, packed.data_ptr(),
                  None if bias_padded is None else bias_padded.data_ptr(), out_features, out.data_ptr())
    return out


def pack_quant(w) -> SimpleNamespace:
    """A draftwise.quant.QWeight -> the qgemm layout, as QLinear's attributes: Q (values), bits, fmt,
    S, SC, M, MC (scales, offsets), per. 4-bit values (all q in 0..15, as Q4_K and Q4_1 hold) are
    nibble-packed, Q uint8 [ceil(O/16), I/2, 16] with columns 2j and 2j + 1 in the low and high nibble;
    anything else stays int8 [ceil(O/16), I, 16]. Scales/offsets: fmt 2 keeps the k-quants' factors
    (base fp32 [ceil(O/16), supers, 16] x int8 [ceil(O/16), groups, 16]); fmt 1 stores fp16 where every
    value is one (Q8_0, Q5_0, Q4_1); fmt 0 fp32 [ceil(O/16), groups, 16]."""
    q, scale, offset = w.q, w.scale, w.offset
    Q, bits = pack_weight(q), 8
    if q.shape[1] % 2 == 0 and q.numel() and int(q.min()) >= 0 and int(q.max()) <= 15:
        u = Q.to(torch.uint8)
        Q, bits = (u[:, 0::2, :] | (u[:, 1::2, :] << 4)).contiguous(), 4
    if w.scale_f is not None and (offset is None) == (w.offset_f is None):
        f = w.offset_f
        return SimpleNamespace(Q=Q, bits=bits, fmt=2, S=pack_weight(w.scale_f.base), SC=pack_weight(w.scale_f.ints),
                               M=None if f is None else pack_weight(f.base), MC=None if f is None else pack_weight(f.ints),
                               per=w.scale_f.ints.shape[1] // w.scale_f.base.shape[1])
    exact16 = all(t is None or torch.equal(t.half().float(), t) for t in (scale, offset))
    cast = (lambda t: t.half()) if exact16 else (lambda t: t)      # noqa: E731
    return SimpleNamespace(Q=Q, bits=bits, fmt=1 if exact16 else 0, S=pack_weight(cast(scale)), SC=None,
                           M=None if offset is None else pack_weight(cast(offset)), MC=None, per=1)


def unpack_quant(p, ids: torch.Tensor):
    """The QWeight of output rows ``ids`` of a pack_quant layout (any object with its attributes, e.g. a
    QLinear: a vocabulary-subset head)."""
    from draftwise.quant import Factors, QWeight

    pick = lambda t: None if t is None else t[ids // 16, :, ids % 16].contiguous()   # noqa: E731
    q = pick(p.Q) if p.bits == 8 else unpack_nibbles(pick(p.Q).T.unsqueeze(0))[0].T.contiguous()
    sf = of = None
    if p.fmt == 2:
        sf = Factors(pick(p.S), pick(p.SC))
        of = None if p.M is None else Factors(pick(p.M), pick(p.MC))
        scale, offset = sf.value(), None if of is None else of.value()
    else:
        scale, offset = pick(p.S).float(), None if p.M is None else pick(p.M).float()
    group = q.shape[1] // scale.shape[1]
    return QWeight(q, scale, offset, group, getattr(p, "kind", "subset"), sf, of)


def unpack_nibbles(Q: torch.Tensor) -> torch.Tensor:
    """[..., I/2, L] nibble-packed uint8 -> [..., I, L] int8 (the inverse of pack_quant's packing)."""
    lo, hi = (Q & 0x0F).to(torch.int8), (Q >> 4).to(torch.int8)
    return torch.stack([lo, hi], dim=-2).flatten(-3, -2)


def qlinear(x: torch.Tensor, p, group: int, bias_padded: torch.Tensor | None, out_features: int,
            out: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W^T (+ b) with a pack_quant layout (p: any object with its attributes, e.g. a QLinear;
    see qgemm.c). x: [n, I] fp32 on CPU."""
    lib = library()
    assert lib is not None
    n, in_features = x.shape
    if out is None:
        out = torch.empty(n, out_features, dtype=x.dtype)
    ptr = lambda t: None if t is None else t.data_ptr()     # noqa: E731
    lib.dw_qlinear(x.data_ptr(), n, in_features, p.Q.data_ptr(), p.bits, p.fmt, ptr(p.S), ptr(p.SC), ptr(p.M),
                   ptr(p.MC), group, p.per, ptr(bias_padded), out_features, out.data_ptr())
    return out


# ---------------------------------------------------------------------- row reductions over logits (ops.c)
def _rows_ok(x: torch.Tensor) -> bool:
    return (x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() in (1, 2) and x.stride(-1) == 1
            and x.shape[-1] > 0 and library() is not None)


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """x.argmax(-1) for [n, V] (or [V]) logits: the first index of each row's largest value, as torch picks
    it; native on CPU fp32 (ATen took 1.8-8 ms for 3-8 rows of 151,936), torch elsewhere."""
    if not _rows_ok(x):
        return x.argmax(-1)
    x2 = x if x.dim() == 2 else x.view(1, -1)
    out = torch.empty(x2.shape[0], dtype=torch.long)
    library().dw_argmax_rows(x2.data_ptr(), x2.shape[0], x2.shape[1], x2.stride(0), out.data_ptr())
    if bool((out < 0).any()):                    # a NaN somewhere: torch's rule (NaN is the largest)
        return x.argmax(-1)
    return out if x.dim() == 2 else out[0]


def topk_rows(x: torch.Tensor, k: int) -> torch.Tensor:
    """The indices of each row's k largest values, largest first ([n, V] -> [n, k]); native on CPU fp32
    for k <= 64 (equal values: lower index first; NaN never chosen, where torch would rank it first), torch.topk
    elsewhere."""
    if not _rows_ok(x) or x.dim() != 2 or not 0 < k <= min(64, x.shape[1]):
        return torch.topk(x, k, dim=-1).indices
    out = torch.empty(x.shape[0], k, dtype=torch.long)
    library().dw_topk_rows(x.data_ptr(), x.shape[0], x.shape[1], x.stride(0), k, out.data_ptr())
    return out


# ---------------------------------------------------------------------- fused non-matmul steps (ops.c)
def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last axis of a contiguous fp32 CPU tensor."""
    x = x.contiguous()
    y = torch.empty_like(x)
    D = x.shape[-1]
    library().dw_rms_norm(x.data_ptr(), x.numel() // D, D, w.data_ptr(), eps, y.data_ptr())
    return y


def add_rms_norm(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + y, RMSNorm(x + y)) in one pass; x, y [rows, D]."""
    x, y = x.contiguous(), y.contiguous()
    xo, h = torch.empty_like(x), torch.empty_like(x)
    D = x.shape[-1]
    library().dw_add_rms_norm(x.data_ptr(), y.data_ptr(), x.numel() // D, D, w.data_ptr(), eps, xo.data_ptr(),
                              h.data_ptr())
    return xo, h


def rope_(qkv: torch.Tensor, start: int, heads: int, head_dim: int, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Rotate, in place, the `heads` heads that begin at column `start` of each row of qkv [n, C]."""
    assert qkv.is_contiguous() and cos.is_contiguous() and sin.is_contiguous()
    n, C = qkv.shape
    library().dw_rope(qkv.data_ptr() + start * qkv.element_size(), n, C, heads, head_dim, cos.data_ptr(),
                      sin.data_ptr())


def attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None,
              scale: float) -> torch.Tensor | None:
    """Softmax attention of q [n, H, Dh] over keys/values [Hkv, T, Dh] (grouped heads) with an additive
    mask [>= n, T] (its first n rows are used; None: all visible) -> [n, H * Dh]; see ops.c. None when
    the tensors are not laid out for the kernel (the caller falls back to ATen)."""
    n, H, Dh = q.shape
    Hkv, T, _ = keys.shape
    f32 = torch.float32
    if (q.dtype != f32 or keys.dtype != f32 or values.dtype != f32 or q.stride(2) != 1 or q.stride(1) != Dh
            or keys.stride()[1:] != (Dh, 1) or values.stride() != keys.stride() or H % Hkv
            or (mask is not None and (mask.dtype != f32 or mask.stride(1) != 1 or mask.shape[1] != T))):
        return None
    out = torch.empty(n, H * Dh, dtype=f32)
    if library().dw_attention(q.data_ptr(), n, q.stride(0), H, Hkv, Dh, keys.data_ptr(), values.data_ptr(),
                              keys.stride(0), T, None if mask is None else mask.data_ptr(),
                              0 if mask is None else mask.stride(0), scale, out.data_ptr()):
        raise MemoryError(f"attention over {T} positions: out of memory for its scores")
    return out


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """[n, 2I] -> silu(gate) * up [n, I] in one pass (ops.c)."""
    gate_up = gate_up.contiguous()
    n, two = gate_up.shape
    out = torch.empty(n, two // 2, dtype=gate_up.dtype)
    library().dw_swiglu(gate_up.data_ptr(), n, two // 2, out.data_ptr())
    return out


class _Lin(ctypes.Structure):
    _fields_ = [(f, ctypes.c_long) for f in ("bits", "fmt", "G", "per", "I", "O")] + \
               [(f, ctypes.c_void_p) for f in ("Q", "S", "M", "SC", "MC", "bias")]


class _Layer(ctypes.Structure):
    _fields_ = [(f, ctypes.c_long) for f in ("D", "H", "Hkv", "Dh", "F")] + \
               [("eps", ctypes.c_float), ("scale", ctypes.c_float), ("attn_norm", ctypes.c_void_p),
                ("mlp_norm", ctypes.c_void_p), ("qkv", _Lin), ("o", _Lin), ("gate_up", _Lin), ("down", _Lin)]


def _lin_struct(lin) -> _Lin | None:
    ptr = lambda t: None if t is None else t.data_ptr()     # noqa: E731
    bias = ptr(lin.bias)
    if getattr(lin, "packed", None) is not None:            # prepacked fp32 (models.transformer.Linear)
        return _Lin(32, 0, 0, 0, lin.in_features, lin.out_features, lin.packed.data_ptr(), None, None, None, None, bias)
    if getattr(lin, "segs", None) is not None:              # GGUF blocks, 8-bit activations (QLinear "q8")
        return _Lin(1, 0, 0, 0, lin.in_features, lin.out_features, ctypes.addressof(lin.plan()), None, None, None,
                    None, None)
    if getattr(lin, "Q", None) is not None:                 # GGUF blocks (QLinear)
        return _Lin(lin.bits, lin.fmt, lin.group, lin.per, lin.in_features, lin.out_features, lin.Q.data_ptr(),
                    ptr(lin.S), ptr(lin.M), ptr(lin.SC), ptr(lin.MC), bias)
    return None


def layer_plan(L, heads: tuple[int, int, int], eps: float):
    """The C description of a decoder layer (models.transformer.Layer) for :func:`layer`, or None where
    the layer is not all kernel-backed fp32 CPU tensors or has q/k norms (those run in Python). The plan
    points at the layer's tensors: build it after they are in their final place."""
    H, Hkv, Dh = heads
    if L.q_norm is not None or L.k_norm is not None:
        return None
    lins = [_lin_struct(x) for x in (L.qkv, L.o, L.gate_up, L.down)]
    norms = [t for t in (L.attn_norm, L.mlp_norm) if t is not None]
    if any(x is None for x in lins) or any(t.dtype != torch.float32 or not t.is_contiguous() for t in norms):
        return None
    return _Layer(lins[0].I, H, Hkv, Dh, lins[3].I, eps, 1.0 / Dh ** 0.5,
                  None if L.attn_norm is None else L.attn_norm.data_ptr(), L.mlp_norm.data_ptr(), *lins)


def layer(plan, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_all: torch.Tensor, v_all: torch.Tensor,
          start: int, mask: torch.Tensor | None) -> torch.Tensor:
    """One decoder layer (layer.c) on x [n, D]: keys/values written to k_all/v_all [Hkv, T, Dh] at slots
    [start, start + n), attention over [0, start + n) with mask [>= n, start + n] (additive; first n rows
    used) or None; cos/sin [n, Dh]. Returns the new [n, D]."""
    x, cos, sin = x.contiguous(), cos.contiguous(), sin.contiguous()
    n = x.shape[0]
    out = torch.empty_like(x)
    m = None if mask is None else mask.data_ptr()
    if library().dw_layer(ctypes.addressof(plan), x.data_ptr(), n, cos.data_ptr(), sin.data_ptr(), k_all.data_ptr(),
                          v_all.data_ptr(), k_all.stride(0), start, m, 0 if mask is None else mask.stride(0),
                          out.data_ptr()):
        raise MemoryError(f"a decoder layer over {n} tokens: out of memory for its scratch")
    return out
