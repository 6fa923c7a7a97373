"""Reading Hugging Face model folders: config.json and the family it names."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from flax import nnx
from jax.sharding import Mesh

from easytunix.models.base import DecoderConfig, to_dtype
from easytunix.models.loader import create_model


def read_hf_config(folder: str | Path) -> dict[str, Any]:
  """The ``config.json`` of a Hugging Face model folder, as a dict."""
  folder = Path(folder)
  if not folder.is_dir():
    raise FileNotFoundError(f"Model folder {folder} does not exist or is not a directory.")
  path = folder / "config.json"
  if not path.exists():
    raise FileNotFoundError(
        f"{folder} has no config.json. A Hugging Face model folder holds config.json and *.safetensors."
    )
  try:
    config = json.loads(path.read_text())
  except ValueError as e:
    raise ValueError(f"{path} is not valid JSON ({e}). Restore the folder's config.json.") from e
  if not isinstance(config, dict):
    raise ValueError(f"{path} must hold a JSON object of model settings, got {type(config).__name__}.")
  return config


def parse_hf_config(config_class: type, hf: dict[str, Any], folder: str | Path) -> DecoderConfig:
  """``config_class.from_hf_config(hf)``, with a missing or malformed field named with its file."""
  try:
    return config_class.from_hf_config(hf)
  except KeyError as e:
    raise ValueError(
        f"{Path(folder) / 'config.json'} has no {e.args[0]!r} field, which a {config_class.__name__} needs. "
        "Is it a complete Hugging Face config.json?"
    ) from e
  except (TypeError, ValueError) as e:
    raise ValueError(f"{Path(folder) / 'config.json'} has a field that cannot be used: {e}") from e


def load_hf_model(
    model_cls: type,
    rules: tuple,
    folder: str | Path,
    config: DecoderConfig | None = None,
    *,
    mesh: Mesh | None = None,
    dtype: Any = None,
) -> nnx.Module:
  """Loads a family's model from a Hugging Face folder.

  Args:
    model_cls: the family's model class (its ``config_class`` parses config.json).
    rules: the family's checkpoint name table.
    folder: the model folder.
    config: use this config instead of parsing config.json.
    mesh: shard parameters on this mesh following ``config.sharding``.
    dtype: compute and parameter dtype (default: the checkpoint's own dtype).
  """
  if config is None:
    config = parse_hf_config(model_cls.config_class, read_hf_config(folder), folder)
  if dtype is not None:
    config = config.replace(dtype=to_dtype(dtype), param_dtype=to_dtype(dtype))
  return create_model(model_cls, config, folder, rules, mesh=mesh)


def common_hf_fields(hf: dict[str, Any]) -> dict[str, Any]:
  """Fields every Llama-like Hugging Face config spells the same way."""
  heads = hf["num_attention_heads"]
  fields = dict(
      vocab_size=hf["vocab_size"],
      hidden_size=hf["hidden_size"],
      intermediate_size=hf["intermediate_size"],
      num_layers=hf["num_hidden_layers"],
      num_heads=heads,
      num_kv_heads=hf.get("num_key_value_heads") or heads,
      head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
      norm_eps=hf.get("rms_norm_eps", 1e-6),
      max_position_embeddings=hf.get("max_position_embeddings", 8192),
      attention_bias=bool(hf.get("attention_bias", False)),
  )
  dtype = hf.get("dtype") or hf.get("torch_dtype")
  if dtype in ("float32", "bfloat16", "float16"):
    fields["dtype"] = dtype
    fields["param_dtype"] = dtype
  return fields


def check_model_type(hf: dict[str, Any], expected: tuple[str, ...], family: str) -> None:
  model_type = hf.get("model_type")
  if model_type not in expected:
    raise ValueError(
        f"config.json has model_type {model_type!r}, which is not a {family} model "
        f"(expected one of {expected})."
    )


def rope_to_hf(rope) -> dict[str, Any]:
  """A RopeConfig as a Hugging Face ``rope_parameters`` entry."""
  out: dict[str, Any] = {"rope_type": rope.rope_type, "rope_theta": rope.theta}
  if rope.rope_type == "linear":
    out["factor"] = rope.factor
  elif rope.rope_type == "llama3":
    out.update(factor=rope.factor, low_freq_factor=rope.low_freq_factor, high_freq_factor=rope.high_freq_factor,
               original_max_position_embeddings=rope.original_max_position_embeddings)
  return out


def common_hf_dict(config: DecoderConfig, model_type: str, architecture: str) -> dict[str, Any]:
  """The Llama-like part of a Hugging Face ``config.json`` for ``config``."""
  from easytunix.models.base import dtype_name

  return dict(
      architectures=[architecture],
      model_type=model_type,
      vocab_size=config.vocab_size,
      hidden_size=config.hidden_size,
      intermediate_size=config.intermediate_size,
      num_hidden_layers=config.num_layers,
      num_attention_heads=config.num_heads,
      num_key_value_heads=config.num_kv_heads,
      head_dim=config.head_dim,
      rms_norm_eps=config.norm_eps,
      max_position_embeddings=config.max_position_embeddings,
      tie_word_embeddings=config.tie_embeddings,
      attention_bias=config.attention_bias,
      rope_parameters=rope_to_hf(config.rope),
      rope_theta=config.rope.theta,
      dtype=dtype_name(config.param_dtype),
  )


def save_hf_folder(
    model: nnx.Module, folder: str | Path, rules: tuple, hf_config: dict[str, Any], merge_lora: bool = False
) -> Path:
  """Writes ``model`` as a Hugging Face folder: config.json + model.safetensors (with ``merge_lora``,
  LoRA adapters folded into the kernels)."""
  from easytunix.models.loader import checkpoint_tensors
  from easytunix.models.safetensors_io import write_safetensors

  folder = Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  tensors = checkpoint_tensors(model, rules, merge_lora=merge_lora)
  write_safetensors(tensors, folder / "model.safetensors", metadata={"format": "pt"})
  (folder / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
  return folder
