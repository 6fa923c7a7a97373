"""Gated feed-forward blocks: SwiGLU (silu) and GeGLU (tanh-approximated gelu)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from easytunix.layers.linear import Linear

ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
}


def get_activation(name: str):
  """Returns the activation function called ``name``."""
  try:
    return ACTIVATIONS[name]
  except KeyError:
    raise ValueError(f"Unknown activation {name!r}; expected one of {sorted(ACTIVATIONS)}.") from None


class MLP(nnx.Module):
  """``down(act(gate(x)) * up(x))``."""

  def __init__(
      self,
      hidden_size: int,
      intermediate_size: int,
      *,
      activation: str = "silu",
      dtype: jnp.dtype = jnp.float32,
      param_dtype: jnp.dtype = jnp.float32,
      shd=None,
      rngs: nnx.Rngs,
  ):
    from easytunix.layers.sharding import ShardingConfig

    shd = shd or ShardingConfig.none()
    self.activation = activation
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.gate_proj = Linear(hidden_size, intermediate_size, partition=shd.ffw_in, **kw)
    self.up_proj = Linear(hidden_size, intermediate_size, partition=shd.ffw_in, **kw)
    self.down_proj = Linear(intermediate_size, hidden_size, partition=shd.ffw_out, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    act = get_activation(self.activation)
    return self.down_proj(act(self.gate_proj(x)) * self.up_proj(x))
