"""Loading Gemma 3 weights (Hugging Face safetensors) and its tokenizer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from jax.sharding import Mesh

from easytunix.models.gemma3.model import Gemma3, Gemma3Config
from easytunix.models.hf import load_hf_model, read_hf_config
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


def create_tokenizer(path: str | Path):
  """The tokenizer stored in a Gemma 3 folder (tokenizer.json or tokenizer.model)."""
  # Imported here: tokenizers live in easytunix.generate, a layer above the models.
  from easytunix.generate.tokenizer_adapter import TokenizerAdapter

  return TokenizerAdapter.from_pretrained(path)
