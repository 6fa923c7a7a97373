"""RMS normalisation, in the standard (w * x) and Gemma (1 + w) * x forms."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class RMSNorm(nnx.Module):
  """Root-mean-square layer norm.

  The statistics are computed in float32 whatever the input dtype, as the
  reference implementations do.

  Args:
    dim: size of the normalised (last) axis.
    eps: added to the mean square before the reciprocal square root.
    unit_offset: Gemma's form: scale by ``1 + w`` with ``w`` initialised to 0.
    param_dtype: dtype of the stored scale.
    partition: logical sharding of the scale (see ``ShardingConfig``).
  """

  def __init__(
      self,
      dim: int,
      *,
      eps: float = 1e-6,
      unit_offset: bool = False,
      param_dtype: jnp.dtype = jnp.float32,
      partition: tuple = (None,),
  ):
    self.eps = eps
    self.unit_offset = unit_offset
    init = jnp.zeros if unit_offset else jnp.ones
    self.scale = nnx.Param(init((dim,), param_dtype), partition=partition)

  def __call__(self, x: jax.Array) -> jax.Array:
    dtype = x.dtype
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    scale = self.scale[...].astype(jnp.float32)
    if self.unit_offset:
      return (normed * (1.0 + scale)).astype(dtype)
    # The standard form multiplies in the input dtype after casting back, like the reference.
    return self.scale[...].astype(dtype) * normed.astype(dtype)
