"""Blockwise (memory-linear) attention: parity with the dense layer math, memory, selection."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from easytunix.layers import blockwise_attention as ba
from easytunix.layers.attention import dense_attention_core

# Tiny GQA shapes: K=2 kv heads, G=2 query heads each; T and S are not multiples
# of the blocks, and S > T so that q_offset > 0 is a prefill into a cache.
B, T, S, K, G, H = 2, 13, 19, 2, 2, 8
BLOCK_Q, BLOCK_K = 4, 5

# float32 round-off: outputs are convex combinations of O(1) values over <= 19
# keys; the blockwise path reorders the sums and rescales partial sums once per
# key block (4 blocks), so the error is a few ulps of O(1) (~1e-6; observed
# <= 7e-7 on outputs and gradients alike). Gradients add up ~T * S such terms of
# O(1..10), hence the looser 5e-5. Any real masking or scaling bug is O(0.1).
OUT_TOL = 1e-5
GRAD_TOL = 5e-5

# LLVM -O0 for the CPU code: the same HLO and buffer assignment (so the same
# memory figures), a fraction of the compile time of the blockwise gradients.
COMPILE_OPTIONS = {"xla_backend_optimization_level": 0}


def dense_reference(q, k, v, mask, scale, softcap=None):
  """The current layer's math: mask [B, T, S] bool, q [B, T, K, G, H], k/v [B, S, K, H]."""
  scores = jnp.einsum("btkgh,bskh->bkgts", q, k, preferred_element_type=jnp.float32)
  scores = scores * scale
  if softcap is not None:
    scores = jnp.tanh(scores / softcap) * softcap
  scores = jnp.where(mask[:, None, None, :, :], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1)
  return jnp.einsum("bkgts,bskh->btkgh", probs.astype(v.dtype), v)


def reference_mask(key_valid, q_offset, t, causal, window):
  """The full [B, T, S] mask, built in numpy from the factored form."""
  key_valid = np.asarray(key_valid)
  s = key_valid.shape[1]
  q_slots = q_offset + np.arange(t)[:, None]
  k_slots = np.arange(s)[None, :]
  allowed = np.ones((t, s), bool)
  if causal:
    allowed &= k_slots <= q_slots
  if window is not None:
    allowed &= q_slots - k_slots < window
  return jnp.asarray(key_valid[:, None, :] & allowed[None])


def _inputs(seed=0):
  r = np.random.default_rng(seed)
  q = jnp.asarray(r.normal(size=(B, T, K, G, H)), jnp.float32)
  k = jnp.asarray(r.normal(size=(B, S, K, H)), jnp.float32)
  v = jnp.asarray(r.normal(size=(B, S, K, H)), jnp.float32)
  cot = jnp.asarray(r.normal(size=(B, T, K, G, H)), jnp.float32)
  # Row 0: 2 right-padding keys; row 1: 3 left-padding keys (its first query
  # rows see no key when q_offset = 0, exercising the uniform-average rows).
  key_valid = np.ones((B, S), bool)
  key_valid[0, S - 2 :] = False
  key_valid[1, :3] = False
  return q, k, v, cot, jnp.asarray(key_valid)


@functools.lru_cache(maxsize=None)
def _outputs_and_grads(causal, window, softcap, scale):
  """One compiled function per static case: outputs and q/k/v cotangents of both paths."""

  def run(q, k, v, cot, key_valid, q_offset, mask):
    blockwise = functools.partial(
        ba.blockwise_attention, scale=scale, key_valid=key_valid, causal=causal, q_offset=q_offset,
        sliding_window=window, softcap=softcap, block_q=BLOCK_Q, block_k=BLOCK_K,
    )
    dense = functools.partial(dense_reference, mask=mask, scale=scale, softcap=softcap)
    results = []
    for fn in (blockwise, dense):
      out, vjp = jax.vjp(fn, q, k, v)
      results.append((out, *vjp(cot)))
    return results

  return jax.jit(run)


def _compile_and_run(fn, *args):
  return fn.lower(*args).compile(COMPILE_OPTIONS)(*args)


@pytest.mark.parametrize(
    "causal, window, softcap, scale, q_offset",
    [
        pytest.param(True, None, None, H**-0.5, 0, id="causal-padding"),
        pytest.param(True, None, None, H**-0.5, 6, id="prefill-offset"),  # same compile as above
        # Window and soft-cap share one compilation (each blockwise gradient costs seconds).
        pytest.param(True, 4, 1.5, 0.7, 6, id="sliding-window-softcap"),
    ],
)
def test_parity_with_dense(causal, window, softcap, scale, q_offset):
  """Outputs and q/k/v gradients against the dense reference (GQA, ragged blocks, padding)."""
  q, k, v, cot, key_valid = _inputs()
  mask = reference_mask(key_valid, q_offset, T, causal, window)
  fn = _outputs_and_grads(causal, window, softcap, scale)
  got, want = _compile_and_run(fn, q, k, v, cot, key_valid, jnp.int32(q_offset), mask)
  names = ("out", "dq", "dk", "dv")
  for name, a, b in zip(names, got, want):
    tol = OUT_TOL if name == "out" else GRAD_TOL
    assert np.all(np.isfinite(a)), name
    np.testing.assert_allclose(a, b, rtol=tol, atol=tol, err_msg=name)
  if q_offset == 0:
    # Row 1's first three queries see no key: both give the mean of v over S.
    np.testing.assert_allclose(got[0][1, :3], jnp.broadcast_to(v[1].mean(0)[None, :, None], (3, K, G, H)), atol=OUT_TOL)


def test_output_dtype_follows_q():
  q = jax.ShapeDtypeStruct((1, 5, 1, 2, 8), jnp.bfloat16)
  k = jax.ShapeDtypeStruct((1, 5, 1, 8), jnp.bfloat16)
  out = jax.eval_shape(functools.partial(ba.blockwise_attention, scale=1.0, block_q=2, block_k=2), q, k, k)
  assert out.shape == q.shape and out.dtype == jnp.bfloat16


def _grad_temp_bytes(fn, t):
  """Temporary bytes of the compiled gradient of sum(attention) at sequence length t."""
  q = jax.ShapeDtypeStruct((1, t, 1, 1, 16), jnp.float32)
  kv = jax.ShapeDtypeStruct((1, t, 1, 16), jnp.float32)
  key_valid = jax.ShapeDtypeStruct((1, t), jnp.bool_)

  def loss(q, k, v, key_valid):
    return fn(q, k, v, key_valid=key_valid).sum()

  compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, kv, kv, key_valid).compile(COMPILE_OPTIONS)
  return compiled.memory_analysis().temp_size_in_bytes


def test_memory_linear_in_sequence():
  blockwise = functools.partial(ba.blockwise_attention, scale=0.25, block_q=512, block_k=512)

  def dense(q, k, v, key_valid):
    t = q.shape[1]
    mask = key_valid[:, None, :] & jnp.tril(jnp.ones((t, t), jnp.bool_))[None]
    return dense_reference(q, k, v, mask, 0.25)

  small, large = 2048, 8192  # 4x the length: a quadratic path needs ~16x
  bw = [_grad_temp_bytes(blockwise, t) for t in (small, large)]
  dn = [_grad_temp_bytes(dense, t) for t in (small, large)]
  print(f"temp bytes blockwise {bw}, dense {dn}")
  assert bw[1] / bw[0] < 6, bw
  assert dn[1] / dn[0] > 8, dn  # the measurement does tell quadratic from linear
  assert bw[1] < dn[1] / 8, (bw, dn)


CPU_ONLY = pytest.mark.skipif(jax.default_backend() != "cpu", reason="CPU dispatch (tests/test_gpu.py covers GPUs)")


@CPU_ONLY
def test_select_implementation_on_cpu():
  assert jax.default_backend() == "cpu"
  q = jnp.zeros((1, 4, 1, 2, 64), jnp.bfloat16)
  k = jnp.zeros((1, 4, 1, 64), jnp.bfloat16)
  # A case cuDNN could serve on a GPU runs dense on CPU for short keys, blockwise for long ones.
  assert ba.cudnn_unsupported_reason(q, k) is None
  assert ba.select_implementation(q, k) == "xla"
  long_k = jnp.zeros((1, ba.DENSE_MAX_KEYS + 1, 1, 64), jnp.bfloat16)
  assert ba.select_implementation(q, long_k) == "blockwise"
  assert ba.select_implementation(q, k, implementation="xla") == "xla"
  with pytest.raises(ValueError, match="NVIDIA GPU"):
    ba.select_implementation(q, k, implementation="cudnn")
  with pytest.raises(ValueError, match="NVIDIA GPU"):
    ba.attention(q, k, k, scale=1.0, implementation="cudnn")
  with pytest.raises(ValueError, match="implementation must be one of"):
    ba.select_implementation(q, k, implementation="flash")
  # The cases that keep cuDNN out.
  assert "soft-capping" in ba.cudnn_unsupported_reason(q, k, softcap=50.0)
  assert "bf16/fp16" in ba.cudnn_unsupported_reason(q.astype(jnp.float32), k.astype(jnp.float32))
  assert ba.cudnn_unsupported_reason(q, k, key_valid=jnp.ones((1, 4), bool)) is None  # checked at run time
  assert "q_offset" in ba.cudnn_unsupported_reason(q, k, q_offset=jnp.int32(0))
  assert "head width" in ba.cudnn_unsupported_reason(q[..., :12], k[..., :12])
  assert "causal" in ba.cudnn_unsupported_reason(q, k, causal=False, sliding_window=4)


def test_auto_and_cudnn_argument_mapping():
  """attention(auto) on CPU, and the arguments the cuDNN path passes to
  jax.nn.dot_product_attention (run here with its "xla" implementation), match
  the reference for right padding given as lengths plus a sliding window."""
  q, k, v, _, _ = _inputs(1)
  k, v = k[:, :T], v[:, :T]
  lengths = jnp.array([T, T - 4], jnp.int32)
  key_valid = np.arange(T)[None, :] < np.asarray(lengths)[:, None]
  mask = reference_mask(key_valid, 0, T, True, 5)
  want = dense_reference(q, k, v, mask, 0.3)

  @jax.jit
  def both(q, k, v, lengths):
    mapped = ba._jax_nn_attention(
        q, k, v, scale=0.3, kv_lengths=lengths, causal=True, sliding_window=5, implementation="xla"
    )
    auto = ba.attention(q, k, v, scale=0.3, kv_lengths=lengths, sliding_window=5, block_q=BLOCK_Q, block_k=BLOCK_K)
    return mapped, auto

  mapped, auto = _compile_and_run(both, q, k, v, lengths)
  np.testing.assert_allclose(mapped, want, rtol=OUT_TOL, atol=OUT_TOL)
  np.testing.assert_allclose(auto, want, rtol=OUT_TOL, atol=OUT_TOL)


@CPU_ONLY
def test_key_valid_reaches_cudnn_only_when_right_padded(monkeypatch):
  """With a key_valid mask, "cudnn" runs on the device's check that every row is right-padded; left
  padding takes the dense path inside the same program. cuDNN is stood in for by the "xla"
  implementation of jax.nn.dot_product_attention (same arguments), which records when it runs."""
  ran = []

  def fake_cudnn(q, k, v, *, implementation, **kwargs):
    assert implementation == "cudnn"
    jax.debug.callback(lambda: ran.append(1))
    return original(q, k, v, implementation="xla", **kwargs)

  original = ba._jax_nn_attention
  monkeypatch.setattr(ba, "_is_nvidia_gpu", lambda: True)
  monkeypatch.setattr(ba, "_jax_nn_attention", fake_cudnn)
  r = np.random.default_rng(3)
  q = jnp.asarray(r.normal(size=(3, T, K, G, H)), jnp.bfloat16)
  k = jnp.asarray(r.normal(size=(3, T, K, H)), jnp.bfloat16)
  v = jnp.asarray(r.normal(size=(3, T, K, H)), jnp.bfloat16)

  @jax.jit
  def run(q, k, v, key_valid):
    return ba.attention(q, k, v, scale=0.3, key_valid=key_valid, sliding_window=6, implementation="cudnn")

  lengths = np.array([T, T - 5, 0])  # full, right-padded, empty
  right = np.arange(T)[None, :] < lengths[:, None]
  left = right[:, ::-1].copy()
  for key_valid, cudnn_runs in ((right, True), (left, False), (np.ones((3, T), bool), True)):
    ran.clear()
    got = np.asarray(run(q, k, v, jnp.asarray(key_valid)), np.float32)
    mask = reference_mask(key_valid, 0, T, True, 6)
    want = dense_reference(*(x.astype(jnp.float32) for x in (q, k, v)), mask, 0.3)
    sees_a_key = np.asarray(mask).any(-1)  # rows that see no key are not defined under cuDNN
    np.testing.assert_allclose(got[sees_a_key], np.asarray(want)[sees_a_key], rtol=2e-2, atol=2e-2)
    assert bool(ran) == cudnn_runs, (key_valid, ran)
    assert np.isfinite(got).all()
  assert run._cache_size() == 1  # one program serves both kinds of batch


def _core(q, k, v, mask, scale, softcap):
  """The layer's dense core (``dense_attention_core``) in the reference's layouts."""
  b, t, nk, g, h = q.shape
  qm = q.transpose(0, 2, 3, 1, 4).reshape(b, nk, g * t, h)
  out = dense_attention_core(qm, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), mask, g, scale, softcap)
  return out.reshape(b, nk, g, t, h).transpose(0, 3, 1, 2, 4)


@pytest.mark.parametrize(
    "window, softcap, scale, q_offset",
    [
        pytest.param(None, None, H**-0.5, 0, id="causal-padding"),  # row 1's first queries see no key
        pytest.param(4, 1.5, 0.7, 6, id="sliding-window-softcap"),
    ],
)
def test_dense_core_recomputes_probabilities_with_the_same_gradients(window, softcap, scale, q_offset):
  q, k, v, cot, key_valid = _inputs(seed=1)
  mask = reference_mask(key_valid, q_offset, T, True, window)

  @jax.jit
  def run(q, k, v, cot):
    results = []
    for fn in (_core, dense_reference):
      out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, mask, scale, softcap), q, k, v)
      results.append((out, *vjp(cot)))
    return results

  got, want = run(q, k, v, cot)
  for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
    assert np.all(np.isfinite(a)), name
    np.testing.assert_allclose(a, b, rtol=OUT_TOL if name == "out" else GRAD_TOL,
                               atol=OUT_TOL if name == "out" else GRAD_TOL, err_msg=name)


def test_dense_core_keeps_no_probabilities_for_the_backward_pass(monkeypatch):
  """A model's gradient: autodiff of the same math keeps every layer's [B, K, G, T, S] probabilities."""
  from flax import nnx

  from easytunix.layers import attention
  from easytunix.models.llama3.model import Llama3, ModelConfig

  layers, b, t = 8, 2, 128
  model = Llama3(ModelConfig.tiny(num_layers=layers), rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 100, (b, t)), jnp.int32)

  def temp_bytes():
    def loss(state):
      logits, _ = nnx.merge(graphdef, state)(tokens, None, None, jnp.ones((b, t), bool))
      return jnp.mean(logits**2)

    return jax.jit(jax.grad(loss)).lower(state).compile(COMPILE_OPTIONS).memory_analysis().temp_size_in_bytes

  core = temp_bytes()
  monkeypatch.setattr(attention, "dense_attention_core", lambda *args: attention._core_forward(*args)[0])
  autodiff = temp_bytes()
  probs = b * model.config.num_heads * t * t * 4
  # Measured: 14.3 vs 18.8 MiB (0.5 MiB of probabilities per layer).
  assert autodiff - core > layers / 2 * probs, (core, autodiff, probs)


@pytest.mark.parametrize("window, softcap", [(None, None), (70, 1.5)], ids=["causal-padding", "window-softcap"])
def test_causal_blocks_match_one_dense_block(window, softcap):
  """Query blocks over their key prefixes (150 slots: blocks of 64, 64 and 22), outputs and gradients."""
  from easytunix.layers.attention import causal_blocks_attention

  b, t, nk, g, h = 2, 150, 2, 2, 8
  r = np.random.default_rng(3)
  qm, cot = (jnp.asarray(r.normal(size=(b, nk, g * t, h)), jnp.float32) for _ in range(2))
  k, v = (jnp.asarray(r.normal(size=(b, nk, t, h)), jnp.float32) for _ in range(2))
  key_valid = np.ones((b, t), bool)
  key_valid[0, t - 2 :] = False  # right padding
  key_valid[1, :3] = False  # left padding: row 1's first 3 queries see no key
  allowed = reference_mask(key_valid, 0, t, True, window)
  # Rows with a visible key [B, 1, G * T, 1]; a row that sees none is padding (its output is not compared).
  rows = jnp.asarray(np.asarray(allowed).any(-1)[:, None, None, :].repeat(g, 2).reshape(b, 1, g * t, 1))

  @jax.jit
  def run(qm, k, v, cot):
    results = []
    for fn in (causal_blocks_attention, dense_attention_core):
      out, vjp = jax.vjp(lambda qm, k, v: fn(qm, k, v, allowed, g, 0.35, softcap), qm, k, v)
      results.append((out, *vjp(cot * rows)))
    return results

  got, want = run(qm, k, v, cot)
  for name, a, w in zip(("out", "dq", "dk", "dv"), got, want):
    assert np.all(np.isfinite(a)), name
    a, w = (np.where(rows, a, 0), np.where(rows, w, 0)) if name in ("out", "dq") else (a, w)
    np.testing.assert_allclose(a, w, rtol=OUT_TOL if name == "out" else GRAD_TOL,
                               atol=OUT_TOL if name == "out" else GRAD_TOL, err_msg=name)


def test_model_runs_causal_blocks_on_cpu_for_big_score_maps(monkeypatch):
  """The layer takes the blocks for a factored causal mask once a layer's scores are big enough; same logits."""
  from flax import nnx

  from easytunix.layers import attention
  from easytunix.models.llama3.model import Llama3, ModelConfig

  graphdef, state = nnx.split(Llama3(ModelConfig.tiny(num_layers=1), rngs=nnx.Rngs(0)))
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 100, (2, 150)), jnp.int32)
  valid = jnp.asarray(np.arange(150)[None, :] >= np.array([[0], [5]]))  # row 1 left-padded by 5

  def logits():
    return jax.jit(lambda state: nnx.merge(graphdef, state)(tokens, None, None, valid)[0])(state)

  want = logits()
  calls = []
  blocks = attention.causal_blocks_attention
  monkeypatch.setattr(attention, "causal_blocks_attention", lambda *args: calls.append(1) or blocks(*args))
  assert np.array_equal(logits(), want) and not calls  # 2 x 4 heads x 150^2 scores: under the threshold
  monkeypatch.setattr(attention, "CAUSAL_BLOCKS_MIN_SCORES", 0)
  got = logits()
  assert calls == [1]
  rows = np.asarray(valid)
  np.testing.assert_allclose(np.asarray(got)[rows], np.asarray(want)[rows], rtol=0,
                             atol=2e-5 * np.abs(np.asarray(want)).max())
