"""Loading Qwen 3 (dense and MoE) weights from Hugging Face safetensors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from jax.sharding import Mesh

from easytunix.models.hf import load_hf_model, read_hf_config
from easytunix.models.loader import llama_style_rules
from easytunix.models.qwen3.model import ModelConfig, Qwen3


def name_rules(config: ModelConfig):
  """The checkpoint name table for ``config`` (per-expert tensors are stacked)."""
  return llama_style_rules(qk_norm=True, bias=config.attention_bias, moe=bool(config.num_experts))


def create_model_from_safe_tensors(
    file_dir: str | Path, config: ModelConfig | None = None, mesh: Mesh | None = None, dtype: Any = None
) -> Qwen3:
  """Loads a Qwen 3 model from a Hugging Face folder (config.json + *.safetensors)."""
  if config is None:
    config = ModelConfig.from_hf_config(read_hf_config(file_dir))
  return load_hf_model(Qwen3, name_rules(config), file_dir, config, mesh=mesh, dtype=dtype)
