"""Tunix's calling convention: ``model(tokens, positions, cache, attention_mask) -> (logits, cache)``.

A Tunix-style toy transformer (any nnx.Module with that signature, using a causal [B, T, T] mask)
trains with every trainer; our own models take the same call with a 3-D mask and give the logits
of their factored [B, T] fast path.
"""

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from easytunix.distillation import AttentionTransferStrategy, DistillationTrainer, LogitStrategy
from easytunix.distillation.strategies import FeaturePoolingStrategy, FeatureProjectionStrategy
from easytunix.generate.tokenizer_adapter import TokenizerAdapter
from easytunix.layers.cache import make_causal_mask, positions_from_mask
from easytunix.models.calling import call_causal_lm, model_inputs
from easytunix.models.qwen3 import ModelConfig, Qwen3
from easytunix.rl.dpo import DpoTrainer, DpoTrainingConfig, TrainExample, dpo_loss_fn
from easytunix.rl.dpo.data import TrainingInput as DpoInput
from easytunix.rl.dpo.dpo_trainer import to_train_example
from easytunix.rl.grpo import GrpoConfig, GrpoLearner, prompt_batches
from easytunix.rl.rl_cluster import ClusterConfig, RLCluster, RLTrainingConfig, RolloutConfig
from easytunix.sft.peft_trainer import PeftTrainer, TrainingConfig, TrainingInput

TINY_BPE = Path(__file__).resolve().parent.parent / "easytunix" / "presets" / "assets" / "tiny_bpe"
VOCAB = 512


@dataclasses.dataclass(frozen=True)
class ToyConfig:
  """Sizes of the toy; ``num_layers`` / ``num_kv_heads`` / ``head_dim`` size the sampler's cache."""

  vocab_size: int = VOCAB
  embed_dim: int = 16
  num_heads: int = 2
  num_layers: int = 1
  max_len: int = 64
  dtype: object = jnp.float32

  @property
  def num_kv_heads(self) -> int:
    return self.num_heads

  @property
  def head_dim(self) -> int:
    return self.embed_dim // self.num_heads


class ToyBlock(nnx.Module):
  """flax attention over a context (the block's own inputs, or the cached ones) and an MLP."""

  def __init__(self, c: ToyConfig, rngs: nnx.Rngs):
    self.attn = nnx.MultiHeadAttention(
        num_heads=c.num_heads, in_features=c.embed_dim, qkv_features=c.embed_dim, use_bias=False, decode=False,
        rngs=rngs,
    )
    self.w1 = nnx.Linear(c.embed_dim, 2 * c.embed_dim, rngs=rngs)
    self.w2 = nnx.Linear(2 * c.embed_dim, c.embed_dim, rngs=rngs)

  def __call__(self, x, context, mask):
    x = x + self.attn(x, context, context, mask=mask[:, None])
    return x + self.w2(nnx.relu(self.w1(x)))


class ToyTransformer(nnx.Module):
  """A Tunix-style causal LM: ``(input_tokens, positions, cache, attention_mask) -> (logits, cache)``.

  ``attention_mask`` is [B, T, T] (or [B, T, S] with a cache). With a cache (the sampler's: per-layer
  ``k``/``v`` slots and an ``index``), each block's inputs are stored in the ``k`` slots.
  """

  def __init__(self, rngs: nnx.Rngs, config: ToyConfig = ToyConfig()):
    self.config = config
    self.embed = nnx.Embed(config.vocab_size, config.embed_dim, rngs=rngs)
    self.pos = nnx.Embed(config.max_len, config.embed_dim, rngs=rngs)
    self.blocks = nnx.List([ToyBlock(config, rngs) for _ in range(config.num_layers)])
    self.head = nnx.Linear(config.embed_dim, config.vocab_size, rngs=rngs)

  def __call__(self, input_tokens, positions, cache, attention_mask):
    assert attention_mask.ndim == 3, "the toy needs the full causal mask"
    x = self.embed(input_tokens) + self.pos(positions)
    b, t, d = x.shape
    layers = []
    for i, block in enumerate(self.blocks):
      context = x
      if cache is not None:
        layer = cache.layers[i]
        heads, _, width = layer.v.shape[1:]  # the values are [B, K, S, H]
        stored = jax.lax.dynamic_update_slice(
            layer.v, x.reshape(b, t, heads, width).transpose(0, 2, 1, 3).astype(layer.v.dtype),
            (0, 0, cache.index, 0),
        )
        layers.append(type(layer)(layer.k, stored))
        context = stored.transpose(0, 2, 1, 3).reshape(b, stored.shape[2], d)
      x = block(x, context, attention_mask)
    new_cache = None if cache is None else type(cache)(tuple(layers), cache.index + t)
    return self.head(x), new_cache


def _params(model):
  return jax.tree.map(np.asarray, nnx.state(model, nnx.Param))


def _changed(before, model):
  after = _params(model)
  return any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)))


def _batch(seed=0, b=4, t=10):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(3, VOCAB, (b, t)).astype(np.int32)
  lengths = np.array([t, t - 3, t - 1, t - 5])[:b]
  mask = (np.arange(t)[None] < lengths[:, None]).astype(np.int32)
  return TrainingInput(input_tokens=np.where(mask, tokens, 0), input_mask=mask)


@pytest.fixture(scope="module")
def tokenizer():
  return TokenizerAdapter.from_pretrained(TINY_BPE)


@pytest.fixture(scope="module")
def qwen():
  return Qwen3(ModelConfig.tiny(num_layers=1), rngs=nnx.Rngs(0))


# ----------------------------------------------------------------------------- our models


def test_our_model_gives_the_same_logits_with_a_3d_mask(qwen):
  model = qwen
  rng = np.random.default_rng(1)
  tokens = jnp.asarray(rng.integers(1, 512, (3, 9)), jnp.int32)
  # Right padding, left padding and none.
  mask = jnp.asarray(np.array([[1] * 6 + [0] * 3, [0] * 4 + [1] * 5, [1] * 9], bool))
  positions = positions_from_mask(mask)
  factored, _ = model(tokens, attention_mask=mask)
  full, cache = model(tokens, positions, None, make_causal_mask(mask))  # Tunix's positional call
  derived, _ = model(tokens, None, None, make_causal_mask(mask))  # positions read off the diagonal
  assert cache is None
  valid = np.asarray(mask)
  np.testing.assert_allclose(np.asarray(full)[valid], np.asarray(factored)[valid], atol=1e-5, rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(derived), np.asarray(full))
  with pytest.raises(ValueError, match=r"attention_mask must be \[B, T\]"):
    model(tokens, positions, None, jnp.ones((3, 9, 4), bool))


def test_the_helper_keeps_our_fast_path_and_gives_others_the_causal_mask(qwen):
  ours = qwen
  toy = ToyTransformer(nnx.Rngs(0))
  batch = _batch()
  _, positions, mask = model_inputs(ours, batch.input_tokens, batch.input_mask)
  assert mask.ndim == 2
  _, toy_positions, toy_mask = model_inputs(toy, batch.input_tokens, batch.input_mask)
  np.testing.assert_array_equal(np.asarray(toy_mask), np.asarray(make_causal_mask(jnp.asarray(batch.input_mask))))
  np.testing.assert_array_equal(np.asarray(toy_positions), np.asarray(positions))
  # A given 3-D mask is passed through; positions are read off its diagonal.
  _, from_3d, mask_3d = model_inputs(ours, batch.input_tokens, attention_mask=toy_mask)
  assert mask_3d.ndim == 3
  np.testing.assert_array_equal(np.asarray(from_3d), np.asarray(positions))
  assert call_causal_lm(toy, batch.input_tokens, batch.input_mask).shape == (4, 10, VOCAB)
  with pytest.raises(ValueError, match="must be \\[B, T\\] or \\[B, T, T\\]"):
    model_inputs(toy, batch.input_tokens, attention_mask=jnp.ones((4, 3), bool))


# ----------------------------------------------------------------------------- trainers with a toy model


def test_sft_trains_a_tunix_style_model_with_both_input_conventions():
  batch = _batch()

  def tunix_inputs(x):  # what a Tunix script's gen_model_input_fn returns
    mask = jnp.asarray(x.input_mask)
    return {
        "input_tokens": x.input_tokens,
        "input_mask": x.input_mask,
        "positions": positions_from_mask(mask),
        "attention_mask": make_causal_mask(mask),
    }

  for gen_fn in (None, tunix_inputs):
    model = ToyTransformer(nnx.Rngs(0))
    before = _params(model)
    trainer = PeftTrainer(model, optax.adam(1e-2), TrainingConfig(max_steps=6, show_progress_bar=False))
    if gen_fn is not None:
      trainer.with_gen_model_input_fn(gen_fn)
    trainer.train([batch])
    losses = trainer.metrics_logger.values("loss")
    assert len(losses) == 6 and np.all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert _changed(before, model)


def _dpo_input():
  rng = np.random.default_rng(2)
  prompt = rng.integers(3, VOCAB, (2, 4)).astype(np.int32)
  prompt_mask = np.array([[1, 1, 1, 1], [0, 0, 1, 1]], np.int32)
  chosen = rng.integers(3, VOCAB, (2, 3)).astype(np.int32)
  rejected = rng.integers(3, VOCAB, (2, 3)).astype(np.int32)
  chosen_mask = np.array([[1, 1, 1], [1, 1, 0]], np.int32)
  rejected_mask = np.array([[1, 1, 0], [1, 1, 1]], np.int32)
  return DpoInput(prompt * prompt_mask, prompt_mask, chosen * chosen_mask, chosen_mask, rejected * rejected_mask,
                  rejected_mask)


def test_dpo_trains_a_tunix_style_model_and_takes_tunix_train_examples():
  model = ToyTransformer(nnx.Rngs(0))
  before = _params(model)
  batch = _dpo_input()
  trainer = DpoTrainer(model, None, optax.adam(1e-2), DpoTrainingConfig(max_steps=5, show_progress_bar=False))
  trainer.train([batch])
  losses = trainer.metrics_logger.values("loss")
  assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
  assert abs(losses[0] - np.log(2.0)) < 1e-4  # the policy starts as its reference
  assert _changed(before, model)

  # Tunix's layout: a causal [2B, T, T] mask, positions, completion_mask over the last logits_to_keep columns.
  ours = to_train_example(batch.replace(ref_chosen_logps=np.zeros(2, np.float32),
                                        ref_rejected_logps=np.array([-1.0, -2.0], np.float32)))
  keep = ours.logits_to_keep
  assert keep == 3 and ours.positions is not None
  tunix = TrainExample(
      input_ids=ours.input_ids,
      positions=ours.positions,
      attention_mask=make_causal_mask(ours.attention_mask),
      ref_chosen_logps=ours.ref_chosen_logps,
      ref_rejected_logps=ours.ref_rejected_logps,
      completion_mask=ours.completion_mask[:, -keep:],
      logits_to_keep=keep,
  )
  plain = ours.replace(positions=None, logits_to_keep=None)
  losses = [dpo_loss_fn(model, example, beta=0.1, label_smoothing=0.0)[0] for example in (plain, ours, tunix)]
  np.testing.assert_allclose(np.asarray(losses[1:]), float(losses[0]), rtol=1e-5)


def test_distillation_trains_tunix_style_teacher_and_student():
  batch = _batch()
  teacher = ToyTransformer(nnx.Rngs(1), ToyConfig(embed_dim=32, num_heads=4, num_layers=2))
  for strategy in (LogitStrategy(temperature=2.0, alpha=0.5),
                   AttentionTransferStrategy(attention_layer=nnx.MultiHeadAttention, alpha=0.5)):
    student = ToyTransformer(nnx.Rngs(0))
    before = _params(student)
    trainer = DistillationTrainer(student, teacher, strategy, optax.adam(1e-2),
                                  TrainingConfig(max_steps=5, show_progress_bar=False))
    trainer.train([batch])
    losses = trainer.metrics_logger.values("loss")
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0], (type(strategy).__name__, losses)
    assert np.isfinite(trainer.last_metrics["distill_loss"])
    assert _changed(before, student)
    trainer.close()


def test_feature_strategies_take_tunix_shapes_and_return_the_models():
  """Tunix's outputs: layer-first [L, B, D] features of a classifier, one-hot labels, no token_mask."""
  rng = np.random.default_rng(3)
  logits = jnp.asarray(rng.normal(size=(2, 3)), jnp.float32)
  labels = jax.nn.one_hot(jnp.array([0, 2]), 3)
  student = jnp.asarray(rng.normal(size=(1, 2, 4)), jnp.float32)
  teacher = jnp.asarray(rng.normal(size=(2, 2, 8)), jnp.float32)
  pooling = FeaturePoolingStrategy(feature_layer=nnx.Linear, alpha=0.5)
  loss = pooling.compute_loss({"logits": logits, "features": student}, teacher, labels)
  pooled = teacher.mean(0, keepdims=True).reshape(1, 2, 4, 2).mean(-1)  # layers and width pooled
  cos = (student * pooled).sum(-1) / (np.linalg.norm(student, axis=-1) * np.linalg.norm(pooled, axis=-1))
  task = optax.softmax_cross_entropy(logits, labels).mean()
  np.testing.assert_allclose(float(loss), 0.5 * float((1 - cos).mean()) + 0.5 * float(task), rtol=1e-5)

  projection = FeatureProjectionStrategy(feature_layer=nnx.Linear, alpha=0.5)
  projected = jnp.asarray(rng.normal(size=(1, 2, 8)), jnp.float32)
  loss = projection.compute_loss({"logits": logits, "features": projected}, teacher, labels)
  mse = ((projected - teacher.mean(0, keepdims=True)) ** 2).mean()
  np.testing.assert_allclose(float(loss), 0.5 * float(mse) + 0.5 * float(task), rtol=1e-5)
  with pytest.raises(TypeError, match="'logits' and 'features'"):
    projection.compute_loss({"logits": logits}, teacher, labels)

  s_model, t_model = ToyTransformer(nnx.Rngs(0)), ToyTransformer(nnx.Rngs(1), ToyConfig(embed_dim=32, num_heads=4))
  strategy = FeatureProjectionStrategy(feature_layer=ToyBlock).bind_defaults()
  out = strategy.pre_process_models(s_model, t_model)
  assert out[0] is s_model and out[1] is t_model and hasattr(s_model, strategy.projection_name)
  assert strategy.post_process_models(s_model, t_model) == (s_model, t_model)
  assert not hasattr(s_model, strategy.projection_name)


def test_grpo_trains_a_tunix_style_model(tokenizer):
  model = ToyTransformer(nnx.Rngs(0))
  before = _params(model)
  config = ClusterConfig(
      training_config=RLTrainingConfig(actor_optimizer=optax.adam(1e-2), max_steps=3, show_progress_bar=False),
      rollout_config=RolloutConfig(max_tokens_to_generate=4, max_prompt_length=16, temperature=1.0),
  )
  cluster = RLCluster(model, tokenizer=tokenizer, cluster_config=config)

  def longer_is_better(completions, **_):
    return [float(len(c)) for c in completions]

  learner = GrpoLearner(cluster, longer_is_better, GrpoConfig(num_generations=2, beta=0.04, async_rollout=False))
  records = [{"prompt": f"{a}+{a}="} for a in range(8)]
  learner.train(prompt_batches(records, 2))
  assert learner.trainer.train_steps() == 3
  losses = learner.trainer.metrics_logger.values("loss")
  assert np.all(np.isfinite(losses)) and np.isfinite(learner.trainer.last_metrics["kl"])
  assert _changed(before, model)
