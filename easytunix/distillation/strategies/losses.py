"""The loss maths strategies share: masked means, the task cross-entropy, distances and pooling."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from easytunix.distillation.strategies.defaults import TokenLabels


def masked_mean(values: jax.Array, mask: jax.Array | None) -> jax.Array:
  """Mean of ``values`` over the entries where ``mask`` (broadcast to its shape) is True; 0 when none is."""
  values = values.astype(jnp.float32)
  if mask is None:
    return values.mean()
  weights = jnp.broadcast_to(jnp.asarray(mask).astype(jnp.float32), values.shape)
  return jnp.where(weights > 0, values, 0.0).sum() / jnp.maximum(weights.sum(), 1.0)


def task_loss(logits: jax.Array, labels: Any) -> jax.Array:
  """Cross-entropy of ``logits`` [..., V] against ``labels``.

  ``labels`` is a :class:`TokenLabels` (masked mean over its mask), integer
  ids [...] or a distribution / one-hot array [..., V] (plain mean).
  """
  logits = logits.astype(jnp.float32)
  if isinstance(labels, TokenLabels):
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, labels.targets)
    return masked_mean(nll, labels.mask)
  labels = jnp.asarray(labels)
  if labels.shape == logits.shape:
    return optax.softmax_cross_entropy(logits, labels.astype(jnp.float32)).mean()
  if labels.shape == logits.shape[:-1] and jnp.issubdtype(labels.dtype, jnp.integer):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  raise ValueError(
      f"Labels of shape {labels.shape} do not fit logits of shape {logits.shape}: a labels_fn returns a "
      "TokenLabels, integer ids shaped like the logits without the vocabulary axis, or one-hot labels shaped like them."
  )


def label_mask(labels: Any) -> jax.Array | None:
  """The positions a loss counts (None: all)."""
  return labels.mask if isinstance(labels, TokenLabels) else None


def count_tokens(labels: Any, logits_shape: tuple[int, ...] | None = None) -> jax.Array:
  """How many positions the task loss averages over (weights micro-batches in accumulation)."""
  if isinstance(labels, TokenLabels):
    return jnp.asarray(labels.mask).astype(jnp.float32).sum()
  shape = jnp.shape(labels)
  if logits_shape is not None and tuple(shape) == tuple(logits_shape):
    shape = shape[:-1]
  return jnp.asarray(float(np.prod(shape)), jnp.float32)


def cosine_distance(a: jax.Array, b: jax.Array, axis: int | tuple[int, ...] = -1, eps: float = 1e-8) -> jax.Array:
  """``1 - cos(a, b)`` along ``axis`` (the axis is reduced); zero vectors count as orthogonal."""
  a, b = a.astype(jnp.float32), b.astype(jnp.float32)
  # max() before sqrt keeps the gradient finite at zero vectors (padding).
  norm_a = jnp.sqrt(jnp.maximum((a * a).sum(axis), eps * eps))
  norm_b = jnp.sqrt(jnp.maximum((b * b).sum(axis), eps * eps))
  return 1.0 - (a * b).sum(axis) / (norm_a * norm_b)


def pooling_matrix(size_in: int, size_out: int) -> np.ndarray:
  """[size_out, size_in] averaging weights of adaptive average pooling.

  Output i averages inputs ``floor(i * n / m)`` to ``ceil((i + 1) * n / m) - 1``
  (n inputs, m outputs): equal groups when m divides n, overlapping bins otherwise.
  """
  if size_out > size_in:
    raise ValueError(f"Pooling shrinks an axis; cannot pool {size_in} entries to {size_out}.")
  weights = np.zeros((size_out, size_in), np.float32)
  for i in range(size_out):
    start = (i * size_in) // size_out
    stop = -(-((i + 1) * size_in) // size_out)
    weights[i, start:stop] = 1.0 / (stop - start)
  return weights


def adaptive_avg_pool(x: jax.Array, size: int, axis: int) -> jax.Array:
  """Average-pools ``axis`` of ``x`` to ``size`` entries (unchanged when it already has that many)."""
  axis = axis % x.ndim
  if x.shape[axis] == size:
    return x
  weights = jnp.asarray(pooling_matrix(x.shape[axis], size))
  moved = jnp.moveaxis(x.astype(jnp.float32), axis, -1)
  return jnp.moveaxis(moved @ weights.T, -1, axis)


def pool_layers(maps: jax.Array, num_layers: int) -> jax.Array:
  """Average-pools the layer axis (1) of [B, L, ...] maps to ``num_layers``."""
  return adaptive_avg_pool(maps, num_layers, axis=1)


def pool_to_shape(x: jax.Array, shape: tuple[int, ...], what: str = "maps") -> jax.Array:
  """Average-pools every axis of ``x`` down to ``shape`` (same rank; no axis may grow)."""
  if x.ndim != len(shape):
    raise ValueError(f"Cannot pool {what} of shape {x.shape} to {tuple(shape)}: the ranks differ.")
  for axis, (size, target) in enumerate(zip(x.shape, shape)):
    if size < target:
      raise ValueError(f"Cannot pool {what} of shape {x.shape} to {tuple(shape)}: axis {axis} would grow.")
    x = adaptive_avg_pool(x, target, axis)
  return x


def pool_to_common(a: jax.Array, b: jax.Array, what: str = "maps") -> tuple[jax.Array, jax.Array]:
  """Average-pools both arrays to their common (per-axis smallest) shape; any rank, any layout."""
  if a.ndim != b.ndim:
    raise ValueError(f"The student's {what} {a.shape} and the teacher's {b.shape} have different ranks.")
  common = tuple(min(x, y) for x, y in zip(a.shape, b.shape))
  return pool_to_shape(a, common, what), pool_to_shape(b, common, what)


def token_weights(token_mask: jax.Array | None, ndim: int, seq_axis: int) -> jax.Array | None:
  """A [B, T] mask reshaped to broadcast over [B, ..., T (at seq_axis), ...] maps (None stays None)."""
  if token_mask is None:
    return None
  mask = jnp.asarray(token_mask).astype(jnp.float32)
  shape = [1] * ndim
  shape[0], shape[seq_axis] = mask.shape[0], mask.shape[1]
  return mask.reshape(shape)


def stack_layers(values: list[jax.Array], what: str) -> jax.Array:
  """Stacks per-layer arrays [B, ...] into [B, L, ...] (they must share a shape)."""
  shapes = {tuple(v.shape) for v in values}
  if len(shapes) != 1:
    raise ValueError(
        f"The captured {what} have different shapes {sorted(shapes)}; choose a layer class whose instances "
        "all produce the same shape (e.g. the decoder layer)."
    )
  return jnp.stack(values, axis=1)


def call_loss_fn(fn: Callable[..., jax.Array], student: jax.Array, teacher: jax.Array, mask: jax.Array | None) -> jax.Array:
  """Calls a user's loss ``fn(student, teacher)`` (or ``fn(student, teacher, mask=...)`` when it takes a mask)."""
  try:
    takes_mask = "mask" in inspect.signature(fn).parameters
  except (TypeError, ValueError):
    takes_mask = False
  out = fn(student, teacher, mask=mask) if takes_mask else fn(student, teacher)
  return jnp.asarray(out, jnp.float32).mean()


def check_alpha(alpha: float) -> float:
  """``alpha`` as a float, or a ValueError when it is outside [0, 1]."""
  if not 0.0 <= float(alpha) <= 1.0:
    raise ValueError(f"alpha must be in [0, 1], got {alpha!r}.")
  return float(alpha)


__all__ = [
    "adaptive_avg_pool",
    "call_loss_fn",
    "check_alpha",
    "cosine_distance",
    "count_tokens",
    "label_mask",
    "masked_mean",
    "pool_layers",
    "pool_to_common",
    "pool_to_shape",
    "pooling_matrix",
    "stack_layers",
    "task_loss",
    "token_weights",
]
