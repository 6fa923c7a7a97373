"""Logit distillation of real weights on CPU: SmolLM2-135M-Instruct teaches a 4-layer student."""

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from easytunix.convert.real_models import ensure_real_model
from easytunix.distillation import (
    DistillationTrainer,
    LogitStrategy,
    TrainingConfig,
    init_student_from_teacher,
)
from easytunix.generate.tokenizer_adapter import TokenizerAdapter
from easytunix.models import load_model
from easytunix.sft.data import SupervisedDataset, bundled_dataset_path, load_records

pytestmark = pytest.mark.real_weights


def test_smollm2_teaches_a_four_layer_student():
  folder = ensure_real_model("smollm2-135m-instruct")
  tokenizer = TokenizerAdapter.from_pretrained(folder)
  teacher = load_model(folder, dtype="float32")
  student = init_student_from_teacher(teacher, num_layers=4)
  assert student.config.vocab_size == teacher.config.vocab_size == tokenizer.vocab_size
  teacher_before = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(teacher, nnx.Param)))

  records = load_records(bundled_dataset_path("instructions"))
  common = dict(tokenizer=tokenizer, batch_size=4, max_length=64, use_chat_template=True)
  train_ds = SupervisedDataset(records[8:], seed=0, **common)
  held_out = next(iter(SupervisedDataset(records[:8], shuffle=False, **common)))

  strategy = LogitStrategy(temperature=2.0, alpha=0.5)
  trainer = DistillationTrainer(student, teacher, strategy, optax.adamw(1e-3), TrainingConfig(max_steps=8, show_progress_bar=False))
  inputs = dict(input_tokens=held_out.input_tokens, input_mask=held_out.input_mask, completion_mask=held_out.completion_mask)
  teacher_output = trainer.teacher_outputs(held_out)

  graphdef = nnx.graphdef(student)

  @jax.jit
  def held_out_terms(state, teacher_output, inputs):
    return strategy.train_loss_and_metrics(nnx.merge(graphdef, state), teacher_output, inputs)[1]

  before = held_out_terms(nnx.state(student), teacher_output, inputs)
  trainer.train(train_ds)
  after = held_out_terms(nnx.state(student), teacher_output, inputs)
  losses = trainer.metrics_logger.values("distill_loss")
  print(f"held-out distill loss {float(before['distill_loss']):.3f} -> {float(after['distill_loss']):.3f}; "
        f"task loss {float(before['task_loss']):.3f} -> {float(after['task_loss']):.3f}; train distill {losses}")
  assert trainer.train_steps() == 8 and trainer.num_teacher_traces == 1
  assert float(after["distill_loss"]) < 0.8 * float(before["distill_loss"])
  assert float(after["task_loss"]) < float(before["task_loss"])
  teacher_after = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(teacher, nnx.Param)))
  assert all(jax.tree.leaves(jax.tree.map(np.array_equal, teacher_before, teacher_after)))
  trainer.close()
