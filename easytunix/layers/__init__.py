"""Shared building blocks for every model family: written once, imported by all."""

from easytunix.layers.attention import Attention, AttentionConfig
from easytunix.layers.cache import KVCache, LayerCache, RaggedLayout, init_cache, make_causal_mask, make_decode_mask
from easytunix.layers.embedder import Embedder
from easytunix.layers.linear import Linear
from easytunix.layers.mlp import MLP
from easytunix.layers.moe import MoELayer
from easytunix.layers.norm import RMSNorm
from easytunix.layers.quantization import QuantizedKernel, QuantizedWeight
from easytunix.layers.rope import RopeConfig, apply_rope, rope_inv_freq
from easytunix.layers.sharding import ShardingConfig, partition_specs, shard_model

__all__ = [
    "Attention",
    "AttentionConfig",
    "Embedder",
    "KVCache",
    "LayerCache",
    "Linear",
    "MLP",
    "MoELayer",
    "QuantizedKernel",
    "QuantizedWeight",
    "RMSNorm",
    "RaggedLayout",
    "RopeConfig",
    "ShardingConfig",
    "apply_rope",
    "init_cache",
    "make_causal_mask",
    "make_decode_mask",
    "partition_specs",
    "rope_inv_freq",
    "shard_model",
]
