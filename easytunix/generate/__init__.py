"""Text generation: the JAX sampler (greedy, top-p/top-k, beam search, streaming) and the tokenizer adapter."""

from easytunix.generate.base_sampler import BaseSampler
from easytunix.generate.sampler import (
    CacheConfig,
    SampleState,
    Sampler,
    SamplerOutput,
    StreamChunk,
    sample_best,
    sample_top_p,
)
from easytunix.generate.tokenizer_adapter import TokenizerAdapter

__all__ = [
    "BaseSampler",
    "CacheConfig",
    "SampleState",
    "Sampler",
    "SamplerOutput",
    "StreamChunk",
    "TokenizerAdapter",
    "sample_best",
    "sample_top_p",
]
