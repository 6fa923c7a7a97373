"""Knowledge distillation on the one training loop: a teacher's outputs guide a student.

:class:`DistillationTrainer` is a :class:`~easytunix.sft.peft_trainer.PeftTrainer`
whose loss comes from a strategy (:mod:`easytunix.distillation.strategies`).
For every micro-batch the teacher runs first, on the host side of the loop
(``_prepare_inputs``), through one compiled function and outside the
differentiated step; its outputs travel with the batch into the student's
compiled train step. The teacher's weights never change.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import jax
import optax
from flax import nnx

from easytunix.distillation.strategies.base_strategy import BaseStrategy
from easytunix.sft.peft_trainer import (
    PeftTrainer,
    TrainingConfig,
    TrainingInput,
    default_gen_model_input_fn,
)

# The key under which the teacher's output rides along with the model inputs.
TEACHER_OUTPUT_KEY = "_teacher_output"


class DistillationTrainer(PeftTrainer):
  """Trains ``student_model`` to imitate ``teacher_model`` as ``strategy`` says.

  Args:
    student_model: the model trained in place (its LoRA adapters when it has them).
    teacher_model: the frozen model whose outputs the student learns from.
    strategy: a :class:`~easytunix.distillation.strategies.BaseStrategy`; one built
      without forward/label functions gets the defaults for easytunix causal LMs.
    optimizer: an ``optax.GradientTransformation`` for the student (and any
      projection the strategy adds).
    training_config: a :class:`TrainingConfig`.

  On creation the strategy checks the pair (``check_compatible``) and prepares
  the models (``pre_process_models``, e.g. adding a learned projection to the
  student, which then trains with it). :meth:`close` reverts that, leaving a
  plain student. Evaluation reports the student's task loss (the teacher is not
  run for it unless a custom loss function is set).

  Batches are :class:`TrainingInput` (or anything ``gen_model_input_fn`` maps to
  the forward functions' keyword arguments). A custom objective set with
  :meth:`with_loss_fn` is called as ``loss_fn(student, teacher_output, inputs)``.
  """

  def __init__(
      self,
      student_model: nnx.Module,
      teacher_model: nnx.Module,
      strategy: BaseStrategy,
      optimizer: optax.GradientTransformation,
      training_config: TrainingConfig,
  ):
    if not isinstance(strategy, BaseStrategy):
      raise TypeError(
          f"strategy must be an easytunix.distillation.strategies.BaseStrategy, got {type(strategy).__name__}."
      )
    if not strategy.is_bound:
      strategy.bind_defaults()
    strategy.check_compatible(student_model, teacher_model)
    self.strategy = strategy
    self.teacher_model = teacher_model
    self._post_processed = False
    processed = strategy.pre_process_models(student_model, teacher_model)
    if processed is not None:  # Tunix's strategies return (student, teacher); older ones change them in place
      student_model, teacher_model = processed
      self.teacher_model = teacher_model
    try:
      super().__init__(student_model, optimizer, training_config)
    except BaseException:
      strategy.post_process_models(student_model, teacher_model)
      raise
    self._user_gen_model_input_fn: Callable[[Any], Any] = default_gen_model_input_fn
    self._train_loss_fn: Callable[..., Any] = self.get_train_loss
    self._eval_loss_fn: Callable[..., Any] = self.get_eval_loss
    self._teacher_in_eval = False
    self._evaluating = False
    PeftTrainer.with_gen_model_input_fn(self, self._model_inputs)
    PeftTrainer.with_loss_fn(self, self._train_objective, has_aux=True)
    self.eval_loss_fn = self._eval_objective
    self._teacher_graphdef, self._teacher_state = nnx.split(teacher_model)
    self.num_teacher_traces = 0
    self._teacher_fn = jax.jit(self._teacher_forward)

  # ------------------------------------------------------------------ builder API

  def with_gen_model_input_fn(self, gen_model_input_fn: Callable[[Any], Any]) -> "DistillationTrainer":
    """Maps each batch to the forward functions' keyword arguments (a dict); returns the trainer."""
    self._user_gen_model_input_fn = gen_model_input_fn
    self.clear_jit_cache()
    return self

  def with_loss_fn(self, loss_fn: Callable[..., Any], has_aux: bool = False) -> "DistillationTrainer":
    """Uses ``loss_fn(student, teacher_output, inputs)`` for training and evaluation; returns the trainer."""
    self._train_loss_fn = loss_fn
    self._eval_loss_fn = loss_fn
    self._teacher_in_eval = True
    self._has_aux = has_aux
    self.clear_jit_cache()
    return self

  # ------------------------------------------------------------------ the losses

  def get_train_loss(self, model: nnx.Module, teacher_output: Any, inputs: dict[str, Any]) -> tuple[jax.Array, dict[str, Any]]:
    """The strategy's training loss and its terms: ``(loss, {"task_loss", "distill_loss", "num_tokens"})``."""
    return self.strategy.train_loss_and_metrics(model, teacher_output, inputs)

  def get_eval_loss(self, model: nnx.Module, teacher_output: Any, inputs: dict[str, Any]) -> tuple[jax.Array, dict[str, Any]]:
    """The student's task loss (``teacher_output`` is unused): ``(loss, {"num_tokens"})``."""
    del teacher_output
    return self.strategy.eval_loss_and_metrics(model, inputs)

  def _model_inputs(self, prepared: dict[str, Any]) -> dict[str, Any]:
    inputs = self._user_inputs(prepared["batch"])
    return {**inputs, TEACHER_OUTPUT_KEY: prepared["teacher_output"]}

  def _user_inputs(self, batch: Any) -> dict[str, Any]:
    inputs = self._user_gen_model_input_fn(batch)
    if not isinstance(inputs, dict):
      raise TypeError(
          "The distillation trainer's gen_model_input_fn must return a dict of the forward functions' keyword "
          f"arguments, got {type(inputs).__name__}."
      )
    if TEACHER_OUTPUT_KEY in inputs:
      raise ValueError(f"Model inputs may not use the reserved key {TEACHER_OUTPUT_KEY!r}.")
    return inputs

  def _train_objective(self, model: nnx.Module, **kwargs: Any) -> Any:
    teacher_output = kwargs.pop(TEACHER_OUTPUT_KEY)
    return self._train_loss_fn(model, teacher_output, kwargs)

  def _eval_objective(self, model: nnx.Module, **kwargs: Any) -> Any:
    teacher_output = kwargs.pop(TEACHER_OUTPUT_KEY)
    return self._eval_loss_fn(model, teacher_output, kwargs)

  # ------------------------------------------------------------------ the teacher

  def _teacher_forward(self, state: Any, inputs: dict[str, Any]) -> Any:
    self.num_teacher_traces += 1
    teacher = nnx.merge(self._teacher_graphdef, state)
    return jax.lax.stop_gradient(self.strategy.get_teacher_outputs(teacher, inputs))

  def teacher_outputs(self, batch: Any) -> Any:
    """The teacher's output on one batch (compiled once per batch shape)."""
    return self._teacher_fn(self._teacher_state, self._user_inputs(batch))

  def _prepare_inputs(self, batch: Any) -> Any:
    run_teacher = not self._evaluating or self._teacher_in_eval
    return {"batch": batch, "teacher_output": self.teacher_outputs(batch) if run_teacher else None}

  @contextlib.contextmanager
  def _evaluation(self) -> Iterator[None]:
    previous, self._evaluating = self._evaluating, True
    try:
      yield
    finally:
      self._evaluating = previous

  def evaluate(self, eval_ds: Iterable[Any] | None, skip_jit: bool = False) -> dict[str, float]:
    with self._evaluation():
      return super().evaluate(eval_ds, skip_jit)

  def _trainable_filter(self) -> Any:
    base = super()._trainable_filter()
    extra = self.strategy.extra_trainable_paths() if hasattr(self, "strategy") else ()
    if not extra:
      return base
    return nnx.Any(base, *(nnx.PathContains(name) for name in extra))

  # ------------------------------------------------------------------ the end

  def close(self) -> None:
    """Reverts the strategy's changes to the models (the student is plain again) and closes the loop's resources."""
    if not self._post_processed:
      self.strategy.post_process_models(self.model, self.teacher_model)
      self._post_processed = True
    super().close()


def build_distillation_trainer(
    student: nnx.Module,
    teacher: nnx.Module,
    strategy: BaseStrategy,
    optimizer: optax.GradientTransformation,
    training_config: TrainingConfig | None = None,
    **training_config_kwargs: Any,
) -> DistillationTrainer:
  """A :class:`DistillationTrainer` for easytunix models: what ``compile(trainer="distill")`` needs.

  Fills the strategy's missing forward/label functions with the defaults for
  causal LMs fed :class:`TrainingInput` batches, checks the pair (e.g. a
  vocabulary mismatch for logit distillation is a ValueError) and builds the
  trainer with ``training_config`` or ``TrainingConfig(**training_config_kwargs)``.
  """
  if training_config is not None and training_config_kwargs:
    raise ValueError("Pass either training_config or TrainingConfig keyword arguments, not both.")
  config = training_config or TrainingConfig(**training_config_kwargs)
  if not isinstance(strategy, BaseStrategy):
    raise TypeError(
        f"distill must be a distillation strategy (e.g. LogitStrategy(temperature=2.0)), got {type(strategy).__name__}."
    )
  strategy.bind_defaults()
  return DistillationTrainer(student, teacher, strategy, optimizer, config)


def init_student_from_teacher(teacher: nnx.Module, *, rngs: nnx.Rngs | None = None, **config_overrides: Any) -> nnx.Module:
  """A model of the teacher's class and config with ``config_overrides`` (e.g. ``num_layers=4``).

  Every parameter whose path and shape the teacher shares (embeddings, the first
  layers, the final norm) starts as a copy of the teacher's; the rest is random
  (``rngs``, default ``nnx.Rngs(0)``). A student that shares the teacher's
  vocabulary and tokenizer, as logit distillation needs. A teacher kernel that is
  quantized (QLoRA) is copied dequantized, in the student's dtype.
  """
  from easytunix.layers.quantization import quantized_kernels

  config = teacher.config.replace(**config_overrides)
  student = type(teacher)(config, rngs=rngs if rngs is not None else nnx.Rngs(0))
  teacher_params = dict(nnx.to_flat_state(nnx.state(teacher, nnx.Param)))
  teacher_quantized = quantized_kernels(teacher)
  state = nnx.state(student, nnx.Param)
  for path, variable in nnx.to_flat_state(state):
    source = teacher_params.get(path)
    if source is not None and source.shape == variable.shape and source.dtype == variable.dtype:
      variable.set_value(jax.numpy.array(source.get_value(), copy=True))
    quantized = teacher_quantized.get(".".join(str(p) for p in path))
    if quantized is not None and quantized.shape == variable.shape:
      variable.set_value(quantized.dequantize(variable.dtype))
  nnx.update(student, state)
  return student


def check_compatible(student: nnx.Module, teacher: nnx.Module, strategy: BaseStrategy) -> None:
  """Raises a ValueError when ``strategy`` cannot distil ``teacher`` into ``student`` (call it at compile time)."""
  strategy.check_compatible(student, teacher)


__all__ = [
    "DistillationTrainer",
    "TrainingConfig",
    "TrainingInput",
    "build_distillation_trainer",
    "check_compatible",
    "init_student_from_teacher",
]
