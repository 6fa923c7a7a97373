"""``Linear`` inside ``out_major_kernels``: few rows multiply by the [out, in] copies, with the same values."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from easytunix.layers import linear as linear_lib
from easytunix.layers.linear import Linear, out_major_copies, out_major_kernels, out_major_targets
from easytunix.sft.lora import apply_lora, quantize_base

IN, OUT = 24, 40
# float32 sums of 24 products of O(1): a few ulps of O(5) whatever the summation order.
TOL = 1e-5


class Block(nnx.Module):
  """Two projections, as a model's attention block names them (so LoRA's default targets find them)."""

  def __init__(self, rngs: nnx.Rngs):
    self.q_proj = Linear(IN, OUT, use_bias=True, rngs=rngs)
    self.o_proj = Linear(OUT, IN, rngs=rngs)

  def __call__(self, x):
    return self.o_proj(jnp.tanh(self.q_proj(x)))


def _block(lora: bool = False) -> Block:
  block = Block(nnx.Rngs(0))
  block.q_proj.bias[...] = jax.random.normal(jax.random.key(5), (OUT,))
  if lora:
    apply_lora(block, rank=4, alpha=8.0, targets=("q_proj",))
    block.q_proj.lora_b[...] = jax.random.normal(jax.random.key(6), block.q_proj.lora_b.shape) * 0.1
  return block


def _reference(block: Block, x) -> np.ndarray:
  """The block in float64 numpy, from its own weights."""
  f64 = lambda v: np.asarray(v, np.float64)  # noqa: E731
  q = block.q_proj
  h = f64(x) @ f64(q.kernel[...]) + f64(q.bias[...])
  if q.lora_a is not None:
    h = h + (f64(x) @ f64(q.lora_a[...])) @ f64(q.lora_b[...]) * q.lora_scale
  return np.tanh(h) @ f64(block.o_proj.kernel[...])


def _copies(block: Block) -> dict:
  return out_major_copies({path: m.kernel[...] for path, m in out_major_targets(block)})


def _run(block: Block, x, copies):
  """(output, number of products that took a copy) of the block within ``out_major_kernels``."""

  def f(x):
    with out_major_kernels(block, copies):
      return block(x)

  return f(x), str(jax.make_jaxpr(f)(x)).count("optimization_barrier")


@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize("shape", [(1, IN), (16, IN), (2, 8, IN), (3, 20, IN), (64, IN), (65, IN), (3, 30, IN)])
def test_the_copies_give_the_same_values_for_few_rows_only(shape, lora):
  block = _block(lora)
  x = jax.random.normal(jax.random.key(1), shape, jnp.float32)
  out, used = _run(block, x, _copies(block))
  rows = int(np.prod(shape[:-1]))
  assert used == (2 if rows <= linear_lib.OUT_MAJOR_ROWS else 0)
  assert out.shape == (*shape[:-1], IN)
  np.testing.assert_allclose(out, _reference(block, x), rtol=TOL, atol=TOL)


def test_outside_the_block_or_without_copies_nothing_changes():
  block = _block()
  x = jnp.ones((4, IN), jnp.float32)
  assert "optimization_barrier" not in str(jax.make_jaxpr(block)(x))
  assert _run(block, x, None)[1] == 0 and _run(block, x, {})[1] == 0
  # A copy for one layer only: that layer takes it, the other multiplies as usual.
  only_q = {"q_proj": _copies(block)["q_proj"]}
  out, used = _run(block, x, only_q)
  assert used == 1
  np.testing.assert_allclose(out, _reference(block, x), rtol=TOL, atol=TOL)


def test_copies_are_each_kernel_transposed_and_skip_quantized_kernels():
  block = _block()
  copies = _copies(block)
  assert sorted(copies) == ["o_proj", "q_proj"]
  np.testing.assert_array_equal(copies["q_proj"], np.asarray(block.q_proj.kernel[...]).T)
  quantize_base(block, "int8", block_size=8, targets=("o_proj",))
  assert [path for path, _ in out_major_targets(block)] == ["q_proj"]


def test_a_copy_of_the_wrong_shape_or_dtype_is_refused():
  block = _block()
  x = jnp.ones((4, IN), jnp.float32)
  with pytest.raises(ValueError, match=r"the copy for q_proj is float32\[24, 40\].*needs float32\[40, 24\]"):
    _run(block, x, {"q_proj": block.q_proj.kernel[...]})
  with pytest.raises(ValueError, match=r"the copy for o_proj is bfloat16\[24, 40\]"):
    _run(block, x, {"o_proj": block.o_proj.kernel[...].T.astype(jnp.bfloat16)})
