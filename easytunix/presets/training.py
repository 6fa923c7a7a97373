"""``compile`` / ``fit`` / ``evaluate``: friendly arguments turned into core trainers.

The facade owns no training logic: it builds an optax optimizer and generic
settings, then drives the chosen trainer through its recipe
(:mod:`easytunix.sft.recipe`): the recipe prepares the data, builds the
trainer and says how many steps an epoch makes; this module runs ``fit`` and
bridges Keras-style callbacks onto ``TrainingHooks``, the same way for every
trainer.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

# Importing a trainer package's recipe module registers its recipe.
import easytunix.distillation.recipe  # noqa: F401
import easytunix.rl.dpo.recipe  # noqa: F401
import easytunix.rl.grpo.recipe  # noqa: F401
from easytunix import callbacks as callbacks_lib
from easytunix.presets import data_formats
from easytunix.sft import hooks as hooks_lib
from easytunix.sft.recipe import Recipe, RecipeSettings, TrainingRun, get_recipe, resolve_options

_OPTIMIZERS: dict[str, Callable[..., optax.GradientTransformation]] = {
    "adamw": optax.adamw,
    "adam": optax.adam,
    "sgd": optax.sgd,
    "adafactor": optax.adafactor,
    "lion": optax.lion,
}


@dataclasses.dataclass(frozen=True)
class CompileSpec:
  """What ``compile`` decided: the recipe and its settings (``fit`` builds the trainer from them)."""

  recipe: Recipe
  settings: RecipeSettings


def build_optimizer(optimizer: Any, learning_rate: float | Callable, weight_decay: float | None,
                    warmup_steps: int, decay_steps: int | None, schedule: str) -> optax.GradientTransformation:
  """An optax optimizer whose learning rate the trainer can log (``inject_hyperparams``)."""
  if isinstance(optimizer, optax.GradientTransformation):
    return optimizer
  if not isinstance(optimizer, str) or optimizer not in _OPTIMIZERS:
    raise ValueError(
        f"optimizer must be one of {sorted(_OPTIMIZERS)} or an optax.GradientTransformation, got {optimizer!r}."
    )
  if callable(learning_rate):
    lr = learning_rate
  else:
    if not learning_rate > 0:
      raise ValueError(f"learning_rate must be > 0, got {learning_rate!r}.")
    if schedule == "constant":
      lr = optax.linear_schedule(0.0, learning_rate, warmup_steps) if warmup_steps else learning_rate
      if warmup_steps:
        lr = optax.join_schedules([lr, optax.constant_schedule(learning_rate)], [warmup_steps])
    elif schedule in ("cosine", "linear"):
      if not decay_steps:
        raise ValueError(f"schedule={schedule!r} needs decay_steps (the total number of steps).")
      if schedule == "cosine":
        lr = optax.warmup_cosine_decay_schedule(0.0, learning_rate, warmup_steps, decay_steps)
      else:
        lr = optax.join_schedules([optax.linear_schedule(0.0, learning_rate, max(warmup_steps, 1)),
                                   optax.linear_schedule(learning_rate, 0.0, max(decay_steps - warmup_steps, 1))],
                                  [max(warmup_steps, 1)])
    else:
      raise ValueError(f"schedule must be 'constant', 'cosine' or 'linear', got {schedule!r}.")
  kwargs = {"learning_rate": lr}
  if weight_decay is not None:
    if optimizer != "adamw":
      raise ValueError(f"weight_decay is an option of 'adamw', not {optimizer!r}.")
    kwargs["weight_decay"] = weight_decay
  return optax.inject_hyperparams(_OPTIMIZERS[optimizer])(**kwargs)


def training_config(*, gradient_accumulation_steps: int, checkpoint_dir: str | None, log_dir: str | None,
                    max_grad_norm: float | None, eval_every_n_steps: int | None, save_every_n_steps: int = 100,
                    keep_checkpoints: int | None = 3) -> dict[str, Any]:
  """``TrainingConfig`` keyword arguments from ``compile``'s generic arguments (the same for every trainer).

  Raises:
    ValueError: ``checkpoint_dir`` is (or is under) a file, or a save setting is not a positive int.
  """
  from easytunix.sft.checkpoint import CheckpointingOptions, check_checkpoint_directory
  from easytunix.sft.metrics import MetricsLoggerOptions

  if checkpoint_dir is not None:
    check_checkpoint_directory(checkpoint_dir, what="checkpoint_dir")
  for name, value in (("save_every_n_steps", save_every_n_steps), ("keep_checkpoints", keep_checkpoints)):
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
      raise ValueError(f"{name} must be a positive int{' or None' if name == 'keep_checkpoints' else ''}, "
                       f"got {value!r}.")
  if save_every_n_steps is None:
    raise ValueError("save_every_n_steps must be a positive int, got None.")
  return dict(
      gradient_accumulation_steps=gradient_accumulation_steps,
      checkpoint_root_directory=checkpoint_dir,
      checkpointing_options=CheckpointingOptions(save_interval_steps=save_every_n_steps, max_to_keep=keep_checkpoints)
      if checkpoint_dir else None,
      metrics_logging_options=MetricsLoggerOptions(log_dir=log_dir) if log_dir else None,
      max_grad_norm=max_grad_norm,
      eval_every_n_steps=eval_every_n_steps,
  )


PRECISIONS = ("float32", "bf16-mixed")


def check_choice(name: str, value: Any, choices: Any) -> None:
  """Raises a ValueError naming ``name`` when ``value`` is not one of ``choices`` (checked before any change)."""
  if value not in choices:
    raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}.")


def compute_dtype_for(precision: str | None, model) -> Any:
  """The compute dtype ``compile(precision=...)`` asks for (None: keep the model's).

  Raises:
    ValueError: an unknown precision, or "bf16-mixed" on a model whose weights are not float32
      (there would be no float32 master copy to keep).
  """
  if precision is None:
    return None
  if precision not in PRECISIONS:
    raise ValueError(f"precision must be None or one of {PRECISIONS}, got {precision!r}.")
  if precision == "float32":
    return jnp.float32
  weights = {leaf.dtype for leaf in jax.tree.leaves(nnx.state(model, nnx.Param))}
  if weights != {jnp.dtype(jnp.float32)}:
    raise ValueError(
        f"precision='bf16-mixed' keeps float32 master weights, but this model's weights are "
        f"{sorted(str(d) for d in weights)}. Load it with dtype='float32' (from_preset(..., dtype='float32'))."
    )
  return jnp.bfloat16


def compile_spec(model, trainer: str, settings: RecipeSettings) -> CompileSpec:
  """Runs ``trainer``'s compile-time checks on ``model`` (options already checked by ``resolve_options``)."""
  recipe = get_recipe(trainer)
  recipe.validate(model, settings)
  return CompileSpec(recipe, settings)


class _FitHooks(hooks_lib.TrainingHooks):
  """Bridges the core trainer's hooks onto Keras-style callbacks."""

  def __init__(self, model, callbacks: callbacks_lib.CallbackList, batches_per_epoch: int | None,
               validation: Any, epochs: int, evaluate: Callable[[Any], dict[str, float]],
               epoch_metrics: tuple[str, ...] = ()):
    self.model = model
    self.evaluate = evaluate
    self.epoch_metrics = epoch_metrics
    self.epoch_values: dict[str, list[float]] = {}
    self.callbacks = callbacks
    self.batches_per_epoch = batches_per_epoch
    self.validation = validation
    self.epochs = epochs
    self.epoch = 0
    self.batch_in_epoch = 0
    self.epoch_losses: list[float] = []
    self.epoch_open = False

  def _open_epoch(self) -> None:
    if not self.epoch_open:
      self.callbacks.params["epoch"] = self.epoch
      self.callbacks.on_epoch_begin(self.epoch, {})
      self.epoch_open = True
      self.batch_in_epoch = 0
      self.epoch_losses = []
      self.epoch_values = {}

  def close_epoch(self) -> None:
    if not self.epoch_open:
      return
    logs = {"loss": float(np.mean(self.epoch_losses)) if self.epoch_losses else float("nan")}
    logs.update({k: float(np.mean(v)) for k, v in self.epoch_values.items() if v})
    if self.validation is not None:
      self.callbacks.on_test_begin({})
      result = self.evaluate(self.validation)
      self.callbacks.on_test_end(dict(result))
      logs.update({f"val_{k}": v for k, v in result.items()})
    self.callbacks.on_epoch_end(self.epoch, logs)
    self.epoch_open = False
    self.epoch += 1

  def on_train_step_start(self, train_ctx):
    self._open_epoch()
    self.callbacks.on_train_batch_begin(self.batch_in_epoch, {})

  def on_train_step_end(self, train_ctx, train_loss):
    metrics = {k: float(v) for k, v in jax.device_get(train_ctx.step_metrics).items() if np.ndim(v) == 0}
    logs = {k: v for k, v in metrics.items() if k not in ("num_tokens", "input_tokens")}
    if "tokens_per_second" in train_ctx.last_metrics:
      logs["tokens_per_second"] = train_ctx.last_metrics["tokens_per_second"]
    logs["step"] = train_ctx.train_steps()
    self.epoch_losses.append(logs["loss"])
    for key in self.epoch_metrics:
      if key in logs:
        self.epoch_values.setdefault(key, []).append(logs[key])
    self.callbacks.on_train_batch_end(self.batch_in_epoch, logs)
    self.batch_in_epoch += 1
    epoch_done = self.batches_per_epoch is not None and self.batch_in_epoch >= self.batches_per_epoch
    if self.model.stop_training:
      train_ctx.stop_training = True
    elif epoch_done:
      self.close_epoch()
      if self.epoch >= self.epochs:
        train_ctx.stop_training = True


def _batches(model, spec: CompileSpec, data: Any, batch_size: int, shuffle: bool, seed: int, name: str):
  records = data_formats.as_records(data, what=name)
  data_format = spec.recipe.data_format or spec.recipe.name
  if data_format in data_formats.FORMATS:
    data_formats.check_format(records, data_format, what=name)
  if model.tokenizer is None and records and isinstance(records[0], dict):
    raise ValueError(f"{name}: the model has no tokenizer; pass one to from_preset(tokenizer=...) or give TrainingInput batches.")
  return spec.recipe.batches(model, spec.settings, records, batch_size, shuffle=shuffle, seed=seed, name=name)


def _build(model, spec: CompileSpec, state: dict[str, Any], num_epochs: int | None) -> TrainingRun:
  config = {**spec.settings.training_config, "max_steps": None, "num_epochs": num_epochs, "show_progress_bar": False}
  return spec.recipe.build(model, spec.settings, config, state.setdefault("recipe_state", {}))


def close_run(state: dict[str, Any]) -> None:
  """Closes the model's current run (its checkpoint writers, loggers, rollout engine), if any."""
  run = state.pop("run", None)
  if run is not None:
    run.close()


def fit(model, spec: CompileSpec, state: dict[str, Any], data: Any, *, epochs: int, steps: int | None,
        batch_size: int, validation_data: Any, callbacks: list | None, shuffle: bool, seed: int,
        verbose: int) -> callbacks_lib.History:
  if epochs is None or epochs <= 0:
    raise ValueError(f"epochs must be a positive int, got {epochs!r}.")
  if steps is not None and steps <= 0:
    raise ValueError(f"steps must be a positive int or None, got {steps!r}.")
  if batch_size <= 0:
    raise ValueError(f"batch_size must be positive, got {batch_size!r}.")
  recipe, settings = spec.recipe, spec.settings
  train = _batches(model, spec, data, batch_size, shuffle, seed, "training data")
  validation = (_batches(model, spec, validation_data, batch_size, False, seed, "validation_data")
                if validation_data is not None else None)
  try:
    num_batches = len(train)
  except TypeError:
    num_batches = None
  batches_per_epoch = recipe.steps_per_epoch(settings, num_batches) if num_batches is not None else None
  if batches_per_epoch == 0:
    raise ValueError(
        f"The training data makes {num_batches} batch(es) of {batch_size}, fewer than "
        f"gradient_accumulation_steps={settings.gradient_accumulation_steps}: no optimizer step fits. "
        "Use more data or a smaller batch."
    )
  if steps is not None:
    max_steps = steps
    if batches_per_epoch:
      epochs = max(epochs, math.ceil(steps / batches_per_epoch))
  else:
    max_steps = batches_per_epoch * epochs if batches_per_epoch else None

  history = callbacks_lib.History()
  user = list(callbacks or [])
  extra = [callbacks_lib.ProgbarLogger()] if verbose and not any(isinstance(c, callbacks_lib.ProgbarLogger) for c in user) else []
  cbs = callbacks_lib.CallbackList([*extra, *user, history])
  cbs.set_model(model)
  cbs.set_params({"epochs": epochs, "steps": batches_per_epoch, "verbose": verbose, "batch_size": batch_size})

  previous = state.pop("run", None)
  if previous is not None:
    previous.close()  # before the new run starts (e.g. its own rollout engine)
  run = _build(model, spec, state, None if max_steps is not None else epochs)
  trainer = run.trainer
  if previous is not None:
    # Keep the optimizer's moments and schedule position across fit calls, as Keras does.
    trainer.continue_from(previous.trainer)
  if max_steps is not None:
    trainer.config = dataclasses.replace(trainer.config, max_steps=trainer.train_steps() + max_steps)
  state["run"] = run
  hooks = _FitHooks(model, cbs, batches_per_epoch, validation, epochs, evaluate=run.evaluate,
                    epoch_metrics=recipe.epoch_metrics)
  trainer.with_training_hooks(hooks)
  model.stop_training = False
  cbs.on_train_begin({})
  try:
    # With eval_every_n_steps the validation data is also scored during the epoch (TensorBoard, trainer metrics).
    run.train(train, validation if settings.eval_every_n_steps else None)
    hooks.close_epoch()
  finally:
    cbs.on_train_end(history.history and {k: v[-1] for k, v in history.history.items()} or {})
    trainer.training_hooks = None
    state["run"] = recipe.after_fit(run)  # None once the recipe closed it
  return history


def evaluate(model, spec: CompileSpec, state: dict[str, Any], data: Any, batch_size: int) -> dict[str, float]:
  if state.get("run") is None:
    state["run"] = _build(model, spec, state, None)
  batches = _batches(model, spec, data, spec.recipe.eval_batch_size(spec.settings, batch_size), False, 0,
                     "evaluation data")
  return state["run"].evaluate(batches)


__all__ = ["CompileSpec", "RecipeSettings", "build_optimizer", "compile_spec", "evaluate", "fit", "resolve_options",
           "training_config"]
