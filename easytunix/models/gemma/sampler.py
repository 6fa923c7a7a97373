"""Seed path of the Gemma sampler; the code is :mod:`easytunix.generate.gemma_sampler`."""

from easytunix.models._seed_paths import lazy_aliases

__all__ = ["CacheConfig", "Sampler", "SamplerOutput", "sample_best", "sample_top_p"]
__getattr__ = lazy_aliases(__name__, {name: "easytunix.generate.gemma_sampler" for name in __all__})


def __dir__() -> list[str]:
  return sorted(__all__)
