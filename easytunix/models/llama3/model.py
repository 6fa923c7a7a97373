"""Llama 3 (and Llama-architecture models such as SmolLM2)."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from easytunix.layers import MLP, Attention, Embedder, RMSNorm, ShardingConfig  # noqa: F401  (seed names)
from easytunix.layers.rope import RopeConfig
from easytunix.models.base import CausalLM, DecoderConfig, DecoderLayer, hf_rope_params  # noqa: F401
from easytunix.models.hf import check_model_type, common_hf_dict, common_hf_fields


@dataclasses.dataclass(frozen=True)
class ModelConfig(DecoderConfig):
  """Llama 3 configuration: SwiGLU, RMSNorm, GQA, Llama-3 rope scaling."""

  norm_eps: float = 1e-5
  rope: RopeConfig = RopeConfig(theta=500_000.0)

  hf_model_types: ClassVar[tuple[str, ...]] = ("llama",)

  @classmethod
  def from_hf_config(cls, hf: dict[str, Any], **overrides: Any) -> "ModelConfig":
    check_model_type(hf, cls.hf_model_types, "Llama")
    fields = common_hf_fields(hf)
    fields.update(
        rope=RopeConfig.from_hf(hf_rope_params(hf), default_theta=10_000.0),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        activation="silu",
    )
    fields.update(overrides)
    return cls(**fields)

  def to_hf_config(self) -> dict[str, Any]:
    """This config as a transformers ``LlamaConfig`` dict."""
    return {**common_hf_dict(self, "llama", "LlamaForCausalLM"), "hidden_act": "silu", "mlp_bias": False}

  @classmethod
  def tiny(cls, **overrides: Any) -> "ModelConfig":
    """A 2-layer model for tests (vocabulary of the shipped tiny tokenizer)."""
    fields = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=16, rope=RopeConfig(theta=10_000.0), tie_embeddings=True,
                  max_position_embeddings=512)
    fields.update(overrides)
    return cls(**fields)

  @classmethod
  def llama3_2_1b(cls, **overrides: Any) -> "ModelConfig":
    return cls(**{**_LLAMA32_SCALING, **dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                 num_layers=16, num_heads=32, num_kv_heads=8, head_dim=64, tie_embeddings=True), **overrides})

  @classmethod
  def llama3_2_3b(cls, **overrides: Any) -> "ModelConfig":
    return cls(**{**_LLAMA32_SCALING, **dict(vocab_size=128256, hidden_size=3072, intermediate_size=8192,
                 num_layers=28, num_heads=24, num_kv_heads=8, head_dim=128, tie_embeddings=True), **overrides})

  @classmethod
  def llama3_1_8b(cls, **overrides: Any) -> "ModelConfig":
    rope = RopeConfig(theta=500_000.0, rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                      high_freq_factor=4.0, original_max_position_embeddings=8192)
    return cls(**{**dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
                         num_heads=32, num_kv_heads=8, head_dim=128, tie_embeddings=False, rope=rope,
                         max_position_embeddings=131072, dtype="bfloat16", param_dtype="bfloat16"), **overrides})

  @classmethod
  def smollm2_135m(cls, **overrides: Any) -> "ModelConfig":
    return cls(**{**dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
                         num_heads=9, num_kv_heads=3, head_dim=64, rope=RopeConfig(theta=100_000.0),
                         tie_embeddings=True, max_position_embeddings=8192, dtype="bfloat16",
                         param_dtype="bfloat16"), **overrides})


_LLAMA32_SCALING = dict(
    rope=RopeConfig(theta=500_000.0, rope_type="llama3", factor=32.0, low_freq_factor=1.0,
                    high_freq_factor=4.0, original_max_position_embeddings=8192),
    max_position_embeddings=131072,
    dtype="bfloat16",
    param_dtype="bfloat16",
)

NAMED_SIZES = {
    "llama3.2_1b": ModelConfig.llama3_2_1b,
    "llama3.2_3b": ModelConfig.llama3_2_3b,
    "llama3.1_8b": ModelConfig.llama3_1_8b,
    "smollm2_135m": ModelConfig.smollm2_135m,
    "llama3_tiny": ModelConfig.tiny,
}


class Llama3(CausalLM):
  """The Llama 3 transformer."""

  config_class: ClassVar[type] = ModelConfig
  family: ClassVar[str] = "llama3"
