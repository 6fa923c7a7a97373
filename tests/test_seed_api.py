"""Public functions that nothing else in easytunix calls (seed names, inspection helpers), pinned by tests."""

from __future__ import annotations

import numpy as np
import pytest
from flax import nnx

from easytunix.models.gemma import params as gemma_params


def test_gemma_load_metadata_and_load_and_format_params(hf_tiny):
  folder, _ = hf_tiny("gemma")
  metadata = gemma_params.load_metadata(folder)
  assert metadata["model_type"] == "gemma"
  formatted = gemma_params.load_and_format_params(folder)
  model = gemma_params.create_model_from_safe_tensors(folder)
  state = nnx.to_pure_dict(nnx.state(model, nnx.Param))

  def leaves(tree, prefix=()):
    for key, value in tree.items():
      if isinstance(value, dict):
        yield from leaves(value, (*prefix, str(key)))
      else:
        yield (*prefix, str(key)), np.asarray(value)

  ours = dict(leaves(formatted))
  loaded = dict(leaves(state))
  assert set(ours) == set(loaded)  # every parameter, laid out like the model's state
  for path, value in ours.items():
    np.testing.assert_array_equal(value, loaded[path], err_msg=".".join(path))  # both copies of the file: exact


@pytest.mark.multi_device
def test_partition_specs_name_every_sharded_variable():
  import jax
  from jax.sharding import AxisType, PartitionSpec

  from easytunix.layers import partition_specs
  from easytunix.models.qwen3 import ModelConfig, Qwen3

  model = Qwen3(ModelConfig.tiny(num_layers=1), rngs=nnx.Rngs(0))
  mesh = jax.make_mesh((2, 4), ("fsdp", "tp"), axis_types=(AxisType.Auto, AxisType.Auto))
  specs = partition_specs(model, mesh)
  assert specs["embedder.embedding"] == PartitionSpec("tp", "fsdp")
  assert specs["layers.0.attn.q_proj.kernel"] == PartitionSpec("fsdp", "tp")
  assert all(isinstance(spec, PartitionSpec) for spec in specs.values())
