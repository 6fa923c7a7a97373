"""On an NVIDIA GPU: cuDNN flash attention against the dense reference, in a model, and under fit().

Skipped elsewhere: the suite pins ``JAX_PLATFORMS=cpu`` unless the environment sets it, so on a GPU machine run
``JAX_PLATFORMS=cuda python -m pytest tests/test_gpu.py`` (and any other test file the same way).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from easytunix.layers import attention as attention_layer
from easytunix.layers import blockwise_attention as ba

pytestmark = pytest.mark.skipif(not ba._is_nvidia_gpu(), reason="needs an NVIDIA GPU (JAX_PLATFORMS=cuda)")

CUDNN_CALL = "__cudnn$fmha"  # the custom calls jax.nn.dot_product_attention emits for cuDNN


def _rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


@pytest.mark.parametrize("padding", ["none", "kv_lengths", "right-padded key_valid", "left-padded key_valid"])
@pytest.mark.parametrize("window", [None, 64])
def test_cudnn_attention_matches_dense_reference(padding, window):
  """Outputs and q/k/v gradients of implementation="cudnn" (bf16) against float32 dense attention (GQA)."""
  b, t, k_heads, groups, h = 2, 256, 2, 4, 64
  r = np.random.default_rng(0)
  q, k, v, cot = (jnp.asarray(r.normal(size=s), jnp.bfloat16)
                  for s in ((b, t, k_heads, groups, h), (b, t, k_heads, h), (b, t, k_heads, h), (b, t, k_heads, groups, h)))
  lengths = jnp.array([t, t - 37], jnp.int32)
  right = jnp.arange(t)[None, :] < lengths[:, None]
  key_valid = {"none": None, "kv_lengths": None, "right-padded key_valid": right,
               "left-padded key_valid": right[:, ::-1]}[padding]
  kv_lengths = lengths if padding == "kv_lengths" else None
  scale = h**-0.5

  def cudnn(q, k, v):
    return ba.attention(q, k, v, scale=scale, key_valid=key_valid, kv_lengths=kv_lengths, sliding_window=window,
                        implementation="cudnn")

  def reference(q, k, v):
    valid = right if padding == "kv_lengths" else key_valid
    with jax.default_matmul_precision("highest"):
      return ba.dense_attention(q, k, v, scale=scale, key_valid=valid, sliding_window=window)

  def out_and_grads(fn, dtype, q, k, v, cot):
    out, vjp = jax.vjp(fn, *(x.astype(dtype) for x in (q, k, v)))
    return (out, *vjp(cot.astype(dtype)))

  run = jax.jit(lambda *args: out_and_grads(cudnn, jnp.bfloat16, *args))
  assert CUDNN_CALL in run.lower(q, k, v, cot).as_text()
  got = run(q, k, v, cot)
  want = jax.jit(lambda *args: out_and_grads(reference, jnp.float32, *args))(q, k, v, cot)
  for name, a, w in zip(("out", "dq", "dk", "dv"), got, want):
    assert np.isfinite(np.asarray(a, np.float32)).all(), name
    # bf16 inputs and outputs: relative error ~2^-8 per element, ~4e-3 in norm; a masking bug is O(0.1..1).
    assert _rel_err(a, w) < 2e-2, (name, _rel_err(a, w))


def _tiny_bf16_qwen3():
  from easytunix.models.qwen3.model import ModelConfig, Qwen3

  config = ModelConfig.tiny(num_layers=2, head_dim=64, dtype="bfloat16", param_dtype="bfloat16")
  return Qwen3(config, rngs=nnx.Rngs(0))


def test_model_loss_and_gradients_cudnn_vs_xla():
  """A bf16 Qwen3 with right-padded rows: attention="auto" picks cuDNN on the GPU, and its loss and
  gradients match the dense "xla" path."""
  from easytunix.sft.peft_trainer import default_loss_fn

  model = _tiny_bf16_qwen3()
  r = np.random.default_rng(1)
  tokens = jnp.asarray(r.integers(1, model.config.vocab_size, (4, 96)), jnp.int32)
  mask = jnp.arange(96)[None, :] < jnp.array([96, 80, 50, 9])[:, None]

  def loss_and_grads(implementation):
    attention_layer.set_attention_implementation(model, implementation)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(params, tokens, mask):
      return default_loss_fn(nnx.merge(graphdef, params, rest), tokens, mask)[0]

    fn = jax.jit(jax.value_and_grad(loss))
    return fn.lower(params, tokens, mask).as_text(), fn(params, tokens, mask)

  text_auto, (loss_auto, grads_auto) = loss_and_grads("auto")
  text_xla, (loss_xla, grads_xla) = loss_and_grads("xla")
  assert CUDNN_CALL in text_auto and CUDNN_CALL not in text_xla
  assert abs(float(loss_auto) - float(loss_xla)) < 2e-2 * abs(float(loss_xla)), (loss_auto, loss_xla)
  flat_auto, flat_xla = jax.tree.leaves(grads_auto), jax.tree.leaves(grads_xla)
  assert len(flat_auto) == len(flat_xla) > 0
  worst = max(_rel_err(a, w) for a, w in zip(flat_auto, flat_xla))
  assert worst < 5e-2, worst


def test_fit_and_generate_on_gpu_use_cudnn(monkeypatch):
  """The facade end to end on the GPU: bf16-mixed LoRA fit (attention="auto" resolves to cuDNN in the
  train step), the loss falls, and generate returns text."""
  from easytunix.presets import Qwen3

  chosen = []
  original = attention_layer.select_implementation

  def recording(*args, **kwargs):
    chosen.append(original(*args, **kwargs))
    return chosen[-1]

  monkeypatch.setattr(attention_layer, "select_implementation", recording)
  model = Qwen3.from_preset("qwen3_tiny")
  model.compile(trainer="sft", lora_rank=8, learning_rate=3e-2, precision="bf16-mixed", max_length=64)
  assert jax.devices()[0].platform == "gpu"
  history = model.fit(["the quick brown fox jumps over the lazy dog"] * 16, epochs=8, batch_size=8, verbose=0)
  losses = history.history["loss"]
  assert losses[-1] < losses[0] - 0.5, losses  # 6.09 -> 5.11 on CPU (cuDNN stood in for by XLA)
  assert "cudnn" in chosen, sorted(set(chosen))
  text = model.generate("the quick brown", max_length=8)
  assert isinstance(text, str) and text
