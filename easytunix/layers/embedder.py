"""Token embedding and (tied) output projection."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx


class Embedder(nnx.Module):
  """Looks tokens up in ``embedding`` [vocab, dim]; ``decode`` projects back to logits.

  Args:
    vocab_size: number of token ids.
    hidden_size: model width.
    scale_by_sqrt_dim: multiply embeddings by sqrt(hidden_size) (Gemma).
  """

  def __init__(
      self,
      vocab_size: int,
      hidden_size: int,
      *,
      scale_by_sqrt_dim: bool = False,
      dtype: jnp.dtype = jnp.float32,
      param_dtype: jnp.dtype = jnp.float32,
      partition: tuple = (None, None),
      rngs: nnx.Rngs,
  ):
    self.vocab_size = vocab_size
    self.hidden_size = hidden_size
    self.scale_by_sqrt_dim = scale_by_sqrt_dim
    self.dtype = dtype
    init = nnx.initializers.normal(stddev=0.02)
    self.embedding = nnx.Param(
        init(rngs.params(), (vocab_size, hidden_size), param_dtype), partition=partition
    )

  def encode(self, tokens: jax.Array) -> jax.Array:
    x = jnp.take(self.embedding[...], tokens, axis=0).astype(self.dtype)
    if self.scale_by_sqrt_dim:
      x = x * jnp.asarray(math.sqrt(self.hidden_size), dtype=jnp.float32).astype(self.dtype)
    return x

  def decode(self, x: jax.Array) -> jax.Array:
    # One 2-D matmul over all positions: XLA:CPU transposes [B, T, ...] gradients into another layout
    # for batched 3-D operands; on every backend the reshapes are free.
    rows = x.reshape(-1, x.shape[-1]).astype(self.dtype)
    return (rows @ self.embedding[...].astype(self.dtype).T).reshape(*x.shape[:-1], self.vocab_size)
