"""A dense projection with an optional low-rank (LoRA) adapter built in."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from easytunix.layers.quantization import QuantizedKernel


@jax.jit
def _merge_lora(kernel: jax.Array, lora_a: jax.Array, lora_b: jax.Array, scale: jax.Array) -> jax.Array:
  """``kernel + scale * lora_a @ lora_b``, summed in float32, in the kernel's dtype: one compiled call per
  shape (a weight sync merges every adapted kernel each GRPO step; op by op that was ~12 ms per kernel)."""
  delta = (lora_a.astype(jnp.float32) @ lora_b.astype(jnp.float32)) * scale
  return (kernel.astype(jnp.float32) + delta).astype(kernel.dtype)


# A Linear inside ``out_major_kernels`` takes its [out, in] copy for inputs of at most this many rows.
# XLA:CPU (YNNPACK), SmolLM2-135M's projections over 30 layers: on an AMD EPYC 1.0-1.1x at 1 row, 1.26x
# at 16, 1.2x at 32, and a one-prompt prefill of ~45 rows 3% slower; on an Intel Xeon (AVX-512) the
# [rows, in] @ [in, out] product of 40-48 rows costs as much as one of 64 (1.2-1.45x with the copies at
# 40-64 rows), and SmolLM2's one-prompt first token takes ~7% less time with them (89 vs 96 ms).
OUT_MAJOR_ROWS = 64

_OUT_MAJOR: contextvars.ContextVar[dict[int, jax.Array] | None] = contextvars.ContextVar(
    "easytunix_out_major", default=None)


def out_major_targets(model: nnx.Module) -> list[tuple[str, Linear]]:
  """The Linear layers of ``model`` that ``out_major_kernels`` can serve, with their paths ("layers/0/attn/q_proj")."""
  return [
      ("/".join(map(str, path)), m)
      for path, m in nnx.iter_modules(model)
      if isinstance(m, Linear) and not m.quantized
  ]


@jax.jit
def out_major_copies(kernels: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
  """``{path: kernel.T}``: the [out, in] copies that ``out_major_kernels`` takes (one compiled call for all)."""
  return {path: kernel.T for path, kernel in kernels.items()}


@contextlib.contextmanager
def out_major_kernels(model: nnx.Module, kernels: Mapping[str, jax.Array] | None) -> Iterator[None]:
  """Within the block, ``model``'s Linear layers multiply few rows by the [out, in] copies in ``kernels``.

  For inputs of at most ``OUT_MAJOR_ROWS`` rows a Linear whose path (see ``out_major_targets``) is in
  ``kernels`` computes ``(kernel_t @ x.T).T``: the same products as ``x @ kernel``, which XLA:CPU runs
  ~20% faster for a decode step's few rows (it reads the [out, in] weights in place instead of packing
  the [in, out] ones on every call). Each copy must be ``kernel.astype(dtype).T`` of that layer's
  current kernel and compute dtype (``out_major_copies``); the caller keeps them current. None or an
  empty mapping changes nothing. Used by the Sampler on CPU (see ``Sampler``).
  """
  table = {}
  for path, m in out_major_targets(model) if kernels else ():
    copy = kernels.get(path)
    if copy is None:
      continue
    if copy.shape != (m.out_features, m.in_features) or copy.dtype != jnp.dtype(m.dtype):
      raise ValueError(
          f"out_major_kernels: the copy for {path} is {copy.dtype}{list(copy.shape)}, but that layer needs "
          f"{jnp.dtype(m.dtype)}{[m.out_features, m.in_features]} (its kernel, transposed, in its compute dtype)."
      )
    table[id(m)] = copy
  token = _OUT_MAJOR.set(table or None)
  try:
    yield
  finally:
    _OUT_MAJOR.reset(token)


class Linear(nnx.Module):
  """``y = x @ kernel (+ bias) (+ scale * (x @ lora_a) @ lora_b)``.

  The kernel is stored [in, out]. LoRA adapters are absent until
  ``easytunix.sft.lora.apply_lora`` adds them; then ``lora_a``/``lora_b`` are
  ``nnx.LoRAParam`` variables, so state filters can tell them from base weights.
  ``easytunix.sft.lora.quantize_base`` replaces the kernel by a frozen
  :class:`~easytunix.layers.quantization.QuantizedKernel` (QLoRA); it is then
  dequantized on the fly, in the compute dtype, at every call (and again in the
  backward pass, rather than kept in memory until then). Within ``out_major_kernels``
  (the Sampler's programs on CPU) a few rows multiply by an [out, in] copy of the kernel.
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

  @property
  def quantized(self) -> bool:
    """Whether the kernel is a frozen :class:`QuantizedKernel` (see ``easytunix.sft.lora.quantize_base``)."""
    return isinstance(self.kernel, QuantizedKernel)

  def merged_kernel(self) -> jax.Array:
    """The kernel with the adapters folded in (``kernel + scale * lora_a @ lora_b``, summed in float32).

    Without adapters, the kernel itself. A quantized kernel is dequantized (in float32) and
    the result has the kernel's dtype from before quantization: full precision. The module
    is not changed.
    """
    if self.quantized:
      base = self.kernel.dequantize(jnp.float32)
      if self.lora_a is None:
        return base.astype(self.kernel.param_dtype)
      delta = (self.lora_a[...].astype(jnp.float32) @ self.lora_b[...].astype(jnp.float32)) * self.lora_scale
      return (base + delta).astype(self.kernel.param_dtype)
    kernel = self.kernel[...]
    if self.lora_a is None:
      return kernel
    return _merge_lora(kernel, self.lora_a[...], self.lora_b[...], jnp.float32(self.lora_scale))

  def __call__(self, x: jax.Array) -> jax.Array:
    # Every product is a 2-D matmul over the flattened leading axes: with [B, T, in] operands
    # XLA:CPU copies the backward pass's [B, T, out] gradients into a transposed layout for the
    # weight-gradient dots (about half of a LoRA step's time went there); reshapes are free.
    lead = x.shape[:-1]
    x = x.reshape(-1, x.shape[-1]).astype(self.dtype)
    copies = _OUT_MAJOR.get()
    kernel_t = None if copies is None or x.shape[0] > OUT_MAJOR_ROWS else copies.get(id(self))
    if kernel_t is not None:
      # The barrier keeps XLA from folding the transposes back into x @ kernel.
      y = jax.lax.optimization_barrier(kernel_t @ x.T).T
    elif self.quantized:
      y = self.kernel.matmul(x, self.dtype)
    else:
      y = x @ self.kernel[...].astype(self.dtype)
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    if self.lora_a is not None:
      # The scale goes on lora_b ([rank, out]), not on the [tokens, out] product: scaling the
      # product costs a pass over a [tokens, out] array forward and another over its gradient.
      # Measured on a SmolLM2-135M LoRA step (4 x 256 tokens, XLA:CPU): 5.05 -> 4.79 s (median).
      lora_b = self.lora_b[...].astype(self.dtype) * jnp.asarray(self.lora_scale, self.dtype)
      y = y + (x @ self.lora_a[...].astype(self.dtype)) @ lora_b
    return y.reshape(*lead, y.shape[-1])
