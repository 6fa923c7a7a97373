"""Seed path of the Gemma data utilities; the code is :mod:`easytunix.sft.gemma_data`."""

from easytunix.models._seed_paths import lazy_aliases

__all__ = ["GEMMA_INSTRUCT_TEMPLATE", "GemmaTokenizer", "create_datasets"]
__getattr__ = lazy_aliases(__name__, {name: "easytunix.sft.gemma_data" for name in __all__})


def __dir__() -> list[str]:
  return sorted(__all__)
