"""A GGUF file's linear weights, kept quantized: Hugging Face name -> ``quant.QWeight`` for every
linear the kernels run (the LM head included), undoing llama.cpp's q/k row permutation for
Llama-family files; unpacked once and cached as safetensors under ``DRAFTWISE_CACHE``/quant."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from draftwise.errors import CORRUPT_FILE_ERRORS, CheckpointError
from draftwise.models.layout import gguf_linear_names
from draftwise.quant import SUPPORTED, Factors, QWeight, from_gguf_tensor

_LAYER = gguf_linear_names()          # GGUF block linear -> Hugging Face name


def _unpermute(w: QWeight, heads: int) -> QWeight:
    """Undo llama.cpp's rotary row order for q/k of Llama-family files (rows only: exact)."""
    rows = w.shape[0]
    idx = torch.arange(rows).view(heads, rows // heads // 2, 2).transpose(1, 2).reshape(rows)
    return w.take_rows(idx)


CACHE_VERSION = 2


def _cache_path(path: Path) -> Path:
    from draftwise.paths import cache_root

    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{CACHE_VERSION}".encode()).hexdigest()[:16]
    return cache_root() / "quant" / f"{path.stem}-{key}.safetensors"


def load_gguf_linears(path: str | Path, cfg, cache: bool = True) -> dict[str, QWeight]:
    """Hugging Face name -> QWeight for every quantized linear weight in the file (incl. the LM head:
    ``lm_head.weight`` from ``output.weight``, or, tied, from ``token_embd.weight``). Unpacked once and
    cached as safetensors (keyed by the file's path, size and mtime); a corrupt cache is rebuilt."""
    path = Path(path)
    cp = _cache_path(path)
    if cache and cp.is_file():
        try:
            return _read_cache(cp)
        except CheckpointError:
            pass
    out = _read_gguf(path, cfg)
    if cache:
        _write_cache(cp, out)
    return out


def _write_cache(cp: Path, ws: dict[str, QWeight]) -> None:
    from safetensors.torch import save_file

    tensors, meta = {}, {}
    for name, w in ws.items():
        tensors[name + ".q"], tensors[name + ".scale"] = w.q.contiguous(), w.scale.contiguous()
        if w.offset is not None:
            tensors[name + ".offset"] = w.offset.contiguous()
        for part, f in (("scale", w.scale_f), ("offset", w.offset_f)):
            if f is not None:
                tensors[f"{name}.{part}_base"], tensors[f"{name}.{part}_ints"] = f.base.contiguous(), f.ints.contiguous()
        meta[name] = [w.group, w.kind]
    cp.parent.mkdir(parents=True, exist_ok=True)
    tmp = cp.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"draftwise-quant": json.dumps(meta)})
    os.replace(tmp, cp)                                  # nothing half-written


def _read_cache(cp: Path) -> dict[str, QWeight]:
    from safetensors import safe_open

    try:
        with safe_open(str(cp), framework="pt") as f:
            meta = json.loads((f.metadata() or {})["draftwise-quant"])
            keys = set(f.keys())

            def get(key: str):
                return f.get_tensor(key) if key in keys else None

            def factors(name: str, part: str):
                base = get(f"{name}.{part}_base")
                return None if base is None else Factors(base, get(f"{name}.{part}_ints"))

            return {name: QWeight(get(name + ".q"), get(name + ".scale"), get(name + ".offset"), int(g), kind,
                                  factors(name, "scale"), factors(name, "offset"))
                    for name, (g, kind) in meta.items()}
    except Exception as e:   # safetensors raises its own error types for truncated/corrupt files
        raise CheckpointError(f"quantized-weight cache {cp} is unreadable ({e})") from None


def _read_gguf(path: Path, cfg) -> dict[str, QWeight]:
    from gguf import GGUFReader

    try:
        r = GGUFReader(str(path))
    except CORRUPT_FILE_ERRORS as e:
        raise CheckpointError(f"could not read GGUF file {path}: {e or type(e).__name__}") from None
    arch = str(bytes(r.fields["general.architecture"].parts[-1]), "utf-8") if "general.architecture" in r.fields else ""
    tensors = {t.name: t for t in r.tensors}
    out: dict[str, QWeight] = {}
    for name, t in tensors.items():
        parts = name.split(".")
        if len(parts) == 4 and parts[0] == "blk" and parts[2] in _LAYER and parts[3] == "weight":
            hf = f"model.layers.{parts[1]}.{_LAYER[parts[2]]}.weight"
        elif name == "output.weight":
            hf = "lm_head.weight"
        else:
            continue
        if t.tensor_type.name not in SUPPORTED:
            continue                                     # F32/F16 tensors stay on the fp32 path
        w = from_gguf_tensor(t)
        if arch == "llama" and parts[2:3] in (["attn_q"], ["attn_k"]):
            w = _unpermute(w, cfg.num_heads if parts[2] == "attn_q" else cfg.num_kv_heads)
        out[hf] = w
    emb = tensors.get("token_embd.weight")
    if "lm_head.weight" not in out and "output.weight" not in tensors and emb is not None \
            and emb.tensor_type.name in SUPPORTED:
        out["lm_head.weight"] = from_gguf_tensor(emb)
    return out
