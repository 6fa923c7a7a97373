"""Gemma 3: model, config, sharding, checkpoint and tokenizer loading."""

from easytunix.models.gemma3 import params
from easytunix.models.gemma3.model import (
    NAMED_SIZES,
    Attention,
    Block,
    Embedder,
    FeedForward,
    Gemma3,
    Gemma3Config,
    RMSNorm,
    ShardingConfig,
)

__all__ = ["NAMED_SIZES", "Attention", "Block", "Embedder", "FeedForward", "Gemma3", "Gemma3Config", "RMSNorm", "ShardingConfig", "params"]
