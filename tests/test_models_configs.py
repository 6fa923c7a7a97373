"""Configs: named real sizes, both Hugging Face spellings, round trips."""

import jax
import numpy as np
import pytest
from flax import nnx

from easytunix.layers.rope import RopeConfig, rope_inv_freq
from easytunix.models import config_from_hf
from easytunix.models.base import DecoderConfig
from easytunix.models.gemma import NAMED_SIZES as GEMMA, Transformer
from easytunix.models.gemma3 import NAMED_SIZES as GEMMA3, Gemma3
from easytunix.models.llama3 import NAMED_SIZES as LLAMA, Llama3
from easytunix.models.qwen3 import NAMED_SIZES as QWEN, Qwen3


def _abstract_params(cls, config):
  model = nnx.eval_shape(lambda: cls(config, rngs=nnx.Rngs(0)))
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize(
    "cls,name,billions",
    [
        (Llama3, "llama3.2_1b", 1.24),
        (Llama3, "llama3.1_8b", 8.03),
        (Llama3, "smollm2_135m", 0.135),
        (Qwen3, "qwen3_0.6b", 0.596),
        (Qwen3, "qwen3_8b", 8.19),
        (Qwen3, "qwen3_30b_a3b", 30.5),
        (Transformer, "gemma_2b", 2.51),
        (Gemma3, "gemma3_270m", 0.268),
        (Gemma3, "gemma3_1b", 1.0),
    ],
)
def test_named_sizes_have_the_published_parameter_counts(cls, name, billions):
  table = {**LLAMA, **QWEN, **GEMMA, **GEMMA3}
  n = _abstract_params(cls, table[name]())
  assert abs(n / 1e9 - billions) / billions < 0.02, f"{name}: {n / 1e9:.3f}B"


def test_rope_spellings_agree():
  base = dict(model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2)
  scaling = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                 original_max_position_embeddings=8192)
  v4 = config_from_hf({**base, "rope_theta": 500000.0, "rope_scaling": scaling})
  v5 = config_from_hf({**base, "rope_parameters": {**scaling, "rope_theta": 500000.0}})
  assert v4.rope == v5.rope == RopeConfig(theta=500000.0, **{k: v for k, v in scaling.items() if k != "rope_type"}, rope_type="llama3")


def test_gemma3_per_layer_rope_from_v4_spelling():
  hf = dict(model_type="gemma3_text", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
            num_attention_heads=4, num_key_value_heads=1, head_dim=16, rope_theta=1e6, rope_local_base_freq=1e4,
            rope_scaling={"rope_type": "linear", "factor": 8.0}, sliding_window=512, query_pre_attn_scalar=16)
  c = config_from_hf(hf)
  assert c.layer_types == ("sliding_attention",) * 5 + ("full_attention",)
  assert c.attention_config(0).rope == RopeConfig(theta=1e4)
  assert c.attention_config(5).rope == RopeConfig(theta=1e6, rope_type="linear", factor=8.0)
  assert c.attention_config(0).sliding_window == 512 and c.attention_config(5).sliding_window is None


def test_llama3_scaling_frequencies_match_transformers():
  torch = pytest.importorskip("torch")
  from transformers import LlamaConfig
  from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

  cfg = LlamaConfig(hidden_size=2048, num_attention_heads=32, rope_parameters=dict(
      rope_type="llama3", rope_theta=500000.0, factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
      original_max_position_embeddings=8192))
  expected, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, torch.device("cpu"))
  ours = rope_inv_freq(64, RopeConfig.from_hf(cfg.rope_parameters))
  # No sums: a pow and a few float32 multiplies per frequency, a few ulps apart at most (rtol 1e-6 is
  # ~8 ulps); the llama3 scaling factors (1 to 32) would be off by far more.
  np.testing.assert_allclose(ours, expected.numpy(), rtol=1e-6, atol=0)


def test_config_dict_round_trip():
  for factory in (*LLAMA.values(), *QWEN.values(), *GEMMA.values(), *GEMMA3.values()):
    config = factory()
    again = type(config).from_dict(config.to_dict())
    assert again == config


def test_from_dict_rejects_unknown_fields():
  with pytest.raises(ValueError, match=r"Unknown ModelConfig fields \['hiden_size'\]"):
    LLAMA["llama3_tiny"]().from_dict({"hiden_size": 3})


def test_base_class_is_reusable():
  assert issubclass(type(LLAMA["llama3_tiny"]()), DecoderConfig)
