"""Trained parts on disk (exit layers, draft heads, LDLP predictors, feature manifests): float32
safetensors with a JSON metadata record, written atomically (a tmp file, then a rename: nothing
half-written), and the fingerprint of the target model a part belongs to."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from draftwise.errors import CheckpointError


def model_fingerprint(model) -> str:
    """Identifies a target's weights cheaply: its dimensions, final norm and first embedding rows."""
    c = model.cfg
    h = hashlib.sha256(json.dumps([c.vocab_size, c.hidden_size, c.num_layers, c.num_heads, c.num_kv_heads]).encode())
    for t in (model.norm, model.embed[:4]):
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], kind: str, meta: dict) -> None:
    """A trained part (exit layer, head, LDLP) as float32 safetensors with JSON metadata
    {"kind": kind, **meta}, written atomically (tmp file + rename: nothing half-written)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file({k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}, str(tmp),
              metadata={"draftwise": json.dumps({"kind": kind, **meta})})
    os.replace(tmp, path)


def read_tensors(path: Path, what: str) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, draftwise metadata or {}) of a safetensors file; unreadable -> one-line error."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("draftwise", "{}"))
            return {k: f.get_tensor(k) for k in f.keys()}, meta
    except Exception as e:   # safetensors raises its own error types for truncated/corrupt files
        raise CheckpointError(f"{what} {path} is unreadable ({e})") from None


def write_json(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def check_part(meta: dict, kind: str, model, what: str, path) -> None:
    """A trained part's metadata names its kind and the target it was trained for: a part of another
    kind, or one trained for another target, is a one-line CheckpointError."""
    if meta.get("kind") != kind:
        raise CheckpointError(f"{path} is not a draftwise {what} (kind {meta.get('kind')!r})")
    fp = model_fingerprint(model)
    if meta.get("fingerprint") != fp:
        raise CheckpointError(f"{what} {path} was trained for {meta.get('model', 'another model')} "
                              f"(fingerprint {meta.get('fingerprint')}), not this target ({fp})")
