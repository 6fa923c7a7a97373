"""LoRA adapters: placement, training only the adapters, merging, and running the base model."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from easytunix.models.qwen3 import ModelConfig, Qwen3
from easytunix.sft import lora
from easytunix.sft.peft_trainer import PeftTrainer, TrainingConfig, TrainingInput, is_lora_enabled


_BASE = {}

# Logits of two different float32 programs of the same 2-layer model (merged weights W + s*A@B vs
# x@W + s*(x@A)@B, or another jit with adapters switched off): round-off of 64-128-term sums, measured
# <= 8e-7 of the largest |logit|. The trained adapters move the logits by ~0.6 of it (measured), so
# adapters left on, dropped or merged with the wrong scale fail by orders of magnitude.
LOGIT_TOL = 2e-5


def _assert_logits_close(actual, expected, tol=LOGIT_TOL):
  """|actual - expected| <= tol * max|expected| (round-off scales with the tensor, not with each entry)."""
  expected = np.asarray(expected)
  np.testing.assert_allclose(np.asarray(actual), expected, rtol=0, atol=tol * np.abs(expected).max())


def _model():
  """A fresh copy of one tiny model (built once: eager init compiles every op)."""
  if "model" not in _BASE:
    _BASE["model"] = Qwen3(ModelConfig.tiny(), rngs=nnx.Rngs(0))
  return nnx.clone(_BASE["model"])


@nnx.jit
def _logits(model, tokens):
  return model(tokens)[0]


def _batches(n, batch=4, length=12, seed=0):
  rng = np.random.default_rng(seed)
  # A learnable pattern (each row counts up from a random start) so the loss moves.
  out = []
  for _ in range(n):
    start = rng.integers(3, 400, (batch, 1))
    tokens = (start + np.arange(length)).astype(np.int32)
    out.append(TrainingInput(input_tokens=tokens, input_mask=np.ones_like(tokens, bool)))
  return out


def _flat(state):
  return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(nnx.as_pure(state))}


def test_apply_lora_places_adapters_on_targets():
  model = _model()
  assert not is_lora_enabled(model)
  lora.apply_lora(model, rank=4, alpha=8.0, targets=("q_proj", "v_proj"))
  adapted = lora.lora_modules(model)
  assert sorted(adapted) == sorted(
      f"layers.{i}.attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")
  )
  q = model.layers[0].attn.q_proj
  assert q.lora_a[...].shape == (64, 4) and q.lora_b[...].shape == (4, 64)
  assert q.lora_scale == 2.0
  assert not np.any(np.asarray(q.lora_b[...]))
  assert is_lora_enabled(model)
  assert lora.trainable_filter(model) is nnx.LoRAParam


def test_apply_lora_regex_targets_select_by_path():
  model = _model()
  lora.apply_lora(model, rank=2, targets=(r"layers\.1\.mlp\..*_proj",))
  assert sorted(lora.lora_modules(model)) == [f"layers.1.mlp.{p}" for p in ("down_proj", "gate_proj", "up_proj")]


def test_apply_lora_without_match_lists_the_linear_paths():
  with pytest.raises(ValueError, match=r"No Linear module matches LoRA targets \['wq'\].*layers\.0\.attn\.q_proj"):
    lora.apply_lora(_model(), rank=4, targets=("wq",))
  with pytest.raises(ValueError, match="rank must be a positive int"):
    lora.apply_lora(_model(), rank=0)


def test_fresh_adapters_do_not_change_outputs():
  model = _model()
  tokens = jnp.asarray(_batches(1)[0].input_tokens)
  before = _logits(model, tokens)
  lora.apply_lora(model, rank=4)
  # lora_b is exactly zero, so the adapter adds exact zeros to an unchanged matmul: bitwise equal.
  np.testing.assert_array_equal(np.asarray(_logits(model, tokens)), np.asarray(before))


@pytest.fixture(scope="module")
def trained_lora():
  """A tiny model with rank-4 adapters after 6 LoRA steps, and its state before them."""
  model = _model()
  lora.apply_lora(model, rank=4, alpha=8.0)
  base_before = _flat(lora.base_params(model))
  lora_before = _flat(lora.lora_params(model))
  trainer = PeftTrainer(model, optax.adam(1e-2), TrainingConfig(max_steps=6, show_progress_bar=False))
  trainer.train(_batches(6))
  return model, trainer, base_before, lora_before


def test_lora_training_updates_only_adapters(trained_lora):
  model, trainer, base_before, lora_before = trained_lora
  base_after = _flat(lora.base_params(model))
  assert base_after.keys() == base_before.keys()
  for key in base_before:
    np.testing.assert_array_equal(base_after[key], base_before[key], err_msg=key)
  lora_after = _flat(lora.lora_params(model))
  changed = [k for k in lora_before if not np.array_equal(lora_after[k], lora_before[k])]
  assert len(changed) == len(lora_before), "every adapter should move (lora_b first, then lora_a)"
  losses = trainer.metrics_logger.values("loss")
  assert losses[-1] < losses[0]


def test_merged_model_matches_adapter_model(trained_lora):
  model, _, _, _ = trained_lora
  tokens = jnp.asarray(_batches(1, seed=7)[0].input_tokens)
  with_adapters = np.asarray(_logits(model, tokens))
  merged = nnx.clone(model)
  lora.merge_lora(merged)
  assert not is_lora_enabled(merged)
  assert lora.lora_modules(merged) == {}
  _assert_logits_close(_logits(merged, tokens), with_adapters)


def test_lora_disabled_gives_base_outputs_inside_jit(trained_lora):
  model, _, _, _ = trained_lora
  tokens = jnp.asarray(_batches(1, seed=3)[0].input_tokens)
  base = nnx.clone(model)
  for linear in lora.lora_modules(base).values():
    linear.lora_a = None
    linear.lora_b = None
  expected = np.asarray(_logits(base, tokens))
  adapted = np.asarray(_logits(model, tokens))
  assert np.abs(adapted - expected).max() > 1e-4

  @nnx.jit
  def both(m, t):
    with lora.lora_disabled(m):
      off = m(t)[0]
    return off, m(t)[0]

  off, on = both(model, tokens)
  _assert_logits_close(off, expected)
  _assert_logits_close(on, adapted)
  with lora.lora_disabled(model):
    _assert_logits_close(_logits(model, tokens), expected)
  # Adapters back on: the very program that computed `adapted`, on the same inputs: bitwise equal.
  np.testing.assert_array_equal(np.asarray(_logits(model, tokens)), adapted)


def test_lora_disabled_reference_in_a_loss_gets_no_gradient(trained_lora):
  """A DPO-style loss: policy minus base log-likelihood; only the policy term has gradients."""
  model, _, _, _ = trained_lora
  tokens = jnp.asarray(_batches(1, seed=4)[0].input_tokens)
  graphdef, params, rest = nnx.split(model, nnx.LoRAParam, ...)

  def loss(p):
    m = nnx.merge(graphdef, p, rest)
    with lora.lora_disabled(m):
      ref = jax.lax.stop_gradient(m(tokens)[0])
    return (m(tokens)[0] - ref).sum()

  def policy_only(p):
    return nnx.merge(graphdef, p, rest)(tokens)[0].sum()

  grads, expected = jax.jit(lambda p: (jax.grad(loss)(p), jax.grad(policy_only)(p)))(params)
  # Gradients of a sum of ~25k logits, compiled in two graphs: round-off relative to each tensor's
  # largest entry (measured 0); adapters left off in the policy pass, or a reference term with a
  # gradient, change them by O(1) of it.
  for g, e in zip(jax.tree.leaves(grads), jax.tree.leaves(expected)):
    e = np.asarray(e)
    np.testing.assert_allclose(np.asarray(g), e, rtol=0, atol=LOGIT_TOL * np.abs(e).max())
