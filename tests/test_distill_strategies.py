"""Distillation strategies: each loss against an independent NumPy computation on fixed arrays,
capturing that leaves results unchanged, and the errors a user can hit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from easytunix.distillation import (
    AttentionProjectionStrategy,
    AttentionTransferStrategy,
    FeaturePoolingStrategy,
    FeatureProjectionStrategy,
    LogitStrategy,
    TokenLabels,
    check_compatible,
    default_functions,
)
from easytunix.distillation.capture import capture_intermediates
from easytunix.distillation.strategies.base_strategy import LayerwiseProjection, default_labels_fn, pooling_matrix
from easytunix.layers.attention import Attention
from easytunix.layers.linear import Linear
from easytunix.models.base import DecoderLayer
from easytunix.models.llama3 import Llama3, ModelConfig
from easytunix.models.qwen3 import ModelConfig as Qwen3Config
from easytunix.models.qwen3 import Qwen3

RNG = np.random.default_rng(0)

# Losses below are float32 reductions over at most a few hundred O(1) terms, checked against a float64
# NumPy reference: float32 round-off is ~1e-7 relative (measured <= 1.5e-7), while a wrong mask, weight,
# pooling bin or temperature factor changes a loss by > 1e-2 relative.
LOSS_RTOL = 1e-5
# Tensors computed by two different float32 programs (XLA vs NumPy einsum, jit vs eager): each entry is
# off by round-off of order eps * (sum of |terms|), so the bound is absolute and scaled to the tensor's
# largest entry (entries near zero come out of cancellation with the same absolute error). Measured
# <= 3.1e-7 of the scale; a wrong layer, kernel or mask is off by O(1) of it.
F32_TOL = 1e-5


def _assert_close_to_scale(actual, expected, tol=F32_TOL):
  expected = np.asarray(expected)
  np.testing.assert_allclose(np.asarray(actual), expected, rtol=0, atol=tol * np.abs(expected).max())


def _np_log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _np_pool(x, size, axis):
  """Adaptive average pooling, written as an explicit loop over output bins."""
  x = np.moveaxis(np.asarray(x, np.float64), axis, 0)
  n = x.shape[0]
  out = []
  for i in range(size):
    lo, hi = int(np.floor(i * n / size)), int(np.ceil((i + 1) * n / size))
    out.append(x[lo:hi].mean(0))
  return np.moveaxis(np.stack(out), 0, axis)


def _np_cosine_distance(a, b, axis=-1):
  dot = (a * b).sum(axis)
  return 1.0 - dot / (np.linalg.norm(a, axis=axis) * np.linalg.norm(b, axis=axis))


def _labels(batch=2, length=6, vocab=11):
  targets = RNG.integers(0, vocab, (batch, length))
  mask = np.ones((batch, length), bool)
  mask[0, 4:] = False
  mask[1, :2] = False
  return TokenLabels(targets=jnp.asarray(targets), mask=jnp.asarray(mask)), targets, mask


def _np_ce(logits, targets, mask):
  nll = -np.take_along_axis(_np_log_softmax(logits), targets[..., None], -1)[..., 0]
  return (nll * mask).sum() / mask.sum()


# ------------------------------------------------------------------------------------ logit


@pytest.mark.parametrize("temperature,alpha", [(2.0, 0.5), (1.0, 0.0), (3.5, 0.8)])
def test_logit_loss_matches_numpy(temperature, alpha):
  student = RNG.normal(size=(2, 6, 11)).astype(np.float32) * 2
  teacher = RNG.normal(size=(2, 6, 11)).astype(np.float32) * 3
  labels, targets, mask = _labels()
  strategy = LogitStrategy(temperature=temperature, alpha=alpha)

  log_p = _np_log_softmax(teacher.astype(np.float64) / temperature)
  log_q = _np_log_softmax(student.astype(np.float64) / temperature)
  kl = (np.exp(log_p) * (log_p - log_q)).sum(-1)
  distill = (kl * mask).sum() / mask.sum() * temperature**2
  task = _np_ce(student.astype(np.float64), targets, mask)
  expected = alpha * task + (1 - alpha) * distill

  loss = strategy.compute_loss(jnp.asarray(student), jnp.asarray(teacher), labels)
  np.testing.assert_allclose(float(loss), expected, rtol=LOSS_RTOL)
  terms = strategy.loss_terms(jnp.asarray(student), jnp.asarray(teacher), labels)
  np.testing.assert_allclose(float(terms["distill_loss"]), distill, rtol=LOSS_RTOL)
  np.testing.assert_allclose(float(strategy.compute_eval_loss(jnp.asarray(student), labels)), task, rtol=LOSS_RTOL)


def test_logit_loss_ignores_padding_and_is_zero_for_identical_logits():
  logits = RNG.normal(size=(2, 6, 11)).astype(np.float32)
  labels, _, mask = _labels()
  strategy = LogitStrategy(alpha=0.0)
  # KL of identical float32 logits: ~eps-sized terms at most; an unmasked row or a wrong teacher gives KL ~ 1.
  assert float(strategy.compute_loss(jnp.asarray(logits), jnp.asarray(logits), labels)) == pytest.approx(0.0, abs=1e-6)
  # Changing the teacher where the mask is False changes nothing.
  teacher = logits.copy()
  teacher[~mask] = RNG.normal(size=(int((~mask).sum()), 11)) * 10
  assert float(strategy.compute_loss(jnp.asarray(logits), jnp.asarray(teacher), labels)) == pytest.approx(0.0, abs=1e-6)


def test_logit_accepts_one_hot_and_integer_labels():
  student = RNG.normal(size=(2, 6, 11)).astype(np.float32)
  teacher = RNG.normal(size=(2, 6, 11)).astype(np.float32)
  targets = RNG.integers(0, 11, (2, 6))
  strategy = LogitStrategy(alpha=1.0)
  one_hot = jax.nn.one_hot(targets, 11)
  expected = _np_ce(student.astype(np.float64), targets, np.ones((2, 6)))
  assert float(strategy.compute_loss(jnp.asarray(student), jnp.asarray(teacher), one_hot)) == pytest.approx(expected, rel=LOSS_RTOL)
  assert float(strategy.compute_loss(jnp.asarray(student), jnp.asarray(teacher), jnp.asarray(targets))) == pytest.approx(expected, rel=LOSS_RTOL)


def test_default_labels_are_the_next_real_completion_tokens():
  tokens = np.array([[5, 6, 7, 8, 0]])
  input_mask = np.array([[1, 1, 1, 1, 0]])
  completion = np.array([[0, 0, 1, 1, 0]])
  labels = default_labels_fn(tokens, input_mask, completion)
  np.testing.assert_array_equal(labels.targets, [[6, 7, 8, 0, 0]])
  np.testing.assert_array_equal(labels.mask, [[False, True, True, False, False]])


# ---------------------------------------------------------------------------- feature pooling


def test_pooling_matrix_bins():
  # 1/2 and 0 are exact in binary: the default rtol (1e-7) only absorbs the float64/float32 cast.
  np.testing.assert_allclose(pooling_matrix(4, 2), [[0.5, 0.5, 0, 0], [0, 0, 0.5, 0.5]])
  np.testing.assert_allclose(pooling_matrix(3, 2), [[0.5, 0.5, 0], [0, 0.5, 0.5]])
  with pytest.raises(ValueError, match="shrinks"):
    pooling_matrix(2, 3)


@pytest.mark.parametrize("student_shape,teacher_shape", [((2, 8), (4, 16)), ((3, 6), (2, 10)), ((2, 8), (2, 8))])
def test_feature_pooling_loss_matches_numpy(student_shape, teacher_shape):
  (ls, ds), (lt, dt) = student_shape, teacher_shape
  student = RNG.normal(size=(2, ls, 6, ds)).astype(np.float32)
  teacher = RNG.normal(size=(2, lt, 6, dt)).astype(np.float32)
  logits = RNG.normal(size=(2, 6, 11)).astype(np.float32)
  labels, targets, label_mask = _labels()
  token_mask = np.ones((2, 6), bool)
  token_mask[0, 5:] = False
  strategy = FeaturePoolingStrategy(feature_layer=DecoderLayer, alpha=0.75)

  layers, width = min(ls, lt), min(ds, dt)
  s = _np_pool(_np_pool(student, layers, 1), width, 3)
  t = _np_pool(_np_pool(teacher, layers, 1), width, 3)
  distance = _np_cosine_distance(s, t)  # [B, L, T]
  weights = np.broadcast_to(token_mask[:, None, :], distance.shape)
  feature_loss = (distance * weights).sum() / weights.sum()
  expected = 0.75 * feature_loss + 0.25 * _np_ce(logits.astype(np.float64), targets, label_mask)

  output = {"logits": jnp.asarray(logits), "features": jnp.asarray(student), "token_mask": jnp.asarray(token_mask)}
  loss = strategy.compute_loss(output, jnp.asarray(teacher), labels)
  np.testing.assert_allclose(float(loss), expected, rtol=LOSS_RTOL)


def test_feature_pooling_cosine_axis_and_custom_loss():
  student = RNG.normal(size=(2, 2, 6, 8)).astype(np.float32)
  teacher = RNG.normal(size=(2, 2, 6, 8)).astype(np.float32)
  token_mask = np.ones((2, 6), bool)
  token_mask[1, 4:] = False
  output = {"logits": jnp.zeros((2, 6, 11)), "features": jnp.asarray(student), "token_mask": jnp.asarray(token_mask)}
  labels, _, _ = _labels()

  # Cosine distance over the token axis: padded tokens do not count.
  strategy = FeaturePoolingStrategy(feature_layer=DecoderLayer, alpha=1.0, cosine_distance_axis=2)
  m = token_mask[:, None, :, None]
  expected = _np_cosine_distance(student * m, teacher * m, axis=2).mean()
  np.testing.assert_allclose(float(strategy.compute_loss(output, jnp.asarray(teacher), labels)), expected, rtol=LOSS_RTOL)

  # A custom loss sees the pooled features with padding zeroed.
  seen = {}

  def l1(a, b):
    seen["a"] = a
    return jnp.abs(a - b).mean()

  strategy = FeaturePoolingStrategy(feature_layer=DecoderLayer, alpha=1.0, feature_loss_fn=l1)
  loss = strategy.compute_loss(output, jnp.asarray(teacher), labels)
  np.testing.assert_allclose(float(loss), np.abs(student * m - teacher * m).mean(), rtol=LOSS_RTOL)
  assert float(jnp.abs(seen["a"][1, :, 4:]).sum()) == 0.0  # exact: padding is multiplied by 0


# ---------------------------------------------------------------------------- feature projection


def test_layerwise_projection_is_a_per_layer_matmul():
  proj = LayerwiseProjection(3, 4, 5, axis=-1, rngs=nnx.Rngs(0))
  x = RNG.normal(size=(2, 3, 6, 4)).astype(np.float32)
  expected = np.einsum("bltd,lde->blte", x, np.asarray(proj.kernel[...]))
  _assert_close_to_scale(proj(jnp.asarray(x)), expected)
  heads = LayerwiseProjection(3, 2, 4, axis=2, rngs=nnx.Rngs(0))
  a = RNG.random((2, 3, 2, 6, 6)).astype(np.float32)
  expected = np.einsum("blhts,lhg->blgts", a, np.asarray(heads.kernel[...]))
  _assert_close_to_scale(heads(jnp.asarray(a)), expected)


def test_feature_projection_loss_matches_numpy():
  projected = RNG.normal(size=(2, 2, 6, 16)).astype(np.float32)  # already projected to the teacher's width
  teacher = RNG.normal(size=(2, 4, 6, 16)).astype(np.float32)
  logits = RNG.normal(size=(2, 6, 11)).astype(np.float32)
  labels, targets, label_mask = _labels()
  token_mask = np.ones((2, 6), bool)
  token_mask[1, 3:] = False
  strategy = FeatureProjectionStrategy(feature_layer=DecoderLayer, alpha=0.6)

  t = _np_pool(teacher, 2, 1)
  sq = (projected - t) ** 2
  weights = np.broadcast_to(token_mask[:, None, :, None], sq.shape)
  mse = (sq * weights).sum() / weights.sum()
  expected = 0.6 * mse + 0.4 * _np_ce(logits.astype(np.float64), targets, label_mask)
  output = {"logits": jnp.asarray(logits), "features": jnp.asarray(projected), "token_mask": jnp.asarray(token_mask)}
  np.testing.assert_allclose(float(strategy.compute_loss(output, jnp.asarray(teacher), labels)), expected, rtol=LOSS_RTOL)


def test_feature_projection_student_outputs_go_through_the_projection():
  teacher = Llama3(ModelConfig.tiny(), rngs=nnx.Rngs(0))
  student = Llama3(ModelConfig.tiny(num_layers=1, hidden_size=32, num_heads=2, num_kv_heads=1), rngs=nnx.Rngs(1))
  strategy = FeatureProjectionStrategy(feature_layer=DecoderLayer).bind_defaults()
  strategy.pre_process_models(student, teacher)
  inputs = {"input_tokens": jnp.asarray(RNG.integers(1, 512, (2, 5))), "input_mask": jnp.ones((2, 5), bool)}
  graphdef, state = nnx.split(student)

  @jax.jit
  def outputs(state):
    model = nnx.merge(graphdef, state)
    raw = capture_intermediates(model, lambda m: m(inputs["input_tokens"])[0], feature_layer=DecoderLayer)[1]
    return strategy.get_student_outputs(model, inputs), raw[0]

  out, raw = outputs(state)
  kernel = np.asarray(student.distillation_feature_projection.kernel[...])
  assert kernel.shape == (1, 32, 64)
  expected = np.einsum("btd,de->bte", np.asarray(raw), kernel[0])[:, None]
  _assert_close_to_scale(out["features"], expected)
  teacher_graphdef, teacher_state = nnx.split(teacher)
  teacher_maps = jax.eval_shape(lambda st: strategy.get_teacher_outputs(nnx.merge(teacher_graphdef, st), inputs), teacher_state)
  assert teacher_maps.shape == (2, 2, 5, 64)
  strategy.post_process_models(student, teacher)
  assert not hasattr(student, "distillation_feature_projection")


# ---------------------------------------------------------------------------- attention


def _attention_maps(batch, layers, heads, length):
  scores = RNG.normal(size=(batch, layers, heads, length, length))
  causal = np.tril(np.ones((length, length), bool))
  scores = np.where(causal, scores, -np.inf)
  probs = np.exp(scores - scores.max(-1, keepdims=True))
  return (probs / probs.sum(-1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("student_heads,teacher_heads", [(2, 4), (4, 4)])
def test_attention_transfer_loss_matches_numpy(student_heads, teacher_heads):
  student = _attention_maps(2, 2, student_heads, 6)
  teacher = _attention_maps(2, 3, teacher_heads, 6)
  logits = RNG.normal(size=(2, 6, 11)).astype(np.float32)
  labels, targets, label_mask = _labels()
  token_mask = np.ones((2, 6), bool)
  token_mask[0, 4:] = False
  strategy = AttentionTransferStrategy(attention_layer=Attention, alpha=0.75)

  s, t = _np_pool(student, 2, 1), _np_pool(teacher, 2, 1)
  if student_heads != teacher_heads:
    s, t = s.mean(2, keepdims=True), t.mean(2, keepdims=True)
  distance = _np_cosine_distance(s, t, axis=-1)  # [B, L, H, T]
  weights = np.broadcast_to(token_mask[:, None, None, :], distance.shape)
  attention_loss = (distance * weights).sum() / weights.sum()
  expected = 0.75 * attention_loss + 0.25 * _np_ce(logits.astype(np.float64), targets, label_mask)

  output = {"logits": jnp.asarray(logits), "attention": jnp.asarray(student), "token_mask": jnp.asarray(token_mask)}
  np.testing.assert_allclose(float(strategy.compute_loss(output, jnp.asarray(teacher), labels)), expected, rtol=LOSS_RTOL)


def test_attention_projection_loss_matches_numpy():
  projected = RNG.normal(size=(2, 2, 4, 6, 6)).astype(np.float32)
  teacher = _attention_maps(2, 2, 4, 6)
  logits = RNG.normal(size=(2, 6, 11)).astype(np.float32)
  labels, targets, label_mask = _labels()
  token_mask = np.ones((2, 6), bool)
  token_mask[1, 2:] = False
  strategy = AttentionProjectionStrategy(attention_layer=Attention, alpha=0.5)
  sq = (projected - teacher) ** 2
  weights = np.broadcast_to(token_mask[:, None, None, :, None], sq.shape)
  expected = 0.5 * (sq * weights).sum() / weights.sum() + 0.5 * _np_ce(logits.astype(np.float64), targets, label_mask)
  output = {"logits": jnp.asarray(logits), "attention": jnp.asarray(projected), "token_mask": jnp.asarray(token_mask)}
  np.testing.assert_allclose(float(strategy.compute_loss(output, jnp.asarray(teacher), labels)), expected, rtol=LOSS_RTOL)


def test_captured_attention_maps_are_the_models_softmax_weights():
  """The captured maps of a 1-layer model equal softmax(q.k) recomputed here from its weights."""
  config = ModelConfig.tiny(num_layers=1)
  model = Llama3(config, rngs=nnx.Rngs(0))
  tokens = jnp.asarray(RNG.integers(1, 512, (1, 5)))
  _, _, maps = capture_intermediates(model, lambda m: m(tokens)[0], attention_layer=Attention)
  attn = model.layers[0].attn
  x = model.layers[0].input_norm(model.embedder.encode(tokens))
  from easytunix.layers.rope import apply_rope, rope_inv_freq

  c = attn.config
  q = attn.q_proj(x).reshape(1, 5, c.num_heads, c.head_dim)
  k = attn.k_proj(x).reshape(1, 5, c.num_kv_heads, c.head_dim)
  pos = jnp.arange(5)[None]
  inv = rope_inv_freq(c.head_dim, c.rope)
  q, k = np.asarray(apply_rope(q, pos, inv)), np.asarray(apply_rope(k, pos, inv))
  k = np.repeat(k, c.num_heads // c.num_kv_heads, axis=2)
  scores = np.einsum("bthd,bshd->bhts", q, k) * c.scale
  scores = np.where(np.tril(np.ones((5, 5), bool)), scores, -np.inf)
  probs = np.exp(scores - scores.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  # Softmax keeps relative accuracy: each probability is off by about the float32 error of the scores
  # (a 16-term dot product, ~1e-6 relative; measured 6e-8); a wrong mask or scale moves them by > 1e-2.
  np.testing.assert_allclose(np.asarray(maps[0]), probs, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------- capture


def test_capture_leaves_outputs_and_model_unchanged():
  model = Qwen3(Qwen3Config.tiny(), rngs=nnx.Rngs(0))
  tokens = jnp.asarray(RNG.integers(1, 512, (2, 7)))
  mask = jnp.asarray(np.arange(7)[None] < np.array([[7], [5]]))
  graphdef = nnx.graphdef(model)
  plain = model(tokens, attention_mask=mask)[0]
  logits, features, maps = capture_intermediates(
      model, lambda m: m(tokens, attention_mask=mask)[0], feature_layer=DecoderLayer, attention_layer=Attention
  )
  np.testing.assert_array_equal(np.asarray(logits), np.asarray(plain))  # the same eager ops on the same inputs
  assert len(features) == 2 and features[0].shape == (2, 7, 64)
  assert len(maps) == 2 and maps[0].shape == (2, 4, 7, 7)
  assert nnx.graphdef(model) == graphdef
  assert type(model.layers[0]) is DecoderLayer and model.layers[0].attn.capture_weights is False
  # Inside jit, on a model merged from its state: same values.
  graphdef, state = nnx.split(model)

  @jax.jit
  def run(state):
    m = nnx.merge(graphdef, state)
    return capture_intermediates(m, lambda m: m(tokens, attention_mask=mask)[0], feature_layer=DecoderLayer)[1]

  # jit fuses the forward pass into other float32 summation orders than eager execution.
  _assert_close_to_scale(run(state)[1], features[1])


def test_capture_restores_the_model_when_the_forward_fails():
  model = Llama3(ModelConfig.tiny(), rngs=nnx.Rngs(0))
  graphdef = nnx.graphdef(model)

  def broken(m):
    m(jnp.ones((1, 3), jnp.int32))
    raise RuntimeError("boom")

  with pytest.raises(RuntimeError, match="boom"):
    capture_intermediates(model, broken, feature_layer=DecoderLayer, attention_layer=Attention)
  assert nnx.graphdef(model) == graphdef
  assert not any("__captures__" in vars(m) for _, m in nnx.iter_modules(model))


def test_capture_of_a_leaf_layer_class():
  model = Llama3(ModelConfig.tiny(num_layers=1), rngs=nnx.Rngs(0))
  tokens = jnp.ones((1, 3), jnp.int32)
  _, features, _ = capture_intermediates(model, lambda m: m(tokens)[0], feature_layer=Linear)
  assert [f.shape[-1] for f in features] == [64, 32, 32, 64, 128, 128, 64]  # q k v o gate up down


def test_capture_of_declared_layers_leaves_their_classes_alone():
  """DecoderLayer and Attention sow what they declare: capturing them wraps and swaps nothing."""
  model = Llama3(ModelConfig.tiny(num_layers=1), rngs=nnx.Rngs(0))
  calls = (DecoderLayer.__dict__["__call__"], Attention.__dict__["__call__"])
  seen = {}

  def forward(m):
    seen["calls"] = (type(m.layers[0]).__dict__["__call__"], type(m.layers[0].attn).__dict__["__call__"])
    return m(jnp.ones((1, 3), jnp.int32))[0]

  _, features, maps = capture_intermediates(model, forward, feature_layer=DecoderLayer, attention_layer=Attention)
  assert seen["calls"] == calls and type(model.layers[0]) is DecoderLayer
  assert len(features) == 1 and len(maps) == 1


def test_capture_of_an_undeclared_class_restores_it():
  linear_call = Linear.__dict__["__call__"]
  model = Llama3(ModelConfig.tiny(num_layers=1), rngs=nnx.Rngs(0))

  def broken(m):
    m(jnp.ones((1, 3), jnp.int32))
    raise RuntimeError("boom")

  with pytest.raises(RuntimeError, match="boom"):
    capture_intermediates(model, broken, feature_layer=Linear)
  assert Linear.__dict__["__call__"] is linear_call
  capture_intermediates(model, lambda m: m(jnp.ones((1, 3), jnp.int32))[0], feature_layer=Linear)
  assert Linear.__dict__["__call__"] is linear_call


class _MhaModel(nnx.Module):
  """Two flax MultiHeadAttention layers, called the way a Tunix user's model calls them (no sow_weights)."""

  def __init__(self, rngs):
    kw = dict(num_heads=2, in_features=8, qkv_features=8, decode=False, rngs=rngs)
    self.second = nnx.MultiHeadAttention(**kw)
    self.first = nnx.MultiHeadAttention(**kw)

  def __call__(self, x):
    return self.second(self.first(x))


def test_capture_of_flax_multi_head_attention():
  mha_call = nnx.MultiHeadAttention.__dict__["__call__"]
  model = _MhaModel(nnx.Rngs(0))
  x = jnp.asarray(RNG.normal(size=(2, 5, 8)).astype(np.float32))
  plain = model(x)
  out, _, maps = capture_intermediates(model, lambda m: m(x), attention_layer=nnx.MultiHeadAttention)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(plain))
  assert nnx.MultiHeadAttention.__dict__["__call__"] is mha_call
  # Call order, not graph order ("first" runs first); each map is that layer's softmax over keys.
  _, expected = nnx.capture(lambda m: m.second(m.first(x, sow_weights=True), sow_weights=True), nnx.Intermediate)(model)
  np.testing.assert_array_equal(np.asarray(maps[0]), np.asarray(expected["first"]["attention_weights"][0]))
  np.testing.assert_array_equal(np.asarray(maps[1]), np.asarray(expected["second"]["attention_weights"][0]))
  assert maps[0].shape == (2, 2, 5, 5)
  strategy = AttentionTransferStrategy(attention_layer=nnx.MultiHeadAttention)
  strategy.check_compatible(model, _MhaModel(nnx.Rngs(1)))


# ---------------------------------------------------------------------------- errors


def test_vocabulary_mismatch_is_a_clear_error():
  teacher = Llama3(ModelConfig.tiny(), rngs=nnx.Rngs(0))
  student = Llama3(ModelConfig.tiny(vocab_size=256), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="one vocabulary.*256.*512"):
    check_compatible(student, teacher, LogitStrategy())
  # Feature distillation does not compare logits.
  check_compatible(student, teacher, FeaturePoolingStrategy())


def test_missing_layer_class_and_unbound_functions_are_clear_errors():
  teacher = Llama3(ModelConfig.tiny(), rngs=nnx.Rngs(0))
  student = Llama3(ModelConfig.tiny(num_layers=1), rngs=nnx.Rngs(0))

  class Other(nnx.Module):
    pass

  with pytest.raises(ValueError, match="has no Other module"):
    check_compatible(student, teacher, FeaturePoolingStrategy(feature_layer=Other))
  with pytest.raises(ValueError, match="cannot report attention weights"):
    check_compatible(student, teacher, AttentionTransferStrategy(attention_layer=DecoderLayer))
  with pytest.raises(ValueError, match="same object"):
    check_compatible(teacher, teacher, LogitStrategy())
  with pytest.raises(ValueError, match="bind_defaults"):
    LogitStrategy().get_teacher_outputs(teacher, {"input_tokens": jnp.ones((1, 2), jnp.int32)})
  with pytest.raises(TypeError, match="module class"):
    FeaturePoolingStrategy(feature_layer="DecoderLayer")
  with pytest.raises(ValueError, match="temperature"):
    LogitStrategy(temperature=0.0)
  with pytest.raises(ValueError, match="alpha"):
    AttentionTransferStrategy(alpha=1.5)
  with pytest.raises(ValueError, match="same batch, sequence and vocabulary"):
    LogitStrategy().compute_loss(jnp.zeros((1, 2, 3)), jnp.zeros((1, 2, 4)), jnp.zeros((1, 2), jnp.int32))


def test_bind_defaults_keeps_given_functions():
  forward = lambda model, **inputs: model(inputs["input_tokens"])[0]  # noqa: E731
  strategy = LogitStrategy(student_forward_fn=forward).bind_defaults()
  defaults = default_functions()
  assert strategy.student_forward_fn is forward
  assert strategy.teacher_forward_fn is defaults[1] and strategy.labels_fn is defaults[2]


def test_feature_and_attention_strategies_across_families():
  """A Gemma 3 teacher (sliding + global layers, 3 layers) and a Qwen 3 MoE student: different depth,
  width, heads and vocabulary still give finite feature and attention losses (compiled)."""
  from easytunix.models.gemma3 import Gemma3, Gemma3Config

  teacher = Gemma3(Gemma3Config.tiny(), rngs=nnx.Rngs(0))
  student = Qwen3(Qwen3Config.tiny_moe(num_layers=1), rngs=nnx.Rngs(1))
  tokens = jnp.asarray(RNG.integers(1, 200, (2, 6)))
  mask = jnp.asarray(np.arange(6)[None] < np.array([[6], [4]]))
  inputs = {"input_tokens": tokens, "input_mask": mask, "completion_mask": None, "positions": None}
  for strategy in (FeaturePoolingStrategy(), AttentionProjectionStrategy()):
    strategy.bind_defaults()
    strategy.check_compatible(student, teacher)
    strategy.pre_process_models(student, teacher)
    teacher_out = jax.jit(lambda st, x: strategy.get_teacher_outputs(nnx.merge(nnx.graphdef(teacher), st), x))(nnx.state(teacher), inputs)
    graphdef = nnx.graphdef(student)
    loss, aux = jax.jit(lambda st, t, x: strategy.train_loss_and_metrics(nnx.merge(graphdef, st), t, x))(nnx.state(student), teacher_out, inputs)
    assert np.isfinite(float(loss)) and float(aux["distill_loss"]) > 0
    strategy.post_process_models(student, teacher)
