"""Gemma 3 (text): sliding/global layers with their own rope, q/k-norm, sandwich norms."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from easytunix.layers import MLP, Attention, Embedder, RMSNorm, ShardingConfig  # noqa: F401  (seed names)
from easytunix.layers.rope import RopeConfig
from easytunix.models.base import FULL, SLIDING, CausalLM, DecoderConfig, DecoderLayer, hf_rope_params
from easytunix.models.gemma.model import hf_activation, hf_activation_name
from easytunix.models.hf import check_model_type, common_hf_dict, common_hf_fields, rope_to_hf


def sliding_pattern(num_layers: int, every: int = 6) -> tuple[str, ...]:
  """Gemma 3's layout: every ``every``-th layer is global, the rest sliding."""
  return tuple(FULL if (i + 1) % every == 0 else SLIDING for i in range(num_layers))


@dataclasses.dataclass(frozen=True)
class Gemma3Config(DecoderConfig):
  """Gemma 3 configuration."""

  norm_unit_offset: bool = True
  scale_embeddings: bool = True
  activation: str = "gelu_tanh"
  tie_embeddings: bool = True
  qk_norm: bool = True
  sandwich_norms: bool = True
  rope: RopeConfig = RopeConfig(theta=1_000_000.0)
  local_rope: RopeConfig | None = RopeConfig(theta=10_000.0)

  hf_model_types: ClassVar[tuple[str, ...]] = ("gemma3_text", "gemma3")

  @classmethod
  def from_hf_config(cls, hf: dict[str, Any], **overrides: Any) -> "Gemma3Config":
    check_model_type(hf, cls.hf_model_types, "Gemma 3")
    if hf.get("model_type") == "gemma3" and "text_config" in hf:
      hf = {**hf["text_config"], "model_type": "gemma3_text", "dtype": hf.get("dtype") or hf.get("torch_dtype")}
    fields = common_hf_fields(hf)
    n = fields["num_layers"]
    layer_types = hf.get("layer_types") or sliding_pattern(
        n, hf.get("sliding_window_pattern") or hf.get("_sliding_window_pattern") or 6
    )
    full = hf_rope_params(hf, FULL)
    full.setdefault("rope_theta", 1_000_000.0)
    nested = hf.get("rope_parameters")
    if isinstance(nested, dict) and SLIDING in nested:
      local = dict(nested[SLIDING])
    else:
      local = {"rope_theta": hf.get("rope_local_base_freq", 10_000.0)}
    fields.update(
        layer_types=tuple(layer_types),
        sliding_window=hf.get("sliding_window"),
        rope=RopeConfig.from_hf(full),
        local_rope=RopeConfig.from_hf(local),
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        activation=hf_activation(hf),
        query_pre_attn_scalar=hf.get("query_pre_attn_scalar"),
        attn_logit_softcap=hf.get("attn_logit_softcapping"),
        final_logit_softcap=hf.get("final_logit_softcapping"),
    )
    fields.update(overrides)
    return cls(**fields)

  def to_hf_config(self) -> dict[str, Any]:
    """This config as a transformers ``Gemma3TextConfig`` dict."""
    out = common_hf_dict(self, "gemma3_text", "Gemma3ForCausalLM")
    local = self.local_rope or self.rope
    out.pop("rope_theta")
    out.update(
        hidden_activation=hf_activation_name(self.activation),
        layer_types=list(self.layer_types or (FULL,) * self.num_layers),
        sliding_window=self.sliding_window,
        query_pre_attn_scalar=self.query_pre_attn_scalar or self.head_dim,
        attn_logit_softcapping=self.attn_logit_softcap,
        final_logit_softcapping=self.final_logit_softcap,
        rope_parameters={FULL: rope_to_hf(self.rope), SLIDING: rope_to_hf(local)},
    )
    return out

  @classmethod
  def tiny(cls, **overrides: Any) -> "Gemma3Config":
    """A 3-layer model for tests: two sliding layers (window 8) then a global one."""
    fields = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=3, num_heads=4,
                  num_kv_heads=2, head_dim=16, layer_types=(SLIDING, SLIDING, FULL), sliding_window=8,
                  query_pre_attn_scalar=16, max_position_embeddings=512)
    fields.update(overrides)
    return cls(**fields)

  @classmethod
  def _real(cls, **fields: Any) -> "Gemma3Config":
    n = fields["num_layers"]
    base = dict(vocab_size=262144, head_dim=256, query_pre_attn_scalar=256, layer_types=sliding_pattern(n),
                sliding_window=512, max_position_embeddings=32768, dtype="bfloat16", param_dtype="bfloat16")
    return cls(**{**base, **fields})

  @classmethod
  def gemma3_270m(cls, **o: Any) -> "Gemma3Config":
    return cls._real(**{**dict(hidden_size=640, intermediate_size=2048, num_layers=18, num_heads=4,
                               num_kv_heads=1), **o})

  @classmethod
  def gemma3_1b(cls, **o: Any) -> "Gemma3Config":
    return cls._real(**{**dict(hidden_size=1152, intermediate_size=6912, num_layers=26, num_heads=4,
                               num_kv_heads=1), **o})

  @classmethod
  def gemma3_4b(cls, **o: Any) -> "Gemma3Config":
    return cls._real(**{**dict(vocab_size=262208, hidden_size=2560, intermediate_size=10240, num_layers=34,
                               num_heads=8, num_kv_heads=4, sliding_window=1024, max_position_embeddings=131072,
                               rope=RopeConfig(theta=1_000_000.0, rope_type="linear", factor=8.0)), **o})


NAMED_SIZES = {
    "gemma3_270m": Gemma3Config.gemma3_270m,
    "gemma3_1b": Gemma3Config.gemma3_1b,
    "gemma3_4b": Gemma3Config.gemma3_4b,
    "gemma3_tiny": Gemma3Config.tiny,
}

Block = DecoderLayer
FeedForward = MLP


class Gemma3(CausalLM):
  """The Gemma 3 text transformer."""

  config_class: ClassVar[type] = Gemma3Config
  family: ClassVar[str] = "gemma3"
