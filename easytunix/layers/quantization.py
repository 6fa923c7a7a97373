"""Blockwise absmax quantization of 2-D kernels (the frozen base of QLoRA).

A kernel [in, out] is cut into blocks of ``block_size`` consecutive input rows;
each block of each output column keeps one float32 scale (its largest |w|), and
every weight becomes a small integer code:

* ``"nf4"``: the nearest of the 16 NormalFloat-4 levels of QLoRA (Dettmers et al.,
  2023), which are quantiles of a standard normal, so a normally distributed
  block uses every code about equally often. Two codes per uint8.
* ``"int4"``: symmetric integers -7..7 (``round(w / (absmax / 7))``), two per uint8.
* ``"int8"``: symmetric integers -127..127, one int8 each.

Stored bytes per weight: ``0.5 + 4 / block_size`` for 4-bit methods, ``1 + 4 / block_size``
for int8 (0.5625 and 1.0625 at the default block of 64). Everything is plain
``jnp``, so it traces under ``jax.jit`` and ``nnx.eval_shape``.

:class:`QuantizedKernel` is what replaces ``Linear.kernel`` after
``easytunix.sft.lora.quantize_base``; its arrays are :class:`QuantizedWeight`
variables, not ``nnx.Param``, so optimizers and ``nnx.Param`` filters never see them.
"""

from __future__ import annotations

import functools
import statistics
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from easytunix.layers.sharding import Axes, divisible_axes, variable_sharding

QUANTIZATION_METHODS: tuple[str, ...] = ("nf4", "int4", "int8")
DEFAULT_BLOCK_SIZE = 64

_BITS = {"nf4": 4, "int4": 4, "int8": 8}
_INT_MAX = {"int4": 7, "int8": 127}


def _normal_float_levels() -> np.ndarray:
  """The 16 NormalFloat-4 levels, ascending, in [-1, 1] with an exact 0 (index 7).

  Following the construction of the QLoRA paper: 8 quantiles of N(0, 1) for the
  positive half and 7 for the negative half (so that 0 is a level and 16 values
  remain), each half spread evenly in probability from 0.5 to an outermost
  probability ``p``, then divided by the largest so the levels end at -1 and 1.
  The normal quantile of 1 is infinite, so ``p`` stops short of 1 by the mean of
  the half-step margins ``1/(2*16)`` and ``1/(2*15)`` of 16 and 15 evenly spaced
  points: ``p = 1 - (1/32 + 1/30) / 2 = 0.9677...``, the value the paper uses.
  Python's ``statistics.NormalDist`` gives the quantiles (no dependency).
  """
  inv_cdf = statistics.NormalDist().inv_cdf
  p = 1.0 - 0.5 * (1.0 / 32.0 + 1.0 / 30.0)
  positive = [inv_cdf(q) for q in np.linspace(p, 0.5, 9)[:-1]]  # 8 values, the quantile of 0.5 (zero) dropped
  negative = [-inv_cdf(q) for q in np.linspace(p, 0.5, 8)[:-1]]  # 7 values
  levels = np.sort(np.array(positive + negative + [0.0]))
  return (levels / levels.max()).astype(np.float32)


NF4_LEVELS: np.ndarray = _normal_float_levels()
# Decision thresholds: a value goes to the level whose midpoint interval holds it (the nearest level).
_NF4_MIDPOINTS: np.ndarray = ((NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2).astype(np.float32)


class QuantizedWeight(nnx.Variable):
  """Frozen storage of a quantized kernel (its codes or its scales).

  Not an ``nnx.Param``: optimizers, ``nnx.Param`` filters and the trainer's
  trainable filter never select it, so it is never trained.
  """


def check_method(method: Any) -> None:
  """Raises a ValueError unless ``method`` is one of :data:`QUANTIZATION_METHODS`."""
  if method not in QUANTIZATION_METHODS:
    import difflib

    close = difflib.get_close_matches(str(method), QUANTIZATION_METHODS, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"Quantization method must be one of {list(QUANTIZATION_METHODS)}, got {method!r}.{hint}")


def check_block_size(shape: tuple[int, ...], method: str, block_size: int, name: str = "kernel") -> None:
  """Raises a ValueError unless a kernel of ``shape`` [in, out] can be quantized in blocks of ``block_size``."""
  if not isinstance(block_size, (int, np.integer)) or isinstance(block_size, bool) or block_size <= 0:
    raise ValueError(f"block_size must be a positive int, got {block_size!r}.")
  if len(shape) != 2:
    raise ValueError(f"Only 2-D kernels [in, out] are quantized; {name} has shape {tuple(shape)}.")
  if _BITS[method] == 4 and block_size % 2:
    raise ValueError(
        f"block_size={block_size} is odd; {method!r} packs two 4-bit codes per byte along the input "
        "dimension, so the block size must be even (e.g. 64)."
    )
  if shape[0] % block_size:
    divisors = [b for b in (256, 128, 64, 32, 16, 8, 4, 2) if shape[0] % b == 0 and b < block_size]
    fix = f"block_size={divisors[0]}" if divisors else "a block_size that divides it"
    raise ValueError(
        f"Cannot quantize {name} of shape {tuple(shape)} [in, out] in blocks of {block_size}: the input "
        f"dimension {shape[0]} is not a multiple of block_size={block_size}. Use {fix}, or leave this "
        "module out of the quantization targets."
    )


def quantized_shapes(shape: tuple[int, int], method: str, block_size: int) -> tuple[tuple[int, int], tuple[int, int]]:
  """``(codes shape, scales shape)`` of a kernel of ``shape`` [in, out]."""
  n_in, n_out = shape
  rows = n_in // 2 if _BITS[method] == 4 else n_in
  return (rows, n_out), (n_in // block_size, n_out)


def bytes_per_parameter(method: str, block_size: int = DEFAULT_BLOCK_SIZE) -> float:
  """Stored bytes per weight: the code plus a float32 scale shared by ``block_size`` weights."""
  check_method(method)
  return _BITS[method] / 8 + 4 / block_size


def quantize(
    kernel: jax.Array, method: str = "nf4", block_size: int = DEFAULT_BLOCK_SIZE
) -> tuple[jax.Array, jax.Array]:
  """Quantizes ``kernel`` [in, out] blockwise along ``in``.

  Args:
    kernel: a 2-D float array [in, out].
    method: "nf4", "int4" or "int8".
    block_size: input rows sharing one scale; it must divide ``in`` (and be even for 4-bit methods).

  Returns:
    ``(codes, scales)``: codes uint8 [in // 2, out] (4-bit: row ``2i`` in the low nibble, row
    ``2i + 1`` in the high one) or int8 [in, out]; scales float32 [in // block_size, out].

  Raises:
    ValueError: an unknown method or a block size that does not fit the kernel.
  """
  check_method(method)
  check_block_size(tuple(kernel.shape), method, block_size)
  return _quantize(kernel, method, block_size)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _quantize(kernel: jax.Array, method: str, block_size: int) -> tuple[jax.Array, jax.Array]:
  # Jitted (compiled once per shape when called eagerly; inlined inside an outer jit or eval_shape).
  n_in, n_out = kernel.shape
  w = kernel.astype(jnp.float32).reshape(n_in // block_size, block_size, n_out)
  absmax = jnp.max(jnp.abs(w), axis=1)  # [blocks, out]
  if method == "nf4":
    scales = absmax
    x = w / jnp.where(absmax > 0, absmax, 1.0)[:, None, :]  # in [-1, 1]
    q = jnp.zeros(x.shape, jnp.uint8)
    for threshold in _NF4_MIDPOINTS:  # the level index is how many thresholds lie below x
      q = q + (x > threshold).astype(jnp.uint8)
  else:
    qmax = _INT_MAX[method]
    scales = absmax / qmax
    q = jnp.clip(jnp.round(w / jnp.where(scales > 0, scales, 1.0)[:, None, :]), -qmax, qmax)
    if method == "int8":
      return q.astype(jnp.int8).reshape(n_in, n_out), scales
    q = (q + 8).astype(jnp.uint8)  # -7..7 stored as 1..15
  q = q.reshape(n_in // 2, 2, n_out)
  return q[:, 0, :] | (q[:, 1, :] << 4), scales


def dequantize(codes: jax.Array, scales: jax.Array, method: str, dtype: Any = jnp.float32) -> jax.Array:
  """The kernel [in, out] that ``codes`` and ``scales`` (from :func:`quantize`) stand for, in ``dtype``.

  Computed in float32 (``level * scale``) and cast once, so every dtype rounds the same values.
  """
  check_method(method)
  return _dequantize(codes, scales, method, jnp.dtype(dtype))


@functools.partial(jax.jit, static_argnums=(2, 3))
def _dequantize(codes: jax.Array, scales: jax.Array, method: str, dtype: Any) -> jax.Array:
  if _BITS[method] == 4:
    q = jnp.stack([codes & 0x0F, codes >> 4], axis=1).reshape(codes.shape[0] * 2, codes.shape[1])
    if method == "nf4":
      values = jnp.asarray(NF4_LEVELS)[q]
    else:
      values = q.astype(jnp.float32) - 8.0
  else:
    values = codes.astype(jnp.float32)
  n_in, n_out = values.shape
  blocks = scales.shape[0]
  values = values.reshape(blocks, n_in // blocks, n_out) * scales.astype(jnp.float32)[:, None, :]
  return values.reshape(n_in, n_out).astype(dtype)


@functools.partial(jax.checkpoint, static_argnums=(3, 4))
def _dequantized_matmul(x: jax.Array, codes: jax.Array, scales: jax.Array, method: str, dtype: Any) -> jax.Array:
  # Under jax.checkpoint the backward pass keeps only x, codes and scales and dequantizes again: without
  # it autodiff saves every layer's dequantized kernel (the whole base in the compute dtype) until the
  # backward pass, which would undo most of what quantizing saved.
  return x @ _dequantize(codes, scales, method, dtype)


class QuantizedKernel(nnx.Module):
  """A frozen, quantized ``Linear.kernel``: ``codes`` and ``scales`` (:class:`QuantizedWeight`) plus what decodes them.

  ``kernel[...]`` reads the dequantized kernel in its original dtype, so code that
  only reads a Linear's kernel works unchanged; writing is refused (the base is frozen).

  Attributes:
    method / block_size: how it was quantized.
    shape: the kernel's shape [in, out].
    param_dtype: the kernel's dtype before quantization (what exports write).
    partition: the kernel's logical sharding axes (codes and scales use them where they divide).
  """

  def __init__(self, codes: Any, scales: Any, *, method: str, block_size: int, shape: tuple[int, int],
               param_dtype: Any, partition: Axes = (None, None)):
    partition = tuple(partition)
    # replicate_indivisible: a placement onto a mesh (shard_model, RL weight copies) replicates an axis that
    # does not divide the (smaller) code or scale dimension instead of refusing it.
    self.codes = QuantizedWeight(codes, partition=partition, replicate_indivisible=True)
    self.scales = QuantizedWeight(scales, partition=partition, replicate_indivisible=True)
    self.method = method
    self.block_size = int(block_size)
    self.shape = tuple(int(d) for d in shape)
    self.param_dtype = jnp.dtype(param_dtype)
    self.partition = partition

  @classmethod
  def from_kernel(cls, kernel: Any, method: str = "nf4", block_size: int = DEFAULT_BLOCK_SIZE, *,
                  partition: Axes = (None, None), name: str = "kernel") -> "QuantizedKernel":
    """Quantizes ``kernel`` (a concrete array, a tracer or a ``jax.ShapeDtypeStruct``).

    A kernel placed on a mesh gives codes and scales on that mesh with the kernel's
    row/column axes, each replicated where it does not divide the smaller dimension.
    """
    check_method(method)
    shape = tuple(kernel.shape)
    check_block_size(shape, method, block_size, name)
    partition = (tuple(partition or ()) + (None, None))[:2]
    sharding = getattr(kernel, "sharding", None) if not isinstance(kernel, jax.core.Tracer) else None
    mesh = sharding.mesh if isinstance(sharding, jax.sharding.NamedSharding) else None
    out_shardings = None
    if mesh is not None:
      out_shardings = tuple(
          variable_sharding(f"{name}.{part}", s, divisible_axes(s, partition, mesh), mesh)
          for part, s in zip(("codes", "scales"), quantized_shapes(shape, method, block_size))
      )

    if isinstance(kernel, jax.ShapeDtypeStruct):
      codes, scales = jax.eval_shape(_quantize, kernel, method, block_size)
      if out_shardings is not None:
        codes, scales = (jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)
                         for a, s in zip((codes, scales), out_shardings))
    elif out_shardings is not None:
      codes, scales = _placed_quantizer(method, block_size, out_shardings)(kernel)
    else:
      codes, scales = _quantize(kernel, method, block_size)
    return cls(codes, scales, method=method, block_size=block_size, shape=shape, param_dtype=kernel.dtype,
               partition=partition)

  def dequantize(self, dtype: Any = None) -> jax.Array:
    """The kernel in ``dtype`` (default: its original dtype); no gradient flows into the stored arrays."""
    scales = jax.lax.stop_gradient(self.scales[...])
    return dequantize(self.codes[...], scales, self.method, self.param_dtype if dtype is None else dtype)

  def matmul(self, x: jax.Array, dtype: Any) -> jax.Array:
    """``x @ kernel`` with the kernel dequantized in ``dtype``; no dequantized kernel is kept for the backward pass.

    The backward pass dequantizes again from the codes (cheap, elementwise) instead of
    holding every layer's full kernel; no gradient flows into the codes or scales.
    """
    scales = jax.lax.stop_gradient(self.scales[...])
    return _dequantized_matmul(x, self.codes[...], scales, self.method, jnp.dtype(dtype))

  def __getitem__(self, index: Any) -> jax.Array:
    kernel = self.dequantize()
    return kernel if index is Ellipsis else kernel[index]

  def __setitem__(self, index: Any, value: Any) -> None:
    raise TypeError(
        f"This kernel is quantized ({self.method}, block {self.block_size}) and frozen; it cannot be assigned. "
        "Train LoRA adapters on it, or replace the whole kernel: linear.kernel = nnx.Param(new_kernel)."
    )

  @property
  def size(self) -> int:
    """Weights the kernel stands for (``in * out``)."""
    return int(np.prod(self.shape))

  @property
  def nbytes(self) -> int:
    """Bytes stored (codes plus scales)."""
    arrays = (self.codes.get_value(), self.scales.get_value())
    return sum(int(np.prod(a.shape)) * jnp.dtype(a.dtype).itemsize for a in arrays)


@functools.lru_cache(maxsize=64)
def _placed_quantizer(method: str, block_size: int, out_shardings: tuple) -> Any:
  """``quantize`` compiled to write its outputs straight into ``out_shardings`` (one wrapper per layout)."""
  return jax.jit(functools.partial(_quantize, method=method, block_size=block_size), out_shardings=out_shardings)


def quantized_kernels(model: nnx.Module) -> dict[str, QuantizedKernel]:
  """Every :class:`QuantizedKernel` inside ``model``, by dotted path ('layers.0.attn.q_proj.kernel')."""
  return {".".join(str(p) for p in path): m for path, m in nnx.iter_graph(model) if isinstance(m, QuantizedKernel)}


__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "NF4_LEVELS",
    "QUANTIZATION_METHODS",
    "QuantizedKernel",
    "QuantizedWeight",
    "bytes_per_parameter",
    "check_block_size",
    "check_method",
    "dequantize",
    "quantize",
    "quantized_kernels",
    "quantized_shapes",
]
