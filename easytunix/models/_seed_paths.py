"""Seed module paths whose code lives in a higher layer.

The Tunix API names ``models.gemma.data``, ``models.gemma.sampler`` and
``models.gemma3.params.create_tokenizer``; their code is data, sampling and
tokenizer code, which lives in ``easytunix.sft`` and ``easytunix.generate``
(imports point down). These paths stay importable through a lazy module
``__getattr__``: importing ``easytunix.models`` never loads a higher layer.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_aliases(module: str, aliases: Mapping[str, str]) -> Callable[[str], Any]:
  """A module ``__getattr__`` resolving ``name -> "package.module:attr.path"`` on first use."""

  def __getattr__(name: str) -> Any:
    if name not in aliases:
      raise AttributeError(f"module {module!r} has no attribute {name!r}")
    target, _, path = aliases[name].partition(":")
    value: Any = importlib.import_module(target)
    for part in (path or name).split("."):
      value = getattr(value, part)
    return value

  return __getattr__
