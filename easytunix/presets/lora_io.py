"""Saving, restoring and merging LoRA adapters for presets, and recording a quantized (QLoRA) base."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx

from easytunix.layers.linear import Linear
from easytunix.layers.sharding import path_str
from easytunix.models.safetensors_io import ADAPTER_FILE  # the base-weight loader skips this file


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


def quantization_description(model: nnx.Module) -> dict[str, Any] | None:
  """How ``model``'s base is quantized (method, block size, module paths), for the preset file; None: it is not.

  The preset's safetensors hold the dequantized kernels (full precision, what any loader reads);
  :func:`requantize` quantizes them again on load. Blockwise absmax quantization gives back the
  same codes from its own dequantized values (each block's largest weight dequantizes to its
  scale), so the reloaded model is the saved one up to float round-off of the scales.
  """
  kernels = {path_str(p): m.kernel for p, m in nnx.iter_graph(model) if isinstance(m, Linear) and m.quantized}
  if not kernels:
    return None
  settings = {(k.method, k.block_size) for k in kernels.values()}
  if len(settings) > 1:
    raise ValueError(
        f"The model's kernels are quantized with several (method, block_size) settings {sorted(settings)}; "
        "save_to_preset records one. Quantize every kernel the same way."
    )
  method, block_size = settings.pop()
  return {"method": method, "block_size": block_size, "modules": sorted(kernels)}


def requantize(model: nnx.Module, description: dict[str, Any]) -> None:
  """Quantizes ``model``'s kernels as :func:`quantization_description` recorded them."""
  import re

  from easytunix.sft.lora import quantize_base

  quantize_base(model, description["method"], block_size=int(description["block_size"]),
                targets=[re.escape(name) for name in description["modules"]])


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

