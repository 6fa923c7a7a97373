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
import json
import math
import time
import warnings
from pathlib import Path
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
from easytunix import distributed
from easytunix.presets import data_formats
from easytunix.presets import validation as validation_lib
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
  """Bridges the core trainer's hooks onto Keras-style callbacks.

  Every scalar step metric is also kept per epoch (its mean, in ``History``). Throughput is
  measured here per step, from the step's start to its metrics being read back; the first
  step of a ``fit`` compiles the train step, so it reports its time instead of a throughput.
  """

  def __init__(self, model, callbacks: callbacks_lib.CallbackList, batches_per_epoch: int | None,
               validation: Any, epochs: int, evaluate: Callable[[Any], dict[str, float]],
               max_steps: int | None = None, note: Callable[[str], None] | None = None):
    self.model = model
    self.evaluate = evaluate
    self.callbacks = callbacks
    self.batches_per_epoch = batches_per_epoch
    self.validation = validation
    self.epochs = epochs
    self.max_steps = max_steps
    self.note = note
    self.epoch = 0
    self.steps_done = 0
    self.batch_in_epoch = 0
    self.resume_batch = 0
    self.epoch_values: dict[str, list[float]] = {}
    self.epoch_open = False
    self.step_start = 0.0
    self.compile_seconds: float | None = None

  def steps_in_epoch(self) -> int | None:
    """Optimizer steps the current epoch runs (the last one may be cut short by ``steps=``)."""
    in_epoch = None if self.batches_per_epoch is None else self.batches_per_epoch - self.resume_batch
    if self.max_steps is None:
      return in_epoch
    left = self.max_steps - self.steps_done
    return left if in_epoch is None else min(in_epoch, left)

  def _open_epoch(self) -> None:
    if not self.epoch_open:
      self.callbacks.params["epoch"] = self.epoch
      self.callbacks.params["steps"] = self.steps_in_epoch()
      self.callbacks.on_epoch_begin(self.epoch, {})
      self.epoch_open = True
      self.batch_in_epoch, self.resume_batch = self.resume_batch, 0  # a resumed job starts mid-epoch
      self.epoch_values = {}

  def close_epoch(self) -> None:
    if not self.epoch_open:
      return
    logs = {"loss": float("nan")}
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
    self.step_start = time.perf_counter()

  def on_train_step_end(self, train_ctx, train_loss):
    raw = {k: float(v) for k, v in jax.device_get(train_ctx.step_metrics).items() if np.ndim(v) == 0}
    seconds = time.perf_counter() - self.step_start  # the step is done: its metrics are on the host
    logs = {k: v for k, v in raw.items() if k not in ("num_tokens", "input_tokens")}
    if self.steps_done == 0:
      self.compile_seconds = seconds
      if self.note is not None:
        self.note(f"Compiled the train step in {seconds:.1f} s (the first step's time, compilation included).")
    elif seconds > 0 and raw.get("input_tokens"):
      logs["tokens_per_second"] = raw["input_tokens"] / seconds
    logs["step"] = train_ctx.train_steps()
    for key, value in logs.items():
      if key != "step":
        self.epoch_values.setdefault(key, []).append(value)
    self.steps_done += 1
    self.callbacks.on_train_batch_end(self.batch_in_epoch, logs)
    self.batch_in_epoch += 1
    epoch_done = self.batches_per_epoch is not None and self.batch_in_epoch >= self.batches_per_epoch
    if self.model.stop_training:
      train_ctx.stop_training = True
    elif epoch_done:
      self.close_epoch()
      if self.epoch >= self.epochs:
        train_ctx.stop_training = True


def data_parallel_size(model) -> int:
  """How many ways the batch is split: the product of the mesh's data axes (1 without a mesh)."""
  from easytunix.sft.peft_trainer import TrainingConfig

  mesh = getattr(model, "mesh", None)
  if mesh is None:
    return 1
  axes = TrainingConfig.__dataclass_fields__["data_sharding_axis"].default
  return int(np.prod([mesh.shape[a] for a in axes if a in mesh.axis_names] or [1]))


def check_batch_size(model, batch_size: int, what: str = "batch_size") -> None:
  """Raises when the mesh's data-parallel devices do not divide ``batch_size``, saying what works."""
  size = data_parallel_size(model)
  if batch_size % size:
    mesh = model.mesh
    shape = ", ".join(f"{a}={n}" for a, n in mesh.shape.items())
    lower, upper = batch_size // size * size, (batch_size // size + 1) * size
    choices = f"{lower} or {upper}" if lower else str(upper)
    raise ValueError(
        f"{what}={batch_size} does not split over the {size} data-parallel devices of the model's mesh "
        f"({shape}; the batch is split over its 'data' and 'fsdp' axes). Use a multiple of {size} "
        f"(e.g. {choices}), or load the model on a mesh with fewer devices on those axes "
        "(from_preset(..., mesh=...))."
    )


def split_validation(records: list[Any], validation_split: float, validation_data: Any) -> tuple[list[Any], list[Any]]:
  """Keras's ``validation_split``: the last fraction of the records (before shuffling) is held out."""
  if not isinstance(validation_split, (int, float)) or not 0 <= validation_split < 1:
    raise ValueError(f"validation_split must be a float in [0, 1), got {validation_split!r}.")
  if validation_data is not None:
    raise ValueError("Pass validation_data or validation_split, not both.")
  at = int(len(records) * (1 - validation_split))
  train, held_out = records[:at], records[at:]
  if not train or not held_out:
    raise ValueError(
        f"validation_split={validation_split} of {len(records)} example(s) leaves {len(train)} for training and "
        f"{len(held_out)} for validation; both need at least one. Use more data or another fraction."
    )
  return train, held_out


def _count(n: int) -> str:
  return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n:,}"


def start_banner(model, spec: CompileSpec, *, records: list[Any], train: Any, batches_per_epoch: int | None,
                 max_steps: int | None, batch_size: int) -> str:
  """What ``fit(verbose=1)`` prints before training: devices, parameters, data, batch and lengths."""
  from easytunix.sft.lora import trainable_filter

  mesh = getattr(model, "mesh", None)
  devices = jax.devices()
  where = (f"mesh {dict(mesh.shape)} ({mesh.size} {mesh.devices.flat[0].platform} devices)" if mesh is not None
           else f"1 {devices[0].platform} device ({len(devices)} available; from_preset(mesh=...) uses more)")
  total = (model.num_params if hasattr(model, "num_params")  # counts a QLoRA base's quantized kernels too
           else sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param))))
  trainable = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, trainable_filter(model))))
  accumulation, parallel = spec.settings.gradient_accumulation_steps, data_parallel_size(model)
  num_examples = len(records)
  unit = "examples" if not records or isinstance(records[0], (dict, str)) else "ready batches"
  truncated = getattr(train, "num_truncated", None)
  if truncated is None and hasattr(train, "truncation"):
    truncated = train.truncation.pairs_truncated
  steps = f"{batches_per_epoch} steps per epoch" if batches_per_epoch is not None else "steps per epoch unknown"
  if max_steps is not None:
    steps += f", {max_steps} steps in all"
  lines = [
      f"{type(model).__name__} \"{getattr(model, 'preset', '') or ''}\", trainer={spec.recipe.name!r}, on {where}",
      f"parameters: {_count(total)} total, {_count(trainable)} trainable",
      f"data: {num_examples} {unit}, {steps}",
      # batch_size is global: each batch is split over the data-parallel devices, not multiplied by them.
      f"effective batch: {batch_size * accumulation} examples per optimizer step = batch_size {batch_size} x "
      f"accumulation {accumulation}, each batch split over {parallel} data-parallel device(s) "
      f"({batch_size // parallel} per device)",
      f"max_length: {spec.settings.max_length}"
      + (f" ({truncated} of {num_examples} {unit} truncated)" if truncated is not None else ""),
  ]
  return "\n".join(lines)


def _batches(model, spec: CompileSpec, data: Any, batch_size: int, shuffle: bool, seed: int, name: str):
  records = data_formats.as_records(data, what=name)
  data_format = spec.recipe.data_format or spec.recipe.name
  if data_format in data_formats.FORMATS:
    data_formats.check_format(records, data_format, what=name)
  if model.tokenizer is None and records and isinstance(records[0], dict):
    raise ValueError(f"{name}: the model has no tokenizer; pass one to from_preset(tokenizer=...) or give TrainingInput batches.")
  if records and not isinstance(records[0], dict):
    validation_lib.check_training_inputs(records, model.config.vocab_size, what=name)
  return spec.recipe.batches(model, spec.settings, records, batch_size, shuffle=shuffle, seed=seed, name=name)


def _build(model, spec: CompileSpec, state: dict[str, Any], num_epochs: int | None) -> TrainingRun:
  config = {**spec.settings.training_config, "max_steps": None, "num_epochs": num_epochs, "show_progress_bar": False}
  return spec.recipe.build(model, spec.settings, config, state.setdefault("recipe_state", {}))


def _record_run(spec: CompileSpec, state: dict[str, Any], records: list[Any], resumed: int, **settings: Any) -> None:
  """Warns about settings or data that differ from the checkpointed run's, then records this run's."""
  folder = spec.settings.training_config.get("checkpoint_root_directory")
  if not folder or not distributed.is_main_process():
    return  # with several processes, process 0 compares and records (they all got the same data)
  folder = Path(folder)
  current = {**state.get("run_settings", {}), **settings, "data": validation_lib.data_fingerprint(records)}
  if resumed:
    for note in validation_lib.compare_run(folder, current, resumed):
      warnings.warn(f"Resuming from step {resumed} of {folder}: {note}.", stacklevel=4)
  validation_lib.write_run(folder, current)


def _check_processes_agree(data: list[Any], validation_data: list[Any] | None, **arguments: Any) -> None:
  """Raises on every process unless all passed the same data and ``fit`` arguments (a collective call).

  Every process feeds its own devices' rows of each global batch, so differing data would be mixed silently.
  """
  validation = validation_lib.data_fingerprint(validation_data) if validation_data is not None else None
  described = {"data": validation_lib.data_fingerprint(data), "validation_data": validation, **arguments}
  distributed.check_same_on_all_processes(json.dumps(described, sort_keys=True, default=str),
                                          "The training data or the fit() arguments")


def close_run(state: dict[str, Any]) -> None:
  """Closes the model's current run (its checkpoint writers, loggers, rollout engine), if any."""
  run = state.pop("run", None)
  if run is not None:
    run.close()


def fit(model, spec: CompileSpec, state: dict[str, Any], data: Any, *, epochs: int, steps: int | None,
        batch_size: int, validation_data: Any, callbacks: list | None, shuffle: bool, seed: int,
        verbose: int, validation_split: float = 0.0) -> callbacks_lib.History:
  validation_lib.check_fit_args(epochs=epochs, steps=steps, batch_size=batch_size, seed=seed, shuffle=shuffle)
  if verbose not in (0, 1, 2):
    raise ValueError(f"verbose must be 0 (silent), 1 (progress bar) or 2 (one line per epoch), got {verbose!r}.")
  check_batch_size(model, batch_size)
  recipe, settings = spec.recipe, spec.settings
  data = data_formats.as_records(data, what="training data")
  if validation_split:
    data, validation_data = split_validation(data, validation_split, validation_data)
  if jax.process_count() > 1:
    if validation_data is not None:  # records once: a generator could not be read twice
      validation_data = data_formats.as_records(validation_data, what="validation_data")
    _check_processes_agree(data, validation_data, epochs=epochs, steps=steps, batch_size=batch_size,
                           shuffle=shuffle, seed=seed)
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
  progbar = next((c for c in user if isinstance(c, callbacks_lib.ProgbarLogger)), None)
  extra = [progbar := callbacks_lib.ProgbarLogger()] if verbose and progbar is None else []
  cbs = callbacks_lib.CallbackList([*extra, *user, history])
  cbs.set_model(model)
  # The epochs this call runs (steps= may end it early); "steps" is set per epoch by _FitHooks.
  epochs_run = math.ceil(max_steps / batches_per_epoch) if max_steps and batches_per_epoch else epochs
  cbs.set_params({"epochs": epochs_run, "steps": batches_per_epoch, "verbose": verbose, "batch_size": batch_size,
                  "main_metric": recipe.main_metric})
  if verbose == 1:
    progbar.write(start_banner(model, spec, records=data, train=train, batches_per_epoch=batches_per_epoch,
                               max_steps=max_steps, batch_size=batch_size))

  previous = state.pop("run", None)
  if previous is not None:
    previous.close()  # before the new run starts (e.g. its own rollout engine)
  run = _build(model, spec, state, None if max_steps is not None else epochs)
  trainer = run.trainer
  if previous is not None:
    # Keep the optimizer's moments and schedule position across fit calls, as Keras does.
    trainer.continue_from(previous.trainer)
  # The first fit after compile that finds checkpoints resumes the job: steps/epochs count from its start.
  resumed = trainer.train_steps() if previous is None else 0
  if max_steps is not None:
    start = 0 if resumed else trainer.train_steps()
    trainer.config = dataclasses.replace(trainer.config, max_steps=start + max_steps)
    max_steps = max(start + max_steps - trainer.train_steps(), 0)
  state["run"] = run
  _record_run(spec, state, data, resumed, batch_size=batch_size, shuffle=shuffle, seed=seed)
  if resumed and max_steps == 0:
    message = (f"This job is already finished: the checkpoint in {settings.training_config['checkpoint_root_directory']}"
               f" is at step {resumed}, and fit(steps={steps}, epochs={epochs}) asks for "
               f"{trainer.config.max_steps} steps in all; nothing to train. Ask for more steps or epochs to "
               "continue, or use a new checkpoint_dir to start over.")
    warnings.warn(message, stacklevel=3)
    state["run"] = recipe.after_fit(run)
    return history
  hooks = _FitHooks(model, cbs, batches_per_epoch, validation, epochs, evaluate=run.evaluate, max_steps=max_steps,
                    note=progbar.write if verbose == 1 else None)
  if resumed and batches_per_epoch:
    hooks.epoch, hooks.resume_batch = divmod(resumed, batches_per_epoch)
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
  eval_batch_size = spec.recipe.eval_batch_size(spec.settings, batch_size)
  check_batch_size(model, eval_batch_size)
  if state.get("run") is None:
    state["run"] = _build(model, spec, state, None)
  batches = _batches(model, spec, data, eval_batch_size, False, 0, "evaluation data")
  return state["run"].evaluate(batches)


__all__ = ["CompileSpec", "RecipeSettings", "build_optimizer", "compile_spec", "evaluate", "fit", "resolve_options",
           "training_config"]
