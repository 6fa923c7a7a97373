"""Qwen 3 (dense and MoE): model, config, sharding and checkpoint loading."""

from easytunix.models.qwen3 import params
from easytunix.models.qwen3.model import (
    MLP,
    NAMED_SIZES,
    Attention,
    DecoderLayer,
    Embedder,
    ModelConfig,
    MoELayer,
    Qwen3,
    RMSNorm,
    ShardingConfig,
)

__all__ = ["MLP", "NAMED_SIZES", "Attention", "DecoderLayer", "Embedder", "ModelConfig", "MoELayer", "Qwen3", "RMSNorm", "ShardingConfig", "params"]
