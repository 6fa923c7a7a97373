"""The training loop every easytunix trainer runs: SFT here; DPO, distillation and GRPO plug in.

``PeftTrainer(model, optimizer, training_config).train(train_ds)`` trains either
the LoRA adapters (when ``apply_lora`` was called on the model) or every
parameter, with one compiled train step, exact token-weighted gradient
accumulation, gradient clipping, periodic evaluation, orbax checkpoints with
automatic resume, TensorBoard metrics and a progress bar.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from easytunix.distributed import is_main_process
from easytunix.host_memory import release_memory_after_compiles
from easytunix.layers.sharding import commit_model, mesh_context, module_mesh
from easytunix.layers.sharding import place as place_on_sharding
from easytunix.models.calling import logits_log_probs, next_token_log_probs
from easytunix.sft import hooks as hooks_lib
from easytunix.sft.checkpoint import CHECKPOINTING_OPTIONS_TYPES, CheckpointingOptions, CheckpointManager
from easytunix.sft.lora import is_lora_enabled, trainable_filter
from easytunix.sft.metrics import MetricsLogger, MetricsLoggerOptions, ProgressBar, perplexity

logger = logging.getLogger(__name__)

# An aux entry with this key weights micro-batches (and eval batches) when they
# are combined: loss and gradients are summed over tokens and divided by the
# total token count, exactly as for one big batch.
NUM_TOKENS = "num_tokens"


@flax.struct.dataclass
class TrainingInput:
  """One batch for the default SFT loss (a pytree; arrays are [batch, seq]).

  Attributes:
    input_tokens: token ids.
    input_mask: 1 for real tokens, 0 for padding (attention and loss both skip padding).
    completion_mask: 1 for tokens the loss predicts (e.g. the completion of a
      prompt/completion pair, assistant turns of a chat); None: every real token.
      Unlike Tunix, where ``input_mask`` doubles as the loss mask, the two are separate.
    positions: position ids; None: counted from the first real token.
  """

  input_tokens: Any
  input_mask: Any
  completion_mask: Any = None
  positions: Any = None


@dataclasses.dataclass(frozen=True)
class ProfilerOptions:
  """Trace a range of optimizer steps with ``jax.profiler`` (view in TensorBoard / Perfetto).

  Attributes:
    log_dir: where the trace is written.
    skip_first_n_steps: steps to run before tracing starts (skip compilation).
    profiler_steps: how many steps to trace.
  """

  log_dir: str
  skip_first_n_steps: int = 1
  profiler_steps: int = 3

  def __post_init__(self):
    if not self.log_dir:
      raise ValueError("ProfilerOptions.log_dir must name a folder for the trace.")
    if self.skip_first_n_steps < 0 or self.profiler_steps <= 0:
      raise ValueError(
          f"ProfilerOptions needs skip_first_n_steps >= 0 and profiler_steps > 0, got "
          f"{self.skip_first_n_steps} and {self.profiler_steps}."
      )


def _positive_or_none(name: str, value: Any) -> None:
  if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
    raise ValueError(f"TrainingConfig.{name} must be a positive int or None, got {value!r}.")


@dataclasses.dataclass(frozen=True)
class TrainingConfig:
  """Settings of a training run.

  Attributes:
    eval_every_n_steps: evaluate on ``eval_ds`` every this many optimizer steps
      (None: only once at the end of ``train``).
    max_steps: stop after this many optimizer steps (None: run ``num_epochs``).
    num_epochs: passes over ``train_ds`` (None: 1, or as many as ``max_steps``
      needs when ``max_steps`` is set and ``train_ds`` can be iterated again).
    gradient_accumulation_steps: micro-batches (items of ``train_ds``) per
      optimizer step; loss and gradients are token-weighted exactly.
    checkpoint_root_directory: where checkpoints go; the newest one there is
      restored when the trainer is created (None: no checkpoints).
    checkpointing_options: save interval, how many to keep, async writing.
    metrics_logging_options: TensorBoard folder and flush interval.
    profiler_options: a range of steps to trace with ``jax.profiler``.
    data_sharding_axis: mesh axes the batch dimension is split over (those the
      mesh has); with no mesh the batch goes to the default device.
    max_grad_norm: clip gradients to this global norm (None: no clipping).
    max_eval_steps: at most this many batches per evaluation (None: all).
    pbar_description: label of the progress bar.
    show_progress_bar: draw a tqdm bar.
    mesh: device mesh for the batch (None: the mesh the model's parameters are on).
  """

  eval_every_n_steps: int | None = None
  max_steps: int | None = None
  num_epochs: int | None = None
  gradient_accumulation_steps: int | None = None
  checkpoint_root_directory: str | None = None
  checkpointing_options: CheckpointingOptions | None = None
  metrics_logging_options: MetricsLoggerOptions | None = None
  profiler_options: ProfilerOptions | None = None
  data_sharding_axis: tuple[str, ...] = ("data", "fsdp")
  max_grad_norm: float | None = None
  max_eval_steps: int | None = None
  pbar_description: str = "Training"
  show_progress_bar: bool = True
  mesh: jax.sharding.Mesh | None = None

  def __post_init__(self):
    for name in ("eval_every_n_steps", "max_steps", "num_epochs", "gradient_accumulation_steps", "max_eval_steps"):
      _positive_or_none(name, getattr(self, name))
    if self.max_grad_norm is not None and not self.max_grad_norm > 0:
      raise ValueError(f"TrainingConfig.max_grad_norm must be > 0 or None, got {self.max_grad_norm!r}.")
    if isinstance(self.data_sharding_axis, str):
      object.__setattr__(self, "data_sharding_axis", (self.data_sharding_axis,))
    object.__setattr__(self, "data_sharding_axis", tuple(self.data_sharding_axis))
    if self.checkpointing_options is not None and not isinstance(self.checkpointing_options, CHECKPOINTING_OPTIONS_TYPES):
      raise TypeError(
          "checkpointing_options must be an easytunix.sft.checkpoint.CheckpointingOptions "
          "or an orbax.checkpoint.CheckpointManagerOptions."
      )
    if self.metrics_logging_options is not None and not isinstance(
        self.metrics_logging_options, MetricsLoggerOptions
    ):
      raise TypeError("metrics_logging_options must be an easytunix.sft.metrics.MetricsLoggerOptions.")

  def get_with_default(self, key: str, default: Any) -> Any:
    """The value of ``key``, or ``default`` when it is None or not a field."""
    value = getattr(self, key, None)
    return default if value is None else value

  @property
  def accumulation(self) -> int:
    return self.gradient_accumulation_steps or 1


@contextlib.contextmanager
def time_measure(context: str = "", suppress_logging: bool = False) -> Iterator[Callable[[], float]]:
  """Logs how long the block took: ``[context] took 1.23s``; yields a function giving the seconds so far."""
  start = time.perf_counter()
  try:
    yield lambda: time.perf_counter() - start
  finally:
    if not suppress_logging:
      logger.info("[%s] took %.2fs", context, time.perf_counter() - start)


def default_gen_model_input_fn(batch: Any) -> Any:
  """A :class:`TrainingInput` becomes the keyword arguments of :func:`default_loss_fn`; dicts pass through."""
  if isinstance(batch, TrainingInput):
    return dict(
        input_tokens=batch.input_tokens,
        input_mask=batch.input_mask,
        completion_mask=batch.completion_mask,
        positions=batch.positions,
    )
  return batch


token_log_probs = logits_log_probs  # log p(target) per position, in float32: [B, T, V], [B, T] -> [B, T]


def default_loss_fn(
    model: nnx.Module,
    input_tokens: jax.Array,
    input_mask: jax.Array,
    completion_mask: jax.Array | None = None,
    positions: jax.Array | None = None,
    attention_mask: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Next-token cross-entropy over the completion tokens, summed and divided by their count.

  The model is called the Tunix way, ``model(input_tokens, positions, None, attention_mask)``
  (see :func:`easytunix.models.calling.call_causal_lm`): any module with that signature
  trains. Without ``attention_mask``, ``input_mask`` (the padding) is the attention
  mask too; Tunix's ``gen_model_input_fn`` outputs (``input_tokens``, ``input_mask`` as the
  loss mask, ``positions``, a causal [B, T, T] ``attention_mask``) are accepted as keywords.

  Returns ``(loss, {"num_tokens": count})``; the count lets the trainer combine
  micro-batches exactly.
  """
  input_mask = jnp.asarray(input_mask).astype(jnp.bool_)
  # The log-probs of the next tokens, in chunks of positions for easytunix models (no [B, T, vocab] logits).
  nll = -next_token_log_probs(model, input_tokens, input_mask, positions, attention_mask)
  mask = input_mask[:, 1:]
  if completion_mask is not None:
    mask = mask & jnp.asarray(completion_mask[:, 1:]).astype(jnp.bool_)
  count = mask.sum().astype(jnp.float32)
  loss = jnp.where(mask, nll, 0.0).sum() / jnp.maximum(count, 1.0)
  return loss, {NUM_TOKENS: count}


def _scheduled_apart(fn: Callable[..., Any], trainable: Any, *args: Any) -> Any:
  """``fn(trainable, *args)`` inside a ``lax.cond`` whose predicate is true but unknown to the compiler.

  The branch is compiled and scheduled as a computation of its own, so what follows it (the gradient
  clipping's global norm) cannot reorder its work. Measured on XLA:CPU with block remat (Qwen3-0.6B LoRA,
  6 layers, 8k tokens): 4.07 GiB of temporaries inline, 2.15 GiB in the branch, as without clipping.
  The other branch (never taken) returns zeros of the same structure.
  """
  shapes = []

  def taken(*operands):
    out = fn(*operands)
    shapes.append(jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)), out))
    return out

  def never(*operands):
    spec = shapes[0] if shapes else jax.eval_shape(fn, *operands)
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), spec)

  leaves = jax.tree.leaves(trainable)
  if not leaves:
    return fn(trainable, *args)
  x = jnp.ravel(leaves[0])[0]
  pred = (x == x) | (x != x)  # true for every value, NaN included; XLA does not fold it
  return jax.lax.cond(pred, taken, never, trainable, *args)


def _find_hyperparam(opt_state: Any, name: str) -> Any:
  """A hyperparameter injected with ``optax.inject_hyperparams`` anywhere in ``opt_state``."""
  nodes = jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(getattr(x, "hyperparams", None), dict))
  for node in nodes:
    params = getattr(node, "hyperparams", None)
    if isinstance(params, dict) and name in params:
      return params[name]
  return None


def _count_input_tokens(inputs: Any) -> jax.Array | None:
  if isinstance(inputs, dict):
    if inputs.get("input_mask") is not None:
      return jnp.asarray(inputs["input_mask"]).astype(jnp.float32).sum()
    if inputs.get("input_tokens") is not None:
      return jnp.asarray(float(np.prod(inputs["input_tokens"].shape)), jnp.float32)
  return None


def _weighted_mean(values: jax.Array, weights: jax.Array, total: jax.Array) -> jax.Array:
  """``sum_i weights[i] * values[i] / total`` over the leading (micro-batch) axis."""
  values = jnp.asarray(values, jnp.float32)
  return (values * weights.reshape((-1,) + (1,) * (values.ndim - 1))).sum(0) / total


def _commit(tree: Any, copy: bool = False) -> Any:
  """Pins every array to the sharding it has: a jitted step compiled for committed
  arguments is not compiled again when it is later fed its own (committed) outputs.

  With ``copy`` the arrays get their own buffers, so donating them cannot delete
  arrays that another model (a clone, a reference model) shares.
  """
  return jax.tree.map(lambda x: jax.device_put(x, x.sharding, may_alias=False if copy else None), tree)


def _stack(items: list[Any]) -> Any:
  def stack(*leaves):
    if any(isinstance(x, jax.Array) for x in leaves):
      return jnp.stack(leaves)
    return np.stack([np.asarray(x) for x in leaves])

  try:
    return jax.tree.map(stack, *items)
  except ValueError as err:
    raise ValueError(
        "The micro-batches of one optimizer step have different structures or shapes, so they cannot be "
        f"stacked for gradient accumulation ({err}). Pad every batch to the same max_length."
    ) from err


def _with_hyperparams_of(restored: Any, fresh: Any) -> Any:
  """``restored`` optimizer state carrying ``fresh``'s injected hyperparameters.

  Moments and step counts come from the checkpoint; hyperparameters such as a
  constant learning rate come from the optimizer this run was built with, so a
  changed setting applies instead of being silently replaced by the saved one.
  """
  def injected(x):  # optax's Inject(Stateful)HyperparamsState
    return isinstance(getattr(x, "hyperparams", None), dict) and hasattr(x, "_replace")

  def pick(old, new):
    return old._replace(hyperparams=new.hyperparams) if injected(old) and injected(new) else old

  try:
    return jax.tree.map(pick, restored, fresh, is_leaf=injected)
  except ValueError:  # different structures: keep what was restored
    return restored


class _LiveState:
  """The model's trainable variables and the newer arrays a running ``train`` holds for them."""

  def __init__(self, variables: list[nnx.Variable]):
    self.variables = variables
    self.values: Any = None

  def set(self, values: Any) -> None:
    self.values = values

  def sync(self) -> None:
    if self.values is None:
      return
    for variable, value in zip(self.variables, jax.tree.leaves(self.values)):
      variable.set_value(value)
    self.values = None


@dataclasses.dataclass
class _Pending:
  """A dispatched train step whose metrics have not been read back yet."""

  step: int
  metrics: dict[str, Any]
  start: float
  end: float | None = None  # when the next step was dispatched (this one was done by then)
  compiled: bool = False  # the call traced and compiled the train step: its time is not a throughput


class PeftTrainer:
  """Trains ``model`` with ``optimizer``: the LoRA adapters when it has them, else all parameters.

  Attributes:
    model: the ``nnx.Module`` trained in place.
    config: the :class:`TrainingConfig`.
    optimizer: an ``optax.GradientTransformation``. Wrap it in
      ``optax.inject_hyperparams`` to log the learning rate, e.g.
      ``optax.inject_hyperparams(optax.adamw)(learning_rate=schedule)``.
    loss_fn / eval_loss_fn: ``loss_fn(model, **model_inputs) -> loss`` or ``(loss, aux)``.
    gen_model_input_fn: maps a batch to the keyword arguments of the loss function.
    checkpoint_manager: the :class:`CheckpointManager` (None without a checkpoint folder).
    metrics_logger: the :class:`MetricsLogger` (its ``history`` has every logged scalar).
    is_managed_externally: set by an outer loop (e.g. GRPO) that calls ``train``
      repeatedly: no progress bar, final evaluation or forced final checkpoint per call.
    training_hooks / data_hooks: see :mod:`easytunix.sft.hooks`.
    last_metrics: the newest train metrics read back from the device (floats).
      To keep the device busy, a step's metrics are read back while the next
      step runs, so during ``on_train_step_end`` this is the previous step's.
    step_metrics: the metrics of the step just taken, as device arrays (reading
      them, e.g. ``jax.device_get(trainer.step_metrics)``, waits for the step).
    stop_training: a hook sets this to True to end ``train`` after the current step.
    reports_perplexity: log ``exp(loss)`` as ``perplexity`` (True for NLL losses; DPO and
      GRPO set it to False).

  Extension points (how DPO, distillation and GRPO reuse this loop instead of forking it):

  * ``with_loss_fn(loss_fn, has_aux=True)``: the objective. It is called inside
    the compiled, differentiated step as ``loss_fn(model, **gen_model_input_fn(batch))``
    with a model rebuilt from the traced trainable state, and returns a scalar or
    ``(scalar, aux)``. ``aux`` is a dict of scalars: every entry is logged as
    ``train/<name>`` and ``eval/<name>`` (DPO's reward margins, GRPO's KL). An aux
    entry ``"num_tokens"`` weights micro-batches so accumulation equals one big
    batch exactly (return the normalised loss; the trainer un-normalises it).
    Inside the loss, :func:`easytunix.sft.lora.lora_disabled` gives the base
    model's outputs from the same weights (DPO's reference with LoRA).
  * ``with_gen_model_input_fn(fn)``: traced per micro-batch; turns the batch
    pytree into the loss function's keyword arguments (DPO concatenates chosen
    and rejected rows here).
  * ``_prepare_inputs(batch)``: override in a subclass. Runs on the host for
    every micro-batch (train and eval), outside the gradient and the compiled
    step: the place for work that must not be differentiated or that needs
    other models: reference-model log-probs (DPO, GRPO), teacher logits
    (distillation), rollouts, rewards and advantages (GRPO). It returns a
    pytree of arrays whose leading dimension is the batch (micro-batches are
    stacked along a new leading axis for accumulation).
  * ``_trainable_filter()``: override to choose what is trained (default:
    ``nnx.LoRAParam`` when the model has adapters, else ``nnx.Param``).
  * ``with_training_hooks`` / ``with_data_hooks``: side effects and custom data sources.

  Each micro-batch is one item of ``train_ds``; ``gradient_accumulation_steps``
  items make one optimizer step. The train step is compiled once (call
  ``clear_jit_cache`` after changing the loss or input function).
  """

  def __init__(self, model: nnx.Module, optimizer: optax.GradientTransformation, training_config: TrainingConfig):
    if not isinstance(training_config, TrainingConfig):
      raise TypeError(
          f"training_config must be an easytunix.sft.peft_trainer.TrainingConfig, got {type(training_config).__name__}."
      )
    release_memory_after_compiles()
    self.model = model
    self.optimizer = optimizer
    self.config = training_config
    self.loss_fn: Callable[..., Any] = default_loss_fn
    self.eval_loss_fn: Callable[..., Any] = default_loss_fn
    self._has_aux = True
    self.gen_model_input_fn: Callable[[Any], Any] = default_gen_model_input_fn
    self.training_hooks: hooks_lib.TrainingHooks | None = None
    self.data_hooks: hooks_lib.DataHooks | None = None
    self.is_managed_externally = False
    self.metrics_logger = MetricsLogger(training_config.metrics_logging_options)
    self.checkpoint_manager = (
        CheckpointManager(training_config.checkpoint_root_directory, training_config.checkpointing_options)
        if training_config.checkpoint_root_directory
        else None
    )
    self.last_metrics: dict[str, float] = {}
    self.step_metrics: dict[str, Any] = {}
    self.stop_training = False
    # exp(loss) is logged as perplexity when the loss is a token NLL (trainers with other objectives turn it off).
    self.reports_perplexity = True
    self.num_train_step_traces = 0
    self.num_eval_step_traces = 0
    self._train_steps = 0
    self._data_position = (0, 0)  # (epoch, micro-batches of that epoch consumed)
    self._jitted: tuple[Callable, Callable] | None = None
    self._jitted_skip: bool | None = None
    self._pending: _Pending | None = None
    self._profiling = False
    self._pbar: ProgressBar | None = None
    self._live: _LiveState | None = None
    self._warned_non_finite = False

    # Pinned in place, so that every program taking the model (a sampler's, a reference pass) sees one
    # placement before and after the train steps (whose outputs are pinned).
    commit_model(model)
    _, trainable, _ = nnx.split(model, self._trainable_filter(), ...)
    if not jax.tree.leaves(trainable):
      raise ValueError("The model has no trainable parameters (no nnx.Param / nnx.LoRAParam found).")
    self._opt_state = self._init_opt_state(nnx.as_pure(trainable))
    self._maybe_restore()

  def _init_opt_state(self, trainable: Any) -> Any:
    """The optimizer state, each parameter-shaped leaf sharded like its parameter, the rest replicated."""
    mesh = self._mesh()
    replicated = (
        NamedSharding(mesh, PartitionSpec()) if mesh is not None else jax.sharding.SingleDeviceSharding(self._device())
    )
    param_shardings = jax.tree.map(lambda x: x.sharding, trainable)
    abstract = jax.eval_shape(self.optimizer.init, trainable)
    shardings = optax.tree_map_params(
        self.optimizer, lambda _, sharding: sharding, abstract, param_shardings,
        transform_non_params=lambda _: replicated,
    )
    return _commit(jax.jit(self.optimizer.init, out_shardings=shardings)(trainable))

  # ------------------------------------------------------------------ builder API

  def with_training_hooks(self, training_hooks: hooks_lib.TrainingHooks) -> "PeftTrainer":
    """Sets the training hooks; returns the trainer."""
    self.training_hooks = training_hooks
    return self

  def with_data_hooks(self, data_hooks: hooks_lib.DataHooks) -> "PeftTrainer":
    """Sets the data hooks (they replace ``train_ds``/``eval_ds``); returns the trainer."""
    self.data_hooks = data_hooks
    return self

  def with_loss_fn(
      self, loss_fn: Callable[..., Any], has_aux: bool = False, eval_loss_fn: Callable[..., Any] | None = None
  ) -> "PeftTrainer":
    """Uses ``loss_fn(model, **model_inputs)`` for training and (unless ``eval_loss_fn``
    is given, with the same ``has_aux`` convention) evaluation; returns the trainer."""
    self.loss_fn = loss_fn
    self.eval_loss_fn = eval_loss_fn or loss_fn
    self._has_aux = has_aux
    self.clear_jit_cache()
    return self

  def with_gen_model_input_fn(self, gen_model_input_fn: Callable[[Any], Any]) -> "PeftTrainer":
    """Maps each batch to the loss function's inputs (a dict is passed as keyword arguments)."""
    self.gen_model_input_fn = gen_model_input_fn
    self.clear_jit_cache()
    return self

  def clear_jit_cache(self) -> None:
    """Drops the compiled train/eval steps so the next ``train`` recompiles them."""
    self._jitted = None
    self._jitted_skip = None

  # --------------------------------------------------------------- extension hooks

  def _trainable_filter(self) -> Any:
    """What the optimizer updates (override to train something else)."""
    return trainable_filter(self.model)

  def _prepare_inputs(self, batch: Any) -> Any:
    """Host-side work on each micro-batch before the compiled step (override; default: none)."""
    return batch

  # -------------------------------------------------------------------- the steps

  def _loss_and_aux(self, loss_fn: Callable, model: nnx.Module, batch: Any) -> tuple[jax.Array, dict[str, Any], Any]:
    inputs = self.gen_model_input_fn(batch)
    out = loss_fn(model, **inputs) if isinstance(inputs, dict) else loss_fn(model, inputs)
    loss, aux = out if self._has_aux else (out, {})
    aux = dict(aux or {})
    return jnp.asarray(loss, jnp.float32), aux, _count_input_tokens(inputs)

  def create_train_step_fn(self) -> Callable[..., Any]:
    """``train_step(trainable, opt_state, frozen, batch) -> (trainable, opt_state, metrics)``.

    ``trainable`` and ``frozen`` are the pure states of ``nnx.split(model,
    self._trainable_filter(), ...)``; the step rebuilds the model from them with
    the graph definition the model has now.

    ``batch`` is one micro-batch, or ``gradient_accumulation_steps`` of them
    stacked on a leading axis; losses and gradients are combined weighted by
    the aux ``num_tokens`` (equal weights without it). Gradients are clipped
    to ``max_grad_norm`` before the optimizer update.
    """
    accumulation = self.config.accumulation
    max_grad_norm = self.config.max_grad_norm
    optimizer = self.optimizer
    loss_fn = self.loss_fn
    graphdef = nnx.graphdef(self.model)
    mesh = self._mesh()
    # XLA:CPU schedules a backward pass whose gradients feed a global norm (clipping) so that every remat'd
    # block's activations stay alive: remat then saves nothing. In a branch of its own the backward is
    # scheduled apart and keeps the saving (see _scheduled_apart). GPUs/TPUs are left as they are.
    apart = (jax.default_backend() == "cpu" and max_grad_norm is not None
             and getattr(self.model, "remat", "none") != "none")

    def micro_step(trainable, frozen, micro_batch):
      def objective(params):
        model = nnx.merge(graphdef, params, frozen)
        loss, aux, input_tokens = self._loss_and_aux(loss_fn, model, micro_batch)
        return loss, (aux, input_tokens)

      (loss, (aux, input_tokens)), grads = jax.value_and_grad(objective, has_aux=True)(trainable)
      weight = jnp.asarray(aux.get(NUM_TOKENS, 1.0), jnp.float32)
      return loss, aux, input_tokens, grads, weight

    def train_step(trainable, opt_state, frozen, batch):
      with mesh_context(mesh):  # the model's activation constraints see the mesh
        return mesh_step(trainable, opt_state, frozen, batch)

    def mesh_step(trainable, opt_state, frozen, batch):
      self.num_train_step_traces += 1
      if accumulation == 1:
        step = functools.partial(_scheduled_apart, micro_step) if apart else micro_step
        loss, aux, input_tokens, grads, weight = step(trainable, frozen, batch)
        grads = jax.tree.map(lambda g: g.astype(jnp.float32), grads)
      else:
        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), trainable)

        def body(grad_sum, micro_batch):
          loss, aux, input_tokens, grads, weight = micro_step(trainable, frozen, micro_batch)
          grad_sum = jax.tree.map(lambda s, g: s + g.astype(jnp.float32) * weight, grad_sum, grads)
          return grad_sum, (loss, aux, input_tokens, weight)

        grad_sum, (losses, auxes, input_tokens, weights) = jax.lax.scan(body, zeros, batch)
        total = weights.sum()
        denominator = jnp.where(total > 0, total, 1.0)
        grads = jax.tree.map(lambda g: g / denominator, grad_sum)
        loss = (losses * weights).sum() / denominator
        aux = {k: v.sum() if k == NUM_TOKENS else _weighted_mean(v, weights, denominator) for k, v in auxes.items()}
        input_tokens = None if input_tokens is None else input_tokens.sum()
      grad_norm = optax.tree.norm(grads)
      if max_grad_norm is not None:
        factor = jnp.where(grad_norm < max_grad_norm, 1.0, max_grad_norm / jnp.maximum(grad_norm, 1e-30))
        grads = jax.tree.map(lambda g: g * factor, grads)
      grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, trainable)
      updates, opt_state = optimizer.update(grads, opt_state, trainable)
      trainable = optax.apply_updates(trainable, updates)
      metrics = dict(aux)
      metrics.update(loss=loss, grad_norm=grad_norm)
      if input_tokens is not None:
        metrics["input_tokens"] = input_tokens
      learning_rate = _find_hyperparam(opt_state, "learning_rate")
      if learning_rate is not None:
        metrics["learning_rate"] = jnp.asarray(learning_rate, jnp.float32)
      return trainable, opt_state, metrics

    return train_step

  def create_eval_step_fn(self) -> Callable[..., Any]:
    """``eval_step(trainable, frozen, batch) -> metrics`` (loss, aux, num_tokens)."""
    loss_fn = self.eval_loss_fn
    graphdef = nnx.graphdef(self.model)
    mesh = self._mesh()

    def eval_step(trainable, frozen, batch):
      self.num_eval_step_traces += 1
      model = nnx.merge(graphdef, trainable, frozen)
      with mesh_context(mesh):
        loss, aux, _ = self._loss_and_aux(loss_fn, model, batch)
      metrics = dict(aux)
      metrics["loss"] = loss
      metrics.setdefault(NUM_TOKENS, jnp.asarray(1.0, jnp.float32))
      return metrics

    return eval_step

  def jit_train_and_eval_step(self, skip_jit: bool = False) -> tuple[Callable, Callable]:
    """The (cached) train and eval step functions; compiled unless ``skip_jit``.

    The compiled train step donates the trainable state and optimizer state,
    and pins their output shardings to the input ones so that one compilation
    serves the whole run.
    """
    if self._jitted is not None and self._jitted_skip == skip_jit:
      return self._jitted
    train_step, eval_step = self.create_train_step_fn(), self.create_eval_step_fn()
    if not skip_jit:
      _, trainable, _ = nnx.split(self.model, self._trainable_filter(), ...)
      trainable_shardings = jax.tree.map(lambda x: x.sharding, nnx.as_pure(trainable))
      opt_shardings = jax.tree.map(lambda x: x.sharding, self._opt_state)
      train_step = jax.jit(
          train_step,
          donate_argnums=(0, 1),
          out_shardings=(trainable_shardings, opt_shardings, None),
      )
      eval_step = jax.jit(eval_step)
    self._jitted, self._jitted_skip = (train_step, eval_step), skip_jit
    return self._jitted

  # ------------------------------------------------------------------- utilities

  def train_steps(self) -> int:
    """Optimizer steps taken so far (restored ones included)."""
    return self._train_steps

  @property
  def data_position(self) -> tuple[int, int]:
    """``(epoch, micro-batches of that epoch consumed)``: where the data stream stands."""
    return self._data_position

  def continue_from(self, previous: "PeftTrainer") -> bool:
    """Takes over ``previous``'s optimizer state and step count, as a second Keras ``fit`` continues the first.

    Only a trainer that has not stepped yet continues, and only when both
    optimizer states have the same structure (the same optimizer over the same
    trainable parameters); otherwise nothing changes.

    Returns:
      Whether this trainer now continues from ``previous``.
    """
    if self._train_steps or jax.tree.structure(previous.opt_state) != jax.tree.structure(self._opt_state):
      return False
    self._opt_state = previous.opt_state
    self._train_steps = previous.train_steps()
    return True

  @property
  def opt_state(self) -> Any:
    """The optimizer state (a pytree of arrays)."""
    return self._opt_state

  def _mesh(self) -> jax.sharding.Mesh | None:
    return self.config.mesh if self.config.mesh is not None else module_mesh(self.model)

  def _device(self) -> jax.Device:
    """The device of the model's first parameter (used when there is no mesh)."""
    for leaf in jax.tree.leaves(nnx.state(self.model, nnx.Param)):
      devices = getattr(leaf, "devices", None)
      if devices is not None:
        return next(iter(devices()))
    return jax.devices()[0]

  def _placement(self) -> tuple[jax.sharding.Mesh | None, jax.Device]:
    """Where batches go: the mesh (or None) and the default device (looked up once per train/evaluate)."""
    return self._mesh(), self._device()

  def _place_batch(self, batch: Any, stacked: bool, placement: tuple[Any, Any] | None = None) -> Any:
    """Puts a batch on the devices, the batch dimension split over the data axes of the mesh.

    With several processes (``jax.distributed``) every process holds the same global batch and
    each puts only its own devices' rows of it on them: the global array is the one a single
    process would build from that batch.
    """
    mesh, device = placement or self._placement()
    if mesh is None:
      single = jax.sharding.SingleDeviceSharding(device)
      return jax.tree.map(lambda x: jax.device_put(x, single), batch)
    axes = tuple(a for a in self.config.data_sharding_axis if a in mesh.axis_names)
    size = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
    batch_dim = 1 if stacked else 0
    spec_axes = axes if len(axes) != 1 else axes[0]
    put = place_on_sharding if jax.process_count() > 1 else jax.device_put

    def place(x):
      x = x if isinstance(x, jax.Array) else np.asarray(x)
      if not axes or x.ndim <= batch_dim:
        return put(x, NamedSharding(mesh, PartitionSpec()))
      if x.shape[batch_dim] % size:
        raise ValueError(
            f"Batch size {x.shape[batch_dim]} is not divisible by the {size} devices of mesh axes {axes} "
            "that the batch is split over. Use a batch size that is a multiple of it, or set "
            "TrainingConfig.data_sharding_axis to other axes."
        )
      spec = (None,) * batch_dim + (spec_axes,)
      return put(x, NamedSharding(mesh, PartitionSpec(*spec)))

    return jax.tree.map(place, batch)

  # ---------------------------------------------------------------- checkpoints

  def _maybe_restore(self) -> None:
    if self.checkpoint_manager is None:
      return
    restored = self.checkpoint_manager.maybe_restore(self.model, self._opt_state)
    if restored is None:
      return
    if restored.opt_state is not None:
      self._opt_state = _commit(_with_hyperparams_of(restored.opt_state, self._opt_state))
    self._train_steps = restored.step
    self._data_position = (int(restored.metadata.get("epoch", 0)), int(restored.metadata.get("batch_in_epoch", 0)))
    logger.info("Resuming from step %d (epoch %d, batch %d).", self._train_steps, *self._data_position)

  def _save_checkpoint(self, force: bool = False) -> None:
    if self.checkpoint_manager is None or not (force or self.checkpoint_manager.should_save(self._train_steps)):
      return
    self.sync_model()
    epoch, batch = self._data_position
    self.checkpoint_manager.save(
        self._train_steps, self.model, self._opt_state, dict(epoch=epoch, batch_in_epoch=batch), force=force
    )

  # --------------------------------------------------------------------- metrics

  def _read_pending(self) -> None:
    """Reads back the metrics of the last dispatched step and logs them."""
    if self._pending is None:
      return
    pending, self._pending = self._pending, None
    values = {k: float(v) for k, v in jax.device_get(pending.metrics).items() if np.ndim(v) == 0}
    if not self._warned_non_finite and not math.isfinite(values.get("loss", 0.0)):
      self._warned_non_finite = True
      warnings.warn(
          f"The training loss is {values['loss']} at step {pending.step} (the first non-finite loss of this run). "
          "Lower the learning rate, clip gradients (max_grad_norm), check the data, or stop with "
          "callbacks.TerminateOnNaN().", RuntimeWarning, stacklevel=2)
    # A step's time runs from its dispatch to the next dispatch, which the loop
    # only reaches once the step before was read back; in steady state that is
    # the device time per step, whether dispatch is asynchronous (GPU) or not (CPU).
    elapsed = (pending.end if pending.end is not None else time.perf_counter()) - pending.start
    logged = {k: v for k, v in values.items() if k not in (NUM_TOKENS, "input_tokens")}
    if self.reports_perplexity:
      logged["perplexity"] = perplexity(values["loss"])
    if elapsed > 0 and values.get("input_tokens") and not pending.compiled:
      logged["tokens_per_second"] = values["input_tokens"] / elapsed
    logged["step_time"] = elapsed
    self.metrics_logger.log_dict(logged, pending.step, mode="train")
    self.last_metrics = logged
    if self._pbar is not None:
      self._pbar.update(pending.step, logged)

  def _maybe_profile(self) -> None:
    options = self.config.profiler_options
    if options is None:
      return
    start = options.skip_first_n_steps
    if not self._profiling and self._train_steps == start:
      jax.profiler.start_trace(options.log_dir)
      self._profiling = True
    elif self._profiling and self._train_steps >= start + options.profiler_steps:
      self._stop_profiler()

  def _stop_profiler(self) -> None:
    if self._profiling:
      if self._pending is not None:
        jax.block_until_ready(self._pending.metrics)
      jax.profiler.stop_trace()
      self._profiling = False

  # ------------------------------------------------------------------------ data

  def _micro_batches(self, train_ds: Iterable[Any] | None) -> Iterator[tuple[Any, tuple[int, int]]]:
    """Yields ``(micro_batch, data position after it)``, skipping what a restored run consumed."""
    if self.data_hooks is not None:
      if train_ds is not None:
        logger.warning("Data hooks are set: train_ds is ignored and batches come from load_next_train_batch.")
      while True:
        batch = self.data_hooks.load_next_train_batch(self)
        if batch is None:
          return
        yield batch, self._data_position
    if train_ds is None:
      raise ValueError("train() needs train_ds (an iterable of batches) or data hooks (with_data_hooks).")
    epoch, skip = self._data_position
    num_epochs = self.config.num_epochs or (None if self.config.max_steps else 1)
    one_shot = iter(train_ds) is train_ds
    first = True
    while num_epochs is None or epoch < num_epochs:
      if not first and one_shot:
        return
      first = False
      if hasattr(train_ds, "set_epoch"):
        train_ds.set_epoch(epoch)
      index = 0
      batches = iter(train_ds)
      try:
        for batch in batches:
          index += 1
          if index <= skip:
            continue
          yield batch, (epoch, index)
      finally:
        # A generator source (e.g. GRPO's rollout stream, which may run a thread)
        # is closed as soon as training stops, not whenever it is collected.
        close = getattr(batches, "close", None)
        if close is not None and batches is not train_ds:
          close()
      if index == 0:
        return
      epoch, skip = epoch + 1, 0

  def _eval_batches(self, eval_ds: Iterable[Any] | None) -> Iterator[Any]:
    limit = self.config.max_eval_steps
    count = 0
    if self.data_hooks is not None:
      while limit is None or count < limit:
        batch = self.data_hooks.load_next_eval_batch(self)
        if batch is None:
          break
        count += 1
        yield batch
      if count or eval_ds is None:
        return
    if eval_ds is None:
      return
    for batch in eval_ds:
      if limit is not None and count >= limit:
        return
      count += 1
      yield batch

  # ------------------------------------------------------------------------ loop

  def evaluate(self, eval_ds: Iterable[Any] | None, skip_jit: bool = False) -> dict[str, float]:
    """Runs the eval loss over ``eval_ds``; logs and returns token-weighted ``eval/*`` metrics."""
    _, eval_step = self.jit_train_and_eval_step(skip_jit)
    self.sync_model()
    placement = self._placement()
    _, trainable, frozen = nnx.split(self.model, self._trainable_filter(), ...)
    trainable, frozen = _commit(nnx.as_pure(trainable)), _commit(nnx.as_pure(frozen))
    sums: dict[str, jax.Array] = {}
    total = None
    for batch in self._eval_batches(eval_ds):
      if self.training_hooks is not None:
        self.training_hooks.on_eval_step_start(self)
      batch = self._place_batch(self._prepare_inputs(batch), stacked=False, placement=placement)
      metrics = eval_step(trainable, frozen, batch)
      if self.training_hooks is not None:
        self.training_hooks.on_eval_step_end(self, metrics["loss"])
      weight = metrics[NUM_TOKENS]
      total = weight if total is None else total + weight
      for k, v in metrics.items():
        if k != NUM_TOKENS and jnp.ndim(v) == 0:
          sums[k] = sums.get(k, 0.0) + v * weight
    if total is None:
      return {}
    total = float(total)
    result = {k: float(v) / max(total, 1e-30) for k, v in jax.device_get(sums).items()}
    if self.reports_perplexity:
      result["perplexity"] = perplexity(result["loss"])
    self.metrics_logger.log_dict(result, self._train_steps, mode="eval")
    self.last_metrics = {**self.last_metrics, **{f"eval_{k}": v for k, v in result.items()}}
    return result

  def train(self, train_ds: Iterable[Any] | None, eval_ds: Iterable[Any] | None = None, skip_jit: bool = False) -> None:
    """Runs optimizer steps until ``max_steps`` or the end of the data.

    Each item of ``train_ds`` is one micro-batch (a :class:`TrainingInput` or
    any pytree the loss function understands); ``gradient_accumulation_steps``
    of them make one step. On resume the micro-batches a restored run already
    consumed are skipped, so ``train_ds`` must yield the same sequence again
    (a deterministic iterable; one with ``set_epoch(epoch)`` gets it called
    before each epoch).

    With several processes (``easytunix.distributed``) every process calls
    ``train`` with the same ``train_ds``: each item is the global batch, and
    each process puts only its own devices' rows of it on them.
    """
    config = self.config
    train_step, _ = self.jit_train_and_eval_step(skip_jit)
    hooks = self.training_hooks
    accumulation = config.accumulation
    self.stop_training = False
    if config.max_steps is not None and self._train_steps >= config.max_steps:
      logger.info("max_steps=%d already reached; nothing to train.", config.max_steps)
      return
    if not self.is_managed_externally:
      self._pbar = ProgressBar(
          total=config.max_steps or self._estimate_total_steps(train_ds),
          initial=self._train_steps,
          description=config.pbar_description,
          enabled=config.show_progress_bar and is_main_process(),  # one bar per job, not one per host
      )
    _, trainable_state, frozen = nnx.split(self.model, self._trainable_filter(), ...)
    # The step donates the trainable arrays: train on private copies (a clone
    # of the model, e.g. a reference model, may share the buffers).
    trainable, frozen = _commit(nnx.as_pure(trainable_state), copy=not skip_jit), _commit(nnx.as_pure(frozen))
    # The model's variables are refreshed from the new arrays only before user
    # code or evaluation/checkpointing looks at the model: a per-step update of
    # every variable costs more than a tiny model's whole step.
    self._live = _LiveState(jax.tree.leaves(trainable_state, is_leaf=lambda x: isinstance(x, nnx.Variable)))
    # The model holds the copies from the start, so the original buffers are freed now unless
    # another model shares them: otherwise a full fine-tune's first step would hold every
    # trainable weight twice (135M float32 parameters: +0.54 GB of peak memory).
    self._live.set(trainable)
    self._live.sync()
    user_code_reads_model = (
        hooks is not None
        or self.data_hooks is not None
        or type(self)._prepare_inputs is not PeftTrainer._prepare_inputs
    )
    placement = self._placement()
    if hooks is not None:
      hooks.on_train_start(self)
    evaluated_at = None
    source = self._micro_batches(train_ds)
    try:
      while config.max_steps is None or self._train_steps < config.max_steps:
        if user_code_reads_model:
          self.sync_model()
        group, position = [], self._data_position
        for batch, position in source:
          group.append(self._prepare_inputs(batch))
          if len(group) == accumulation:
            break
        if len(group) < accumulation:
          if group:
            logger.warning(
                "Dropped %d trailing micro-batch(es): fewer than gradient_accumulation_steps=%d were left.",
                len(group), accumulation,
            )
          break
        if hooks is not None:
          hooks.on_train_step_start(self)
        self._maybe_profile()
        batch = self._place_batch(
            group[0] if accumulation == 1 else _stack(group), stacked=accumulation > 1, placement=placement
        )
        start = time.perf_counter()
        if self._pending is not None:
          self._pending.end = start
        traces = self.num_train_step_traces
        trainable, self._opt_state, metrics = train_step(trainable, self._opt_state, frozen, batch)
        self._live.set(trainable)
        self._train_steps += 1
        self._data_position = position
        self._read_pending()
        self._pending = _Pending(self._train_steps, metrics, start, compiled=self.num_train_step_traces > traces)
        self.step_metrics = metrics
        self._save_checkpoint()
        if config.eval_every_n_steps and self._train_steps % config.eval_every_n_steps == 0:
          if eval_ds is not None or self.data_hooks is not None:
            self._read_pending()
            self.evaluate(eval_ds, skip_jit)
            evaluated_at = self._train_steps
        if hooks is not None:
          self.sync_model()
          hooks.on_train_step_end(self, metrics["loss"])
        if self.stop_training:
          logger.info("Training stopped by a hook after step %d.", self._train_steps)
          break
      self._read_pending()
      self.sync_model()
      if not self.is_managed_externally:
        if (eval_ds is not None or self.data_hooks is not None) and evaluated_at != self._train_steps:
          self.evaluate(eval_ds, skip_jit)
        self._save_checkpoint(force=True)
      if hooks is not None:
        hooks.on_train_end(self)
    finally:
      source.close()
      self.sync_model()
      self._live = None
      if self.checkpoint_manager is not None:
        # The last save is committed before train returns (or raises): a script may exit right after.
        self.checkpoint_manager.wait_until_finished()
      self._stop_profiler()
      self.metrics_logger.flush()
      if self._pbar is not None:
        self._pbar.close()
        self._pbar = None

  def sync_model(self) -> None:
    """Writes the newest trainable arrays of a running ``train`` into the model's variables.

    The loop does this before hooks, evaluation and checkpoints; code that reads
    the model from elsewhere during training (e.g. a rollout thread) calls it first.
    """
    if self._live is not None:
      self._live.sync()

  def _estimate_total_steps(self, train_ds: Any) -> int | None:
    try:
      per_epoch = len(train_ds)
    except TypeError:
      return None
    return per_epoch * (self.config.num_epochs or 1) // self.config.accumulation

  def close(self) -> None:
    """Waits for pending checkpoint writes and closes the metrics logger."""
    self._stop_profiler()
    if self.checkpoint_manager is not None:
      self.checkpoint_manager.close()
    self.metrics_logger.close()


__all__ = [
    "NUM_TOKENS",
    "PeftTrainer",
    "ProfilerOptions",
    "TrainingConfig",
    "TrainingInput",
    "default_gen_model_input_fn",
    "default_loss_fn",
    "is_lora_enabled",
    "time_measure",
    "token_log_probs",
]
