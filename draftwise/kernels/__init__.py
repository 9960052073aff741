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

from draftwise.kernels.build import (  # noqa: F401
                                     HEADER,
                                     ISA_ENV,
                                     ISAS,
                                     available,
                                     bind,
                                     cpu_flags,
                                     describe,
                                     isa,
                                     library,
                                     prototypes,
                                     set_isa,
                                     supported_isas,
                                     version,
                                     why_unavailable,
)
from draftwise.kernels.linear import (  # noqa: F401
                                     _Layer,
                                     _Lin,
                                     add_rms_norm,
                                     argmax_rows,
                                     attention,
                                     huge_page_copies,
                                     layer,
                                     layer_plan,
                                     linear,
                                     pack_quant,
                                     pack_weight,
                                     pad_bias,
                                     qlinear,
                                     rms_norm,
                                     rope_,
                                     swiglu,
                                     topk_rows,
                                     unpack_nibbles,
                                     unpack_quant,
)
from draftwise.kernels.q8 import MAX_Q8_SEGMENTS, Q8_KINDS, _Q8Lin, _Q8Seg, pack_q8, q8_plan, q8_quantize, q8linear, unpack_q8  # noqa: F401
