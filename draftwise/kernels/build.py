"""Building and loading the kernel library: the C sources compiled on first use with the system
compiler (q8gemm.c once per instruction set), cached by a hash of sources and flags under
``DRAFTWISE_CACHE``/kernels, loaded with ctypes and bound from ``kernels.h``; the instruction set of
the 8-bit-activation kernels chosen at run time from /proc/cpuinfo (``DRAFTWISE_ISA`` overrides)."""
from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

_DIR = Path(__file__).parent
_SRC = _DIR / "gemm.c"
# Sources built with the baseline flags, and q8gemm.c once per instruction set (its functions are only
# called where the CPU has that set: see :func:`isa`).
_SOURCES = ("gemm.c", "qgemm.c", "ops.c", "layer.c", "q8quant.c")
_HEADERS = ("common.h", "q8.h", "kernels.h")
HEADER = _DIR / "kernels.h"
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
    from draftwise.paths import cache_root

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


_CTYPES = {"void": None, "int": ctypes.c_int, "long": ctypes.c_long, "float": ctypes.c_float}


def prototypes(header: Path = HEADER) -> dict[str, tuple[str, list[str]]]:
    """name -> (return type, parameter types) of every function kernels.h declares (pointers as "*")."""
    out = {}
    for m in re.finditer(r"^(\w+)\s+(dw_\w+)\((.*?)\);", header.read_text(), re.M | re.S):
        params = []
        for p in m.group(3).split(","):
            p = " ".join(p.split())
            params.append("*" if "*" in p else p.rsplit(" ", 1)[0].removeprefix("const "))
        out[m.group(2)] = (m.group(1), params)
    return out


def bind(lib: ctypes.CDLL) -> None:
    """Set every exported function's ctypes signature from kernels.h (the one place they are written)."""
    for name, (ret, params) in prototypes().items():
        f = getattr(lib, name)
        f.argtypes = [ctypes.c_void_p if t == "*" else _CTYPES[t] for t in params]
        f.restype = _CTYPES[ret]


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
    bind(lib)
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
