"""Loading Gemma weights from Hugging Face safetensors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from jax.sharding import Mesh

from easytunix.models.gemma.model import Transformer, TransformerConfig
from easytunix.models.hf import load_hf_model, read_hf_config
from easytunix.models.loader import llama_style_rules, normalize_name
from easytunix.models.safetensors_io import SafetensorsReader, checkpoint_files


def name_rules(config: TransformerConfig):
  """The checkpoint name table for ``config``."""
  return llama_style_rules(bias=config.attention_bias)


def load_metadata(path: str | Path) -> dict[str, Any]:
  """The checkpoint's configuration (its Hugging Face ``config.json``)."""
  return read_hf_config(path)


def load_and_format_params(path: str | Path) -> dict[str, Any]:
  """Reads a Gemma checkpoint into a nested dict laid out like the model's state.

  Returns host numpy arrays keyed like ``{"layers": {"0": {"attn": {"q_proj": {"kernel": ...}}}}}``.
  """
  config = TransformerConfig.from_hf_config(read_hf_config(path))
  rules = name_rules(config)
  params: dict[str, Any] = {}
  for file in checkpoint_files(path):
    with SafetensorsReader(file) as reader:
      for raw in reader.keys():
        name = normalize_name(raw)
        for rule in rules:
          groups = rule.match_checkpoint(name)
          if groups is not None:
            break
        else:
          continue
        array = np.array(reader.get(raw))
        if rule.transpose:
          array = array.T
        node = params
        *parents, leaf = rule.param.format(**groups).split(".")
        for key in parents:
          node = node.setdefault(key, {})
        node[leaf] = array
  return params


def create_model_from_safe_tensors(
    file_dir: str | Path, config: TransformerConfig | None = None, mesh: Mesh | None = None, dtype: Any = None
) -> Transformer:
  """Loads a Gemma model from a Hugging Face folder (config.json + *.safetensors)."""
  if config is None:
    config = TransformerConfig.from_hf_config(read_hf_config(file_dir))
  return load_hf_model(Transformer, name_rules(config), file_dir, config, mesh=mesh, dtype=dtype)


create_model_from_checkpoint = create_model_from_safe_tensors
