"""Prefill plus one-token decode through the KV cache reproduces the full forward pass."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from easytunix.layers.cache import make_decode_mask
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
