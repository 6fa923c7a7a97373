"""Llama 3: model, config, sharding and checkpoint loading."""

from easytunix.models.llama3 import params
from easytunix.models.llama3.model import (
    MLP,
    NAMED_SIZES,
    Attention,
    DecoderLayer,
    Embedder,
    Llama3,
    ModelConfig,
    RMSNorm,
    ShardingConfig,
)

__all__ = ["MLP", "NAMED_SIZES", "Attention", "DecoderLayer", "Embedder", "Llama3", "ModelConfig", "RMSNorm", "ShardingConfig", "params"]
