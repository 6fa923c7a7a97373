"""Prefill plus one-token decode through the KV cache reproduces the full forward pass."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from easytunix.layers.cache import RaggedLayout, make_decode_mask
from easytunix.models.gemma.model import Transformer, TransformerConfig
from easytunix.models.gemma3.model import Gemma3, Gemma3Config
from easytunix.models.llama3.model import Llama3, ModelConfig as LlamaConfig
from easytunix.models.qwen3.model import ModelConfig as QwenConfig, Qwen3
from tests import hf_reference

MODELS = {
    "llama3": (Llama3, LlamaConfig.tiny()),
    "qwen3_moe": (Qwen3, QwenConfig.tiny_moe()),
    "gemma": (Transformer, TransformerConfig.tiny()),
    "gemma3": (Gemma3, Gemma3Config.tiny(sliding_window=4)),
}


@nnx.jit
def _forward(model, tokens, positions, cache, mask):
  # Compiled: op by op, every call shape compiles each of the model's eager ops (~19 s for one family).
  return model(tokens, positions, cache, mask)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_incremental_decode_matches_full_forward(name):
  cls, config = MODELS[name]
  model = cls(config, rngs=nnx.Rngs(1))
  tokens, mask = hf_reference.prompts_batch(seed=3, batch=3, max_len=18)
  tokens, mask = jnp.asarray(tokens), jnp.asarray(mask)
  full, _ = _forward(model, tokens, None, None, mask)

  prefill = 10
  positions = jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0)
  cache = model.init_cache(batch_size=3, max_len=24)
  key_valid = jnp.zeros((3, 24), bool).at[:, :prefill].set(mask[:, :prefill])
  logits, cache = _forward(model, tokens[:, :prefill], positions[:, :prefill], cache,
                           make_decode_mask(key_valid, 0, prefill))
  outs = [logits]
  for t in range(prefill, tokens.shape[1]):
    key_valid = key_valid.at[:, t].set(mask[:, t])
    step, cache = _forward(model, tokens[:, t : t + 1], positions[:, t : t + 1], cache, make_decode_mask(key_valid, t, 1))
    outs.append(step)
  incremental = jnp.concatenate(outs, axis=1)
  assert int(cache.index) == tokens.shape[1]
  # Decoding through the cache attends over another key length than the full pass, so float32 sums run
  # in another order: logits agree to ~1e-6 of the largest |logit| (measured <= 9.5e-7); a wrong
  # position, cache slot or mask is off by O(1) of it.
  want = np.asarray(full)[np.asarray(mask)]
  np.testing.assert_allclose(np.asarray(incremental)[np.asarray(mask)], want, rtol=0, atol=2e-5 * np.abs(want).max())


def _padded_prefill(name: str, seed: int):
  """A family's tiny model and a left-padded prompt batch [3, P] for a prefill into a fresh 24-slot cache.

  Returns (model, tokens [B, P], mask [B, P], positions [B, P], cache, [B, P, 24] decode mask).
  """
  cls, config = MODELS[name]
  model = cls(config, rngs=nnx.Rngs(1))
  tokens, mask = hf_reference.prompts_batch(seed=seed, batch=3, max_len=18)
  b, p = tokens.shape
  key_valid = jnp.zeros((b, 24), bool).at[:, :p].set(mask)
  positions = jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0)
  return model, tokens, mask, positions, model.init_cache(batch_size=b, max_len=24), make_decode_mask(key_valid, 0, p)


ROWS = np.array([0, 17, 40, 53])  # flat [B * T] slots, in no row order


@nnx.jit
def _picked(model, tokens, positions, cache, mask):
  """The full prefill, and two ``pick``s of it: each row's last slot, and the flat slots ``ROWS``."""
  full, full_cache = model(tokens, positions, cache, mask)
  last, last_cache = model(tokens, positions, cache, mask, pick=lambda x: x[:, -1])
  rows, _ = model(tokens, positions, cache, mask, pick=lambda x: jnp.take(x.reshape(-1, x.shape[-1]), ROWS, axis=0))
  return full, full_cache, last, last_cache, rows


@pytest.mark.parametrize("name", sorted(MODELS))
def test_pick_gives_the_picked_logits_and_the_whole_cache(name):
  """``pick`` runs the last MLP and the head on a few slots only: same logits there, same cache everywhere."""
  model, tokens, _, positions, cache, decode_mask = _padded_prefill(name, seed=7)
  b = tokens.shape[0]
  full, full_cache, last, last_cache, rows = _picked(model, jnp.asarray(tokens), positions, cache, decode_mask)
  full = np.asarray(full)
  assert last.shape == (b, 1, full.shape[-1]) and rows.shape == (ROWS.size, 1, full.shape[-1])
  # The MLP of fewer rows may sum in another order (MoE: other expert groupings): ~1e-6 of the largest logit.
  tol = 1e-5 * np.abs(full).max()
  np.testing.assert_allclose(np.asarray(last)[:, 0], full[:, -1], rtol=0, atol=tol)
  np.testing.assert_allclose(np.asarray(rows)[:, 0], full.reshape(-1, full.shape[-1])[ROWS], rtol=0, atol=tol)
  for got, want in zip(jax.tree.leaves(last_cache), jax.tree.leaves(full_cache)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_ragged_prefill_matches_padded_prefill(name):
  """Prompts end to end in one row (RaggedLayout): every token's logits, the cache and its next slot."""
  model, tokens, mask, positions, cache, decode_mask = _padded_prefill(name, seed=5)
  b, p = tokens.shape
  want, want_cache = _forward(model, jnp.asarray(tokens), positions, cache, decode_mask)

  n = int(mask.sum()) + 3  # three filler slots at the end
  slots = np.flatnonzero(mask.reshape(-1))  # left-padded slot b * p + col of each real token, row by row
  flat = np.zeros((1, n), np.int32)
  flat[0, : slots.size] = tokens.reshape(-1)[slots]
  flat_positions = np.zeros((1, n), np.int32)
  flat_positions[0, : slots.size] = np.asarray(positions).reshape(-1)[slots]
  src = np.zeros((b, p), np.int32)
  src.reshape(-1)[slots] = np.arange(slots.size)
  dst = np.zeros((n,), np.int32)
  dst[: slots.size] = slots
  layout = RaggedLayout(jnp.asarray(src), jnp.asarray(dst), jnp.asarray(mask))
  got, got_cache = _forward(model, jnp.asarray(flat), jnp.asarray(flat_positions),
                            model.init_cache(batch_size=b, max_len=24), layout)

  assert got.shape == (1, n, want.shape[-1]) and int(got_cache.index) == int(want_cache.index) == p
  scale = np.abs(np.asarray(want)).max()
  np.testing.assert_allclose(np.asarray(got)[0, : slots.size], np.asarray(want).reshape(b * p, -1)[slots],
                             rtol=0, atol=2e-5 * scale)
  keys_valid = np.pad(np.asarray(mask, bool), ((0, 0), (0, 24 - p)))[:, None, None, :]  # the prompt slots
  for ours, padded in zip(got_cache.layers, want_cache.layers):
    np.testing.assert_allclose(np.where(keys_valid, ours.k, 0), np.where(keys_valid, padded.k, 0), atol=1e-5)
    np.testing.assert_allclose(np.where(keys_valid.swapaxes(-1, -2), ours.v, 0),
                               np.where(keys_valid.swapaxes(-1, -2), padded.v, 0), atol=1e-5)
    assert not np.any(np.where(keys_valid, 0, ours.k))  # padding slots stay empty


def test_ragged_prefill_rejects_wrong_shapes():
  model = Llama3(LlamaConfig.tiny(), rngs=nnx.Rngs(0))
  layout = RaggedLayout(jnp.zeros((2, 4), jnp.int32), jnp.zeros((6,), jnp.int32), jnp.ones((2, 4), bool))
  tokens, positions = jnp.ones((1, 6), jnp.int32), jnp.zeros((1, 6), jnp.int32)
  with pytest.raises(ValueError, match=r"tokens \[1, N\]"):
    model(jnp.ones((2, 3), jnp.int32), jnp.zeros((2, 3), jnp.int32), model.init_cache(2, 8), layout)
  with pytest.raises(ValueError, match="positions"):
    model(tokens, None, model.init_cache(2, 8), layout)
  with pytest.raises(ValueError, match="cache of 2 rows"):
    model(tokens, positions, model.init_cache(3, 8), layout)
