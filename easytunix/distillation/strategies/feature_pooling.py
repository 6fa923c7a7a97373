"""Feature pooling distillation: match the hidden states of chosen layers, pooled to a common shape."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from easytunix.distillation.strategies.base_strategy import IntermediateStrategy
from easytunix.distillation.strategies.defaults import ModelForwardCallable
from easytunix.distillation.strategies.losses import cosine_distance, masked_mean, pool_to_common


def pool_features(student: jax.Array, teacher: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Average-pools the features of both models to their common shape: for [B, L, T, D] maps the
  smaller layer count and width (any rank and layout works: every axis goes to the smaller size)."""
  return pool_to_common(student, teacher, "features")


class FeaturePoolingStrategy(IntermediateStrategy):
  """``loss = alpha * feature_loss + (1 - alpha) * task_loss`` on pooled layer outputs.

  The output of every ``feature_layer`` module (the hidden state, for a decoder
  layer) is captured in both models and stacked to [B, L, T, D]. Both stacks
  are average-pooled to the smaller number of layers (neighbouring layers
  averaged) and the smaller width (neighbouring channels averaged); the
  default feature loss is the cosine distance along ``cosine_distance_axis``,
  averaged over real tokens and layers. No parameters are added.
  :meth:`compute_loss` also takes maps of other shapes (Tunix's [L, B, D] features
  of a classifier, no ``token_mask``): every axis is pooled to the smaller size.

  Args:
    student_forward_fn / teacher_forward_fn / labels_fn: see :class:`BaseStrategy`.
    feature_layer: the module class whose outputs are matched (None: easytunix's
      decoder layer).
    alpha: weight of the feature loss; the task loss gets ``1 - alpha``.
    feature_loss_fn: ``fn(student_features, teacher_features[, mask=...]) -> scalar`` on the pooled
      [B, L, T, D] features (padding zeroed), instead of the cosine distance.
    cosine_distance_axis: axis (of [B, L, T, D]) of the default cosine distance.
  """

  maps_key = "features"

  def __init__(
      self,
      student_forward_fn: ModelForwardCallable[jax.Array] | None = None,
      teacher_forward_fn: ModelForwardCallable[jax.Array] | None = None,
      labels_fn: Callable[..., Any] | None = None,
      feature_layer: type[nnx.Module] | None = None,
      alpha: float = 0.75,
      feature_loss_fn: Callable[..., jax.Array] | None = None,
      cosine_distance_axis: int | tuple[int, ...] = -1,
  ):
    if feature_layer is None:
      from easytunix.models.base import DecoderLayer

      feature_layer = DecoderLayer
    super().__init__(student_forward_fn, teacher_forward_fn, labels_fn, feature_layer, alpha, feature_loss_fn)
    self.feature_layer = feature_layer
    self.cosine_distance_axis = cosine_distance_axis

  def map_loss(self, student_maps: jax.Array, teacher_maps: jax.Array, token_mask: jax.Array | None) -> jax.Array:
    student, teacher = pool_features(student_maps, teacher_maps)
    if self.loss_fn is not None:
      return self.custom_loss(student, teacher, token_mask)
    weights = self.token_weights(token_mask, student)
    if weights is None:
      return cosine_distance(student, teacher, axis=self.cosine_distance_axis).mean()
    # Padded tokens are zeroed, so a distance taken across tokens ignores them too.
    weights = jnp.broadcast_to(weights, student.shape)
    distance = cosine_distance(student * weights, teacher * weights, axis=self.cosine_distance_axis)
    return masked_mean(distance, weights.max(axis=self.cosine_distance_axis))


__all__ = ["FeaturePoolingStrategy", "pool_features"]
