"""DistillationTrainer: it beats SFT at matching a teacher, keeps the teacher frozen and compiled once,
accumulates exactly, trains projections with the student and leaves a plain student behind."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from easytunix.distillation import (
    AttentionProjectionStrategy,
    AttentionTransferStrategy,
    DistillationTrainer,
    FeaturePoolingStrategy,
    FeatureProjectionStrategy,
    LogitStrategy,
    TrainingConfig,
    TrainingInput,
    build_distillation_trainer,
)
from easytunix.distillation.strategies.base_strategy import default_labels_fn
from easytunix.distillation.strategies.logit import softened_kl
from easytunix.generate.tokenizer_adapter import TokenizerAdapter
from easytunix.models.llama3 import Llama3, ModelConfig
from easytunix.sft.data import SupervisedDataset
from easytunix.sft.lora import apply_lora
from easytunix.sft.peft_trainer import PeftTrainer, default_loss_fn
from easytunix.sft.synthetic import addition_task

TINY_BPE = Path(__file__).resolve().parent.parent / "easytunix" / "presets" / "assets" / "tiny_bpe"
STUDENT = ModelConfig.tiny(num_layers=1, hidden_size=32, intermediate_size=64, num_heads=2, num_kv_heads=1)
# One SGD step done as two micro-batches vs one batch is the same float32 math in another summation
# order: parameters end <= 6e-7 of each tensor's largest entry apart (measured; eps 1.2e-7 times sums of
# a few hundred terms). The step itself moves them by ~1e-2 of it, so a dropped micro-batch shows as
# ~1e-2 and a 12% weighting error as ~1e-3. The bound is absolute per tensor, scaled to its largest
# entry: an elementwise rtol fails on entries that happen to be near zero.
PARAM_TOL = 2e-5


def _quiet(**kw):
  return TrainingConfig(show_progress_bar=False, **kw)


def _state(model, filter_=nnx.Param):
  return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(nnx.as_pure(nnx.state(model, filter_)))}


def _random_batches(count, batch=4, length=10, seed=0):
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(count):
    tokens = rng.integers(1, 512, (batch, length)).astype(np.int32)
    mask = np.ones((batch, length), bool)
    mask[0, length - 3 :] = False
    completion = np.ones((batch, length), bool)
    completion[:, :2] = False
    out.append(TrainingInput(tokens, mask, completion))
  return out


@pytest.fixture(scope="module")
def tokenizer():
  return TokenizerAdapter.from_pretrained(TINY_BPE)


@pytest.fixture(scope="module")
def task():
  return addition_task(num_eval=256, seed=0)


@pytest.fixture(scope="module")
def random_teacher():
  return Llama3(ModelConfig.tiny(), rngs=nnx.Rngs(0))


# ------------------------------------------------------------------------------ learning


def test_logit_distillation_beats_sft_at_matching_the_teacher(tokenizer, task):
  """Same student init, data, optimizer and steps: distillation ends closer to the teacher
  (held-out KL(teacher || student)) than SFT on the same examples."""
  as_text = lambda records: [{"text": r["prompt"] + r["completion"]} for r in records]  # noqa: E731
  teacher = Llama3(ModelConfig.tiny(intermediate_size=256), rngs=nnx.Rngs(0))
  schedule = optax.warmup_cosine_decay_schedule(0.0, 5e-3, 10, 60, 5e-4)
  PeftTrainer(teacher, optax.adamw(schedule, weight_decay=0.0), _quiet(max_steps=60)).train(
      SupervisedDataset(as_text(task.train), tokenizer, batch_size=32, max_length=12, seed=0)
  )
  held_out = next(iter(SupervisedDataset(as_text(task.eval), tokenizer, batch_size=256, max_length=12, shuffle=False)))
  mask = jnp.asarray(held_out.input_mask, bool)
  logits = nnx.jit(lambda model: model(held_out.input_tokens, attention_mask=mask)[0])  # compiled, not op by op
  teacher_logits = logits(teacher)
  positions = default_labels_fn(held_out.input_tokens, held_out.input_mask, held_out.completion_mask).mask

  def held_out_kl(student):
    kl = softened_kl(logits(student), teacher_logits, 1.0)
    return float(jnp.where(positions, kl, 0.0).sum() / positions.sum())

  results = {}
  for name in ("sft", "distill"):
    student = Llama3(STUDENT, rngs=nnx.Rngs(1))
    data = SupervisedDataset(as_text(task.train), tokenizer, batch_size=32, max_length=12, seed=1)
    config = _quiet(max_steps=80)
    if name == "sft":
      trainer = PeftTrainer(student, optax.adam(4e-3), config)
    else:
      strategy = LogitStrategy(temperature=1.0, alpha=0.1)
      trainer = DistillationTrainer(student, teacher, strategy, optax.adam(4e-3), config)
    trainer.train(data)
    results[name] = held_out_kl(student)
  print(f"held-out KL(teacher || student): {results}")
  assert results["distill"] < 0.85 * results["sft"], results


# ------------------------------------------------------------------------------ mechanics


STRATEGIES = {
    "logit": lambda: LogitStrategy(temperature=2.0),
    "feature_pooling": lambda: FeaturePoolingStrategy(),
    "feature_projection": lambda: FeatureProjectionStrategy(rngs=nnx.Rngs(3)),
    "attention_transfer": lambda: AttentionTransferStrategy(),
    "attention_projection": lambda: AttentionProjectionStrategy(rngs=nnx.Rngs(3)),
}


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_training_leaves_teacher_frozen_and_a_plain_student(name, random_teacher):
  """Every strategy: the teacher never changes and is compiled once, the train step compiles once,
  loss terms are logged, learned projections train, and after close() the student's graph, state
  and logits are exactly a plain model's."""
  student = Llama3(STUDENT, rngs=nnx.Rngs(1))
  plain = Llama3(STUDENT, rngs=nnx.Rngs(7))
  teacher_before = _state(random_teacher, ...)
  student_before = _state(student)
  trainer = build_distillation_trainer(
      student, random_teacher, STRATEGIES[name](), optax.adam(1e-2), max_steps=3, show_progress_bar=False
  )
  projection_name = trainer.strategy.projection_name if hasattr(trainer.strategy, "projection_name") else None
  projection_before = None
  if projection_name is not None:
    projection_before = np.asarray(getattr(student, projection_name).kernel[...])
  trainer.train(_random_batches(3), eval_ds=_random_batches(1, seed=5) if name == "logit" else None)

  assert trainer.num_train_step_traces == 1
  assert trainer.num_teacher_traces == 1
  assert {"distill_loss", "task_loss"} <= set(trainer.last_metrics)
  assert np.isfinite(trainer.last_metrics["loss"]) and np.isfinite(trainer.last_metrics["grad_norm"])
  assert name != "logit" or "eval_loss" in trainer.last_metrics
  for key, value in _state(random_teacher, ...).items():
    np.testing.assert_array_equal(value, teacher_before[key])
  assert any(not np.array_equal(v, student_before[k]) for k, v in _state(student).items() if k in student_before)
  if projection_name is not None:
    assert not np.array_equal(np.asarray(getattr(student, projection_name).kernel[...]), projection_before)

  trainer.close()
  assert nnx.graphdef(student) == nnx.graphdef(plain)
  assert jax.tree.structure(nnx.state(student)) == jax.tree.structure(nnx.state(plain))
  nnx.update(plain, nnx.state(student))
  tokens = jnp.asarray(_random_batches(1, seed=9)[0].input_tokens)
  # The same eager forward on the same weights: bitwise equal.
  np.testing.assert_array_equal(np.asarray(student(tokens)[0]), np.asarray(plain(tokens)[0]))
  trainer.close()  # a second close is harmless


def test_eval_loss_is_the_students_sft_loss(random_teacher):
  student = Llama3(STUDENT, rngs=nnx.Rngs(1))
  batch = _random_batches(1)[0]
  trainer = DistillationTrainer(student, random_teacher, LogitStrategy(), optax.sgd(0.0), _quiet())
  result = trainer.evaluate([batch])
  expected, aux = default_loss_fn(student, batch.input_tokens, batch.input_mask, batch.completion_mask)
  # Compiled vs eager float32 loss over ~30 tokens: ~1e-7 relative apart; another loss would be > 1e-2 off.
  assert result["loss"] == pytest.approx(float(expected), rel=1e-5)
  assert trainer.num_teacher_traces == 0  # the task loss needs no teacher


def test_gradient_accumulation_is_exact(random_teacher):
  """Two micro-batches of 2 rows give the same update as one batch of 4 (token-weighted)."""
  batches = _random_batches(1, batch=4)
  big = batches[0]
  halves = [TrainingInput(*(getattr(big, f)[s] for f in ("input_tokens", "input_mask", "completion_mask"))) for s in (slice(0, 2), slice(2, 4))]
  params = []
  for data, accumulation in (([big], None), (halves, 2)):
    student = Llama3(STUDENT, rngs=nnx.Rngs(1))
    trainer = DistillationTrainer(
        student, random_teacher, LogitStrategy(), optax.sgd(0.5), _quiet(max_steps=1, gradient_accumulation_steps=accumulation)
    )
    trainer.train(data)
    params.append(_state(student))
  assert params[0].keys() == params[1].keys()
  for key, want in params[0].items():
    np.testing.assert_allclose(params[1][key], want, rtol=0, atol=PARAM_TOL * np.abs(want).max(), err_msg=key)


def test_lora_student_trains_adapters_and_projection_only(random_teacher):
  student = apply_lora(Llama3(STUDENT, rngs=nnx.Rngs(1)), rank=4)
  base = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))
  base_before = _state(student, base)
  trainer = DistillationTrainer(student, random_teacher, FeatureProjectionStrategy(), optax.adam(1e-2), _quiet(max_steps=2))
  kernel_before = np.asarray(student.distillation_feature_projection.kernel[...])
  lora_before = _state(student, nnx.LoRAParam)
  trainer.train(_random_batches(2))
  after = _state(student, base)
  for key, value in base_before.items():
    if "distillation_feature_projection" not in key:
      np.testing.assert_array_equal(after[key], value)
  assert not np.array_equal(np.asarray(student.distillation_feature_projection.kernel[...]), kernel_before)
  assert any(not np.array_equal(v, lora_before[k]) for k, v in _state(student, nnx.LoRAParam).items())
  trainer.close()
  assert not hasattr(student, "distillation_feature_projection")


def test_custom_loss_and_input_functions(random_teacher):
  student = Llama3(STUDENT, rngs=nnx.Rngs(1))
  seen = {}

  def gen_inputs(batch):
    seen["gen"] = True
    return {"input_tokens": batch["tokens"], "input_mask": batch["mask"]}

  def loss_fn(model, teacher_output, inputs):
    logits = model(inputs["input_tokens"], attention_mask=inputs["input_mask"])[0]
    return jnp.mean((logits - teacher_output) ** 2), {"logit_mse": jnp.mean((logits - teacher_output) ** 2)}

  trainer = DistillationTrainer(student, random_teacher, LogitStrategy(), optax.adam(1e-2), _quiet(max_steps=3))
  trainer.with_gen_model_input_fn(gen_inputs).with_loss_fn(loss_fn, has_aux=True)
  raw = [{"tokens": b.input_tokens, "mask": b.input_mask.astype(bool)} for b in _random_batches(3)]
  trainer.train(raw, eval_ds=raw[:1])
  losses = trainer.metrics_logger.values("loss")
  assert seen["gen"] and losses[-1] < losses[0]
  assert "logit_mse" in trainer.last_metrics and "eval_logit_mse" in trainer.last_metrics


def test_build_errors(random_teacher):
  student = Llama3(STUDENT, rngs=nnx.Rngs(1))
  with pytest.raises(TypeError, match="distillation strategy"):
    build_distillation_trainer(student, random_teacher, "logit", optax.adam(1e-3))
  with pytest.raises(ValueError, match="not both"):
    build_distillation_trainer(student, random_teacher, LogitStrategy(), optax.adam(1e-3), _quiet(), max_steps=2)
  with pytest.raises(ValueError, match="one vocabulary"):
    build_distillation_trainer(Llama3(STUDENT.replace(vocab_size=256), rngs=nnx.Rngs(1)), random_teacher, LogitStrategy(), optax.adam(1e-3))
  with pytest.raises(TypeError, match="BaseStrategy"):
    DistillationTrainer(student, random_teacher, object(), optax.adam(1e-3), _quiet())
  # A failed build leaves no projection behind.
  with pytest.raises(TypeError, match="TrainingConfig"):
    DistillationTrainer(student, random_teacher, FeatureProjectionStrategy(), optax.adam(1e-3), {"max_steps": 1})
  assert not hasattr(student, "distillation_feature_projection")
