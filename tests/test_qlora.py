"""QLoRA: blockwise 4/8-bit quantization of the base kernels, LoRA on top, and full-precision exports."""

import contextlib
import io
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.ad_checkpoint import print_saved_residuals

from easytunix import callbacks
from easytunix.layers import quantization as q
from easytunix.layers.linear import Linear
from easytunix.layers.sharding import shard_model
from easytunix.models.qwen3 import ModelConfig, Qwen3
from easytunix.presets import CausalLM
from easytunix.presets import Qwen3 as Qwen3Preset
from easytunix.sft import lora

METHODS = ("nf4", "int4", "int8")
TEXTS = [f"the {w} cat sat on the {v} mat."
         for w in ("red", "big", "old", "shy") for v in ("blue", "soft", "flat", "warm")]


def _weights(shape=(256, 48), seed=0):
  """Gaussian weights whose blocks have very different magnitudes, one all-zero block and one outlier."""
  rng = np.random.default_rng(seed)
  w = rng.normal(size=shape).astype(np.float32)
  w *= np.exp(rng.uniform(-4, 2, size=(shape[0] // 64, 1, shape[1]))).repeat(64, axis=0).reshape(shape)
  w[64:128, 3] = 0.0
  w[5, 7] = 40.0
  return w


# Jitted once per shape: run eagerly, every jnp op of the quantizer would compile on its own.
_quantize = jax.jit(q.quantize, static_argnums=(1, 2))
_dequantize = jax.jit(q.dequantize, static_argnums=(2, 3))


def _block_absmax(w, block):
  return np.abs(w.reshape(w.shape[0] // block, block, w.shape[1])).max(axis=1).repeat(block, axis=0)


def test_nf4_levels_are_the_qlora_normal_float_table():
  # The NF4 values printed in the QLoRA paper (Dettmers et al., 2023, appendix E), to their 4 printed decimals.
  published = [-1.0, -0.6962, -0.5251, -0.3949, -0.2844, -0.1848, -0.0911, 0.0,
               0.0796, 0.1609, 0.2461, 0.3379, 0.4407, 0.5626, 0.7230, 1.0]
  np.testing.assert_allclose(q.NF4_LEVELS, published, atol=6e-5)
  assert q.NF4_LEVELS[7] == 0.0 and q.NF4_LEVELS.dtype == np.float32


@pytest.mark.parametrize("method", METHODS)
def test_round_trip_error_is_within_half_a_step(method):
  w = _weights()
  codes, scales = _quantize(jnp.asarray(w), method, 64)
  back = np.asarray(_dequantize(codes, scales, method, jnp.float32))
  absmax = _block_absmax(w, 64)
  # Every weight is rounded to the nearest representable value of its block, so the error is at most half
  # the largest gap between neighbouring values: symmetric ints step by absmax / qmax (127 or 7); NF4's
  # levels (times absmax) are widest apart between 0.723 and 1. The 1e-5 slack covers float32 round-off of
  # w / scale and level * scale (~1e-7 of absmax), far below any half step (>= absmax / 254).
  half_step = {"int8": 1 / 127 / 2, "int4": 1 / 7 / 2, "nf4": float(np.diff(q.NF4_LEVELS).max()) / 2}[method]
  err = np.abs(back - w)
  assert np.all(err <= absmax * half_step * (1 + 1e-5) + 1e-30), (err / absmax).max()
  # Not a vacuous bound: the worst weight uses a good part of it (rounding, not truncation to zero).
  assert (err / np.maximum(absmax, 1e-30)).max() > 0.3 * half_step
  assert np.all(back[64:128, 3] == 0.0)  # an all-zero block stays exactly zero (no 0/0)
  assert back[5, 7] == pytest.approx(40.0, rel=1e-6)  # each block's largest weight is its scale: kept
  # Quantizing the dequantized kernel gives the same codes (what save_to_preset/from_preset relies on).
  again, _ = _quantize(jnp.asarray(back), method, 64)
  np.testing.assert_array_equal(np.asarray(again), np.asarray(codes))


@pytest.mark.parametrize("method, block, expected", [
    ("nf4", 64, 0.5 + 4 / 64), ("int4", 64, 0.5 + 4 / 64), ("int8", 64, 1 + 4 / 64), ("nf4", 32, 0.5 + 4 / 32),
])
def test_bytes_per_parameter_measured_from_the_stored_arrays(method, block, expected):
  w = jnp.asarray(_weights())
  codes, scales = _quantize(w, method, block)
  measured = (np.asarray(codes).nbytes + np.asarray(scales).nbytes) / w.size
  assert measured == expected == q.bytes_per_parameter(method, block)
  assert codes.shape == ((w.shape[0] // 2, w.shape[1]) if method != "int8" else w.shape)
  assert codes.dtype == (jnp.int8 if method == "int8" else jnp.uint8) and scales.dtype == jnp.float32
  assert scales.shape == (w.shape[0] // block, w.shape[1])


def test_bad_block_size_and_method_errors():
  w = jnp.zeros((96, 8))
  with pytest.raises(ValueError, match=r"shape \(96, 8\).*not a multiple of block_size=64.*Use block_size=32"):
    q.quantize(w, "nf4", 64)
  with pytest.raises(ValueError, match="must be even"):
    q.quantize(w, "int4", 3)
  with pytest.raises(ValueError, match=r"one of \['nf4', 'int4', 'int8'\], got 'nf5'. Did you mean 'nf4'"):
    q.quantize(w, "nf5", 32)
  model = nnx.eval_shape(lambda: Qwen3(ModelConfig.tiny(), rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match=r"layers\.0\.\w+\.\w+_proj\.kernel of shape \(64, \d+\).*block_size=48"):
    lora.quantize_base(model, "int8", block_size=48)
  assert not lora.is_quantized(model)  # every kernel is checked before any is changed


@nnx.jit
def _logits(model, tokens):
  return model(tokens)[0]


_BASE = {}


def _model():
  """A fresh copy of one tiny model (built once: eager init compiles every op)."""
  if "model" not in _BASE:
    _BASE["model"] = Qwen3(ModelConfig.tiny(), rngs=nnx.Rngs(0))
  return nnx.clone(_BASE["model"])


def test_quantized_forward_is_lora_on_the_dequantized_base():
  model = _model()
  lora.apply_lora(model, rank=4, alpha=8.0)
  for m in lora.lora_modules(model).values():  # non-zero adapters, so the LoRA branch counts
    m.lora_b[...] = 0.05 * jax.random.normal(jax.random.key(1), m.lora_b[...].shape)
  reference = nnx.clone(model)
  lora.quantize_base(model, "nf4")
  assert len(lora.check_quantizable(model, "nf4")) == 0 and lora.quantization_method(model) == "nf4"
  quantized = lora.linear_modules(model)
  for path, linear in lora.linear_modules(reference).items():
    if quantized[path].quantized:
      linear.kernel[...] = quantized[path].kernel.dequantize(jnp.float32)
  assert sum(m.quantized for m in quantized.values()) == 14  # 7 projections x 2 layers
  tokens = jnp.asarray(np.random.default_rng(0).integers(3, 500, (2, 12)), jnp.int32)
  got, want = np.asarray(_logits(model, tokens)), np.asarray(_logits(reference, tokens))
  # Both run the same float32 matmuls on the same kernel values (the quantized one dequantizes inside the
  # jit first); only fusion order may differ: round-off ~1e-7 of the logits. A wrong code, scale or packing
  # order moves them by >1e-2.
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())
  # The codes and scales are not nnx.Param: no Param filter (optimizer, trainer) selects them.
  assert not jax.tree.leaves(nnx.state(model, nnx.All(nnx.Param, q.QuantizedWeight)))
  assert len(jax.tree.leaves(nnx.state(model, q.QuantizedWeight))) == 28


def test_backward_pass_keeps_codes_not_the_dequantized_kernel():
  linear = Linear(128, 64, rngs=nnx.Rngs(0))
  lora.apply_lora(linear, rank=4, targets=".*")
  lora.quantize_base(linear, "nf4", targets=".*")
  graphdef, adapters, rest = nnx.split(linear, nnx.LoRAParam, ...)

  def loss(adapters, x):
    return jnp.sum(nnx.merge(graphdef, adapters, rest)(x) ** 2)

  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    print_saved_residuals(loss, adapters, jnp.ones((4, 128)))  # one line per saved array: "u8[64,64] from ..."
  saved = out.getvalue()
  # Kept for the backward pass: the 0.5-byte codes [64, 64] (and the small scales), never the float kernel
  # [128, 64], which would hold the whole base in the compute dtype from the forward to the backward pass.
  assert "u8[64,64]" in saved and "[128,64]" not in saved, saved


@pytest.mark.multi_device
def test_abstract_and_sharded_quantization():
  abstract = nnx.eval_shape(lambda: lora.quantize_base(Qwen3(ModelConfig.tiny(), rngs=nnx.Rngs(0)), "nf4"))
  kernels = q.quantized_kernels(abstract)
  stored = sum(leaf.size * leaf.dtype.itemsize for k in kernels.values()
               for leaf in (k.codes.get_value(), k.scales.get_value()))
  assert stored == sum(k.size for k in kernels.values()) * (0.5 + 4 / 64)

  mesh = jax.make_mesh((2, 4), ("fsdp", "tp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  model = shard_model(_model(), mesh)
  lora.quantize_base(model, "nf4", targets=("q_proj", "down_proj"))
  qk, dk = model.layers[0].attn.q_proj.kernel, model.layers[0].mlp.down_proj.kernel
  spec = lambda v: tuple(v.get_value().sharding.spec)  # noqa: E731
  # q_proj [64, 64] is ("fsdp", "tp"): codes [32, 64] keep it; scales [1, 64] cannot split 1 row over fsdp.
  assert spec(qk.codes) == ("fsdp", "tp") and spec(qk.scales) == (None, "tp")
  assert spec(dk.codes) == ("tp", "fsdp") and spec(dk.scales) == (None, "fsdp")  # down_proj [128, 64]: 2 blocks
  lora.apply_lora(model, rank=4, targets="q_proj")
  assert tuple(model.layers[0].attn.q_proj.lora_a.get_value().sharding.spec) == ("fsdp", None)
  wider = jax.make_mesh((8, 1), ("fsdp", "tp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  shard_model(model, wider)  # codes [32, 64] split 8 ways; the 1-row scales are replicated, not refused
  assert spec(qk.codes) == ("fsdp", "tp") and spec(qk.scales) == (None, "tp")


@pytest.fixture(scope="module")
def qlora():
  """A qwen3_tiny QLoRA-tuned (nf4, rank 8) for a few steps, with what the tests compare against."""
  m = Qwen3Preset.from_preset("qwen3_tiny", seed=1)
  full = m.num_params
  m.compile(trainer="sft", lora_rank=8, quantize_base="nf4", learning_rate=1e-2)
  assert m.num_params == full + sum(x.lora_a.get_value().size + x.lora_b.get_value().size
                                    for x in lora.lora_modules(m).values())  # weights counted, not bytes
  codes = {p: np.asarray(k.codes.get_value()) for p, k in q.quantized_kernels(m).items()}
  embed = np.asarray(m.embedder.embedding.get_value())
  seen = []
  spy = callbacks.LambdaCallback(on_train_batch_end=lambda batch, logs: seen.append(logs["loss"]))
  m.fit(TEXTS * 4, epochs=1, batch_size=8, callbacks=[spy], verbose=0)
  return m, codes, embed, seen


def test_facade_qlora_trains_only_the_adapters(qlora):
  m, codes, embed, seen = qlora
  assert len(seen) == 8 and all(math.isfinite(x) for x in seen)
  assert np.mean(seen[-3:]) < np.mean(seen[:3]) - 0.3, seen
  after = q.quantized_kernels(m)
  assert sorted(after) == sorted(codes) and len(after) == 14
  for path, kernel in after.items():  # the frozen base: same codes, bit for bit
    np.testing.assert_array_equal(np.asarray(kernel.codes.get_value()), codes[path])
  np.testing.assert_array_equal(np.asarray(m.embedder.embedding.get_value()), embed)
  assert any(np.abs(np.asarray(x.lora_b.get_value())).max() > 0 for x in lora.lora_modules(m).values())
  assert isinstance(m.generate("the red cat", max_length=4), str)
  text = m.summary(print_fn=None)
  assert "quantized base: 14 kernels in nf4" in text and "0.5625 bytes per weight" in text
  # Compiling again with the same method keeps the codes (the very same arrays), and needs no lora_rank.
  arrays = {p: k.codes.get_value() for p, k in after.items()}
  m.compile(trainer="sft", quantize_base="nf4", learning_rate=1e-3)
  assert all(k.codes.get_value() is arrays[p] for p, k in q.quantized_kernels(m).items())
  with pytest.raises(ValueError, match=r"already quantized with 'nf4'.*cannot become 'int8'"):
    m.compile(trainer="sft", quantize_base="int8")


def test_qlora_exports_full_precision(qlora, tmp_path):
  m = qlora[0]
  tokens = jnp.asarray([m.tokenizer.encode("the big cat sat on")])
  want = np.asarray(_logits(m, tokens))
  # Merged float32 weights (dequantized base + s * A @ B) vs the QLoRA forward (x @ base + s * (x @ A) @ B):
  # float32 round-off of 2 layers of 64-128-term sums, ~1e-6 of the largest |logit| (as in test_lora).
  tol = 2e-5 * np.abs(want).max()

  exported = CausalLM.from_preset(m.export_safetensors(tmp_path / "hf"))
  assert not q.quantized_kernels(exported) and not lora.lora_modules(exported)
  assert exported.layers[0].attn.q_proj.kernel.get_value().dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(_logits(exported, tokens)), want, rtol=0, atol=tol)

  # save_to_preset keeps adapters apart and records the quantization: it comes back as a QLoRA model.
  again = CausalLM.from_preset(m.save_to_preset(tmp_path / "preset"))
  assert lora.quantization_method(again) == "nf4" and lora.lora_modules(again)
  for path, kernel in q.quantized_kernels(again).items():
    np.testing.assert_array_equal(np.asarray(kernel.codes.get_value()),
                                  np.asarray(q.quantized_kernels(m)[path].codes.get_value()))
  np.testing.assert_allclose(np.asarray(_logits(again, tokens)), want, rtol=0, atol=tol)

  # merge_lora in place: full-precision nnx.Param kernels, the same function.
  again.merge_lora()
  assert not lora.is_quantized(again) and isinstance(again.layers[0].mlp.up_proj.kernel, nnx.Param)
  np.testing.assert_allclose(np.asarray(_logits(again, tokens)), want, rtol=0, atol=tol)


def test_facade_errors():
  m = Qwen3Preset.from_preset("qwen3_tiny", num_layers=1)
  with pytest.raises(ValueError, match=r"quantize_base='nf4' needs lora_rank.*cannot be fully fine-tuned"):
    m.compile(quantize_base="nf4")
  with pytest.raises(ValueError, match=r"one of \['nf4', 'int4', 'int8'\], got 'nf5'. Did you mean 'nf4'"):
    m.compile(lora_rank=4, quantize_base="nf5")
  assert not lora.is_quantized(m) and not lora.lora_modules(m)  # nothing changed by the failed compiles
  lora.quantize_base(m, "int8", targets="q_proj")
  with pytest.raises(ValueError, match=r"base is quantized \(int8\).*Pass lora_rank"):
    m.compile(learning_rate=1e-3)
  odd = Qwen3Preset.from_preset("qwen3_tiny", num_layers=1, intermediate_size=96)
  with pytest.raises(ValueError, match=r"down_proj\.kernel of shape \(96, 64\).*block_size=32.*quantize_base\(model"):
    odd.compile(lora_rank=4, quantize_base="int4")
  assert not lora.is_quantized(odd) and not lora.lora_modules(odd)
