"""Qwen 3, dense and mixture-of-experts."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from easytunix.layers import MLP, Attention, Embedder, MoELayer, RMSNorm, ShardingConfig  # noqa: F401  (seed names)
from easytunix.layers.rope import RopeConfig
from easytunix.models.base import SLIDING, FULL, CausalLM, DecoderConfig, DecoderLayer, hf_rope_params  # noqa: F401
from easytunix.models.hf import check_model_type, common_hf_dict, common_hf_fields


@dataclasses.dataclass(frozen=True)
class ModelConfig(DecoderConfig):
  """Qwen 3 configuration: GQA with per-head q/k RMSNorm, SwiGLU or top-k MoE."""

  rope: RopeConfig = RopeConfig(theta=1_000_000.0)
  qk_norm: bool = True

  hf_model_types: ClassVar[tuple[str, ...]] = ("qwen3", "qwen3_moe")

  @classmethod
  def from_hf_config(cls, hf: dict[str, Any], **overrides: Any) -> "ModelConfig":
    check_model_type(hf, cls.hf_model_types, "Qwen 3")
    fields = common_hf_fields(hf)
    fields.update(
        rope=RopeConfig.from_hf(hf_rope_params(hf), default_theta=1_000_000.0),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qk_norm=True,
        activation="silu",
    )
    if hf.get("use_sliding_window") and hf.get("layer_types"):
      fields.update(layer_types=tuple(hf["layer_types"]), sliding_window=hf["sliding_window"])
    num_experts = hf.get("num_experts") or hf.get("num_local_experts") or 0
    if hf.get("model_type") == "qwen3_moe" and num_experts:
      n = fields["num_layers"]
      step = hf.get("decoder_sparse_step", 1) or 1
      dense = set(hf.get("mlp_only_layers") or [])
      fields.update(
          num_experts=num_experts,
          num_experts_per_tok=hf["num_experts_per_tok"],
          moe_intermediate_size=hf["moe_intermediate_size"],
          norm_topk_prob=bool(hf.get("norm_topk_prob", True)),
          moe_layers=tuple((i not in dense) and (i + 1) % step == 0 for i in range(n)),
      )
    fields.update(overrides)
    return cls(**fields)

  def to_hf_config(self) -> dict[str, Any]:
    """This config as a transformers ``Qwen3Config`` / ``Qwen3MoeConfig`` dict."""
    if not self.num_experts:
      return {**common_hf_dict(self, "qwen3", "Qwen3ForCausalLM"), "hidden_act": "silu"}
    out = common_hf_dict(self, "qwen3_moe", "Qwen3MoeForCausalLM")
    out.update(hidden_act="silu", num_experts=self.num_experts, num_experts_per_tok=self.num_experts_per_tok,
               moe_intermediate_size=self.moe_intermediate_size, norm_topk_prob=self.norm_topk_prob,
               decoder_sparse_step=1, mlp_only_layers=[i for i in range(self.num_layers) if not self.is_moe_layer(i)])
    return out

  @classmethod
  def tiny(cls, **overrides: Any) -> "ModelConfig":
    """A 2-layer dense model for tests."""
    fields = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=16, rope=RopeConfig(theta=10_000.0), tie_embeddings=True,
                  max_position_embeddings=512)
    fields.update(overrides)
    return cls(**fields)

  @classmethod
  def tiny_moe(cls, **overrides: Any) -> "ModelConfig":
    """A 2-layer MoE model for tests: 4 experts, 2 per token."""
    return cls.tiny(**{**dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                              tie_embeddings=False), **overrides})

  @classmethod
  def _real(cls, **fields: Any) -> "ModelConfig":
    base = dict(vocab_size=151936, head_dim=128, max_position_embeddings=40960, dtype="bfloat16",
                param_dtype="bfloat16")
    return cls(**{**base, **fields})

  @classmethod
  def qwen3_0_6b(cls, **o: Any) -> "ModelConfig":
    return cls._real(**{**dict(hidden_size=1024, intermediate_size=3072, num_layers=28, num_heads=16,
                               num_kv_heads=8, tie_embeddings=True), **o})

  @classmethod
  def qwen3_1_7b(cls, **o: Any) -> "ModelConfig":
    return cls._real(**{**dict(hidden_size=2048, intermediate_size=6144, num_layers=28, num_heads=16,
                               num_kv_heads=8, tie_embeddings=True), **o})

  @classmethod
  def qwen3_4b(cls, **o: Any) -> "ModelConfig":
    return cls._real(**{**dict(hidden_size=2560, intermediate_size=9728, num_layers=36, num_heads=32,
                               num_kv_heads=8, tie_embeddings=True), **o})

  @classmethod
  def qwen3_8b(cls, **o: Any) -> "ModelConfig":
    return cls._real(**{**dict(hidden_size=4096, intermediate_size=12288, num_layers=36, num_heads=32,
                               num_kv_heads=8, tie_embeddings=False), **o})

  @classmethod
  def qwen3_14b(cls, **o: Any) -> "ModelConfig":
    return cls._real(**{**dict(hidden_size=5120, intermediate_size=17408, num_layers=40, num_heads=40,
                               num_kv_heads=8, tie_embeddings=False), **o})

  @classmethod
  def qwen3_30b_a3b(cls, **o: Any) -> "ModelConfig":
    return cls._real(**{**dict(hidden_size=2048, intermediate_size=6144, num_layers=48, num_heads=32,
                               num_kv_heads=4, tie_embeddings=False, num_experts=128, num_experts_per_tok=8,
                               moe_intermediate_size=768, norm_topk_prob=True), **o})


NAMED_SIZES = {
    "qwen3_0.6b": ModelConfig.qwen3_0_6b,
    "qwen3_1.7b": ModelConfig.qwen3_1_7b,
    "qwen3_4b": ModelConfig.qwen3_4b,
    "qwen3_8b": ModelConfig.qwen3_8b,
    "qwen3_14b": ModelConfig.qwen3_14b,
    "qwen3_30b_a3b": ModelConfig.qwen3_30b_a3b,
    "qwen3_tiny": ModelConfig.tiny,
    "qwen3_moe_tiny": ModelConfig.tiny_moe,
}


class Qwen3(CausalLM):
  """The Qwen 3 transformer (dense or MoE, by config)."""

  config_class: ClassVar[type] = ModelConfig
  family: ClassVar[str] = "qwen3"
