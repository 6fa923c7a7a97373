"""The learned projection that projection strategies add to the student."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx


class LayerwiseProjection(nnx.Module):
  """One learned linear map per layer along one axis of [B, L, ...] maps (student -> teacher sizes).

  Args:
    num_layers: L.
    in_features / out_features: the size of ``axis`` before and after.
    axis: the projected axis of the [B, L, ...] input (e.g. -1 for features [B, L, T, D],
      2 for the heads of attention maps [B, L, H, T, S]).
    init: ``init(key, shape) -> kernel`` [L, in, out].
  """

  def __init__(
      self,
      num_layers: int,
      in_features: int,
      out_features: int,
      axis: int,
      *,
      rngs: nnx.Rngs,
      init: Callable[[jax.Array, tuple[int, ...]], jax.Array] | None = None,
  ):
    init = init or (lambda key, shape: jax.random.normal(key, shape, jnp.float32) * in_features**-0.5)
    self.axis = axis
    self.kernel = nnx.Param(init(rngs.params(), (num_layers, in_features, out_features)))

  def __call__(self, x: jax.Array) -> jax.Array:
    moved = jnp.moveaxis(x.astype(jnp.float32), self.axis, -1)  # [B, L, ..., in]
    kernel = self.kernel[...]
    extra = moved.ndim - 3
    kernel = kernel.reshape(kernel.shape[:1] + (1,) * extra + kernel.shape[1:])  # [L, 1.., in, out]
    projected = (moved[..., None, :] @ kernel)[..., 0, :]
    return jnp.moveaxis(projected, -1, self.axis)


def replicate_on_devices_of(module: nnx.Module, reference: nnx.Module) -> None:
  """Moves ``module``'s arrays, replicated, onto the mesh (or device) of ``reference``'s parameters.

  A projection built on the host then trains next to a student that is already sharded.
  """
  leaves = jax.tree.leaves(nnx.state(reference, nnx.Param))
  if not leaves or not hasattr(leaves[0], "sharding"):
    return
  sharding = leaves[0].sharding
  if isinstance(sharding, jax.sharding.NamedSharding):
    target = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
  else:
    target = jax.sharding.SingleDeviceSharding(next(iter(leaves[0].devices())))
  state = nnx.state(module)
  nnx.update(module, jax.tree.map(lambda x: jax.device_put(x, target), state))


__all__ = ["LayerwiseProjection", "replicate_on_devices_of"]
