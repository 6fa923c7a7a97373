"""Feature projection distillation: a learned map sends the student's hidden states to the teacher's width."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from flax import nnx

from easytunix.distillation.strategies.base_strategy import IntermediateStrategy
from easytunix.distillation.strategies.defaults import ModelForwardCallable
from easytunix.distillation.strategies.losses import masked_mean, pool_to_shape
from easytunix.distillation.strategies.projection import LayerwiseProjection


class FeatureProjectionStrategy(IntermediateStrategy):
  """``loss = alpha * feature_loss + (1 - alpha) * task_loss`` with a learned student -> teacher projection.

  The outputs of every ``feature_layer`` module are stacked to [B, L, T, D] in
  both models; both are average-pooled to the smaller layer count, then a
  per-layer linear map (``D_student -> D_teacher``) projects the student's.
  :meth:`pre_process_models` adds that projection to the student as
  ``student.distillation_feature_projection`` (found from a trace of
  ``dummy_input``), so it trains with the student; :meth:`post_process_models`
  removes it. The default feature loss is the mean squared error over real tokens.
  :meth:`compute_loss` also takes maps of other shapes and no ``token_mask`` (Tunix's
  outputs): the teacher's maps are average-pooled to the student's shape on every axis.

  Args:
    student_forward_fn / teacher_forward_fn / labels_fn: see :class:`BaseStrategy`.
    feature_layer: the module class whose outputs are matched (None: easytunix's decoder layer).
    dummy_input: a batch of model inputs (``forward_fn(model, **dummy_input)``) used to
      trace the shapes (None: 1 x 8 tokens).
    rngs: initialises the projection (None: ``nnx.Rngs(0)``).
    alpha: weight of the feature loss; the task loss gets ``1 - alpha``.
    feature_loss_fn: ``fn(projected_student, teacher[, mask=...]) -> scalar`` instead of the MSE.
  """

  maps_key = "features"
  projection_name = "distillation_feature_projection"

  def __init__(
      self,
      student_forward_fn: ModelForwardCallable[jax.Array] | None = None,
      teacher_forward_fn: ModelForwardCallable[jax.Array] | None = None,
      labels_fn: Callable[..., Any] | None = None,
      feature_layer: type[nnx.Module] | None = None,
      dummy_input: dict[str, jax.Array] | None = None,
      rngs: nnx.Rngs | None = None,
      alpha: float = 0.75,
      feature_loss_fn: Callable[..., jax.Array] | None = None,
  ):
    if feature_layer is None:
      from easytunix.models.base import DecoderLayer

      feature_layer = DecoderLayer
    super().__init__(student_forward_fn, teacher_forward_fn, labels_fn, feature_layer, alpha, feature_loss_fn)
    self.feature_layer = feature_layer
    self.dummy_input = dummy_input
    self.rngs = rngs if rngs is not None else nnx.Rngs(0)
    self.projection: LayerwiseProjection | None = None

  def make_projection(self, student_maps: jax.ShapeDtypeStruct, teacher_maps: jax.ShapeDtypeStruct) -> LayerwiseProjection:
    num_layers = min(student_maps.shape[1], teacher_maps.shape[1])
    return LayerwiseProjection(num_layers, student_maps.shape[-1], teacher_maps.shape[-1], axis=-1, rngs=self.rngs)

  def pre_process_models(self, student_model: nnx.Module, teacher_model: nnx.Module) -> tuple[nnx.Module, nnx.Module]:
    """Adds the learned projection to the student; returns ``(student, teacher)``."""
    self._attach_projection(student_model, teacher_model, self.dummy_input)
    return student_model, teacher_model

  def post_process_models(self, student_model: nnx.Module, teacher_model: nnx.Module) -> tuple[nnx.Module, nnx.Module]:
    """Removes the projection (the student is a plain model again); returns ``(student, teacher)``."""
    self._detach_projection(student_model)
    return student_model, teacher_model

  def extra_trainable_paths(self) -> tuple[str, ...]:
    return (self.projection_name,)

  def map_loss(self, student_maps: jax.Array, teacher_maps: jax.Array, token_mask: jax.Array | None) -> jax.Array:
    try:
      teacher = pool_to_shape(teacher_maps, student_maps.shape, "teacher features")
    except ValueError as err:
      raise ValueError(
          f"Projected student features {student_maps.shape} do not match the teacher's {teacher_maps.shape} ({err}); "
          "the projection was built for other models or another dummy_input layout."
      ) from None
    if self.loss_fn is not None:
      return self.custom_loss(student_maps, teacher, token_mask)
    return masked_mean((student_maps - teacher) ** 2, self.token_weights(token_mask, student_maps))


__all__ = ["FeatureProjectionStrategy"]
