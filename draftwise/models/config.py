"""Model configuration read from a Hugging Face config.json (Llama family)."""
from __future__ import annotations

from dataclasses import dataclass

from draftwise.errors import CheckpointError

SUPPORTED = ("llama", "qwen2", "qwen3", "mistral")


@dataclass
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False      # bias on q/k/v (Qwen2)
    qk_norm: bool = False             # RMSNorm on q and k per head (Qwen3)
    sliding_window: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None

    @classmethod
    def from_hf(cls, cfg: dict) -> "ModelConfig":
        mt = cfg.get("model_type")
        if mt not in SUPPORTED:
            raise CheckpointError(f"unsupported model_type {mt!r}; draftwise supports {', '.join(SUPPORTED)}")
        try:
            heads = int(cfg["num_attention_heads"])
            hidden = int(cfg["hidden_size"])
            rope = dict(cfg.get("rope_parameters") or {})
            scaling = cfg.get("rope_scaling") or None
            theta = cfg.get("rope_theta", rope.get("rope_theta", 10000.0))
            if rope and rope.get("rope_type", "default") != "default":
                scaling = rope
            if scaling and scaling.get("rope_type", scaling.get("type", "default")) == "default":
                scaling = None
            eos = cfg.get("eos_token_id")
            eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
            sw = cfg.get("sliding_window") if cfg.get("use_sliding_window", mt == "mistral") else None
            return cls(
                model_type=mt,
                vocab_size=int(cfg["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(cfg["intermediate_size"]),
                num_layers=int(cfg["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
                head_dim=int(cfg.get("head_dim") or hidden // heads),
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                rope_theta=float(theta),
                rope_scaling=scaling,
                max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                attention_bias=bool(cfg.get("attention_bias", mt == "qwen2")),
                qk_norm=mt == "qwen3",
                sliding_window=int(sw) if sw else None,
                eos_token_ids=eos_ids,
                bos_token_id=cfg.get("bos_token_id"),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"config.json is missing or has an invalid field: {e}") from None
