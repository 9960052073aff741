"""A GGUF model's own quantized weights, unpacked into one exact low-bit form.

Every supported GGUF block type is, exactly, ``W[o, i] = scale[o, g] * q[o, i] (+ offset[o, g])``
with q a small integer (int8 here), g = i // group, and scale/offset fp32 numbers computed the way
``gguf``'s own dequantization computes them (so the product is bit-for-bit its dequantized value):

=========  =====  =====================================  ==========================
type       group  q                                      scale, offset
=========  =====  =====================================  ==========================
Q8_0       32     int8                                    d
Q5_0       32     5-bit - 16                              d
Q4_1       32     4-bit                                   d, + m
Q6_K       16     6-bit - 32                              d * sc (sc int8 per 16)
Q4_K       32     4-bit                                   d * sc, - dmin * mn (6-bit sc, mn)
=========  =====  =====================================  ==========================

``models/gguf.py`` reads a GGUF file's linear weights into this form, by Hugging Face name.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from draftwise.errors import CheckpointError

SUPPORTED = ("Q8_0", "Q5_0", "Q4_1", "Q6_K", "Q4_K")


@dataclass
class Factors:
    """A per-group scale (or offset) that is, exactly, base * int: the k-quants' fp16 super-block factor
    (d, or -dmin for Q4_K's offset) times a small per-group integer (sc, mn). base fp32 [rows, supers],
    ints int8 [rows, groups]; each super covers ``groups // supers`` consecutive groups. The kernel reads
    these (1 byte per group instead of 4) and multiplies them itself: the same fp32 product."""
    base: torch.Tensor
    ints: torch.Tensor

    def value(self) -> torch.Tensor:
        per = self.ints.shape[1] // self.base.shape[1]
        return self.base.repeat_interleave(per, dim=1) * self.ints.float()


@dataclass
class QWeight:
    """One block-quantized matrix: q int8 [rows, cols], scale/offset fp32 [rows, cols // group], and
    for the k-quants the factors those scales/offsets are products of (None otherwise)."""
    q: torch.Tensor
    scale: torch.Tensor
    offset: torch.Tensor | None
    group: int
    kind: str
    scale_f: Factors | None = None
    offset_f: Factors | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)

    def dequantize(self) -> torch.Tensor:
        rows, cols = self.q.shape
        g = self.group
        w = self.scale.unsqueeze(-1) * self.q.view(rows, cols // g, g).float()
        if self.offset is not None:
            w = w + self.offset.unsqueeze(-1)
        return w.reshape(rows, cols)

    def regroup(self, group: int) -> "QWeight":
        """The same matrix with a smaller group (each scale repeated: exact)."""
        if group == self.group:
            return self
        r = self.group // group
        off = None if self.offset is None else self.offset.repeat_interleave(r, dim=1)
        rep = lambda f: None if f is None else Factors(f.base, f.ints.repeat_interleave(r, dim=1))   # noqa: E731
        return QWeight(self.q, self.scale.repeat_interleave(r, dim=1), off, group, self.kind, rep(self.scale_f),
                       rep(self.offset_f))

    def take_rows(self, idx: torch.Tensor) -> "QWeight":
        pick = lambda f: None if f is None else Factors(f.base[idx], f.ints[idx])   # noqa: E731
        return QWeight(self.q[idx], self.scale[idx], None if self.offset is None else self.offset[idx], self.group,
                       self.kind, pick(self.scale_f), pick(self.offset_f))


def quantize_q8_0(w: torch.Tensor) -> QWeight:
    """fp32 [rows, cols] (cols a multiple of 32) -> Q8_0 blocks as llama.cpp writes them: per 32 values
    d = amax / 127 (stored fp16), q = round(x / d). For draft parts (EAGLE heads) run on the GGUF path:
    they only propose tokens, so their rounding never reaches the output."""
    rows, cols = w.shape
    if cols % 32:
        raise ValueError(f"Q8_0 needs a multiple of 32 columns, got {cols}")
    b = w.detach().float().cpu().view(rows, cols // 32, 32)
    d = (b.abs().amax(-1) / 127).half().float()                                 # [rows, cols / 32]
    inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
    q = torch.round(b * inv.unsqueeze(-1)).clamp_(-127, 127).to(torch.int8).view(rows, cols)
    return QWeight(q, d, None, 32, "Q8_0")


def concat_rows(parts: list[QWeight]) -> QWeight:
    """Stack matrices along the rows (fused q/k/v, gate/up), unifying group size and offsets. The
    factors survive when every part has them over equal super-blocks (else the fp32 values serve)."""
    g = min(p.group for p in parts)
    parts = [p.regroup(g) for p in parts]
    offs = None
    if any(p.offset is not None for p in parts):
        offs = torch.cat([p.offset if p.offset is not None else torch.zeros_like(p.scale) for p in parts])
    kinds = "+".join(dict.fromkeys(p.kind for p in parts))
    sf = of = None
    supers = {p.scale_f.base.shape[1] if p.scale_f is not None else None for p in parts}
    if len(supers) == 1 and None not in supers and all(p.offset is None or p.offset_f is not None for p in parts):
        sf = Factors(torch.cat([p.scale_f.base for p in parts]), torch.cat([p.scale_f.ints for p in parts]))
        if offs is not None:
            zero = lambda p: Factors(torch.zeros_like(p.scale_f.base), torch.zeros_like(p.scale_f.ints))  # noqa: E731
            fs = [p.offset_f if p.offset_f is not None else zero(p) for p in parts]
            of = Factors(torch.cat([f.base for f in fs]), torch.cat([f.ints for f in fs]))
    return QWeight(torch.cat([p.q for p in parts]), torch.cat([p.scale for p in parts]), offs, g, kinds, sf, of)


# ---------------------------------------------------------------------- unpacking, per type
def _f16(b: np.ndarray) -> np.ndarray:
    return b.copy().view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray, n: int, span: int) -> np.ndarray:
    """Low nibbles of each span of bytes, then their high nibbles (ggml's order)."""
    q = qs.reshape(n, -1, 1, span) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    return (q & np.uint8(0x0F)).reshape(n, -1)


def unpack(kind: str, blocks: np.ndarray):
    """blocks uint8 [n_blocks, block_bytes] -> (q int8 [n_blocks, values], scale and offset fp32
    [n_blocks, values // group], group, factors). factors: None, or for the k-quants (scale base fp32
    [n_blocks, 1], scale ints int8 [n_blocks, groups], offset base, offset ints (None for Q6_K)) with
    scale = base * ints and offset = base * ints exactly (the same fp32 products)."""
    n = blocks.shape[0]
    if kind == "Q8_0":
        d, x = np.split(blocks, [2], axis=1)
        return x.copy().view(np.int8), _f16(d), None, 32, None
    if kind == "Q5_0":
        d, rest = np.hsplit(blocks, [2])
        qh, qs = np.hsplit(rest, [4])
        bits = (qh.copy().view(np.uint32).reshape(n, 1) >> np.arange(32, dtype=np.uint32).reshape(1, 32)) & np.uint32(1)
        q = (_nibbles(qs, n, 16) | (bits.astype(np.uint8) << np.uint8(4))).astype(np.int8) - np.int8(16)
        return q, _f16(d), None, 32, None
    if kind == "Q4_1":
        d, rest = np.hsplit(blocks, [2])
        m, qs = np.hsplit(rest, [2])
        return _nibbles(qs, n, 16).astype(np.int8), _f16(d), _f16(m), 32, None
    if kind == "Q6_K":
        ql, rest = np.hsplit(blocks, [128])
        qh, rest = np.hsplit(rest, [64])
        sc, d = np.hsplit(rest, [16])
        sc = sc.copy().view(np.int8)
        scale = _f16(d) * sc.astype(np.float32)                                     # [n, 16]
        low = _nibbles(ql, n, 64).reshape(n, -1, 32)
        high = (qh.reshape(n, -1, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1))
        high = (high & np.uint8(0x03)).reshape(n, -1, 32)
        q = ((low | (high << np.uint8(4))).astype(np.int8) - np.int8(32)).reshape(n, 256)
        return q, scale, None, 16, (_f16(d), sc, None, None)
    if kind == "Q4_K":
        d, rest = np.hsplit(blocks, [2])
        dmin, rest = np.hsplit(rest, [2])
        scales, qs = np.hsplit(rest, [12])
        s = scales.copy().view(np.uint8).reshape(n, 3, 4)
        a, b, c = np.split(s, 3, axis=-2)
        sc = np.concatenate([a & 0x3F, (c & 0x0F) | ((a >> 2) & 0x30)], axis=-1).reshape(n, 8)
        mn = np.concatenate([b & 0x3F, (c >> 4) | ((b >> 2) & 0x30)], axis=-1).reshape(n, 8)
        scale = _f16(d) * sc.astype(np.float32)
        offset = -(_f16(dmin) * mn.astype(np.float32))
        q = _nibbles(qs, n, 32).astype(np.int8)
        return q, scale, offset, 32, (_f16(d), sc.astype(np.int8), -_f16(dmin), mn.astype(np.int8))
    raise CheckpointError(f"GGUF tensor type {kind} is not supported by the block kernel (supported: "
                          f"{', '.join(SUPPORTED)})")


def from_gguf_tensor(t) -> QWeight:
    """A gguf.ReaderTensor of a supported quantized type -> QWeight [rows, cols]."""
    import gguf

    kind = t.tensor_type.name
    cols, rows = (int(x) for x in t.shape[:2])               # GGUF lists the fastest axis first
    block_size, type_size = gguf.GGML_QUANT_SIZES[t.tensor_type]
    blocks = np.asarray(t.data).reshape(-1, type_size)
    q, scale, offset, group, factors = unpack(kind, blocks)
    per_row = lambda a: torch.from_numpy(np.ascontiguousarray(a.reshape(rows, -1)))   # noqa: E731
    sf = of = None
    if factors is not None:
        sb, si, ob, oi = factors
        sf = Factors(per_row(sb), per_row(si))
        of = None if ob is None else Factors(per_row(ob), per_row(oi))
    return QWeight(per_row(q), per_row(scale), None if offset is None else per_row(offset), group, kind, sf, of)
