"""The Gemma sampler names (``Sampler(transformer, vocab, ...)``) on the shared JAX sampler.

Everything runs on ``easytunix.generate.sampler``; this module only keeps the
Gemma-style constructor (a SentencePiece ``vocab``, an optional cache config)
and the ``total_generation_steps`` argument name. Its seed path is
``easytunix.models.gemma.sampler``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from flax import nnx

from easytunix.generate import sampler as _sampler
from easytunix.generate.sampler import CacheConfig, SamplerOutput, sample_best, sample_top_p

__all__ = ["CacheConfig", "Sampler", "SamplerOutput", "sample_best", "sample_top_p"]


class Sampler(_sampler.Sampler):
  """Samples from a Gemma transformer.

  Args:
    transformer: the Gemma model (any easytunix causal LM works).
    vocab: a ``sentencepiece.SentencePieceProcessor`` or a TokenizerAdapter.
    cache_config: the KV cache shape; by default one of ``cache_size`` tokens
      sized for ``transformer``.
    cache_size: the cache length used when ``cache_config`` is None.
    max_batch_size: the batch limit used when ``cache_config`` is None.
  """

  def __init__(
      self,
      transformer: nnx.Module,
      vocab: Any,
      cache_config: CacheConfig | None = None,
      *,
      cache_size: int = 1024,
      max_batch_size: int | None = None,
  ):
    if cache_config is None:
      cache_config = CacheConfig.for_model(transformer, cache_size=cache_size, max_batch_size=max_batch_size)
    super().__init__(transformer, vocab, cache_config)

  @property
  def vocab(self) -> Any:
    """The tokenizer (wrapped in a TokenizerAdapter)."""
    return self.tokenizer

  def __call__(
      self,
      input_strings: Sequence[str] | Sequence[Sequence[int]],
      total_generation_steps: int | None = None,
      *,
      max_generation_steps: int | None = None,
      **kwargs: Any,
  ) -> SamplerOutput:
    """Generates ``total_generation_steps`` tokens at most per prompt; other options as
    ``easytunix.generate.Sampler.__call__`` (``echo``, ``return_logits``, ``temperature``, ...)."""
    if (total_generation_steps is None) == (max_generation_steps is None):
      raise ValueError("Pass exactly one of total_generation_steps and max_generation_steps.")
    steps = total_generation_steps if total_generation_steps is not None else max_generation_steps
    return super().__call__(input_strings, steps, **kwargs)
