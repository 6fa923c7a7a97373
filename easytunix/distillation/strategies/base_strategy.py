"""What every distillation strategy shares: forward functions, labels, masks and loss helpers.

A strategy turns a batch into a loss. The trainer calls
:meth:`BaseStrategy.get_teacher_outputs` outside the differentiated step and
:meth:`BaseStrategy.get_train_loss` inside it. Strategies may be built without
their three functions; :meth:`BaseStrategy.bind_defaults` then fills in the
ones that fit easytunix causal LMs fed :class:`~easytunix.sft.peft_trainer.TrainingInput`
batches.

Array layouts are batch-first so the trainer can split and stack them along
the batch: logits [B, T, V], features [B, L, T, D], attention maps
[B, L, heads, T, S] (L: captured layers).
"""

from __future__ import annotations

import abc
import inspect
from collections.abc import Callable
from typing import Any, TypeVar

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from easytunix.distillation.capture import capture_intermediates, find_modules, layer_names

T = TypeVar("T")

ModelForwardCallable = Callable[..., T]
"""``forward(model, **inputs) -> output``: one forward pass of a model (an alias of ``Callable[..., Any]``)."""

NUM_TOKENS = "num_tokens"  # the aux key the trainer weights micro-batches by


@flax.struct.dataclass
class TokenLabels:
  """Next-token targets aligned with the logits: position t predicts ``targets[:, t]``.

  Attributes:
    targets: [B, T] int token ids (the input shifted left by one; the last slot is 0).
    mask: [B, T] bool, True where a real (completion) token is predicted.
  """

  targets: Any
  mask: Any


def default_forward_fn(
    model: nnx.Module,
    input_tokens: jax.Array,
    input_mask: jax.Array | None = None,
    positions: jax.Array | None = None,
    **_: Any,
) -> jax.Array:
  """The logits [B, T, V] of an easytunix causal LM (padding masked out of attention)."""
  mask = None if input_mask is None else jnp.asarray(input_mask).astype(jnp.bool_)
  logits, _ = model(input_tokens, positions=positions, attention_mask=mask)
  return logits


def default_labels_fn(
    input_tokens: jax.Array,
    input_mask: jax.Array | None = None,
    completion_mask: jax.Array | None = None,
    **_: Any,
) -> TokenLabels:
  """Next-token labels of a :class:`TrainingInput` batch: every real token, or the completion only."""
  tokens = jnp.asarray(input_tokens)
  mask = jnp.ones(tokens.shape, jnp.bool_) if input_mask is None else jnp.asarray(input_mask).astype(jnp.bool_)
  if completion_mask is not None:
    mask = mask & jnp.asarray(completion_mask).astype(jnp.bool_)
  pad = jnp.zeros(tokens.shape[:-1] + (1,), tokens.dtype)
  targets = jnp.concatenate([tokens[..., 1:], pad], axis=-1)
  target_mask = jnp.concatenate([mask[..., 1:], jnp.zeros(pad.shape, jnp.bool_)], axis=-1)
  return TokenLabels(targets=targets, mask=target_mask)


def default_functions() -> tuple[ModelForwardCallable[jax.Array], ModelForwardCallable[jax.Array], Callable[..., TokenLabels]]:
  """``(student_forward_fn, teacher_forward_fn, labels_fn)`` for easytunix causal LMs and TrainingInput batches."""
  return default_forward_fn, default_forward_fn, default_labels_fn


# ----------------------------------------------------------------------------- loss helpers


def masked_mean(values: jax.Array, mask: jax.Array | None) -> jax.Array:
  """Mean of ``values`` over the entries where ``mask`` (broadcast to its shape) is True; 0 when none is."""
  values = values.astype(jnp.float32)
  if mask is None:
    return values.mean()
  weights = jnp.broadcast_to(jnp.asarray(mask).astype(jnp.float32), values.shape)
  return jnp.where(weights > 0, values, 0.0).sum() / jnp.maximum(weights.sum(), 1.0)


def task_loss(logits: jax.Array, labels: Any) -> jax.Array:
  """Cross-entropy of ``logits`` [..., V] against ``labels``.

  ``labels`` is a :class:`TokenLabels` (masked mean over its mask), integer
  ids [...] or a distribution / one-hot array [..., V] (plain mean).
  """
  logits = logits.astype(jnp.float32)
  if isinstance(labels, TokenLabels):
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, labels.targets)
    return masked_mean(nll, labels.mask)
  labels = jnp.asarray(labels)
  if labels.shape == logits.shape:
    return optax.softmax_cross_entropy(logits, labels.astype(jnp.float32)).mean()
  if labels.shape == logits.shape[:-1] and jnp.issubdtype(labels.dtype, jnp.integer):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  raise ValueError(
      f"Labels of shape {labels.shape} do not fit logits of shape {logits.shape}: a labels_fn returns a "
      "TokenLabels, integer ids shaped like the logits without the vocabulary axis, or one-hot labels shaped like them."
  )


def label_mask(labels: Any) -> jax.Array | None:
  """The positions a loss counts (None: all)."""
  return labels.mask if isinstance(labels, TokenLabels) else None


def count_tokens(labels: Any, logits_shape: tuple[int, ...] | None = None) -> jax.Array:
  """How many positions the task loss averages over (weights micro-batches in accumulation)."""
  if isinstance(labels, TokenLabels):
    return jnp.asarray(labels.mask).astype(jnp.float32).sum()
  shape = jnp.shape(labels)
  if logits_shape is not None and tuple(shape) == tuple(logits_shape):
    shape = shape[:-1]
  return jnp.asarray(float(np.prod(shape)), jnp.float32)


def cosine_distance(a: jax.Array, b: jax.Array, axis: int | tuple[int, ...] = -1, eps: float = 1e-8) -> jax.Array:
  """``1 - cos(a, b)`` along ``axis`` (the axis is reduced); zero vectors count as orthogonal."""
  a, b = a.astype(jnp.float32), b.astype(jnp.float32)
  # max() before sqrt keeps the gradient finite at zero vectors (padding).
  norm_a = jnp.sqrt(jnp.maximum((a * a).sum(axis), eps * eps))
  norm_b = jnp.sqrt(jnp.maximum((b * b).sum(axis), eps * eps))
  return 1.0 - (a * b).sum(axis) / (norm_a * norm_b)


def pooling_matrix(size_in: int, size_out: int) -> np.ndarray:
  """[size_out, size_in] averaging weights of adaptive average pooling.

  Output i averages inputs ``floor(i * n / m)`` to ``ceil((i + 1) * n / m) - 1``
  (n inputs, m outputs): equal groups when m divides n, overlapping bins otherwise.
  """
  if size_out > size_in:
    raise ValueError(f"Pooling shrinks an axis; cannot pool {size_in} entries to {size_out}.")
  weights = np.zeros((size_out, size_in), np.float32)
  for i in range(size_out):
    start = (i * size_in) // size_out
    stop = -(-((i + 1) * size_in) // size_out)
    weights[i, start:stop] = 1.0 / (stop - start)
  return weights


def adaptive_avg_pool(x: jax.Array, size: int, axis: int) -> jax.Array:
  """Average-pools ``axis`` of ``x`` to ``size`` entries (unchanged when it already has that many)."""
  axis = axis % x.ndim
  if x.shape[axis] == size:
    return x
  weights = jnp.asarray(pooling_matrix(x.shape[axis], size))
  moved = jnp.moveaxis(x.astype(jnp.float32), axis, -1)
  return jnp.moveaxis(moved @ weights.T, -1, axis)


def stack_layers(values: list[jax.Array], what: str) -> jax.Array:
  """Stacks per-layer arrays [B, ...] into [B, L, ...] (they must share a shape)."""
  shapes = {tuple(v.shape) for v in values}
  if len(shapes) != 1:
    raise ValueError(
        f"The captured {what} have different shapes {sorted(shapes)}; choose a layer class whose instances "
        "all produce the same shape (e.g. the decoder layer)."
    )
  return jnp.stack(values, axis=1)


def call_loss_fn(fn: Callable[..., jax.Array], student: jax.Array, teacher: jax.Array, mask: jax.Array) -> jax.Array:
  """Calls a user's loss ``fn(student, teacher)`` (or ``fn(student, teacher, mask=...)`` when it takes a mask)."""
  try:
    takes_mask = "mask" in inspect.signature(fn).parameters
  except (TypeError, ValueError):
    takes_mask = False
  out = fn(student, teacher, mask=mask) if takes_mask else fn(student, teacher)
  return jnp.asarray(out, jnp.float32).mean()


def check_alpha(alpha: float) -> float:
  if not 0.0 <= float(alpha) <= 1.0:
    raise ValueError(f"alpha must be in [0, 1], got {alpha!r}.")
  return float(alpha)


def vocab_size_of(model: nnx.Module) -> int | None:
  """The vocabulary size of an easytunix model (None when it does not say)."""
  config = getattr(model, "config", None)
  size = getattr(config, "vocab_size", None)
  if size is None:
    size = getattr(model, "num_embed", None)
  return int(size) if isinstance(size, (int, np.integer)) else None


# ----------------------------------------------------------------------------- the strategy


class BaseStrategy(abc.ABC):
  """Abstract base of distillation strategies.

  Subclasses implement :meth:`compute_loss` (or :meth:`loss_terms`, which gives
  the trainer per-term metrics too) and :meth:`compute_eval_loss`; those that
  need more than logits override :meth:`get_student_outputs` /
  :meth:`get_teacher_outputs` and the model pre/post-processing.

  Args:
    student_forward_fn: ``forward(student, **inputs)`` (None: filled by :meth:`bind_defaults`).
    teacher_forward_fn: ``forward(teacher, **inputs)`` (None: likewise).
    labels_fn: ``labels_fn(**inputs)`` -> labels for the task loss (None: likewise).
  """

  def __init__(
      self,
      student_forward_fn: ModelForwardCallable[Any] | None = None,
      teacher_forward_fn: ModelForwardCallable[Any] | None = None,
      labels_fn: Callable[..., Any] | None = None,
  ):
    self.student_forward_fn = student_forward_fn
    self.teacher_forward_fn = teacher_forward_fn
    self.labels_fn = labels_fn

  # ---------------------------------------------------------------- configuration

  def bind_defaults(
      self,
      student_forward_fn: ModelForwardCallable[Any] | None = None,
      teacher_forward_fn: ModelForwardCallable[Any] | None = None,
      labels_fn: Callable[..., Any] | None = None,
  ) -> "BaseStrategy":
    """Fills the functions still missing: with the given ones, else with :func:`default_functions`."""
    defaults = default_functions()
    self.student_forward_fn = self.student_forward_fn or student_forward_fn or defaults[0]
    self.teacher_forward_fn = self.teacher_forward_fn or teacher_forward_fn or defaults[1]
    self.labels_fn = self.labels_fn or labels_fn or defaults[2]
    return self

  @property
  def is_bound(self) -> bool:
    return None not in (self.student_forward_fn, self.teacher_forward_fn, self.labels_fn)

  def _require_bound(self) -> None:
    if not self.is_bound:
      missing = [
          n for n in ("student_forward_fn", "teacher_forward_fn", "labels_fn") if getattr(self, n) is None
      ]
      raise ValueError(
          f"{type(self).__name__} has no {', '.join(missing)}: pass them to the constructor or call "
          "strategy.bind_defaults() (easytunix causal LMs with TrainingInput batches)."
      )

  def check_compatible(self, student_model: nnx.Module, teacher_model: nnx.Module) -> None:
    """Raises a ValueError explaining why these models cannot be distilled with this strategy."""
    if student_model is teacher_model:
      raise ValueError("The student and the teacher are the same object; pass two models.")

  # ---------------------------------------------------------------- model processing

  def pre_process_models(self, student_model: nnx.Module, teacher_model: nnx.Module) -> None:
    """Prepares the models before training (e.g. adds a projection to the student). Default: nothing."""

  def post_process_models(self, student_model: nnx.Module, teacher_model: nnx.Module) -> None:
    """Reverts :meth:`pre_process_models`, leaving a plain student. Default: nothing."""

  def extra_trainable_paths(self) -> tuple[str, ...]:
    """Attribute names of modules this strategy adds to the student that train with it."""
    return ()

  # ---------------------------------------------------------------- outputs

  def get_teacher_outputs(self, teacher_model: nnx.Module, inputs: dict[str, Any]) -> Any:
    """The teacher's output on ``inputs`` (logits by default)."""
    self._require_bound()
    return self.teacher_forward_fn(teacher_model, **inputs)

  def get_student_outputs(self, student_model: nnx.Module, inputs: dict[str, Any]) -> Any:
    """The student's output on ``inputs`` (logits by default)."""
    self._require_bound()
    return self.student_forward_fn(student_model, **inputs)

  # ---------------------------------------------------------------- losses

  def loss_terms(self, student_output: Any, teacher_output: Any, labels: Any) -> dict[str, jax.Array]:
    """``{"loss", "task_loss", "distill_loss"}`` (override, or override :meth:`compute_loss` instead)."""
    raise NotImplementedError(f"{type(self).__name__} implements neither loss_terms nor compute_loss.")

  def compute_loss(self, student_output: Any, teacher_output: Any, labels: Any) -> jax.Array:
    """The training loss of one batch from both models' outputs and the labels."""
    return self.loss_terms(student_output, teacher_output, labels)["loss"]

  @abc.abstractmethod
  def compute_eval_loss(self, student_output: Any, labels: Any) -> jax.Array:
    """The evaluation loss (the task loss) from the student's output and the labels."""

  def _overrides_compute_loss(self) -> bool:
    return type(self).compute_loss is not BaseStrategy.compute_loss

  def train_loss_and_metrics(
      self, student_model: nnx.Module, teacher_output: Any, inputs: dict[str, Any]
  ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """``(loss, aux)``: aux has the loss terms and ``num_tokens`` (what the trainer logs and weights by)."""
    self._require_bound()
    student_output = self.get_student_outputs(student_model, inputs)
    labels = self.labels_fn(**inputs)
    if self._overrides_compute_loss():
      loss, aux = self.compute_loss(student_output, teacher_output, labels), {}
    else:
      terms = self.loss_terms(student_output, teacher_output, labels)
      loss = terms.pop("loss")
      aux = dict(terms)
    aux[NUM_TOKENS] = count_tokens(labels, _logits_shape(student_output))
    return jnp.asarray(loss, jnp.float32), aux

  def eval_loss_and_metrics(self, student_model: nnx.Module, inputs: dict[str, Any]) -> tuple[jax.Array, dict[str, jax.Array]]:
    """``(task loss, {"num_tokens"})`` on a batch."""
    self._require_bound()
    student_output = self.get_student_outputs(student_model, inputs)
    labels = self.labels_fn(**inputs)
    loss = self.compute_eval_loss(student_output, labels)
    return jnp.asarray(loss, jnp.float32), {NUM_TOKENS: count_tokens(labels, _logits_shape(student_output))}

  def get_train_loss(self, student_model: nnx.Module, teacher_output: Any, inputs: dict[str, Any]) -> jax.Array:
    """The training loss: the student's forward pass against the precomputed teacher output."""
    return self.train_loss_and_metrics(student_model, teacher_output, inputs)[0]

  def get_eval_loss(self, student_model: nnx.Module, inputs: dict[str, Any]) -> jax.Array:
    """The task loss of the student on ``inputs`` (no teacher needed)."""
    return self.eval_loss_and_metrics(student_model, inputs)[0]


def _logits_shape(student_output: Any) -> tuple[int, ...] | None:
  logits = student_output.get("logits") if isinstance(student_output, dict) else student_output
  shape = getattr(logits, "shape", None)
  return tuple(shape) if shape is not None else None


def token_mask_of(inputs: dict[str, Any], batch_shape: tuple[int, ...]) -> jax.Array:
  """The real-token mask [B, T] of a batch (all True without ``input_mask``)."""
  mask = inputs.get("input_mask") if isinstance(inputs, dict) else None
  if mask is None:
    return jnp.ones(batch_shape, jnp.bool_)
  return jnp.asarray(mask).astype(jnp.bool_)


# ----------------------------------------------------------------------------- strategies on intermediates


class LayerwiseProjection(nnx.Module):
  """One learned linear map per layer along one axis of [B, L, ...] maps (student -> teacher sizes).

  Args:
    num_layers: L.
    in_features / out_features: the size of ``axis`` before and after.
    axis: the projected axis of the [B, L, ...] input (e.g. -1 for features [B, L, T, D],
      2 for the heads of attention maps [B, L, H, T, S]).
    init: ``init(key, shape) -> kernel`` [L, in, out].
  """

  def __init__(
      self,
      num_layers: int,
      in_features: int,
      out_features: int,
      axis: int,
      *,
      rngs: nnx.Rngs,
      init: Callable[[jax.Array, tuple[int, ...]], jax.Array] | None = None,
  ):
    init = init or (lambda key, shape: jax.random.normal(key, shape, jnp.float32) * in_features**-0.5)
    self.axis = axis
    self.kernel = nnx.Param(init(rngs.params(), (num_layers, in_features, out_features)))

  def __call__(self, x: jax.Array) -> jax.Array:
    moved = jnp.moveaxis(x.astype(jnp.float32), self.axis, -1)  # [B, L, ..., in]
    kernel = self.kernel[...]
    extra = moved.ndim - 3
    kernel = kernel.reshape(kernel.shape[:1] + (1,) * extra + kernel.shape[1:])  # [L, 1.., in, out]
    projected = (moved[..., None, :] @ kernel)[..., 0, :]
    return jnp.moveaxis(projected, -1, self.axis)


def _place_like(module: nnx.Module, reference: nnx.Module) -> None:
  """Puts ``module``'s arrays where ``reference``'s parameters are (replicated on their mesh)."""
  leaves = jax.tree.leaves(nnx.state(reference, nnx.Param))
  if not leaves or not hasattr(leaves[0], "sharding"):
    return
  sharding = leaves[0].sharding
  if isinstance(sharding, jax.sharding.NamedSharding):
    target = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
  else:
    target = jax.sharding.SingleDeviceSharding(next(iter(leaves[0].devices())))
  state = nnx.state(module)
  nnx.update(module, jax.tree.map(lambda x: jax.device_put(x, target), state))


class IntermediateStrategy(BaseStrategy):
  """Base of the feature and attention strategies: capture maps from a layer class in both models.

  ``loss = alpha * map_loss + (1 - alpha) * task_loss``. The student's output
  is ``{"logits", <maps_key>, "token_mask"}``; the teacher's is its stacked maps.
  Subclasses set ``maps_key`` and implement :meth:`map_loss` (and, for learned
  projections, :meth:`make_projection`).
  """

  maps_key = "features"
  projection_name: str | None = None  # the student's attribute holding the learned projection

  def __init__(
      self,
      student_forward_fn: ModelForwardCallable[Any] | None,
      teacher_forward_fn: ModelForwardCallable[Any] | None,
      labels_fn: Callable[..., Any] | None,
      layer: type | tuple[type, ...],
      alpha: float,
      loss_fn: Callable[..., jax.Array] | None,
  ):
    super().__init__(student_forward_fn, teacher_forward_fn, labels_fn)
    if not (isinstance(layer, type) or (isinstance(layer, tuple) and all(isinstance(t, type) for t in layer))):
      raise TypeError(f"The layer to capture must be a module class (e.g. DecoderLayer), got {layer!r}.")
    self.layer = layer
    self.alpha = check_alpha(alpha)
    self.loss_fn = loss_fn

  # -------------------------------------------------------------- capture

  def _capture_kwargs(self) -> dict[str, Any]:
    if self.maps_key == "attention":
      return {"attention_layer": self.layer}
    return {"feature_layer": self.layer}

  def capture(self, model: nnx.Module, forward_fn: ModelForwardCallable[Any], inputs: dict[str, Any]) -> tuple[Any, jax.Array]:
    """``(forward output, maps [B, L, ...])`` of one forward pass."""
    result, features, attention = capture_intermediates(
        model, lambda m: forward_fn(m, **inputs), **self._capture_kwargs()
    )
    return result, stack_layers(features or attention, self.maps_key)

  def check_compatible(self, student_model: nnx.Module, teacher_model: nnx.Module) -> None:
    super().check_compatible(student_model, teacher_model)
    for role, model in (("student", student_model), ("teacher", teacher_model)):
      found = find_modules(model, self.layer)
      if not found:
        raise ValueError(
            f"The {role} ({type(model).__name__}) has no {layer_names(self.layer)} module, so {type(self).__name__} has nothing "
            "to capture. Pass the layer class the model is built from."
        )
      if self.maps_key == "attention":
        bad = [type(m).__name__ for _, m in found if not hasattr(m, "capture_weights")]
        if bad:
          raise ValueError(
              f"The {role}'s {bad[0]} modules cannot report attention weights: attention distillation needs "
              "layers with a `capture_weights` switch that sow 'attention_weights' (easytunix Attention)."
          )

  def get_teacher_outputs(self, teacher_model: nnx.Module, inputs: dict[str, Any]) -> jax.Array:
    self._require_bound()
    return self.capture(teacher_model, self.teacher_forward_fn, inputs)[1]

  def get_student_outputs(self, student_model: nnx.Module, inputs: dict[str, Any]) -> dict[str, jax.Array]:
    self._require_bound()
    logits, maps = self.capture(student_model, self.student_forward_fn, inputs)
    if self.projection_name is not None:
      projection = getattr(student_model, self.projection_name, None)
      if projection is None:
        raise ValueError(
            f"The student has no {self.projection_name!r}: call strategy.pre_process_models(student, teacher) "
            "first (the DistillationTrainer does)."
        )
      maps = projection(self.pool_layers(maps, projection.kernel.shape[0]))
    token_mask = token_mask_of(inputs, (maps.shape[0], _seq_len(maps, self.maps_key)))
    return {"logits": logits, self.maps_key: maps, "token_mask": token_mask}

  # -------------------------------------------------------------- losses

  @staticmethod
  def pool_layers(maps: jax.Array, num_layers: int) -> jax.Array:
    """Average-pools the layer axis (1) of [B, L, ...] maps to ``num_layers``."""
    return adaptive_avg_pool(maps, num_layers, axis=1)

  @abc.abstractmethod
  def map_loss(self, student_maps: jax.Array, teacher_maps: jax.Array, token_mask: jax.Array) -> jax.Array:
    """The distance between the student's and the teacher's maps, over real tokens."""

  def loss_terms(self, student_output: dict[str, jax.Array], teacher_output: jax.Array, labels: Any) -> dict[str, jax.Array]:
    distill = self.map_loss(student_output[self.maps_key], teacher_output, student_output["token_mask"])
    task = task_loss(student_output["logits"], labels)
    loss = self.alpha * distill + (1.0 - self.alpha) * task
    return {"loss": loss, "task_loss": task, "distill_loss": distill}

  def compute_eval_loss(self, student_output: dict[str, jax.Array], labels: Any) -> jax.Array:
    return task_loss(student_output["logits"], labels)

  def custom_loss(self, student_maps: jax.Array, teacher_maps: jax.Array, token_mask: jax.Array, mask_shape: Callable[[jax.Array], jax.Array]) -> jax.Array:
    """A user's loss function on the maps, with padded positions zeroed in both."""
    weights = mask_shape(token_mask.astype(jnp.float32))
    return call_loss_fn(self.loss_fn, student_maps * weights, teacher_maps * weights, token_mask)

  # -------------------------------------------------------------- learned projection

  def make_projection(self, student_maps: jax.ShapeDtypeStruct, teacher_maps: jax.ShapeDtypeStruct) -> nnx.Module:
    raise NotImplementedError

  def _abstract_maps(self, model: nnx.Module, forward_fn: ModelForwardCallable[Any], inputs: dict[str, Any]) -> jax.ShapeDtypeStruct:
    graphdef, state = nnx.split(model)

    def maps(state):
      return self.capture(nnx.merge(graphdef, state), forward_fn, inputs)[1]

    return jax.eval_shape(maps, state)

  def _attach_projection(self, student_model: nnx.Module, teacher_model: nnx.Module, dummy_input: dict[str, Any] | None) -> None:
    name = self.projection_name
    existing = getattr(student_model, name, None)
    if existing is not None:
      if existing is getattr(self, "projection", None):
        return  # already attached by this strategy
      raise ValueError(f"The student already has an attribute {name!r}; call post_process_models on it first.")
    self._require_bound()
    inputs = dict(dummy_input) if dummy_input is not None else default_dummy_input()
    student_maps = self._abstract_maps(student_model, self.student_forward_fn, inputs)
    teacher_maps = self._abstract_maps(teacher_model, self.teacher_forward_fn, inputs)
    projection = self.make_projection(student_maps, teacher_maps)
    _place_like(projection, student_model)
    setattr(student_model, name, projection)
    self.projection = projection

  def _detach_projection(self, student_model: nnx.Module) -> None:
    name = self.projection_name
    if name is not None and name in vars(student_model):
      delattr(student_model, name)


def _seq_len(maps: jax.Array, maps_key: str) -> int:
  # features [B, L, T, D]: T is axis 2; attention [B, L, H, T, S]: T is axis 3.
  return maps.shape[2] if maps_key == "features" else maps.shape[3]


def default_dummy_input(batch_size: int = 1, length: int = 8) -> dict[str, jax.Array]:
  """A small all-real batch (token id 1) that traces a model to learn its map shapes."""
  return {
      "input_tokens": jnp.ones((batch_size, length), jnp.int32),
      "input_mask": jnp.ones((batch_size, length), jnp.bool_),
  }


__all__ = [
    "BaseStrategy",
    "IntermediateStrategy",
    "LayerwiseProjection",
    "ModelForwardCallable",
    "TokenLabels",
    "adaptive_avg_pool",
    "cosine_distance",
    "default_dummy_input",
    "default_forward_fn",
    "default_functions",
    "default_labels_fn",
    "masked_mean",
    "pooling_matrix",
    "task_loss",
]
