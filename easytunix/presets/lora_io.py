"""Saving, restoring and merging LoRA adapters for presets."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx

from easytunix.layers.linear import Linear
from easytunix.layers.sharding import path_str

ADAPTER_FILE = "lora_adapters.safetensors"


def has_adapters(model: nnx.Module) -> bool:
  return any(isinstance(m, Linear) and m.lora_a is not None for _, m in nnx.iter_graph(model))


def save_adapters(model: nnx.Module, folder: Path) -> dict[str, Any] | None:
  """Writes every adapter to ``folder/lora_adapters.safetensors``; returns their description."""
  from easytunix.models.safetensors_io import write_safetensors

  tensors, scales = {}, {}
  for path, m in nnx.iter_graph(model):
    if isinstance(m, Linear) and m.lora_a is not None:
      name = path_str(path)
      tensors[f"{name}.lora_a"] = np.asarray(m.lora_a.get_value())
      tensors[f"{name}.lora_b"] = np.asarray(m.lora_b.get_value())
      scales[name] = float(m.lora_scale)
  if not tensors:
    return None
  write_safetensors(tensors, Path(folder) / ADAPTER_FILE)
  return {"file": ADAPTER_FILE, "scales": scales}


def load_adapters(model: nnx.Module, folder: Path, description: dict[str, Any]) -> None:
  """Restores adapters written by :func:`save_adapters` onto ``model``."""
  import jax
  from safetensors.numpy import load_file

  import re

  from easytunix.sft.lora import apply_lora

  tensors = load_file(str(Path(folder) / description["file"]))
  names = list(description["scales"])
  rank = tensors[f"{names[0]}.lora_a"].shape[1]
  apply_lora(model, rank=rank, targets=[re.escape(n) for n in names])
  modules = {path_str(p): m for p, m in nnx.iter_graph(model) if isinstance(m, Linear)}
  for name in names:
    m = modules[name]
    m.lora_a.set_value(jax.device_put(tensors[f"{name}.lora_a"], m.lora_a.get_value().sharding))
    m.lora_b.set_value(jax.device_put(tensors[f"{name}.lora_b"], m.lora_b.get_value().sharding))
    m.lora_scale = description["scales"][name]

