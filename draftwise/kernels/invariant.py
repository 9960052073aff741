"""Batch-invariant forward kernels (Triton): 16-bit decoding on CUDA that stays lossless.

Speculative decoding is lossless only if the target scores a token the same way whether its pass
holds one token (plain decoding) or a whole tree: a row's result must not depend on how many rows
share the pass or at which slots its keys sit. cuBLAS, SDPA and fused norms pick tilings, split-K
and reduction trees by shape; in bfloat16 that flips near-tied argmaxes (on an H100 the bf16 eager
AR and the graph AR first differed at tokens 1-42). Here each output row is computed by one fixed
sequence of operations, whatever the number of rows:

- :func:`linear`, y = x W^T (+ b) [n, in] -> [n, out]: fixed tiles (``TILES``), the K loop in one
  order, K optionally cut into ``splits`` chunks chosen from (out, in) and the device alone, never
  from n (:func:`splits_for`), their fp32 partial sums added in chunk order by a second kernel, the
  bias last. Padding rows load as zeros and never feed a real row.
- :func:`rms_norm`: one program per row (16 in the interpreter), the sum of squares in fixed blocks; 16-bit storage rounds
  where Hugging Face rounds (the normalised row, then the product with the weight).
- :func:`attention`: one program per (query row, head) (16 rows in the interpreter) reduces over the slots that row may see
  **in the order of that list** (:class:`Visible`: each row's visible slots, compacted, and their
  count), in blocks of ``ATTN_BLOCK`` by position in the list, with an online softmax. A tree node
  whose ancestors sit at scattered slots sums exactly the blocks the one-token step at its place
  sums, so its scores, weights and output carry the same bits.

The rest of a layer (RoPE, SiLU x up, residual adds, the embedding gather) is elementwise: each
element is one operation at any n. Terms: *rows* are the tokens of one forward (n); *slots* the KV
cache positions; a *visible list* the slots one row attends to.

Storage is bfloat16, float16 or float32. bf16 is read and written through its bits (fp32 = bits <<
16; stores round to nearest even by hand), because Triton's CPU interpreter (``TRITON_INTERPRET=1``,
how CI runs these kernels with no GPU) neither rounds bf16 nor multiplies it correctly. Products:
on CUDA, ``tl.dot`` on 16-bit tiles with fp32 accumulation (tensor cores), IEEE fp32 dots for fp32;
in the interpreter an explicit product-and-sum over each k step (``tl.dot`` there is numpy's matmul,
whose BLAS may sum a row in another order by its position in the tile: seen with OpenBLAS's Haswell
kernel on an AMD EPYC). Invariance is a property of the structure and holds for both; the interpreter
tests check it (and the indexing) at small shapes, a GPU run at full size.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from draftwise.errors import ConfigError

TILES = (32, 64, 64)          # BM, BN, BK of the linear: fixed, so every n runs the same tiles
ATTN_BLOCK = 64               # keys per attention step (by position in the visible list)
NORM_BLOCK = 1024             # columns per RMSNorm step (at most; fewer for narrow rows)
MIN_CHUNK = 256               # K columns per split at least
PREFILL_ROWS = 512            # a linear of more rows runs in slices of this many (bounded workspace)
WARPS = 4
INTERPRETER_ROWS = 16         # norm/attention rows per program in the CPU interpreter
DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}

try:
    import triton
    import triton.language as tl
    _WHY = None
except ImportError as e:          # the kernels are optional: torch paths need no Triton
    triton = tl = None
    _WHY = f"Triton is not installed ({e}); pip install triton"


def interpreted() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def why_unavailable(device: torch.device | str, dtype: torch.dtype) -> str | None:
    """None if the kernels can run for tensors of this device and dtype, else why not (one line)."""
    if _WHY is not None:
        return _WHY
    dev = torch.device(device)
    if dtype not in DTYPES:
        return f"the invariant kernels take float32, bfloat16 or float16, not {str(dtype).split('.')[-1]}"
    if dev.type == "cuda" and not interpreted():
        return None
    if dev.type == "cpu" and interpreted():
        return None
    return (f"the invariant kernels run on CUDA (on CPU only under TRITON_INTERPRET=1, for tests); "
            f"the model is on {dev.type}")


def check(device: torch.device | str, dtype: torch.dtype) -> None:
    why = why_unavailable(device, dtype)
    if why is not None:
        raise ConfigError(why)


# ---------------------------------------------------------------------- Triton kernels
if triton is not None:
    @triton.jit
    def _load(ptr, offs, mask, KIND: tl.constexpr, DOT16: tl.constexpr):
        """Values at ptr + offs as fp32 (or, DOT16, as the 16-bit type tl.dot takes); 0 where masked.
        KIND 0: fp32; 1: bf16 held as int16 bits; 2: fp16. (One return: Triton types each return.)"""
        if KIND == 1:
            bits = tl.load(ptr + offs, mask=mask, other=0)
            if DOT16:
                val = bits.to(tl.bfloat16, bitcast=True)
            else:
                val = (bits.to(tl.int32) << 16).to(tl.float32, bitcast=True)
        elif KIND == 2:
            val = tl.load(ptr + offs, mask=mask, other=0.0)
            if not DOT16:
                val = val.to(tl.float32)
        else:
            val = tl.load(ptr + offs, mask=mask, other=0.0)
        return val

    @triton.jit
    def _round(x, KIND: tl.constexpr):
        """fp32 x rounded to the storage type (nearest, ties to even), back in fp32. bf16 rounds by hand,
        in int64 (no int32 overflow checks in the interpreter)."""
        if KIND == 1:
            u = x.to(tl.uint32, bitcast=True).to(tl.int64)
            u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
            r = u.to(tl.uint32).to(tl.float32, bitcast=True)
        elif KIND == 2:
            r = x.to(tl.float16).to(tl.float32)
        else:
            r = x
        return r

    @triton.jit
    def _store(ptr, offs, x, mask, KIND: tl.constexpr):
        """Store fp32 x into the storage type (bf16 as int16 bits, rounded to nearest even)."""
        if KIND == 1:
            u = x.to(tl.uint32, bitcast=True).to(tl.int64)
            u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
            tl.store(ptr + offs, u.to(tl.int16), mask=mask)
        elif KIND == 2:
            tl.store(ptr + offs, x.to(tl.float16), mask=mask)
        else:
            tl.store(ptr + offs, x, mask=mask)

    @triton.jit
    def _linear_kernel(x, w, b, y, part, M, N, K, sxm, chunk,
                       KIND: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, DOT16: tl.constexpr,
                       SUMDOT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        """One [BM, BN] tile of y (SPLIT 1) or of K chunk ``program_id(2)``'s fp32 partial sum. SUMDOT (the
        interpreter): each k step's products summed explicitly, the same order for every row of the tile."""
        pm = tl.program_id(0)
        pn = tl.program_id(1)
        ps = tl.program_id(2)
        rm = (pm * BM + tl.arange(0, BM)).to(tl.int64)       # int64 offsets: no int32 overflow anywhere
        rn = (pn * BN + tl.arange(0, BN)).to(tl.int64)
        rk = tl.arange(0, BK).to(tl.int64)
        k0 = ps * chunk                                    # int32 loop bounds, int64 offsets
        k1 = tl.minimum(k0 + chunk, K)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k in range(k0, k1, BK):
            kk = k + rk
            a = _load(x, rm[:, None] * sxm + kk[None, :], (rm[:, None] < M) & (kk[None, :] < k1), KIND, DOT16)
            b_t = _load(w, rn[:, None] * K + kk[None, :], (rn[:, None] < N) & (kk[None, :] < k1), KIND, DOT16)
            if SUMDOT:
                acc += tl.sum(a[:, :, None] * tl.trans(b_t)[None, :, :], axis=1)
            elif DOT16:
                acc = tl.dot(a, tl.trans(b_t), acc)
            else:
                acc = tl.dot(a, tl.trans(b_t), acc, input_precision="ieee")
        out = rm[:, None] * N + rn[None, :]
        inside = (rm[:, None] < M) & (rn[None, :] < N)
        if SPLIT == 1:
            if HAS_BIAS:
                acc = acc + _load(b, rn, rn < N, KIND, False)[None, :]
            _store(y, out, acc, inside, KIND)
        else:
            tl.store(part + ps * M * N + out, acc, mask=inside)

    @triton.jit
    def _split_sum_kernel(part, b, y, M, N, KIND: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr,
                          BM: tl.constexpr, BN: tl.constexpr):
        """y = sum of the SPLIT partial sums in chunk order (+ b), rounded once."""
        rm = (tl.program_id(0) * BM + tl.arange(0, BM)).to(tl.int64)
        rn = (tl.program_id(1) * BN + tl.arange(0, BN)).to(tl.int64)
        out = rm[:, None] * N + rn[None, :]
        inside = (rm[:, None] < M) & (rn[None, :] < N)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for s in range(SPLIT):
            acc += tl.load(part + s * M * N + out, mask=inside, other=0.0)
        if HAS_BIAS:
            acc = acc + _load(b, rn, rn < N, KIND, False)[None, :]
        _store(y, out, acc, inside, KIND)

    @triton.jit
    def _rms_kernel(x, w, y, n, D, sx, eps, KIND: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr):
        """Rows program_id(0) * BM + [0, BM): y = round(round(x / rms(x)) * w) (HF's roundings in 16-bit)."""
        rows = (tl.program_id(0) * BM + tl.arange(0, BM)).to(tl.int64)
        rm = rows < n
        cols = tl.arange(0, BD).to(tl.int64)
        acc = tl.zeros((BM, BD), dtype=tl.float32)
        for d in range(0, D, BD):
            m = rm[:, None] & (d + cols < D)[None, :]
            v = _load(x, rows[:, None] * sx + (d + cols)[None, :], m, KIND, False)
            acc += v * v
        r = 1.0 / tl.sqrt(tl.sum(acc, 1) / D + eps)                                            # [BM]
        for d in range(0, D, BD):
            m = rm[:, None] & (d + cols < D)[None, :]
            v = _load(x, rows[:, None] * sx + (d + cols)[None, :], m, KIND, False)
            g = _load(w, d + cols, d + cols < D, KIND, False)
            _store(y, rows[:, None] * D + (d + cols)[None, :], _round(v * r[:, None], KIND) * g[None, :], m, KIND)

    @triton.jit
    def _attn_kernel(q, k, v, o, idx, cnt, n, T, sqn, sqh, skh, skt, svh, svt, sidx, so, G, Dh, scale,
                     KIND: tl.constexpr, HAS_IDX: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                     BD: tl.constexpr):
        """Query rows program_id(0) * BM + [0, BM), head program_id(1): softmax(q K^T * scale) V over each
        row's visible slots, in list order, BN at a time. A row whose list is shorter than another's in
        the block runs the extra steps as exact no-ops (scores -inf: p = 0, alpha = 1)."""
        rows = (tl.program_id(0) * BM + tl.arange(0, BM)).to(tl.int64)                         # [BM]
        rm = rows < n
        h = tl.program_id(1).to(tl.int64)
        kvh = h // G
        d = tl.arange(0, BD).to(tl.int64)
        dm = d < Dh
        qv = _load(q, rows[:, None] * sqn + h * sqh + d[None, :], rm[:, None] & dm[None, :], KIND, False)
        if HAS_IDX:
            counts = tl.load(cnt + rows, mask=rm, other=0)
        else:
            counts = tl.where(rm, T, 0)
        m_i = tl.full((BM,), float("-inf"), tl.float32)
        l_i = tl.zeros((BM,), dtype=tl.float32)
        acc = tl.zeros((BM, BD), dtype=tl.float32)
        for j in range(0, tl.max(counts, 0), BN):
            jj = j + tl.arange(0, BN).to(tl.int64)
            jm = jj[None, :] < counts[:, None]                                                # [BM, BN]
            if HAS_IDX:
                slot = tl.load(idx + rows[:, None] * sidx + jj[None, :], mask=jm, other=0).to(tl.int64)
            else:
                slot = tl.where(jm, jj[None, :], 0)
            km = jm[:, :, None] & dm[None, None, :]
            kt = _load(k, kvh * skh + slot[:, :, None] * skt + d[None, None, :], km, KIND, False)   # [BM, BN, BD]
            s = tl.where(jm, tl.sum(kt * qv[:, None, :], 2) * scale, float("-inf"))               # [BM, BN]
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_new = tl.where(m_new == float("-inf"), 0.0, m_new)     # padding rows: no -inf - -inf
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new[:, None])
            vt = _load(v, kvh * svh + slot[:, :, None] * svt + d[None, None, :], km, KIND, False)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * vt, 1)
            m_i = m_new
        _store(o, rows[:, None] * so + h * Dh + d[None, :], acc / tl.where(l_i > 0, l_i, 1.0)[:, None], rm[:, None] & dm[None, :],
               KIND)


# ---------------------------------------------------------------------- Python side
def _bits(t: torch.Tensor) -> torch.Tensor:
    """What the kernels take for a tensor: bf16 as its int16 bits, else itself."""
    return t.view(torch.int16) if t.dtype == torch.bfloat16 else t


def _dot16(t: torch.Tensor) -> bool:
    return t.dtype != torch.float32 and t.is_cuda and not interpreted()


def rows_per_program(device: torch.device | str) -> int:
    """Rows per RMSNorm and attention program: 1 on CUDA; ``INTERPRETER_ROWS`` in the interpreter, whose
    cost is per program. Fixed per platform, so every n computes a row alike."""
    return 1 if torch.device(device).type == "cuda" and not interpreted() else INTERPRETER_ROWS


def splits_for(out_features: int, in_features: int, device: torch.device | str) -> int:
    """K chunks of a linear: enough (BN-wide) tiles x chunks for two programs per SM of the device,
    chunks of at least MIN_CHUNK columns. A function of the weight's shape and the device only, so
    every n splits the same way (1 off CUDA)."""
    dev = torch.device(device)
    if dev.type != "cuda" or interpreted():
        return 1
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    tiles = -(-out_features // TILES[1])
    return max(1, min(2 * sms // tiles, in_features // MIN_CHUNK))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           splits: int = 1) -> torch.Tensor:
    """x [n, in] @ weight [out, in]^T (+ bias [out]) -> [n, out], each row computed alike for any n."""
    n, K = x.shape
    N = weight.shape[0]
    if x.stride(1) != 1:
        x = x.contiguous()
    if n > PREFILL_ROWS:           # rows are independent: slices bound the split workspace
        return torch.cat([linear(x[s:s + PREFILL_ROWS], weight, bias, splits) for s in range(0, n, PREFILL_ROWS)])
    kind = DTYPES[x.dtype]
    y = torch.empty(n, N, dtype=x.dtype, device=x.device)
    BM, BN, BK = TILES
    chunk = -(-K // (splits * BK)) * BK
    splits = -(-K // chunk)
    part = torch.empty(splits, n, N, dtype=torch.float32, device=x.device) if splits > 1 else y
    b = _bits(bias) if bias is not None else y
    grid = (triton.cdiv(n, BM), triton.cdiv(N, BN), splits)
    _linear_kernel[grid](_bits(x), _bits(weight), b, _bits(y), part, n, N, K, x.stride(0), chunk,
                         KIND=kind, HAS_BIAS=bias is not None, SPLIT=splits, DOT16=_dot16(x),
                         SUMDOT=interpreted(), BM=BM, BN=BN, BK=BK, num_warps=WARPS)
    if splits > 1:
        _split_sum_kernel[(triton.cdiv(n, 32), triton.cdiv(N, 128))](
            part, b, _bits(y), n, N, KIND=kind, HAS_BIAS=bias is not None, SPLIT=splits, BM=32, BN=128,
            num_warps=WARPS)
    return y


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension of x [..., D], one program per row."""
    D = x.shape[-1]
    rows = x.reshape(-1, D)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    y = torch.empty(rows.shape, dtype=x.dtype, device=x.device)
    bd = min(NORM_BLOCK, triton.next_power_of_2(D))
    n, bm = rows.shape[0], rows_per_program(x.device)
    if n:
        _rms_kernel[(triton.cdiv(n, bm),)](_bits(rows), _bits(weight), _bits(y), n, D, rows.stride(0), float(eps),
                                           KIND=DTYPES[x.dtype], BM=bm, BD=bd, num_warps=WARPS)
    return y.view(x.shape)


def add_norm(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual add (elementwise), then the invariant RMSNorm: (x + y, norm(x + y))."""
    x = x + y
    return x, rms_norm(x, w, eps)


@dataclass
class Visible:
    """Which cache slots each row of a forward attends to, as the attention kernel reads them."""
    idx: torch.Tensor       # [n, T + 1] int32: row r's visible slots in ascending order in idx[r, :count[r]]
    count: torch.Tensor     # [n] int32


def visibility(mask: torch.Tensor | None, n: int) -> Visible | None:
    """The visible lists of n rows from a forward's additive mask [g n, T] (0 where a row sees a slot,
    -inf elsewhere; the first n rows hold the pattern, see ``layers.attn_mask``), built on the device
    with no host sync (CUDA-graph safe). None stays None: every row sees every slot."""
    if mask is None or isinstance(mask, Visible):
        return mask
    seen = mask[:n] == 0                                                    # [n, T]
    T = seen.shape[1]
    count = seen.sum(1, dtype=torch.int32)                                   # [n]
    place = torch.where(seen, seen.cumsum(1) - 1, T)                         # list position, or the spare column
    idx = torch.zeros(n, T + 1, dtype=torch.int32, device=mask.device)
    slots = torch.arange(T, dtype=torch.int32, device=mask.device).expand(n, T)
    idx.scatter_(1, place, slots)
    return Visible(idx, count)


def attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask) -> torch.Tensor:
    """q [n, H, Dh] against keys/values [Hkv, T, Dh] (grouped-query heads) over each row's visible
    slots (a :class:`Visible`, an additive mask [g n, T], or None for all T) -> [n, H Dh]."""
    n, H, Dh = q.shape
    Hkv, T, _ = keys.shape
    vis = visibility(mask, n)
    out = torch.empty(n, H * Dh, dtype=q.dtype, device=q.device)
    if n == 0:
        return out
    if q.stride(2) != 1:
        q = q.contiguous()
    if keys.stride(2) != 1 or values.stride(2) != 1:
        keys, values = keys.contiguous(), values.contiguous()
    idx = vis.idx if vis is not None else out
    cnt = vis.count if vis is not None else out
    bm = rows_per_program(q.device)
    _attn_kernel[(triton.cdiv(n, bm), H)](_bits(q), _bits(keys), _bits(values), _bits(out), idx, cnt, n, T,
                         q.stride(0), q.stride(1), keys.stride(0), keys.stride(1), values.stride(0), values.stride(1),
                         idx.stride(0), out.stride(0), H // Hkv, Dh, 1.0 / Dh ** 0.5,
                         KIND=DTYPES[q.dtype], HAS_IDX=vis is not None, BM=bm, BN=ATTN_BLOCK,
                         BD=triton.next_power_of_2(Dh), num_warps=WARPS)
    return out
