"""Model families and the Hugging Face folder loader that picks the right one."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from jax.sharding import Mesh

from easytunix.models.base import CausalLM, DecoderConfig


def families() -> dict[str, type[CausalLM]]:
  """The registry of model families: ``family -> core model class``.

  Each class declares its key (``Llama3.family == "llama3"``) and its config
  the Hugging Face ``model_type`` values it reads; the family's checkpoint-name
  table and loaders live in ``easytunix.models.<family>.params``.
  """
  from easytunix.models import gemma, gemma3, llama3, qwen3

  return {cls.family: cls for cls in (llama3.Llama3, qwen3.Qwen3, gemma.Transformer, gemma3.Gemma3)}


def params_module(model_cls: type[CausalLM]) -> Any:
  """The ``params`` module (checkpoint names, loaders) of a model class's family."""
  return importlib.import_module(f"easytunix.models.{model_cls.family}.params")


def family_for_model_type(model_type: str | None) -> tuple[type, Any]:
  """The (model class, params module) for a Hugging Face ``model_type``."""
  table = {t: (cls, params_module(cls)) for cls in families().values() for t in cls.config_class.hf_model_types}
  if model_type not in table:
    raise ValueError(
        f"Unsupported model_type {model_type!r} in config.json; easytunix supports {sorted(table)}."
    )
  return table[model_type]


def config_from_hf(hf: dict[str, Any], **overrides: Any) -> DecoderConfig:
  """Parses a Hugging Face config dict with the family its ``model_type`` names."""
  model_cls, _ = family_for_model_type(hf.get("model_type"))
  return model_cls.config_class.from_hf_config(hf, **overrides)


def load_model(
    folder: str | Path, *, config: DecoderConfig | None = None, mesh: Mesh | None = None, dtype: Any = None
) -> CausalLM:
  """Loads any supported Hugging Face model folder (family sniffed from config.json)."""
  from easytunix.models.hf import load_hf_model, read_hf_config

  hf = read_hf_config(folder)
  model_cls, params = family_for_model_type(hf.get("model_type"))
  if config is None:
    config = model_cls.config_class.from_hf_config(hf)
  return load_hf_model(model_cls, params.name_rules(config), folder, config, mesh=mesh, dtype=dtype)


__all__ = ["CausalLM", "DecoderConfig", "config_from_hf", "families", "family_for_model_type", "load_model", "params_module"]
