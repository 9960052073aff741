"""Native CPU kernels, built on first use with the system C compiler and loaded with ctypes.

Two kernels: a prepacked fp32 GEMM (``gemm.c``): register tiles for small n, and
for n >= 12 a K-blocked order that keeps a chunk of the weight in L1 while all rows pass over
it (prefill runs at or above torch's GEMM speed), with bit-identical rows on both paths; and one for
GGUF block-quantized weights (``qgemm.c``: int8 or nibble-packed values, fp32 activations and
arithmetic, the scale applied once per block), which streams a quarter to a seventh of the fp32
bytes and likewise computes every row the same way whatever n is. Hugging Face runs
``F.linear`` (MKL/oneDNN), which on this class of CPU costs ~3x the memory roofline at n = 8;
OpenBLAS repacks the whole weight on every call. Prepacking once and streaming the weight once
per call keeps t(n) close to t(1) for the node counts speculative decoding verifies.

If no compiler is available, or the CPU lacks AVX2/FMA, :func:`available` is False and the
model falls back to plain torch matmuls (still exact, only slower).
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from types import SimpleNamespace

import torch

_DIR = Path(__file__).parent
_SRC = _DIR / "gemm.c"
# Sources built with the baseline flags, and q8gemm.c once per instruction set (its functions are only
# called where the CPU has that set: see :func:`isa`).
_SOURCES = ("gemm.c", "qgemm.c", "ops.c", "layer.c", "q8quant.c")
_HEADERS = ("common.h", "q8.h")
_ISA_BUILDS = (("avx2", ("-DQ8_ISA=0",)),
               ("vnni256", ("-DQ8_ISA=1", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni")),
               ("vnni512", ("-DQ8_ISA=2", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni")))
ISAS = tuple(name for name, _ in _ISA_BUILDS)
# -ffp-contract=off: no multiply-add the source does not spell out is fused (results must not depend on
# the compiler's choices); the explicit FMAs are FMAs either way. -falign-loops=64: the inner loops' speed
# moved by up to 20% with where they happened to fall against 64-byte fetch blocks; aligned, it holds
_FLAGS = ("-O3", "-mavx2", "-mfma", "-mf16c", "-ffp-contract=off", "-falign-loops=64", "-fopenmp", "-fPIC",
          *os.environ.get("DRAFTWISE_KERNEL_CFLAGS", "").split())   # extra flags: A/B experiments (-DQ8_PF=...)
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_failed: str | None = None


def _cache_dir() -> Path:
    from draftwise.models.registry import cache_root

    return cache_root() / "kernels"


def _build_tag() -> str:
    srcs = b"".join((_DIR / f).read_bytes() for f in (*_SOURCES, "q8gemm.c", *_HEADERS))
    return hashlib.sha256(srcs + repr((_FLAGS, _ISA_BUILDS)).encode()).hexdigest()[:16]


def version() -> str:
    """A short tag of the kernel source and the instruction set in use: cached measurements (cost
    curves) are keyed by it."""
    return f"{_build_tag()}-{isa()}"


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


_VNNI_FLAGS = {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"}
# zmm vs ymm on AVX-512 VNNI: benchmarks/results/gguf-cpu/q8 (measured on a Xeon with AVX-512 VNNI)
_DEFAULT_VNNI = "vnni512"
ISA_ENV = "DRAFTWISE_ISA"


def supported_isas() -> tuple[str, ...]:
    """The q8gemm.c builds this CPU can run."""
    flags = cpu_flags()
    if not {"avx2", "fma", "f16c"} <= flags:
        return ()
    return ISAS if _VNNI_FLAGS <= flags else ("avx2",)


_isa: str | None = None


def isa() -> str:
    """The instruction set the 8-bit-activation kernels use: ``DRAFTWISE_ISA`` if set (avx2, vnni256,
    vnni512; it must be one this CPU has), else AVX-512 VNNI where the CPU has it, else AVX2."""
    global _isa
    if _isa is None:
        sup = supported_isas()
        want = os.environ.get(ISA_ENV, "").strip().lower()
        if want:
            from draftwise.errors import ConfigError

            if want not in ISAS:
                raise ConfigError(f"{ISA_ENV} must be one of {', '.join(ISAS)}, got {want!r}")
            if want not in sup:
                raise ConfigError(f"{ISA_ENV}={want}: this CPU does not have it (it has: {', '.join(sup) or 'none'})")
            _isa = want
        else:
            _isa = _DEFAULT_VNNI if _DEFAULT_VNNI in sup else "avx2"
    return _isa


def describe() -> str:
    """One line for reports: the kernels and the instruction set of the 8-bit-activation path."""
    return f"prepacked AVX2/FMA, int8 activations on {isa()}" if available() else f"torch ({why_unavailable()})"


def set_isa(name: str) -> str:
    """Switch the 8-bit-activation kernels to another supported ISA (tests, benchmarks); returns the old one."""
    global _isa
    if name not in supported_isas():
        from draftwise.errors import ConfigError

        raise ConfigError(f"ISA {name!r} is not supported on this CPU (supported: {', '.join(supported_isas())})")
    old = isa()
    lib = library()
    if lib is not None:
        lib.dw_q8_set_isa(ISAS.index(name))
    _isa = name
    return old


def _compile(cc: str, args: list[str], what: str) -> None:
    try:
        subprocess.run([cc, *args], check=True, capture_output=True, text=True)
    except subprocess.CalledProcessError as e:
        raise RuntimeError(f"compiling {what} failed: {e.stderr.strip()[:500]}") from None


def _build() -> ctypes.CDLL:
    out = _cache_dir() / f"libdraftwise-kernels-{_build_tag()}.so"
    if not out.exists():
        cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
        if cc is None:
            raise RuntimeError("no C compiler found (set CC)")
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
            objs = []
            for src in _SOURCES:
                objs.append(f"{tmp}/{src}.o")
                _compile(cc, [*_FLAGS, "-c", str(_DIR / src), "-o", objs[-1]], src)
            for name, extra in _ISA_BUILDS:
                objs.append(f"{tmp}/q8gemm-{name}.o")
                _compile(cc, [*_FLAGS, *extra, "-c", str(_DIR / "q8gemm.c"), "-o", objs[-1]], f"q8gemm.c ({name})")
            _compile(cc, [*_FLAGS, "-shared", *objs, "-lm", "-o", f"{tmp}/lib.so"], "the kernel library (link)")
            os.replace(f"{tmp}/lib.so", out)
    lib = ctypes.CDLL(str(out))
    lib.dw_linear.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_long, ctypes.c_void_p,
                              ctypes.c_void_p, ctypes.c_long, ctypes.c_void_p]
    lib.dw_linear.restype = None
    P, L, I = ctypes.c_void_p, ctypes.c_long, ctypes.c_int
    lib.dw_qlinear.argtypes = [P, L, L, P, I, I, P, P, P, P, L, L, P, L, P]
    lib.dw_qlinear.restype = None
    F = ctypes.c_float
    lib.dw_rms_norm.argtypes = [P, L, L, P, F, P]
    lib.dw_add_rms_norm.argtypes = [P, P, L, L, P, F, P, P]
    lib.dw_rope.argtypes = [P, L, L, L, L, P, P]
    lib.dw_attention.argtypes = [P, L, L, L, L, L, P, P, L, L, P, L, F, P]
    lib.dw_swiglu.argtypes = [P, L, L, P]
    lib.dw_layer.argtypes = [P, P, L, P, P, P, P, L, L, P, L, P]
    for f in (lib.dw_rms_norm, lib.dw_add_rms_norm, lib.dw_rope, lib.dw_swiglu):
        f.restype = None
    lib.dw_attention.restype = lib.dw_layer.restype = ctypes.c_int
    lib.dw_argmax_rows.argtypes = [P, L, L, L, P]
    lib.dw_topk_rows.argtypes = [P, L, L, L, L, P]
    lib.dw_argmax_rows.restype = lib.dw_topk_rows.restype = None
    lib.dw_q8linear.argtypes = [P, P, L, P]
    lib.dw_q8linear.restype = ctypes.c_int
    lib.dw_q8_quantize.argtypes = [P, L, L, I, P, P, P, P, P]
    lib.dw_q8_quantize.restype = None
    lib.dw_q8_set_isa.argtypes = [I]
    lib.dw_q8_set_isa.restype = ctypes.c_int
    lib.dw_q8_set_isa(ISAS.index(isa()))
    return lib


def library() -> ctypes.CDLL | None:
    """The compiled kernel library, or None when it cannot be used here."""
    global _lib, _failed
    if _lib is not None or _failed is not None:
        return _lib
    with _lock:
        if _lib is None and _failed is None:
            if os.environ.get("DRAFTWISE_NO_KERNELS"):
                _failed = "disabled by DRAFTWISE_NO_KERNELS"
            elif not supported_isas():
                _failed = "CPU lacks AVX2/FMA/F16C"
            else:
                try:
                    _lib = _build()
                except (RuntimeError, OSError) as e:
                    _failed = str(e)
    return _lib


def available() -> bool:
    return library() is not None


def why_unavailable() -> str | None:
    library()
    return _failed


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
