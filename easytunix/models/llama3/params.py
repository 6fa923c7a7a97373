"""Loading Llama 3 weights from Hugging Face safetensors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from jax.sharding import Mesh

from easytunix.models.hf import load_hf_model
from easytunix.models.llama3.model import Llama3, ModelConfig
from easytunix.models.loader import llama_style_rules


def name_rules(config: ModelConfig):
  """The checkpoint name table for ``config``."""
  return llama_style_rules(bias=config.attention_bias)


def create_model_from_safe_tensors(
    file_dir: str | Path, config: ModelConfig | None = None, mesh: Mesh | None = None, dtype: Any = None
) -> Llama3:
  """Loads a Llama 3 model from a Hugging Face folder (config.json + *.safetensors)."""
  from easytunix.models.hf import read_hf_config

  if config is None:
    config = ModelConfig.from_hf_config(read_hf_config(file_dir))
  return load_hf_model(Llama3, name_rules(config), file_dir, config, mesh=mesh, dtype=dtype)
