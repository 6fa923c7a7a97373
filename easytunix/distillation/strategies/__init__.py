"""Distillation strategies: what the student learns from the teacher.

* :class:`LogitStrategy`: the teacher's softened next-token distribution (KL).
* :class:`FeaturePoolingStrategy`: hidden states, pooled to a common shape (cosine distance).
* :class:`FeatureProjectionStrategy`: hidden states through a learned projection (MSE).
* :class:`AttentionTransferStrategy`: attention maps (cosine distance).
* :class:`AttentionProjectionStrategy`: attention maps through a learned head projection (MSE).
"""

from easytunix.distillation.strategies.attention import AttentionProjectionStrategy, AttentionTransferStrategy
from easytunix.distillation.strategies.base_strategy import (
    BaseStrategy,
    IntermediateStrategy,
    ModelForwardCallable,
    TokenLabels,
    default_forward_fn,
    default_functions,
    default_labels_fn,
)
from easytunix.distillation.strategies.feature_pooling import FeaturePoolingStrategy
from easytunix.distillation.strategies.feature_projection import FeatureProjectionStrategy
from easytunix.distillation.strategies.logit import LogitStrategy

__all__ = [
    "AttentionProjectionStrategy",
    "AttentionTransferStrategy",
    "BaseStrategy",
    "FeaturePoolingStrategy",
    "FeatureProjectionStrategy",
    "IntermediateStrategy",
    "LogitStrategy",
    "ModelForwardCallable",
    "TokenLabels",
    "default_forward_fn",
    "default_functions",
    "default_labels_fn",
]
