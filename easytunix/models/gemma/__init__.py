"""Gemma: model, config, sharding and checkpoint loading."""

from easytunix.models.gemma import params
from easytunix.models.gemma.model import (
    NAMED_SIZES,
    Attention,
    Block,
    Embedder,
    FeedForward,
    RMSNorm,
    ShardingConfig,
    Transformer,
    TransformerConfig,
)

__all__ = ["NAMED_SIZES", "Attention", "Block", "Embedder", "FeedForward", "RMSNorm", "ShardingConfig", "Transformer", "TransformerConfig", "params"]
