"""The preset classes users import: each family's core model plus the facade."""

from __future__ import annotations

from easytunix.models import gemma, gemma3, llama3, qwen3
from easytunix.presets.task import CausalLMTask


class Llama3(CausalLMTask, llama3.Llama3):
  """Llama 3 (and SmolLM2) with ``from_preset``, ``compile``, ``fit`` and ``generate``."""


class Qwen3(CausalLMTask, qwen3.Qwen3):
  """Qwen 3, dense or MoE, with ``from_preset``, ``compile``, ``fit`` and ``generate``."""


class Gemma(CausalLMTask, gemma.Transformer):
  """Gemma with ``from_preset``, ``compile``, ``fit`` and ``generate``."""


class Gemma3(CausalLMTask, gemma3.Gemma3):
  """Gemma 3 with ``from_preset``, ``compile``, ``fit`` and ``generate``."""


class CausalLM(CausalLMTask):
  """Family-agnostic entry point: ``CausalLM.from_preset(name_or_folder)`` picks the class."""

  def __init__(self, *args, **kwargs):
    raise TypeError("CausalLM is only a loader; use CausalLM.from_preset(...) or a family class such as Qwen3.")


# The preset class of each family, keyed by the family its core class declares.
BY_FAMILY = {cls.family: cls for cls in (Llama3, Qwen3, Gemma, Gemma3)}
