"""PeftTrainer: learning, exact gradient accumulation, one compilation, metrics, hooks, sharding."""

import struct
import time
from pathlib import Path

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from easytunix.generate.sampler import CacheConfig, Sampler
from easytunix.generate.tokenizer_adapter import TokenizerAdapter
from easytunix.layers.sharding import shard_model
from easytunix.models.qwen3 import ModelConfig, Qwen3
from easytunix.sft import DataHooks, TrainingHooks
from easytunix.sft.data import SupervisedDataset, pad_batch, tokenize_record
from easytunix.sft.metrics import MetricsLoggerOptions
from easytunix.sft.peft_trainer import (
    PeftTrainer,
    ProfilerOptions,
    TrainingConfig,
    TrainingInput,
    default_loss_fn,
)
from easytunix.sft.synthetic import addition_task

TINY_BPE = Path(__file__).resolve().parent.parent / "easytunix" / "presets" / "assets" / "tiny_bpe"

# Tolerances for runs that do the same float32 math in a different summation order (micro-batches
# vs one batch, 8 shards vs one device, jit vs eager). Float32 eps is 1.2e-7; sums of a few hundred
# terms and 3 SGD steps at lr 1.0 (momentum 0.9) leave parameters <= 9.4e-7 of each tensor's largest
# entry apart (measured), while dropping one micro-batch of four moves them by 0.1 to 0.9 of it
# (measured). Per tensor, the bound is absolute and scaled to that tensor's largest entry: an entry
# near zero carries the absolute round-off of the whole sum, so an elementwise rtol cannot hold there.
PARAM_TOL = 2e-5
# Losses (~6-10, means over ~100 tokens) agree to <= 4.5e-7 relative, gradient norms to 1.5e-7 (measured);
# dropping a micro-batch changes them by 5e-2 and 1e-1. The norm at step 3 also carries the parameter
# drift through the loss curvature, hence its looser bound.
LOSS_RTOL = 1e-5
GRAD_NORM_RTOL = 1e-4


def _assert_params_close(got, want, tol=PARAM_TOL):
  """Per tensor: |got - want| <= tol * max|want| (float32 round-off scales with the tensor, not the entry)."""
  assert got.keys() == want.keys()
  for key in want:
    np.testing.assert_allclose(got[key], want[key], rtol=0, atol=tol * np.abs(want[key]).max(), err_msg=key)


@pytest.fixture(scope="module")
def tokenizer():
  return TokenizerAdapter.from_pretrained(TINY_BPE)


@pytest.fixture(scope="module")
def task():
  return addition_task(num_eval=300, seed=0)


@pytest.fixture(scope="module")
def base_model():
  # One layer: every test here compiles its own train step, and compile time grows with depth.
  return Qwen3(ModelConfig.tiny(num_layers=1), rngs=nnx.Rngs(0))


def _quiet(**kw):
  return TrainingConfig(show_progress_bar=False, **kw)


def _params(model):
  leaves = jax.tree_util.tree_leaves_with_path(nnx.as_pure(nnx.state(model, nnx.Param)))
  return {jax.tree_util.keystr(k): np.asarray(v) for k, v in leaves}


def _micro_batches(task, tokenizer, count, size, max_length=12):
  examples = [tokenize_record(tokenizer, r) for r in task.train[: count * size]]
  return [pad_batch(examples[i * size : (i + 1) * size], max_length, tokenizer.pad_id) for i in range(count)]


def _concat(batches):
  fields = ("input_tokens", "input_mask", "completion_mask")
  return TrainingInput(*(np.concatenate([getattr(b, f) for b in batches]) for f in fields))


# --------------------------------------------------------------------------- learning


def test_tiny_model_learns_two_digit_addition(tokenizer, task):
  """From scratch, on CPU: held-out exact match >= 90% with greedy decoding."""
  model = Qwen3(ModelConfig.tiny(intermediate_size=256), rngs=nnx.Rngs(0))
  steps = 1000
  schedule = optax.warmup_cosine_decay_schedule(0.0, 3e-3, 100, steps, 1.5e-4)
  optimizer = optax.inject_hyperparams(optax.adamw)(learning_rate=schedule, weight_decay=0.0)
  train_ds = SupervisedDataset(task.train, tokenizer, batch_size=64, max_length=10, seed=0)
  trainer = PeftTrainer(model, optimizer, _quiet(max_steps=steps, max_grad_norm=1.0))
  start = time.perf_counter()
  trainer.train(train_ds)
  elapsed = time.perf_counter() - start
  assert trainer.train_steps() == steps
  assert trainer.num_train_step_traces == 1
  losses = trainer.metrics_logger.values("loss")
  assert np.mean(losses[-20:]) < 0.1 < losses[0]
  sampler = Sampler(model, tokenizer, CacheConfig.for_model(model, cache_size=32))
  out = sampler(task.eval_prompts, max_generation_steps=5)
  accuracy = task.score(out.text)
  print(f"addition: {steps} steps in {elapsed:.1f}s, held-out exact match {accuracy:.3f}")
  assert accuracy >= 0.9, list(zip(task.eval_prompts, out.text))[:10]


# ----------------------------------------------------------- accumulation, compilation


def _sgd():
  # SGD with momentum is linear in the gradients; Adam's g / sqrt(v) would amplify
  # float rounding in near-zero gradients and hide real differences.
  return optax.sgd(1.0, momentum=0.9)


@pytest.fixture(scope="module")
def micro_and_big(task, tokenizer):
  micro = _micro_batches(task, tokenizer, count=12, size=2)
  return micro, [_concat(micro[i : i + 4]) for i in range(0, 12, 4)]


@pytest.fixture(scope="module")
def one_device_run(base_model, micro_and_big):
  """3 steps on batches of 8 on one device: the reference of accumulation and sharding tests."""
  model = nnx.clone(base_model)
  trainer = PeftTrainer(model, _sgd(), _quiet(max_steps=3))
  trainer.train(micro_and_big[1])
  return model, trainer


def test_gradient_accumulation_equals_one_big_batch_and_compiles_once(base_model, micro_and_big, one_device_run):
  """4 micro-batches of 2 == 1 batch of 8 (token-weighted: completions differ in length)."""
  micro, _ = micro_and_big
  assert len({int(b.completion_mask.sum()) for b in micro}) > 1, "need unequal token counts to test weighting"
  eval_ds = micro[:2]

  accumulated = nnx.clone(base_model)
  config = _quiet(gradient_accumulation_steps=4, max_steps=3, eval_every_n_steps=1)
  acc_trainer = PeftTrainer(accumulated, _sgd(), config)
  acc_trainer.train(micro, eval_ds=eval_ds)
  single, single_trainer = one_device_run

  np.testing.assert_allclose(
      acc_trainer.metrics_logger.values("loss"), single_trainer.metrics_logger.values("loss"), rtol=LOSS_RTOL
  )
  np.testing.assert_allclose(
      acc_trainer.metrics_logger.values("grad_norm"), single_trainer.metrics_logger.values("grad_norm"),
      rtol=GRAD_NORM_RTOL,
  )
  _assert_params_close(_params(accumulated), _params(single))

  # One compilation of the train step (and one of the eval step) over the whole run.
  assert acc_trainer.num_train_step_traces == 1
  assert acc_trainer.num_eval_step_traces == 1
  train_step, eval_step = acc_trainer.jit_train_and_eval_step()
  assert train_step._cache_size() == 1
  assert eval_step._cache_size() == 1
  assert len(acc_trainer.metrics_logger.values("loss", mode="eval")) == 3


def test_skip_jit_matches_jit(base_model, task, tokenizer):
  # A loss touching only the embedding keeps the eager (op-by-op) run cheap.
  def embedding_loss(model, input_tokens, input_mask, completion_mask=None, positions=None):
    return (model.embedder.encode(input_tokens) ** 2).mean()

  batches = _micro_batches(task, tokenizer, count=2, size=4)
  results = []
  for skip in (False, True):
    model = nnx.clone(base_model)
    trainer = PeftTrainer(model, optax.sgd(10.0), _quiet(max_steps=2)).with_loss_fn(embedding_loss)
    trainer.train(batches, skip_jit=skip)
    results.append(_params(model))
  assert not np.array_equal(results[0]["['embedder']['embedding']"], _params(base_model)["['embedder']['embedding']"])
  # jit fuses the mean of squares into other summation orders than eager op-by-op execution.
  _assert_params_close(results[1], results[0])


def test_epochs_and_max_steps(base_model, task, tokenizer):
  batches = _micro_batches(task, tokenizer, count=3, size=2)
  trainer = PeftTrainer(nnx.clone(base_model), optax.sgd(0.0), _quiet(max_steps=7))
  trainer.train(iter(batches))  # a one-shot iterator is read once
  assert trainer.train_steps() == 3
  # Training on goes on from the data position: the 3 consumed batches are
  # skipped, then max_steps without num_epochs cycles the re-iterable data.
  trainer.train(batches)
  assert trainer.train_steps() == 7
  trainer.train(batches)  # max_steps reached: nothing to do
  assert trainer.train_steps() == 7


def test_continue_from_takes_over_the_optimizer_state_and_step_count(base_model, task, tokenizer):
  batches = _micro_batches(task, tokenizer, count=2, size=2)
  model = nnx.clone(base_model)
  first = PeftTrainer(model, optax.adam(1e-3), _quiet(max_steps=2))
  first.train(batches)
  second = PeftTrainer(model, optax.adam(1e-3), _quiet(max_steps=3))
  assert second.continue_from(first) and second.train_steps() == 2
  assert second.opt_state is first.opt_state  # adam's moments and count carry over
  second.train(batches)
  assert second.train_steps() == 3
  # A trainer that already stepped, or one whose optimizer state differs in structure, keeps its own.
  assert not second.continue_from(first)
  other = PeftTrainer(model, optax.sgd(0.1), _quiet(max_steps=1))
  assert not other.continue_from(first) and other.train_steps() == 0


# ------------------------------------------------------------------ metrics and hooks


def _read_events(log_dir):
  """Scalars of every tensorboard event file under log_dir, as {tag: [(step, value)]}."""
  from tensorboardX.proto import event_pb2

  scalars = {}
  for path in sorted(Path(log_dir).rglob("events.out.tfevents.*")):
    data = path.read_bytes()
    offset = 0
    while offset < len(data):
      (length,) = struct.unpack("<Q", data[offset : offset + 8])
      record = data[offset + 12 : offset + 12 + length]
      offset += 12 + length + 4
      event = event_pb2.Event.FromString(record)
      for value in event.summary.value:
        scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
  return scalars


class _LossRecorder(TrainingHooks):
  """Overrides just one method; the others keep their no-op defaults."""

  def __init__(self):
    self.losses = []

  def on_train_step_end(self, train_ctx, train_loss):
    self.losses.append((train_ctx.train_steps(), float(train_loss)))


def test_tensorboard_events_hold_the_scalars_and_a_one_method_hook_works(base_model, task, tokenizer, tmp_path):
  def loss_with_accuracy(model, input_tokens, input_mask, completion_mask=None, positions=None):
    loss, aux = default_loss_fn(model, input_tokens, input_mask, completion_mask, positions)
    return loss, {**aux, "twice_loss": 2 * loss}

  batches = _micro_batches(task, tokenizer, count=2, size=4)
  log_dir = tmp_path / "tb"
  recorder = _LossRecorder()
  optimizer = optax.inject_hyperparams(optax.adamw)(learning_rate=optax.linear_schedule(1e-3, 0.0, 4))
  trainer = (
      PeftTrainer(
          nnx.clone(base_model),
          optimizer,
          _quiet(num_epochs=2, eval_every_n_steps=2, metrics_logging_options=MetricsLoggerOptions(str(log_dir), 1)),
      )
      .with_loss_fn(loss_with_accuracy, has_aux=True)
      .with_training_hooks(recorder)
  )
  trainer.train(batches, eval_ds=batches[:1])
  trainer.close()

  scalars = _read_events(log_dir)
  for tag in (
      "train/loss", "train/perplexity", "train/learning_rate", "train/grad_norm",
      "train/tokens_per_second", "train/twice_loss", "eval/loss", "eval/perplexity", "eval/twice_loss",
  ):
    assert tag in scalars, f"{tag} missing from {sorted(scalars)}"
  assert trainer.train_steps() == 4  # two epochs of two batches
  assert [s for s, _ in scalars["train/loss"]] == [1, 2, 3, 4]
  assert [s for s, _ in scalars["eval/loss"]] == [2, 4]
  # A schedule evaluated in float32 (a multiply and an add): a few ulps, i.e. < 1e-6 relative; an
  # off-by-one step would be off by 25%.
  np.testing.assert_allclose([v for _, v in scalars["train/learning_rate"]], [1e-3, 7.5e-4, 5e-4, 2.5e-4], rtol=1e-6)
  # 2 * loss is exact in float32; the slack only covers the float32 round trip of logged scalars.
  np.testing.assert_allclose(
      [v for _, v in scalars["train/twice_loss"]], [2 * v for _, v in scalars["train/loss"]], rtol=1e-5
  )
  # The same float32 value, once as a Python float and once through tensorboard's float32: <= 1 ulp.
  assert recorder.losses == [(s, pytest.approx(v, rel=1e-6)) for s, v in scalars["train/loss"]]
  # 16 sequences of 5-9 real tokens per step; step 1 traced and compiled the train step, so its time is no
  # throughput and is not logged as one.
  assert [s for s, _ in scalars["train/tokens_per_second"]] == [2, 3, 4]
  assert all(v > 0 for _, v in scalars["train/tokens_per_second"])


class _ListData(DataHooks):
  def __init__(self, train, evals):
    self.train, self.evals = list(train), list(evals)
    self.eval_pos = 0

  def load_next_train_batch(self, train_ctx):
    return self.train.pop(0) if self.train else None

  def load_next_eval_batch(self, train_ctx):
    if self.eval_pos < len(self.evals):
      self.eval_pos += 1
      return self.evals[self.eval_pos - 1]
    self.eval_pos = 0
    return None


def test_data_hooks_feed_the_loop(base_model, task, tokenizer):
  batches = _micro_batches(task, tokenizer, count=3, size=4)
  trainer = PeftTrainer(nnx.clone(base_model), optax.sgd(0.01), _quiet(eval_every_n_steps=2))
  trainer.with_data_hooks(_ListData(batches, batches[:2]))
  trainer.train(None)
  assert trainer.train_steps() == 3
  assert [s for s, _ in trainer.metrics_logger.history["eval/loss"]] == [2, 3]


class _StopAfter(TrainingHooks):
  def __init__(self, step):
    self.step, self.seen = step, []

  def on_train_step_end(self, train_ctx, train_loss):
    self.seen.append((train_ctx.data_position, float(jax.device_get(train_ctx.step_metrics["loss"]))))
    if train_ctx.train_steps() == self.step:
      train_ctx.stop_training = True


def test_a_hook_can_stop_training_and_read_the_step_metrics(base_model, task, tokenizer):
  batches = _micro_batches(task, tokenizer, count=2, size=4)
  hook = _StopAfter(3)
  trainer = PeftTrainer(nnx.clone(base_model), optax.sgd(0.01), _quiet(max_steps=10)).with_training_hooks(hook)
  trainer.train(batches)
  assert trainer.train_steps() == 3
  assert [p for p, _ in hook.seen] == [(0, 1), (0, 2), (1, 1)]
  # The same float32 loss of the same step, read twice: at most 1 ulp from float conversions.
  assert [loss for _, loss in hook.seen] == pytest.approx(trainer.metrics_logger.values("loss"), rel=1e-6)


def test_custom_loss_without_aux_and_input_fn_and_the_profiler(base_model, task, tokenizer, tmp_path):
  """A loss returning only a scalar, fed by a custom gen_model_input_fn (equal micro-batch weights);
  the second step is traced with jax.profiler."""
  batches = _micro_batches(task, tokenizer, count=6, size=4)
  profile = ProfilerOptions(log_dir=str(tmp_path / "prof"), skip_first_n_steps=1, profiler_steps=1)

  def to_inputs(batch):
    return {"tokens": batch.input_tokens, "mask": batch.input_mask}

  def loss_fn(model, tokens, mask):
    logits, _ = model(tokens, attention_mask=mask)
    return (logits[..., 0] ** 2).mean()

  trainer = (
      PeftTrainer(
          nnx.clone(base_model),
          optax.sgd(0.01),
          _quiet(max_steps=3, gradient_accumulation_steps=2, profiler_options=profile),
      )
      .with_gen_model_input_fn(to_inputs)
      .with_loss_fn(loss_fn)
  )
  trainer.train(batches)
  assert trainer.train_steps() == 3
  assert "loss" in trainer.last_metrics and "train/tokens_per_second" not in trainer.metrics_logger.history
  assert any(p.is_file() for p in (tmp_path / "prof").rglob("*"))


# ------------------------------------------------------------------------ sharding


@pytest.mark.multi_device
def test_sharded_training_matches_one_device(base_model, micro_and_big, one_device_run):
  """fsdp=2 x tp=4 on 8 CPU devices: the same loss curve and parameters as one device."""
  assert jax.device_count() >= 8, "conftest sets 8 CPU devices"
  single, single_trainer = one_device_run
  mesh = jax.make_mesh((2, 4), ("fsdp", "tp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  sharded = shard_model(nnx.clone(base_model), mesh)
  sharded_trainer = PeftTrainer(sharded, _sgd(), _quiet(max_steps=3))
  sharded_trainer.train(micro_and_big[1])

  np.testing.assert_allclose(
      sharded_trainer.metrics_logger.values("loss"), single_trainer.metrics_logger.values("loss"), rtol=LOSS_RTOL
  )
  kernel = sharded.layers[0].attn.q_proj.kernel[...]
  assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tp")
  momentum = jax.tree.leaves(sharded_trainer.opt_state)[0]
  assert isinstance(momentum.sharding, jax.sharding.NamedSharding) and momentum.sharding.mesh == mesh
  assert sharded_trainer.num_train_step_traces == 1
  assert sharded_trainer.jit_train_and_eval_step()[0]._cache_size() == 1
  # Sharded matmuls add partial sums across devices in another order than one device does.
  _assert_params_close(_params(sharded), _params(single))


@pytest.mark.multi_device
def test_batch_not_divisible_by_the_data_axis_is_an_error(base_model, task, tokenizer):
  mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
  model = shard_model(nnx.clone(base_model), mesh)
  trainer = PeftTrainer(model, optax.sgd(0.01), _quiet(max_steps=1))
  with pytest.raises(ValueError, match=r"Batch size 4 is not divisible by the 8 devices of mesh axes \('fsdp',\)"):
    trainer.train(_micro_batches(task, tokenizer, count=1, size=4))


# --------------------------------------------------------------------------- config


def test_training_config_validation():
  with pytest.raises(ValueError, match="max_steps must be a positive int or None"):
    TrainingConfig(max_steps=0)
  with pytest.raises(ValueError, match="gradient_accumulation_steps must be a positive int"):
    TrainingConfig(gradient_accumulation_steps=-2)
  with pytest.raises(ValueError, match="max_grad_norm must be > 0"):
    TrainingConfig(max_grad_norm=0.0)
  with pytest.raises(TypeError, match="checkpointing_options must be"):
    TrainingConfig(checkpointing_options={"save_interval_steps": 5})
  with pytest.raises(ValueError, match="log_dir"):
    ProfilerOptions(log_dir="")
  config = TrainingConfig(max_steps=5, data_sharding_axis="data")
  assert config.data_sharding_axis == ("data",)
  assert config.get_with_default("max_steps", 1) == 5
  assert config.get_with_default("eval_every_n_steps", 7) == 7
  assert config.get_with_default("no_such_field", "x") == "x"
  with pytest.raises(Exception):
    config.max_steps = 3  # frozen


def test_trainer_errors(base_model):
  with pytest.raises(TypeError, match="training_config must be an easytunix.sft.peft_trainer.TrainingConfig"):
    PeftTrainer(nnx.clone(base_model), optax.sgd(0.1), {"max_steps": 3})
  trainer = PeftTrainer(nnx.clone(base_model), optax.sgd(0.1), _quiet(max_steps=1))
  with pytest.raises(ValueError, match="train\\(\\) needs train_ds"):
    trainer.train(None)


def test_hook_defaults_are_no_ops_and_time_measure_logs(caplog):
  hooks, data = TrainingHooks(), DataHooks()
  for name in ("on_train_start", "on_train_end", "on_train_step_start", "on_eval_step_start"):
    assert getattr(hooks, name)(None) is None
  assert hooks.on_train_step_end(None, 1.0) is None and hooks.on_eval_step_end(None, 1.0) is None
  assert data.load_next_train_batch(None) is None and data.load_next_eval_batch(None) is None
  import logging

  from easytunix.sft.peft_trainer import time_measure

  with caplog.at_level(logging.INFO, logger="easytunix.sft.peft_trainer"):
    with time_measure("data loading"):
      pass
  assert any(r.getMessage().startswith("[data loading] took ") for r in caplog.records)
