"""Loading onto an 8-device CPU mesh: same logits, parameters placed per ShardingConfig."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, PartitionSpec

from easytunix.layers.sharding import ShardingConfig, path_str
from easytunix.models import load_model
from tests import hf_reference

pytestmark = pytest.mark.multi_device  # meshes of up to 8 devices


def _mesh():
  return jax.make_mesh((2, 4), ("fsdp", "tp"), axis_types=(AxisType.Auto, AxisType.Auto))


@pytest.mark.parametrize("arch", ["llama3", "qwen3_moe", "gemma3"])
def test_sharded_load_matches_single_device(hf_tiny, arch):
  assert len(jax.devices()) == 8, "conftest must give 8 CPU devices"
  folder, _ = hf_tiny(arch)
  mesh = _mesh()
  single = load_model(folder, dtype="float32")
  sharded = load_model(folder, dtype="float32", mesh=mesh)
  tokens, mask = hf_reference.prompts_batch(batch=4, max_len=16)
  expected, _ = single(jnp.asarray(tokens), attention_mask=jnp.asarray(mask))
  got = nnx.jit(lambda m, t, a: m(t, attention_mask=a)[0])(sharded, jnp.asarray(tokens), jnp.asarray(mask))
  # Sharded jit vs one-device eager: the same float32 sums split across devices and added in another
  # order; logits agree to ~1e-6 of the largest |logit| (measured 1.1e-6, i.e. 7e-6 absolute on logits
  # up to 10), while a wrong partition or a missing all-reduce is off by O(1) of it.
  want = np.asarray(expected)[mask]
  np.testing.assert_allclose(np.asarray(got)[mask], want, rtol=0, atol=2e-5 * np.abs(want).max())

  shd = ShardingConfig.default()
  expected_specs = {
      "embedder.embedding": shd.embed_vd,
      "attn.q_proj.kernel": shd.attn_in,
      "attn.o_proj.kernel": shd.attn_out,
      "mlp.gate_proj.kernel": shd.ffw_in,
      "mlp.down_proj.kernel": shd.ffw_out,
      "mlp.router.kernel": shd.router,
      "mlp.gate_proj": shd.expert_in,
      "mlp.down_proj": shd.expert_out,
      "input_norm.scale": shd.norm,
  }
  checked = 0
  for path, var in nnx.iter_graph(sharded):
    if not isinstance(var, nnx.Param):
      continue
    name = path_str(path)
    for suffix, axes in expected_specs.items():
      if name.endswith(suffix):
        sharding = var.get_value().sharding
        assert sharding.mesh.shape == mesh.shape
        want = jax.sharding.NamedSharding(mesh, PartitionSpec(*axes))
        assert sharding.is_equivalent_to(want, var.get_value().ndim), f"{name}: {sharding.spec} != {axes}"
        checked += 1
        break
  assert checked >= 5


def test_indivisible_dimension_is_a_clear_error(hf_tiny):
  folder, _ = hf_tiny("gemma")
  devices = np.array(jax.devices()[:3]).reshape(1, 3)
  mesh = jax.sharding.Mesh(devices, ("fsdp", "tp"), axis_types=(AxisType.Auto, AxisType.Auto))
  with pytest.raises(ValueError, match=r"embedder\.embedding .* not divisible by mesh axis 'tp' of size 3"):
    load_model(folder, dtype="float32", mesh=mesh)


def test_fsdp_train_step_keeps_activations_split_over_the_batch():
  """On an FSDP mesh each device computes its own rows: the compiled step's temporaries per device track
  the per-device batch, not the global batch (which they did while activations followed the weights' layout)."""
  import optax

  from easytunix.layers.sharding import shard_model
  from easytunix.models.llama3 import Llama3, ModelConfig
  from easytunix.sft.peft_trainer import PeftTrainer, TrainingConfig, TrainingInput

  def temp_bytes(devices: int) -> int:
    # Wide enough that activations, not weights, fill the temporaries: 256 tokens per row, vocab 512.
    config = ModelConfig.tiny()
    model = Llama3(config, rngs=nnx.Rngs(0))
    if devices > 1:
      mesh = jax.make_mesh((devices, 1), ("fsdp", "tp"), axis_types=(AxisType.Auto, AxisType.Auto),
                           devices=jax.devices()[:devices])
      shard_model(model, mesh)
    trainer = PeftTrainer(model, optax.sgd(1e-3), TrainingConfig(max_steps=1, show_progress_bar=False))
    step, _ = trainer.jit_train_and_eval_step()
    tokens = np.ones((devices, 256), np.int32)  # one row per device
    batch = trainer._place_batch(  # noqa: SLF001
        TrainingInput(input_tokens=tokens, input_mask=tokens.astype(bool)), stacked=False)
    _, trainable, frozen = nnx.split(model, trainer._trainable_filter(), ...)  # noqa: SLF001
    compiled = step.lower(nnx.as_pure(trainable), trainer.opt_state, nnx.as_pure(frozen), batch).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  one, eight = temp_bytes(1), temp_bytes(8)
  # Same rows per device: within 1.5x (the sharded step also holds all-gathered weight shards and the
  # collectives' buffers), where computing the whole global batch on every device needs about 8x.
  assert eight < 1.5 * one, (one, eight)
