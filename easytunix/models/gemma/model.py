"""Gemma (the first generation): GeGLU, (1 + w) RMSNorm, scaled tied embeddings."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from easytunix.layers import MLP, Attention, Embedder, RMSNorm, ShardingConfig  # noqa: F401  (seed names)
from easytunix.layers.rope import RopeConfig
from easytunix.models.base import CausalLM, DecoderConfig, DecoderLayer, hf_rope_params
from easytunix.models.hf import check_model_type, common_hf_dict, common_hf_fields

_ACTIVATIONS = {"gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh", "gelu": "gelu", "silu": "silu"}


def hf_activation(hf: dict[str, Any]) -> str:
  name = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
  if name not in _ACTIVATIONS:
    raise ValueError(f"Unsupported hidden activation {name!r}; supported: {sorted(_ACTIVATIONS)}.")
  return _ACTIVATIONS[name]


def hf_activation_name(activation: str) -> str:
  return {"gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu", "silu": "silu"}[activation]


@dataclasses.dataclass(frozen=True)
class TransformerConfig(DecoderConfig):
  """Gemma configuration."""

  norm_unit_offset: bool = True
  scale_embeddings: bool = True
  activation: str = "gelu_tanh"
  tie_embeddings: bool = True

  hf_model_types: ClassVar[tuple[str, ...]] = ("gemma",)

  @classmethod
  def from_hf_config(cls, hf: dict[str, Any], **overrides: Any) -> "TransformerConfig":
    check_model_type(hf, cls.hf_model_types, "Gemma")
    fields = common_hf_fields(hf)
    fields.update(
        rope=RopeConfig.from_hf(hf_rope_params(hf), default_theta=10_000.0),
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        activation=hf_activation(hf),
    )
    fields.update(overrides)
    return cls(**fields)

  def to_hf_config(self) -> dict[str, Any]:
    """This config as a transformers ``GemmaConfig`` dict."""
    return {**common_hf_dict(self, "gemma", "GemmaForCausalLM"), "hidden_activation": hf_activation_name(self.activation)}

  @classmethod
  def tiny(cls, **overrides: Any) -> "TransformerConfig":
    """A 2-layer multi-query model for tests."""
    fields = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                  num_kv_heads=1, head_dim=16, max_position_embeddings=512)
    fields.update(overrides)
    return cls(**fields)

  @classmethod
  def gemma_2b(cls, **o: Any) -> "TransformerConfig":
    return cls(**{**dict(vocab_size=256000, hidden_size=2048, intermediate_size=16384, num_layers=18,
                         num_heads=8, num_kv_heads=1, head_dim=256, dtype="bfloat16", param_dtype="bfloat16"), **o})

  @classmethod
  def gemma_7b(cls, **o: Any) -> "TransformerConfig":
    return cls(**{**dict(vocab_size=256000, hidden_size=3072, intermediate_size=24576, num_layers=28,
                         num_heads=16, num_kv_heads=16, head_dim=256, dtype="bfloat16", param_dtype="bfloat16"), **o})


NAMED_SIZES = {
    "gemma_2b": TransformerConfig.gemma_2b,
    "gemma_7b": TransformerConfig.gemma_7b,
    "gemma_tiny": TransformerConfig.tiny,
}

Block = DecoderLayer
FeedForward = MLP


class Transformer(CausalLM):
  """The Gemma transformer."""

  config_class: ClassVar[type] = TransformerConfig
  family: ClassVar[str] = "gemma"
