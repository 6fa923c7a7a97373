"""Loading Gemma 3 weights (Hugging Face safetensors) and its tokenizer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from jax.sharding import Mesh

from easytunix.models.gemma3.model import Gemma3, Gemma3Config
from easytunix.models.hf import load_hf_model, read_hf_config
from easytunix.models._seed_paths import lazy_aliases
from easytunix.models.loader import llama_style_rules


def name_rules(config: Gemma3Config):
  """The checkpoint name table for ``config``."""
  return llama_style_rules(qk_norm=True, sandwich=True, bias=config.attention_bias)


def create_model_from_checkpoint(
    path: str | Path, config: Gemma3Config | None = None, mesh: Mesh | None = None, dtype: Any = None
) -> Gemma3:
  """Loads Gemma 3 from a Hugging Face folder (text model of multimodal checkpoints too)."""
  if config is None:
    config = Gemma3Config.from_hf_config(read_hf_config(path))
  return load_hf_model(Gemma3, name_rules(config), path, config, mesh=mesh, dtype=dtype)


create_model_from_safe_tensors = create_model_from_checkpoint


# Seed name: create_tokenizer(path) is TokenizerAdapter.from_pretrained, which lives in easytunix.generate.
__getattr__ = lazy_aliases(__name__, {"create_tokenizer": "easytunix.generate.tokenizer_adapter:TokenizerAdapter.from_pretrained"})
