"""One decoder layer's tensors, written down once: the Hugging Face name (under
``model.layers.{i}.``), the GGUF name (under ``blk.{i}.``), the shape from the config, and the
config flag that makes the tensor present. The model's layer builder, the exit layer's and draft
head's loaders and checks, and the GGUF import all read this table.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from draftwise.models.config import ModelConfig


@dataclass(frozen=True)
class LayerTensor:
    name: str                                   # Hugging Face name inside a layer
    gguf: str                                   # GGUF name inside a block
    shape: Callable[[ModelConfig], tuple[int, ...]]
    when: str = ""                              # "" always; else the ModelConfig flag that adds it


def _q(c: ModelConfig) -> int:
    return c.num_heads * c.head_dim


def _kv(c: ModelConfig) -> int:
    return c.num_kv_heads * c.head_dim


LAYER: tuple[LayerTensor, ...] = (
    LayerTensor("input_layernorm.weight", "attn_norm.weight", lambda c: (c.hidden_size,)),
    LayerTensor("self_attn.q_proj.weight", "attn_q.weight", lambda c: (_q(c), c.hidden_size)),
    LayerTensor("self_attn.k_proj.weight", "attn_k.weight", lambda c: (_kv(c), c.hidden_size)),
    LayerTensor("self_attn.v_proj.weight", "attn_v.weight", lambda c: (_kv(c), c.hidden_size)),
    LayerTensor("self_attn.o_proj.weight", "attn_output.weight", lambda c: (c.hidden_size, _q(c))),
    LayerTensor("post_attention_layernorm.weight", "ffn_norm.weight", lambda c: (c.hidden_size,)),
    LayerTensor("mlp.gate_proj.weight", "ffn_gate.weight", lambda c: (c.intermediate_size, c.hidden_size)),
    LayerTensor("mlp.up_proj.weight", "ffn_up.weight", lambda c: (c.intermediate_size, c.hidden_size)),
    LayerTensor("mlp.down_proj.weight", "ffn_down.weight", lambda c: (c.hidden_size, c.intermediate_size)),
    LayerTensor("self_attn.q_proj.bias", "attn_q.bias", lambda c: (_q(c),), "attention_bias"),
    LayerTensor("self_attn.k_proj.bias", "attn_k.bias", lambda c: (_kv(c),), "attention_bias"),
    LayerTensor("self_attn.v_proj.bias", "attn_v.bias", lambda c: (_kv(c),), "attention_bias"),
    LayerTensor("self_attn.q_norm.weight", "attn_q_norm.weight", lambda c: (c.head_dim,), "qk_norm"),
    LayerTensor("self_attn.k_norm.weight", "attn_k_norm.weight", lambda c: (c.head_dim,), "qk_norm"),
)

QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")   # fused into one linear, in this order
GATE_UP = ("mlp.gate_proj", "mlp.up_proj")                            # fused into one linear, in this order
LINEARS = (*QKV, "self_attn.o_proj", *GATE_UP, "mlp.down_proj")


def present(cfg: ModelConfig) -> list[LayerTensor]:
    """The tensors a layer of this config has."""
    return [t for t in LAYER if not t.when or getattr(cfg, t.when)]


def layer_names(cfg: ModelConfig) -> list[str]:
    """Hugging Face names (inside a layer) of every tensor a layer of this config has."""
    return [t.name for t in present(cfg)]


def layer_shapes(cfg: ModelConfig, prefix: str = "") -> dict[str, tuple[int, ...]]:
    """name -> shape of every tensor a layer of this config has, names under prefix."""
    return {prefix + t.name: t.shape(cfg) for t in present(cfg)}


def gguf_linear_names() -> dict[str, str]:
    """GGUF block name of each linear weight -> its Hugging Face name (inside a layer)."""
    return {t.gguf.removesuffix(".weight"): t.name.removesuffix(".weight") for t in LAYER
            if t.name.removesuffix(".weight") in LINEARS and t.name.endswith(".weight")}
