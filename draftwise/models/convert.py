"""GGUF file -> fp32 Hugging Face directory (config, safetensors, tokenizer), with transformers."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from draftwise.errors import CORRUPT_FILE_ERRORS, InstallError


def convert_gguf(gguf: Path, out_dir: Path, progress: bool = True) -> None:
    """Dequantize a GGUF file to an fp32 HF-format directory (config, safetensors, tokenizer)."""
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging
    except ImportError as e:  # pragma: no cover - transformers is a hard dependency
        raise InstallError(f"transformers is required to import GGUF files: {e}") from None
    from safetensors.torch import save_file

    if not progress:
        hf_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except CORRUPT_FILE_ERRORS as e:
        raise InstallError(f"could not read GGUF file {gguf}: {e or type(e).__name__}") from None
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg["torch_dtype"] = "float32"
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if cfg.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=1))
    if model.generation_config is not None:
        model.generation_config.save_pretrained(str(out_dir))
    tok.save_pretrained(str(out_dir))
    del model
