"""Finding, converting and reading checkpoints (HF-format directories and GGUF files)."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from draftwise.errors import CheckpointError
from draftwise.models import catalog
from draftwise.models.config import ModelConfig
from draftwise.models.convert import convert_gguf
from draftwise.paths import cache_root


def _gguf_dir(path: Path, progress: bool) -> Path:
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    final = cache_root() / "gguf" / f"{path.stem}-{key}"
    if (final / "model.safetensors").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".convert-", dir=final.parent))
    try:
        convert_gguf(path, work, progress=progress)
        os.replace(work, final)
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
    return final


def resolve(model: str, progress: bool = True) -> Path:
    """Turn a model argument (known name, HF dir, .gguf file, hub id) into an HF-format dir."""
    if model in catalog.MODELS:
        return catalog.install(model, progress=progress)
    p = Path(model).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise CheckpointError(f"{p} has no config.json: not a Hugging Face model directory")
        return p
    if p.is_file() and p.suffix == ".gguf":
        return _gguf_dir(p, progress)
    if p.exists():
        raise CheckpointError(f"{p} is neither a model directory nor a .gguf file")
    if "/" in model and not model.startswith((".", "/", "~")):
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(model, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
        except Exception as e:  # noqa: BLE001 - the hub client raises many unrelated types
            raise CheckpointError(f"{model!r} is not a known model or local path, and the hub "
                                  f"download failed ({type(e).__name__}); known models: "
                                  f"{', '.join(sorted(catalog.MODELS))}") from None
    raise CheckpointError(f"model {model!r} not found: not a known name ({', '.join(sorted(catalog.MODELS))}), "
                          "a local HF directory or a .gguf file")


def load_config(path: Path) -> ModelConfig:
    try:
        cfg = json.loads((path / "config.json").read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} has no config.json") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path / 'config.json'} is not valid JSON: {e}") from None
    return ModelConfig.from_hf(cfg)


def load_state_dict(path: Path, skip: frozenset[str] | set[str] = frozenset()) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint except the names in ``skip`` (e.g. linears kept quantized)."""
    from safetensors import SafetensorError, safe_open

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path} has no .safetensors weights")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as st:
                state.update({k: st.get_tensor(k) for k in st.keys() if k not in skip})
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"corrupt safetensors file {f}: {e}") from None
    return state
