"""``compile`` / ``fit`` / ``evaluate``: friendly arguments turned into core trainers.

The facade owns no training logic: it builds an optax optimizer, a
``TrainingConfig`` and the core trainer, converts data into the trainer's
batches, and bridges Keras-style callbacks onto ``TrainingHooks``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import numpy as np
import optax
from flax import nnx

from easytunix import callbacks as callbacks_lib
from easytunix.presets import data_formats
from easytunix.sft import hooks as hooks_lib
from easytunix.sft.peft_trainer import PeftTrainer, TrainingConfig

TRAINERS = ("sft", "dpo", "distill", "grpo")

_OPTIMIZERS: dict[str, Callable[..., optax.GradientTransformation]] = {
    "adamw": optax.adamw,
    "adam": optax.adam,
    "sgd": optax.sgd,
    "adafactor": optax.adafactor,
    "lion": optax.lion,
}

# Options each trainer accepts through compile(**trainer_options).
TRAINER_OPTIONS: dict[str, dict[str, Any]] = {
    "sft": {"use_chat_template": None},
    "dpo": {"beta": 0.1, "loss_type": "sigmoid", "label_smoothing": 0.0, "max_prompt_length": None,
            "use_chat_template": False, "ref_model": None},
    "distill": {},
    "grpo": {"reward_fns": None, "reward_weights": None, "num_generations": 4, "num_iterations": 1, "beta": 0.04,
             "epsilon": 0.2, "loss_algo": "grpo", "max_new_tokens": 32, "temperature": 0.9, "top_p": 1.0,
             "top_k": None, "async_rollout": True, "use_chat_template": False, "ref_model": None,
             "rollout_engine": "vanilla"},
}


@dataclasses.dataclass(frozen=True)
class CompileSpec:
  """What ``compile`` decided; ``fit`` builds the trainer from it."""

  trainer: str
  optimizer: optax.GradientTransformation
  max_length: int
  gradient_accumulation_steps: int
  checkpoint_dir: str | None
  max_grad_norm: float | None
  eval_every_n_steps: int | None
  log_dir: str | None
  teacher: Any
  distill: Any
  options: dict[str, Any]


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


def check_trainer_options(trainer: str, options: dict[str, Any]) -> dict[str, Any]:
  known = TRAINER_OPTIONS[trainer]
  unknown = set(options) - set(known)
  if unknown:
    others = {t for t, opts in TRAINER_OPTIONS.items() if unknown & set(opts)}
    hint = f" (those are options of trainer {sorted(others)})" if others else ""
    raise ValueError(
        f"compile(trainer={trainer!r}) got unknown option(s) {sorted(unknown)}{hint}. "
        f"Options for {trainer!r}: {sorted(known) or 'none'}."
    )
  return {**known, **options}


class _FitHooks(hooks_lib.TrainingHooks):
  """Bridges the core trainer's hooks onto Keras-style callbacks."""

  def __init__(self, model, callbacks: callbacks_lib.CallbackList, batches_per_epoch: int | None,
               validation: Any, epochs: int, evaluate: Callable[[Any], dict[str, float]] | None = None,
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

  def close_epoch(self, trainer: PeftTrainer) -> None:
    if not self.epoch_open:
      return
    logs = {"loss": float(np.mean(self.epoch_losses)) if self.epoch_losses else float("nan")}
    logs.update({k: float(np.mean(v)) for k, v in self.epoch_values.items() if v})
    if self.validation is not None:
      self.callbacks.on_test_begin({})
      result = (self.evaluate or trainer.evaluate)(self.validation)
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
      self.close_epoch(train_ctx)
      if self.epoch >= self.epochs:
        train_ctx.stop_training = True


# Step metrics that History also keeps per epoch (averaged), beyond the loss.
_EPOCH_METRICS: dict[str, tuple[str, ...]] = {"grpo": ("reward", "kl")}


def validate_spec(model, spec: CompileSpec) -> None:
  """Trainer-specific checks at compile time (trainer packages register theirs)."""
  check = _VALIDATORS.get(spec.trainer)
  if check is not None:
    check(model, spec)


_VALIDATORS: dict[str, Callable[[Any, CompileSpec], None]] = {
    "distill": lambda m, s: _validate_distill(m, s), "grpo": lambda m, s: _validate_grpo(m, s),
}


def make_trainer(model, spec: CompileSpec, *, max_steps: int | None, num_epochs: int | None,
                 show_progress_bar: bool) -> PeftTrainer:
  """The core trainer for ``spec`` (SFT here; DPO, distillation and GRPO plug in the same way)."""
  from easytunix.sft.checkpoint import CheckpointingOptions
  from easytunix.sft.metrics import MetricsLoggerOptions

  kwargs = dict(
      max_steps=max_steps,
      num_epochs=num_epochs,
      gradient_accumulation_steps=spec.gradient_accumulation_steps,
      checkpoint_root_directory=spec.checkpoint_dir,
      checkpointing_options=CheckpointingOptions() if spec.checkpoint_dir else None,
      metrics_logging_options=MetricsLoggerOptions(log_dir=spec.log_dir) if spec.log_dir else None,
      max_grad_norm=spec.max_grad_norm,
      eval_every_n_steps=spec.eval_every_n_steps,
      show_progress_bar=show_progress_bar,
      mesh=getattr(model, "mesh", None),
  )
  builder = _TRAINER_BUILDERS.get(spec.trainer)
  if builder is None:
    raise NotImplementedError(f"trainer={spec.trainer!r} is not available in this version of easytunix.")
  return builder(model, spec, kwargs)


def _build_sft(model, spec: CompileSpec, kwargs: dict[str, Any]) -> PeftTrainer:
  return PeftTrainer(model, spec.optimizer, TrainingConfig(**kwargs))


def _build_distill(model, spec: CompileSpec, kwargs: dict[str, Any]) -> PeftTrainer:
  from easytunix.distillation import build_distillation_trainer

  return build_distillation_trainer(model, spec.teacher, spec.distill, spec.optimizer, **kwargs)


def _validate_distill(model, spec: CompileSpec) -> None:
  from easytunix.distillation import check_compatible

  student_tok, teacher_tok = getattr(model, "tokenizer", None), getattr(spec.teacher, "tokenizer", None)
  if student_tok is not None and teacher_tok is not None:
    probe = "Distillation needs one tokenizer: 12+7=19, hello world."
    if student_tok.vocab_size != teacher_tok.vocab_size or student_tok.encode(probe) != teacher_tok.encode(probe):
      raise ValueError(
          f"The teacher's tokenizer ({teacher_tok.vocab_size} ids) differs from the student's "
          f"({student_tok.vocab_size} ids): distillation compares them token by token. Give the student "
          "the teacher's tokenizer (from_preset(..., tokenizer=teacher.tokenizer)) and vocabulary."
      )
  check_compatible(model, spec.teacher, spec.distill)


def _build_dpo(model, spec: CompileSpec, kwargs: dict[str, Any]) -> PeftTrainer:
  from easytunix.rl.dpo.dpo_trainer import build_dpo_trainer

  o = spec.options
  return build_dpo_trainer(model, spec.optimizer, ref_model=o["ref_model"], beta=o["beta"], loss_type=o["loss_type"],
                           label_smoothing=o["label_smoothing"], max_length=spec.max_length,
                           max_prompt_length=o["max_prompt_length"], **kwargs)


def _dpo_batches(model, spec: CompileSpec, records, batch_size: int, shuffle: bool, seed: int, name: str):
  from easytunix.rl.dpo.data import dpo_batches

  if records and not isinstance(records[0], dict):
    return records
  return dpo_batches(records, model.tokenizer, batch_size, spec.max_length, shuffle, seed,
                     max_prompt_length=spec.options["max_prompt_length"], drop_remainder=False,
                     use_chat_template=spec.options["use_chat_template"], name=name)


def _grpo_settings(spec: CompileSpec) -> dict[str, Any]:
  o = spec.options
  fns = o["reward_fns"]
  return dict(
      reward_fns=list(fns) if isinstance(fns, (list, tuple)) else fns,
      num_generations=o["num_generations"], num_iterations=o["num_iterations"], beta=o["beta"],
      epsilon=o["epsilon"], loss_algo=o["loss_algo"], reward_weights=o["reward_weights"],
      async_rollout=o["async_rollout"], max_new_tokens=o["max_new_tokens"], temperature=o["temperature"],
      top_p=o["top_p"], top_k=o["top_k"], max_prompt_length=spec.max_length - o["max_new_tokens"],
      rollout_engine=o["rollout_engine"],
  )


def _validate_grpo(model, spec: CompileSpec) -> None:
  from easytunix.rl.grpo.grpo_learner import GrpoConfig
  from easytunix.rl.rl_cluster import RolloutConfig

  o = _grpo_settings(spec)
  fns = o["reward_fns"]
  if fns is None or (isinstance(fns, list) and not fns):
    raise ValueError(
        "compile(trainer='grpo') needs reward_fns: functions fn(prompts, completions, **columns) -> list[float], "
        "e.g. reward_fns=[easytunix.rl.grpo.rewards.exact_match]."
    )
  for fn in fns if isinstance(fns, list) else [fns]:
    if not callable(fn):
      raise TypeError(f"reward_fns must be callables, got {fn!r}.")
  if model.tokenizer is None:
    raise ValueError("trainer='grpo' needs a tokenizer: reward functions read the completions as text.")
  if o["max_prompt_length"] < 1:
    raise ValueError(
        f"max_new_tokens={o['max_new_tokens']} leaves no room for a prompt in max_length={spec.max_length}; "
        "raise max_length (prompt plus completion tokens)."
    )
  if not o["temperature"]:
    raise ValueError("GRPO samples several different completions per prompt: temperature must be > 0 (e.g. 0.9).")
  count = len(fns) if isinstance(fns, list) else 1
  weights = o["reward_weights"]
  if weights is not None and len(weights) != count:
    raise ValueError(f"reward_weights has {len(weights)} entries for {count} reward function(s).")
  from easytunix.rl.rl_cluster import ROLLOUT_ENGINES

  if o["rollout_engine"] not in ROLLOUT_ENGINES:
    raise ValueError(f"rollout_engine must be one of {list(ROLLOUT_ENGINES)}, got {o['rollout_engine']!r}.")
  if o["rollout_engine"] == "vllm":
    from easytunix.generate.vllm_sampler import import_vllm

    import_vllm()
  GrpoConfig(num_generations=o["num_generations"], num_iterations=o["num_iterations"], beta=o["beta"],
             epsilon=o["epsilon"], loss_algo=o["loss_algo"])
  RolloutConfig(max_tokens_to_generate=o["max_new_tokens"], temperature=o["temperature"], top_p=o["top_p"],
                top_k=o["top_k"], max_prompt_length=o["max_prompt_length"])


def _build_grpo(model, spec: CompileSpec, kwargs: dict[str, Any]):
  from easytunix.rl.grpo.grpo_learner import build_grpo_learner

  from easytunix.presets.task import facade_state
  from easytunix.sft.lora import is_lora_enabled

  settings = _grpo_settings(spec)
  reward_fns = settings.pop("reward_fns")
  reference = spec.options["ref_model"]
  if reference is None and not is_lora_enabled(model):
    # Full fine-tuning: the KL reference is the weights as they were at compile(), kept across fit() calls.
    # (It shares their arrays: training works on copies.)
    state = facade_state(model)
    if state.get("grpo_reference") is None:
      state["grpo_reference"] = nnx.clone(model)
    reference = state["grpo_reference"]
  return build_grpo_learner(model, spec.optimizer, reward_fns, tokenizer=model.tokenizer,
                            reference=reference, **settings, **kwargs)


def _grpo_batches(model, spec: CompileSpec, records, batch_size: int, shuffle: bool, seed: int, name: str):
  from easytunix.rl.grpo.grpo_learner import PROMPT_IDS, prompt_batches

  g = spec.options["num_generations"]
  if batch_size % g:
    raise ValueError(
        f"batch_size={batch_size} is not a multiple of num_generations={g}: a GRPO batch holds num_generations "
        f"completions of each of batch_size / num_generations prompts. Use batch_size={max(g, batch_size // g * g)} "
        f"or {(batch_size // g + 1) * g}."
    )
  tokenizer = model.tokenizer
  limit = spec.max_length - spec.options["max_new_tokens"]
  prepared = []
  for index, record in enumerate(records):
    prompt = record["prompt"]
    if isinstance(prompt, str) and not spec.options["use_chat_template"]:
      ids, text = tokenizer.encode(prompt), prompt
    else:
      messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
      ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
      text = prompt if isinstance(prompt, str) else messages[-1].get("content", "")
    if not ids:
      raise ValueError(f"{name}: record {index} has an empty prompt.")
    if len(ids) > limit:
      raise ValueError(
          f"{name}: record {index}'s prompt has {len(ids)} tokens, more than max_length - max_new_tokens = {limit}. "
          "Raise compile(max_length=...) or shorten the prompt."
      )
    prepared.append({**record, "prompt": text, PROMPT_IDS: list(ids)})
  per_batch = batch_size // g
  # Training drops a last partial batch (another shape would compile the update again); evaluation keeps every prompt.
  drop = name == "training data" and len(prepared) >= per_batch
  return prompt_batches(prepared, per_batch, shuffle=shuffle, seed=seed, drop_remainder=drop)


_TRAINER_BUILDERS: dict[str, Callable[..., Any]] = {
    "sft": _build_sft, "distill": _build_distill, "dpo": _build_dpo, "grpo": _build_grpo,
}


def register_trainer(name: str, builder: Callable[..., PeftTrainer], batches: Callable[..., Any],
                     validate: Callable[[Any, CompileSpec], None] | None = None) -> None:
  """Lets a trainer plug into compile/fit: ``builder(model, spec, config_kwargs) -> trainer``,
  ``batches(model, spec, records, batch_size, shuffle, seed, name) -> re-iterable of batches`` and an
  optional compile-time ``validate(model, spec)``."""
  _TRAINER_BUILDERS[name] = builder
  _BATCHES[name] = batches
  if validate is not None:
    _VALIDATORS[name] = validate


def _sft_batches(model, spec: CompileSpec, records, batch_size: int, shuffle: bool, seed: int, name: str):
  from easytunix.sft.data import SupervisedDataset

  if records and not isinstance(records[0], dict):
    return records  # TrainingInput batches, used as they are
  use_chat = spec.options.get("use_chat_template")
  if use_chat is None:
    use_chat = False
  dataset = SupervisedDataset(records, model.tokenizer, batch_size, spec.max_length, shuffle=shuffle, seed=seed,
                              drop_remainder=False, use_chat_template=use_chat, name=name)
  # Rows are padded to the longest example (in steps of 8), not to max_length: short data trains fast.
  longest = max(len(ex) for ex in dataset.examples)
  dataset.max_length = min(spec.max_length, -(-longest // 8) * 8)
  return dataset


_BATCHES: dict[str, Callable[..., Any]] = {
    "sft": _sft_batches, "distill": _sft_batches, "dpo": _dpo_batches, "grpo": _grpo_batches,
}


def batches_for(model, spec: CompileSpec, data: Any, batch_size: int, shuffle: bool, seed: int, name: str):
  records = data_formats.as_records(data, what=name)
  data_formats.check_format(records, spec.trainer, what=name)
  if model.tokenizer is None and records and isinstance(records[0], dict):
    raise ValueError(f"{name}: the model has no tokenizer; pass one to from_preset(tokenizer=...) or give TrainingInput batches.")
  return _BATCHES[spec.trainer](model, spec, records, batch_size, shuffle, seed, name)


def fit(model, spec: CompileSpec, state: dict[str, Any], data: Any, *, epochs: int, steps: int | None,
        batch_size: int, validation_data: Any, callbacks: list | None, shuffle: bool, seed: int,
        verbose: int) -> callbacks_lib.History:
  if epochs is None or epochs <= 0:
    raise ValueError(f"epochs must be a positive int, got {epochs!r}.")
  if steps is not None and steps <= 0:
    raise ValueError(f"steps must be a positive int or None, got {steps!r}.")
  if batch_size <= 0:
    raise ValueError(f"batch_size must be positive, got {batch_size!r}.")
  train = batches_for(model, spec, data, batch_size, shuffle, seed, "training data")
  validation = (batches_for(model, spec, validation_data, batch_size, False, seed, "validation_data")
                if validation_data is not None else None)
  try:
    micro_per_epoch = len(train)
  except TypeError:
    micro_per_epoch = None
  if spec.trainer == "grpo" and micro_per_epoch is not None:
    # A trailing part-group is dropped; each group of rollouts is trained on num_iterations times.
    acc = spec.gradient_accumulation_steps
    micro_per_epoch = micro_per_epoch // acc * acc * spec.options["num_iterations"]
  accumulation = spec.gradient_accumulation_steps
  batches_per_epoch = micro_per_epoch // accumulation if micro_per_epoch is not None else None
  if batches_per_epoch == 0:
    raise ValueError(
        f"The training data makes {micro_per_epoch} batch(es) of {batch_size}, fewer than "
        f"gradient_accumulation_steps={accumulation}: no optimizer step fits. Use more data or a smaller batch."
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

  previous = state.get("trainer")
  previous_learner = state.get("learner")
  if previous_learner is not None:
    previous_learner.rl_cluster.close_rollout_engine()  # before the new learner starts its own engine
  built = make_trainer(model, spec, max_steps=None, num_epochs=None if max_steps is not None else epochs,
                       show_progress_bar=False)
  learner = built if hasattr(built, "rollout_stream") else None
  trainer = learner.trainer if learner is not None else built
  if previous is not None:
    # Keep the optimizer's moments and schedule position across fit calls, as Keras does.
    same = jax.tree.structure(previous._opt_state) == jax.tree.structure(trainer._opt_state)
    if trainer.train_steps() == 0 and same:
      trainer._opt_state = previous._opt_state
      trainer._train_steps = previous.train_steps()
    previous.close()
  if max_steps is not None:
    trainer.config = dataclasses.replace(trainer.config, max_steps=trainer.train_steps() + max_steps)
  state["trainer"], state["learner"] = trainer, learner
  hooks = _FitHooks(model, cbs, batches_per_epoch, validation, epochs,
                    evaluate=learner.evaluate if learner is not None else None,
                    epoch_metrics=_EPOCH_METRICS.get(spec.trainer, ()))
  trainer.with_training_hooks(hooks)
  model.stop_training = False
  cbs.on_train_begin({})
  try:
    # With eval_every_n_steps the validation data is also scored during the epoch (TensorBoard, trainer metrics).
    periodic = validation if spec.eval_every_n_steps else None
    if learner is not None:
      trainer.train(learner.rollout_stream(train, periodic))
    else:
      trainer.train(train, periodic)
    hooks.close_epoch(trainer)
  finally:
    cbs.on_train_end(history.history and {k: v[-1] for k, v in history.history.items()} or {})
    trainer.training_hooks = None
    if spec.trainer == "distill":
      # Reverts what the strategy attached to the student (projections, capture wrappers).
      trainer.close()
      state["trainer"] = None
  return history


def evaluate(model, spec: CompileSpec, state: dict[str, Any], data: Any, batch_size: int) -> dict[str, float]:
  trainer = state.get("trainer")
  if trainer is None:
    built = make_trainer(model, spec, max_steps=None, num_epochs=None, show_progress_bar=False)
    learner = built if hasattr(built, "rollout_stream") else None
    trainer = learner.trainer if learner is not None else built
    state["trainer"], state["learner"] = trainer, learner
  if spec.trainer == "grpo":
    # Mean rewards of one greedy completion per prompt: GRPO has no fixed target to score a loss against.
    batch_size = batch_size // spec.options["num_generations"] * spec.options["num_generations"] or \
        spec.options["num_generations"]
  batches = batches_for(model, spec, data, batch_size, False, 0, "evaluation data")
  if state.get("learner") is not None:
    return state["learner"].evaluate(batches)
  return trainer.evaluate(batches)
