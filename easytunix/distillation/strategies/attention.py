"""Attention distillation: match the attention maps (softmax weights) of the student and the teacher."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from easytunix.distillation.strategies.base_strategy import IntermediateStrategy
from easytunix.distillation.strategies.defaults import ModelForwardCallable
from easytunix.distillation.strategies.losses import cosine_distance, masked_mean, pool_layers
from easytunix.distillation.strategies.projection import LayerwiseProjection


def _default_attention_layer() -> type[nnx.Module]:
  from easytunix.layers.attention import Attention

  return Attention


def match_attention(student: jax.Array, teacher: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Brings [B, L, H, T, S] maps of both models to one shape: layers average-pooled to the
  smaller count; heads averaged (to one) when the head counts differ."""
  num_layers = min(student.shape[1], teacher.shape[1])
  student = pool_layers(student.astype(jnp.float32), num_layers)
  teacher = pool_layers(teacher.astype(jnp.float32), num_layers)
  if student.shape[2] != teacher.shape[2]:
    student = student.mean(axis=2, keepdims=True)
    teacher = teacher.mean(axis=2, keepdims=True)
  if student.shape != teacher.shape:
    raise ValueError(
        f"Attention maps {student.shape} (student) and {teacher.shape} (teacher) cannot be compared; both models "
        "must see the same tokens."
    )
  return student, teacher


class AttentionTransferStrategy(IntermediateStrategy):
  """``loss = alpha * attention_loss + (1 - alpha) * task_loss`` on the attention maps themselves.

  The softmax weights [B, heads, T, S] of every ``attention_layer`` module are
  captured in both models and stacked to [B, L, H, T, S]. Layers are
  average-pooled to the smaller count; when the head counts differ, both are
  averaged over heads. The default loss is the cosine distance between each
  query's attention row (over keys), averaged over real query tokens, heads and
  layers. No parameters are added.

  Args:
    student_forward_fn / teacher_forward_fn / labels_fn: see :class:`BaseStrategy`.
    attention_layer: the attention module class (None: :class:`easytunix.layers.attention.Attention`):
      any class that can report its softmax weights: easytunix's ``Attention``, flax's
      ``nnx.MultiHeadAttention``, or any module whose ``__call__`` takes ``sow_weights`` and then
      sows ``"attention_weights"`` (flax's convention).
    alpha: weight of the attention loss; the task loss gets ``1 - alpha``.
    attention_loss_fn: ``fn(student_maps, teacher_maps[, mask=...]) -> scalar`` on the matched
      [B, L, H, T, S] maps (padded queries zeroed), instead of the cosine distance.
  """

  maps_key = "attention"
  seq_axis = 3  # the query axis of [B, L, H, T, S]

  def __init__(
      self,
      student_forward_fn: ModelForwardCallable[jax.Array] | None = None,
      teacher_forward_fn: ModelForwardCallable[jax.Array] | None = None,
      labels_fn: Callable[..., Any] | None = None,
      attention_layer: type[nnx.Module] | None = None,
      alpha: float = 0.75,
      attention_loss_fn: Callable[..., jax.Array] | None = None,
  ):
    attention_layer = attention_layer or _default_attention_layer()
    super().__init__(student_forward_fn, teacher_forward_fn, labels_fn, attention_layer, alpha, attention_loss_fn)
    self.attention_layer = attention_layer

  def map_loss(self, student_maps: jax.Array, teacher_maps: jax.Array, token_mask: jax.Array | None) -> jax.Array:
    student, teacher = match_attention(student_maps, teacher_maps)
    if self.loss_fn is not None:
      return self.custom_loss(student, teacher, token_mask)
    distance = cosine_distance(student, teacher, axis=-1)  # [B, L, H, T]
    weights = self.token_weights(token_mask, student)
    return masked_mean(distance, None if weights is None else weights[..., 0])


class AttentionProjectionStrategy(IntermediateStrategy):
  """``loss = alpha * attention_loss + (1 - alpha) * task_loss`` with a learned head projection.

  Attention maps are captured as in :class:`AttentionTransferStrategy`; layers
  are average-pooled to the smaller count, and a per-layer linear map mixes the
  student's heads into the teacher's (H_student -> H_teacher), starting as the
  student's head average. :meth:`pre_process_models` adds it to the student as
  ``student.distillation_attention_projection`` (shapes traced from
  ``dummy_input``); :meth:`post_process_models` removes it. The default loss is
  the mean squared error over real query tokens.

  Args:
    student_forward_fn / teacher_forward_fn / labels_fn: see :class:`BaseStrategy`.
    attention_layer: the attention module class (None: easytunix's Attention); any class
      :class:`AttentionTransferStrategy` accepts (e.g. ``nnx.MultiHeadAttention``).
    dummy_input: a batch of model inputs used to trace the shapes (None: 1 x 8 tokens).
    rngs: initialises the projection (None: ``nnx.Rngs(0)``).
    alpha: weight of the attention loss; the task loss gets ``1 - alpha``.
    attention_loss_fn: ``fn(projected_student, teacher[, mask=...]) -> scalar`` instead of the MSE.
  """

  maps_key = "attention"
  seq_axis = 3  # the query axis of [B, L, H, T, S]
  projection_name = "distillation_attention_projection"

  def __init__(
      self,
      student_forward_fn: ModelForwardCallable[jax.Array] | None = None,
      teacher_forward_fn: ModelForwardCallable[jax.Array] | None = None,
      labels_fn: Callable[..., Any] | None = None,
      attention_layer: type[nnx.Module] | None = None,
      dummy_input: dict[str, jax.Array] | None = None,
      rngs: nnx.Rngs | None = None,
      alpha: float = 0.75,
      attention_loss_fn: Callable[..., jax.Array] | None = None,
  ):
    attention_layer = attention_layer or _default_attention_layer()
    super().__init__(student_forward_fn, teacher_forward_fn, labels_fn, attention_layer, alpha, attention_loss_fn)
    self.attention_layer = attention_layer
    self.dummy_input = dummy_input
    self.rngs = rngs if rngs is not None else nnx.Rngs(0)
    self.projection: LayerwiseProjection | None = None

  def make_projection(self, student_maps: jax.ShapeDtypeStruct, teacher_maps: jax.ShapeDtypeStruct) -> LayerwiseProjection:
    num_layers = min(student_maps.shape[1], teacher_maps.shape[1])
    student_heads, teacher_heads = student_maps.shape[2], teacher_maps.shape[2]

    def init(key, shape):  # the head average, plus a little noise to break the symmetry
      return jnp.full(shape, 1.0 / student_heads, jnp.float32) + 0.01 * jax.random.normal(key, shape, jnp.float32)

    return LayerwiseProjection(num_layers, student_heads, teacher_heads, axis=2, rngs=self.rngs, init=init)

  def pre_process_models(self, student_model: nnx.Module, teacher_model: nnx.Module) -> tuple[nnx.Module, nnx.Module]:
    """Adds the learned head projection to the student; returns ``(student, teacher)``."""
    self._attach_projection(student_model, teacher_model, self.dummy_input)
    return student_model, teacher_model

  def post_process_models(self, student_model: nnx.Module, teacher_model: nnx.Module) -> tuple[nnx.Module, nnx.Module]:
    """Removes the projection (the student is a plain model again); returns ``(student, teacher)``."""
    self._detach_projection(student_model)
    return student_model, teacher_model

  def extra_trainable_paths(self) -> tuple[str, ...]:
    return (self.projection_name,)

  def map_loss(self, student_maps: jax.Array, teacher_maps: jax.Array, token_mask: jax.Array) -> jax.Array:
    teacher = self.pool_layers(teacher_maps.astype(jnp.float32), student_maps.shape[1])
    if student_maps.shape != teacher.shape:
      raise ValueError(
          f"Projected student attention {student_maps.shape} does not match the teacher's {teacher.shape}; "
          "the projection was built for other models or another dummy_input layout."
      )
    if self.loss_fn is not None:
      return self.custom_loss(student_maps, teacher, token_mask)
    return masked_mean((student_maps - teacher) ** 2, self.token_weights(token_mask, student_maps))


__all__ = ["AttentionProjectionStrategy", "AttentionTransferStrategy", "match_attention"]
