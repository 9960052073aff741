"""kernels.h is the one place the kernel library's interface is written: every exported function
defined in a .c file is declared there with the same types, the ctypes structs match its structs
field by field, and every function Python calls is declared there."""
from __future__ import annotations

import ctypes
import re
from pathlib import Path

import pytest

from draftwise import kernels

KDIR = Path(kernels.__file__).parent


def _params(text: str) -> list[str]:
    out = []
    for p in text.split(","):
        p = " ".join(p.split())
        out.append("*" if "*" in p else p.rsplit(" ", 1)[0].removeprefix("const "))
    return out


def definitions() -> dict[str, tuple[str, list[str], str]]:
    """Non-static dw_* function definitions in the C sources: name -> (return, params, file)."""
    out = {}
    for f in sorted(KDIR.glob("*.c")):
        for m in re.finditer(r"^(\w+)\s+(dw_\w+)\(([^)]*)\)\s*\{", f.read_text(), re.M):
            out[m.group(2)] = (m.group(1), _params(m.group(3)), f.name)
    return out


def header_structs(text: str) -> dict[str, list[tuple[str, str]]]:
    """typedef'd structs of a header: name -> [(field, C type; "*" for pointers, "T[N]" for arrays)]."""
    text = re.sub(r"//[^\n]*", "", text)
    consts = {m.group(1): int(m.group(2)) for m in re.finditer(r"#define (\w+) (\d+)", text)}
    out = {}
    for m in re.finditer(r"typedef struct \{(.*?)\}\s*(\w+);", text, re.S):
        fields = []
        for decl in m.group(1).split(";"):
            decl = " ".join(decl.split()).removeprefix("const ")
            if not decl:
                continue
            base, rest = decl.split(" ", 1) if not decl.split(" ", 1)[0].endswith("*") else decl.split("*", 1)
            base = base.rstrip("*")
            for name in rest.split(","):
                name = name.strip()
                ptr = name.startswith("*") or decl.split(" ", 1)[0].endswith("*")
                name = name.lstrip("*").strip()
                arr = re.match(r"(\w+)\[(\w+)\]", name)
                if arr:
                    fields.append((arr.group(1), f"{base}[{consts.get(arr.group(2), arr.group(2))}]"))
                else:
                    fields.append((name, "*" if ptr else base))
        out[m.group(2)] = fields
    return out


CTYPE_OF = {ctypes.c_long: "long", ctypes.c_float: "float", ctypes.c_int: "int", ctypes.c_void_p: "*"}
STRUCTS = {"dw_q8seg_t": kernels._Q8Seg, "dw_q8lin_t": kernels._Q8Lin, "dw_lin_t": kernels._Lin,
           "dw_layer_t": kernels._Layer}


def _ctype_name(t) -> str:
    for s, cls in STRUCTS.items():
        if t is cls:
            return s
        if isinstance(t, type) and issubclass(t, ctypes.Array) and t._type_ is cls:
            return f"{s}[{t._length_}]"
    return CTYPE_OF[t]


def test_every_exported_definition_matches_its_declaration():
    decl = kernels.prototypes()
    defs = definitions()
    assert defs, "no dw_* definitions found"
    for name, (ret, params, f) in defs.items():
        assert name in decl, f"{f} defines {name}, which kernels.h does not declare"
        assert decl[name] == (ret, params), f"{name}: {f} has {ret} {params}, kernels.h {decl[name]}"
    assert set(decl) <= set(defs), f"declared but never defined: {sorted(set(decl) - set(defs))}"


@pytest.mark.parametrize("struct", sorted(STRUCTS))
def test_ctypes_structs_match_the_header(struct):
    fields = header_structs(kernels.HEADER.read_text())[struct]
    ours = [(n, _ctype_name(t)) for n, t in STRUCTS[struct]._fields_]
    assert ours == fields


def test_python_calls_only_declared_functions():
    used = set()
    for f in KDIR.parent.rglob("*.py"):
        used |= set(re.findall(r"\.(dw_\w+)\(", f.read_text()))
    assert used, "no kernel calls found"
    assert used <= set(kernels.prototypes()), f"called but not in kernels.h: {sorted(used - set(kernels.prototypes()))}"


def test_the_checks_can_fail(tmp_path):
    """A declaration that drifts from its definition is seen."""
    h = tmp_path / "k.h"
    h.write_text(kernels.HEADER.read_text().replace("void dw_swiglu(const float* gu, long n, long I, float* out);",
                                                    "void dw_swiglu(const float* gu, int n, long I, float* out);"))
    assert kernels.prototypes(h)["dw_swiglu"] != definitions()["dw_swiglu"][:2]
    assert header_structs("typedef struct { long a, b; const float *c; } x_t;") == \
        {"x_t": [("a", "long"), ("b", "long"), ("c", "*")]}
