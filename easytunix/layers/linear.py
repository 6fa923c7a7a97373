"""A dense projection with an optional low-rank (LoRA) adapter built in."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class Linear(nnx.Module):
  """``y = x @ kernel (+ bias) (+ scale * (x @ lora_a) @ lora_b)``.

  The kernel is stored [in, out]. LoRA adapters are absent until
  ``easytunix.sft.lora.apply_lora`` adds them; then ``lora_a``/``lora_b`` are
  ``nnx.LoRAParam`` variables, so state filters can tell them from base weights.
  """

  def __init__(
      self,
      in_features: int,
      out_features: int,
      *,
      use_bias: bool = False,
      dtype: jnp.dtype = jnp.float32,
      param_dtype: jnp.dtype = jnp.float32,
      partition: tuple = (None, None),
      rngs: nnx.Rngs,
  ):
    self.in_features = in_features
    self.out_features = out_features
    self.dtype = dtype
    init = nnx.initializers.lecun_normal()
    self.kernel = nnx.Param(
        init(rngs.params(), (in_features, out_features), param_dtype), partition=partition
    )
    self.bias = (
        nnx.Param(jnp.zeros((out_features,), param_dtype), partition=(partition[-1],))
        if use_bias
        else None
    )
    self.lora_a: nnx.LoRAParam | None = None
    self.lora_b: nnx.LoRAParam | None = None
    self.lora_scale: float = 0.0

  def merged_kernel(self) -> jax.Array:
    """The kernel with the adapters folded in (``kernel + scale * lora_a @ lora_b``, summed in float32).

    Without adapters, the kernel itself. The module is not changed.
    """
    kernel = self.kernel[...]
    if self.lora_a is None:
      return kernel
    delta = (self.lora_a[...].astype(jnp.float32) @ self.lora_b[...].astype(jnp.float32)) * self.lora_scale
    return (kernel.astype(jnp.float32) + delta).astype(kernel.dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.astype(self.dtype)
    y = x @ self.kernel[...].astype(self.dtype)
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    if self.lora_a is not None:
      lora = (x @ self.lora_a[...].astype(self.dtype)) @ self.lora_b[...].astype(self.dtype)
      y = y + lora * jnp.asarray(self.lora_scale, self.dtype)
    return y
