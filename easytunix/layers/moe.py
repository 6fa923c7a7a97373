"""Top-k routed mixture of experts with SwiGLU experts (Qwen3-MoE semantics)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from easytunix.layers.linear import Linear
from easytunix.layers.mlp import get_activation


class MoELayer(nnx.Module):
  """Routes each token to its ``num_experts_per_tok`` highest-probability experts.

  Router probabilities are a softmax over all experts (float32); the top-k are
  renormalised to sum to one when ``norm_topk_prob``. Tokens are sorted by expert
  and each expert's slice runs as one grouped matmul (``jax.lax.ragged_dot``),
  so compute scales with k, not with the number of experts.
  """

  def __init__(
      self,
      hidden_size: int,
      moe_intermediate_size: int,
      num_experts: int,
      num_experts_per_tok: int,
      *,
      norm_topk_prob: bool = True,
      activation: str = "silu",
      dtype: jnp.dtype = jnp.float32,
      param_dtype: jnp.dtype = jnp.float32,
      shd=None,
      rngs: nnx.Rngs,
  ):
    from easytunix.layers.sharding import ShardingConfig

    if not 0 < num_experts_per_tok <= num_experts:
      raise ValueError(
          f"num_experts_per_tok must be in [1, num_experts={num_experts}], got {num_experts_per_tok}."
      )
    shd = shd or ShardingConfig.none()
    self.num_experts = num_experts
    self.num_experts_per_tok = num_experts_per_tok
    self.norm_topk_prob = norm_topk_prob
    self.activation = activation
    self.dtype = dtype
    self.router = Linear(hidden_size, num_experts, dtype=dtype, param_dtype=param_dtype, partition=shd.router, rngs=rngs)
    init = nnx.initializers.lecun_normal(in_axis=-2, out_axis=-1, batch_axis=(0,))
    e, d, i = num_experts, hidden_size, moe_intermediate_size
    self.gate_proj = nnx.Param(init(rngs.params(), (e, d, i), param_dtype), partition=shd.expert_in)
    self.up_proj = nnx.Param(init(rngs.params(), (e, d, i), param_dtype), partition=shd.expert_in)
    self.down_proj = nnx.Param(init(rngs.params(), (e, i, d), param_dtype), partition=shd.expert_out)

  def route(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Top-k expert weights and ids for tokens ``x`` [N, D]."""
    logits = self.router(x).astype(jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1)
    weights, experts = jax.lax.top_k(probs, self.num_experts_per_tok)
    if self.norm_topk_prob:
      weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights.astype(self.dtype), experts

  def __call__(self, x: jax.Array) -> jax.Array:
    shape = x.shape
    xt = x.reshape(-1, shape[-1]).astype(self.dtype)
    weights, experts = self.route(xt)
    k = self.num_experts_per_tok
    flat_experts = experts.reshape(-1)
    order = jnp.argsort(flat_experts, stable=True)
    token_of = order // k
    group_sizes = jnp.bincount(flat_experts, length=self.num_experts).astype(jnp.int32)
    xs = xt[token_of]
    act = get_activation(self.activation)
    gate = jax.lax.ragged_dot(xs, self.gate_proj[...].astype(self.dtype), group_sizes)
    up = jax.lax.ragged_dot(xs, self.up_proj[...].astype(self.dtype), group_sizes)
    ys = jax.lax.ragged_dot(act(gate) * up, self.down_proj[...].astype(self.dtype), group_sizes)
    y = jnp.zeros_like(ys).at[order].set(ys).reshape(xt.shape[0], k, shape[-1])
    out = jnp.sum(y * weights[..., None], axis=1)
    return out.reshape(shape).astype(self.dtype)
