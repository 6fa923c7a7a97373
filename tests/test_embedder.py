"""The tied output projection (``Embedder.decode``): both of its CPU forms give the same logits and gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from easytunix.layers import embedder as emb_lib

VOCAB, DIM = 301, 24

# float32 products of 24 terms of O(1): a few ulps of O(10) whatever the summation order.
TOL = 1e-5


@pytest.fixture(scope="module")
def embedder():
  return emb_lib.Embedder(VOCAB, DIM, rngs=nnx.Rngs(0))


def _reference(x, table):
  return np.einsum("...d,vd->...v", np.asarray(x, np.float64), np.asarray(table, np.float64))


@pytest.mark.parametrize("shape", [(1, DIM), (2, DIM), (16, 1, DIM), (4, 8, DIM), (33, DIM), (3, 40, DIM)])
def test_decode_matches_float64_reference(embedder, shape):
  x = jax.random.normal(jax.random.key(1), shape, jnp.float32)
  logits = embedder.decode(x)
  assert logits.shape == (*shape[:-1], VOCAB)
  np.testing.assert_allclose(logits, _reference(x, embedder.embedding[...]), rtol=TOL, atol=TOL)


def _uses_few_rows_form(embedder, rows):
  x = jnp.ones((rows, DIM), jnp.float32)
  return "optimization_barrier" in str(jax.make_jaxpr(embedder.decode)(x))


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the table @ rows.T form is CPU only")
def test_few_rows_take_the_transposed_product_on_cpu(embedder):
  low, high = emb_lib.FEW_ROWS
  assert [_uses_few_rows_form(embedder, r) for r in (low - 1, low, high, high + 1)] == [False, True, True, False]


def test_few_rows_gradients_match_the_plain_product(embedder, monkeypatch):
  """Training through a few rows (tiny test batches) differentiates the transposed product correctly."""
  x = jax.random.normal(jax.random.key(2), (2, 8, DIM), jnp.float32)
  table = embedder.embedding[...]

  def loss(x, table):
    e = emb_lib.Embedder(VOCAB, DIM, rngs=nnx.Rngs(0))
    e.embedding[...] = table
    return jnp.sum(jnp.sin(e.decode(x)))

  grads = jax.grad(loss, (0, 1))(x, table)
  monkeypatch.setattr(emb_lib, "FEW_ROWS", (0, -1))  # every row count takes the plain product
  plain = jax.grad(loss, (0, 1))(x, table)
  for got, want in zip(grads, plain):
    np.testing.assert_allclose(got, want, rtol=TOL, atol=TOL)
