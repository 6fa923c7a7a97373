"""A Tunix script runs after changing its imports: module paths, keywords and contracts of the components.

One tiny model and one sampler (module fixtures) keep the jit compilations few.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
import sentencepiece as spm
from flax import nnx


class MockVocab(spm.SentencePieceProcessor):
  """A vocabulary that only overrides the id methods, as Tunix's tests write one (no model loaded)."""

  WORDS = ["<pad>", "<s>", "</s>", "input", "string", "hello", "world", "Hello", "there", "!", "My", "name"]
  WORDS += [f"w{i}" for i in range(len(WORDS), 32)]

  def __init__(self):
    super().__init__()
    self._ids = {w: i for i, w in enumerate(self.WORDS)}

  def pad_id(self) -> int:
    return 0

  def bos_id(self) -> int:
    return 1

  def eos_id(self) -> int:
    return 2

  def GetPieceSize(self) -> int:  # noqa: N802 - SentencePiece's name
    return len(self.WORDS)

  def EncodeAsIds(self, text: str) -> list[int]:  # noqa: N802
    return [self._ids[w] for w in text.split(" ") if w in self._ids]

  def DecodeIds(self, ids) -> str:  # noqa: N802
    return " ".join(self.WORDS[int(i)] for i in ids)


class _Tiny(nnx.Module):
  def __init__(self, value: float, lora: bool = False):
    self.w = nnx.Param(jnp.full((4,), value, jnp.float32))
    if lora:
      self.lora_a = nnx.LoRAParam(jnp.full((4, 2), value + 1, jnp.float32))


@pytest.fixture(scope="module")
def tiny_model():
  from easytunix.models.qwen3 import ModelConfig, Qwen3

  return Qwen3(ModelConfig.tiny(num_layers=1, vocab_size=32), rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def sampler(tiny_model):
  from easytunix.generate.sampler import CacheConfig, Sampler

  return Sampler(tiny_model, MockVocab(), CacheConfig.for_model(tiny_model, cache_size=64))


# ----------------------------------------------------------------------------- module paths


def test_tunix_module_paths_import():
  from easytunix.generate import beam_search, utils  # noqa: F401
  from easytunix.rl import utils as rl_utils
  from easytunix.rl.rollout.base_rollout import BaseRollout, CacheConfig, RolloutConfig, RolloutOutput
  from easytunix.rl.rl_cluster import RolloutConfig as ClusterRolloutConfig
  from easytunix.sft import checkpoint, metrics
  from easytunix.sft.checkpoint_manager import CheckpointManager
  from easytunix.sft.metrics_logger import MetricsLogger, MetricsLoggerOptions, Mode
  from easytunix.sft.profiler import Profiler, ProfilerOptions
  from easytunix.sft.utils import build_positions_from_mask, is_lora_enabled, make_causal_attn_mask, time_measure

  assert issubclass(CheckpointManager, checkpoint.CheckpointManager)  # one implementation, two doors
  assert MetricsLogger is metrics.MetricsLogger and MetricsLoggerOptions is metrics.MetricsLoggerOptions
  assert RolloutConfig is ClusterRolloutConfig and Mode.TRAIN == "train"
  assert all(callable(x) for x in (BaseRollout, CacheConfig, RolloutOutput, Profiler, ProfilerOptions,
                                   build_positions_from_mask, is_lora_enabled, make_causal_attn_mask,
                                   rl_utils.chunk_slices_by_size))
  with time_measure("x", suppress_logging=True) as elapsed:
    pass
  assert elapsed() >= 0.0


def test_rollout_config_takes_tunix_fields():
  from easytunix.rl.rollout.base_rollout import RolloutConfig

  config = RolloutConfig(max_tokens_to_generate=8, temperature=0.7, top_p=1.0, top_k=None, seed=jax.random.PRNGKey(3),
                         max_prompt_length=32, kv_cache_size=64, data_type=jnp.float32, eos_tokens=[2],
                         rollout_vllm_model_version="", rollout_vllm_hbm_utilization=0.2,
                         rollout_vllm_init_with_random_weights=True, tensor_parallel_size=-1)
  assert config.seed == 3 and config.eos_tokens == (2,) and config.rollout_vllm_model_version is None
  assert RolloutConfig(seed=None).seed == 0


def test_sft_utils_masks_and_positions():
  from easytunix.sft.utils import build_positions_from_mask, make_causal_attn_mask

  mask = jnp.array([[False, True, True], [True, True, True]])
  attn = make_causal_attn_mask(mask)
  assert attn.shape == (2, 3, 3) and attn.dtype == jnp.bool_
  np.testing.assert_array_equal(np.asarray(attn[0]), [[False, False, False], [False, True, False], [False, True, True]])
  np.testing.assert_array_equal(np.asarray(build_positions_from_mask(mask)), [[0, 0, 1], [0, 1, 2]])
  with pytest.raises(ValueError, match="must be 2-D"):
    make_causal_attn_mask(mask[0])


def test_generate_utils_helpers():
  from easytunix.generate import utils

  assert [utils.next_power_of_2(x) for x in (0, 1, 5, 8)] == [1, 1, 8, 8]
  np.testing.assert_array_equal(utils.pad_to_length(np.array([1, 2]), 4, pad_value=9, left=True), [9, 9, 1, 2])
  ids = jnp.array([0, 0, 5, 2, 7, 0])
  assert int(utils.find_first_non_pad_idx(ids, 0)) == 2 and int(utils.find_last_non_pad_idx(ids, 0)) == 4
  assert int(utils.find_first_eos_idx(ids, 2)) == 3 and int(utils.find_first_eos_idx(ids, [9])) == 6
  assert utils.make_causal_attn_mask(jnp.ones((1, 3), bool), 5).shape == (1, 3, 5)
  decode = utils.compute_attention_masks(2, 4, jnp.array([[True, False, False, False]]))
  np.testing.assert_array_equal(np.asarray(decode), [[[False, True, True, False]]])
  mode = [None]
  utils.check_sampling_mode_conflict(mode, "top_p")
  with pytest.raises(ValueError, match="Conflicting sampling modes"):
    utils.check_sampling_mode_conflict(mode, "beam_search")


def test_rl_utils_helpers():
  from easytunix.rl import utils

  assert [(s.start, s.stop) for s in utils.chunk_slices_by_size(5, 2)] == [(0, 2), (2, 4), (4, 5)]
  merged = utils.merge_micro_batches([{"a": np.array([1]), "t": ["x"]}, {"a": np.array([2]), "t": ["y"]}])
  np.testing.assert_array_equal(merged["a"], [1, 2]) and merged["t"] == ["x", "y"]
  assert utils.get_batch_slice({"a": np.arange(4), "s": 3}, slice(1, 3))["a"].tolist() == [1, 2]
  with pytest.raises(ValueError, match="positive integer"):
    utils.is_positive_integer(0, "num_generations")
  with pytest.raises(ValueError, match="multiple"):
    utils.check_divisibility(3, 8, "a", "b")
  model = _Tiny(1.0)
  assert utils.is_sharing_weights(model, model) and not utils.is_sharing_weights(model, _Tiny(1.0))
  assert utils.get_pytree_mesh_info(nnx.state(model)) is None


# ----------------------------------------------------------------------------- metrics and profiler


def test_metrics_logger_tunix_api():
  from easytunix.sft.metrics_logger import MetricsLogger, Mode

  logger = MetricsLogger()
  logger.log("loss", 2.0, Mode.TRAIN, 1)  # Tunix: (name, value, mode, step)
  logger.log("loss", 4.0, "train", step=2)
  logger.log("loss", 1.0, 3)  # easytunix's older (name, value, step)
  logger.log("perplexity", 2.0, "eval", 1)
  logger.log("perplexity", 8.0, "eval", 2)
  assert logger.metric_exists("loss", "train") and not logger.metric_exists("loss", "eval")
  np.testing.assert_allclose(logger.get_metric_history("loss", Mode.TRAIN), [2.0, 4.0, 1.0])
  assert logger.get_metric("loss", "train") == pytest.approx(7 / 3)
  assert logger.get_metric("perplexity", "eval") == pytest.approx(4.0)  # geometric mean
  assert logger.history["train/loss"][-1] == (3, 1.0)
  with pytest.raises(ValueError, match="'accuracy' not found for mode 'train'.*loss"):
    logger.get_metric("accuracy", "train")


def test_profiler_traces_its_window(monkeypatch, tmp_path):
  from easytunix.sft.profiler import Profiler, ProfilerOptions

  calls = []
  monkeypatch.setattr(jax.profiler, "start_trace", lambda path: calls.append(("start", path)))
  monkeypatch.setattr(jax.profiler, "stop_trace", lambda: calls.append(("stop",)))
  profiler = Profiler(initial_step=10, max_step=13, profiler_options=ProfilerOptions(str(tmp_path), 1, 5))
  for step in range(10, 14):
    if profiler.should_activate(step):
      profiler.activate()
    if profiler.should_deactivate(step):
      profiler.deactivate()
  assert calls == [("start", str(tmp_path)), ("stop",)] and (profiler.first_step, profiler.last_step) == (11, 13)
  off = Profiler(0, None, None)
  assert not off.should_activate(0)
  off.activate()
  assert len(calls) == 2


# ----------------------------------------------------------------------------- checkpoints


def test_checkpoint_manager_saves_when_asked_and_honours_intervals(tmp_path):
  from easytunix.sft.checkpoint_manager import CheckpointManager

  manager = CheckpointManager(tmp_path / "a")
  assert manager.save(1, _Tiny(1.0))  # no interval policy: saves when asked (Tunix)
  assert manager.save(1, _Tiny(1.0)) is False  # already there
  manager.close()
  assert (tmp_path / "a" / "1" / "model_params").is_dir()
  every_two = CheckpointManager(tmp_path / "b", ocp.CheckpointManagerOptions(save_interval_steps=2, max_to_keep=1))
  assert [every_two.save(s, _Tiny(float(s))) for s in (1, 2, 3, 4)] == [False, True, False, True]
  assert every_two.save(5, _Tiny(5.0), force=True)
  every_two.close()
  assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["5"]
  model = _Tiny(0.0)
  assert CheckpointManager(tmp_path / "b").maybe_restore(model) == (5, {"step": 5, "lora": False,
                                                                         "only_lora": False, "has_opt_state": False})
  np.testing.assert_array_equal(np.asarray(model.w[...]), 5.0)
  off = CheckpointManager(None)
  assert off.save(1, _Tiny(1.0), force=True) is False and off.maybe_restore(_Tiny(0.0)) == (0, {})


def test_checkpoint_lora_only_and_optimizer(tmp_path):
  from easytunix.sft.checkpoint_manager import CheckpointManager

  model = _Tiny(2.0, lora=True)
  optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.LoRAParam)
  manager = CheckpointManager(tmp_path)
  assert manager.save(3, model, optimizer, save_only_lora_params=True, custom_metadata={"epoch": 1})
  manager.wait_until_finished()
  assert manager.saved_parameter_paths(3) == ["lora_a"]
  fresh = _Tiny(0.0, lora=True)
  fresh_opt = nnx.Optimizer(fresh, optax.adam(1e-2), wrt=nnx.LoRAParam)
  step, meta = manager.maybe_restore(fresh, fresh_opt, restore_only_lora_params=True)
  assert step == 3 and meta["epoch"] == 1
  np.testing.assert_array_equal(np.asarray(fresh.lora_a[...]), 3.0)
  np.testing.assert_array_equal(np.asarray(fresh.w[...]), 0.0)  # the base was not in the checkpoint
  manager.close()
  with pytest.raises(ValueError, match="has no LoRA adapters"):
    CheckpointManager(tmp_path / "x").save(1, _Tiny(1.0), save_only_lora_params=True)


def test_reads_a_tunix_checkpoint_and_the_older_layout(tmp_path):
  from easytunix.sft.checkpoint import CheckpointManager

  # What Tunix's CheckpointManager writes: nnx.state(model) under "model_params", no meta.
  source = _Tiny(7.0)
  writer = ocp.CheckpointManager(tmp_path / "tunix", options=ocp.CheckpointManagerOptions(create=True))
  writer.save(4, args=ocp.args.Composite(model_params=ocp.args.PyTreeSave(item=nnx.state(source))))
  writer.wait_until_finished()
  writer.close()
  model = _Tiny(0.0)
  restored = CheckpointManager(tmp_path / "tunix").maybe_restore(model)
  assert restored.step == 4 and restored.metadata == {}
  np.testing.assert_array_equal(np.asarray(model.w[...]), 7.0)

  # easytunix's older layout: "params" (a pure dict) and "meta".
  old = ocp.CheckpointManager(tmp_path / "old", options=ocp.CheckpointManagerOptions(create=True))
  meta = {"step": 2, "lora": False, "has_opt_state": False, "epoch": 0}
  old.save(2, args=ocp.args.Composite(params=ocp.args.StandardSave({"w": jnp.full((4,), 9.0)}),
                                      meta=ocp.args.JsonSave(meta)))
  old.wait_until_finished()
  old.close()
  model = _Tiny(0.0)
  manager = CheckpointManager(tmp_path / "old")
  assert manager.maybe_restore(model).metadata == meta
  np.testing.assert_array_equal(np.asarray(model.w[...]), 9.0)
  assert manager.saved_parameter_paths() == ["w"]
  manager.close()


def test_training_config_accepts_orbax_options(tmp_path):
  from easytunix.sft.peft_trainer import TrainingConfig

  config = TrainingConfig(checkpoint_root_directory=str(tmp_path),
                          checkpointing_options=ocp.CheckpointManagerOptions(save_interval_steps=5, max_to_keep=2))
  assert config.checkpointing_options.save_interval_steps == 5


# ----------------------------------------------------------------------------- sampler and tokenizer


def test_tokenizer_adapter_honours_a_sentencepiece_subclass():
  from easytunix.generate.tokenizer_adapter import TokenizerAdapter

  tokenizer = TokenizerAdapter(MockVocab())
  assert tokenizer.encode("hello world") == [1, 5, 6]  # BOS, then EncodeAsIds
  assert tokenizer.decode([1, 5, 6, 2]) == "hello world"  # DecodeIds, specials skipped
  assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id, tokenizer.vocab_size) == (1, 2, 0, 32)
  with pytest.raises(ValueError, match="no model loaded"):
    TokenizerAdapter(spm.SentencePieceProcessor())


def test_sampler_takes_tunix_keywords(sampler):
  out = sampler(input_strings=["hello world"], total_generation_steps=6, max_prompt_length=16,
                echo=True, return_logits=True, pad_output=True, eos_tokens=[], temperature=0.0)
  assert out.tokens.shape == (1, 16 + 6) and out.logits.shape[:2] == (1, 16 + 6)
  assert out.padded_prompt_tokens.shape == (1, 16)
  assert out.tokens[0, :3].tolist() == [1, 5, 6] and out.text[0].startswith("hello world")
  single = sampler(input_strings="hello world", total_generation_steps=6, max_prompt_length=16,
                   return_logits=True, eos_tokens=[])
  assert len(single.text) == 1 and len(single.tokens[0]) == 6 and single.logits[0].shape == (6, 32)
  np.testing.assert_array_equal(single.tokens[0], out.tokens[0, 3:9])
  np.testing.assert_allclose(single.logits[0], out.logits[0, :6], rtol=1e-5, atol=1e-5)
  with pytest.raises(TypeError, match="not both"):
    sampler(["hello"], 4, total_generation_steps=4)


def test_sampler_forbids_token_strings(sampler):
  out = sampler(["hello world"], 6, max_prompt_length=16, return_logits=True, eos_tokens=[])
  first = int(out.tokens[0][0])
  banned = sampler(["hello world"], 6, max_prompt_length=16, return_logits=True, eos_tokens=[],
                   forbidden_tokens=[MockVocab.WORDS[first]])  # Tunix: token strings
  assert int(banned.tokens[0][0]) != first
  with pytest.raises(ValueError, match="each must be one token"):
    sampler(["hello world"], 6, forbidden_tokens=["hello world"])


def test_mismatched_transformer_state_raises_a_named_value_error(sampler, tiny_model):
  wider = nnx.to_pure_dict(nnx.state(tiny_model, nnx.Param))
  wider["embedder"]["embedding"] = jnp.zeros((32, 8), jnp.float32)
  with pytest.raises(ValueError, match=r"transformer_state mismatch: embedder\.embedding is float32\[32, 8\]"):
    sampler.transformer_state = wider
  lora_only = {"layers": {0: {"attn": {"q_proj": {"lora_a": jnp.zeros((64, 2)), "lora_b": jnp.zeros((2, 64))}}}}}
  with pytest.raises(ValueError, match=r"not in the sampler's model, e\.g\. \['layers\.0\.attn\.q_proj\.lora_a'"):
    sampler.transformer_state = lora_only
  sampler.transformer_state = nnx.state(tiny_model, nnx.Param)  # a matching state is taken


# ----------------------------------------------------------------------------- RL cluster on an empty mesh


def test_rl_cluster_treats_an_empty_mesh_as_single_device(tiny_model):
  from easytunix.rl.rl_cluster import ClusterConfig, RLCluster, RLTrainingConfig, Role, RolloutConfig

  empty = jax.sharding.Mesh(np.empty((), dtype=object), ())
  assert empty.empty
  for _ in range(2):  # several clusters in one process
    config = ClusterConfig(
        role_to_mesh={Role.ACTOR: empty, Role.REFERENCE: empty, Role.ROLLOUT: empty},
        training_config=RLTrainingConfig(actor_optimizer=optax.sgd(1e-3), max_steps=1, show_progress_bar=False),
        rollout_config=RolloutConfig(max_tokens_to_generate=4, max_prompt_length=16),
    )
    cluster = RLCluster(actor=nnx.clone(tiny_model), reference=nnx.clone(tiny_model), tokenizer=MockVocab(),
                        cluster_config=config)
    assert cluster.mesh(Role.ACTOR) is None and cluster.colocated
