"""The base classes of distillation strategies.

A strategy turns a batch into a loss. The trainer calls
:meth:`BaseStrategy.get_teacher_outputs` outside the differentiated step and
:meth:`BaseStrategy.get_train_loss` inside it. Strategies may be built without
their three functions; :meth:`BaseStrategy.bind_defaults` then fills in the
ones that fit easytunix causal LMs fed :class:`~easytunix.sft.peft_trainer.TrainingInput`
batches. :class:`IntermediateStrategy` is the base of the strategies that
compare captured layer outputs or attention maps.

The defaults live in ``defaults``, the loss maths in ``losses`` and the learned
projection in ``projection``; their names are re-exported here, where they
were first defined.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from easytunix.distillation.capture import can_report_attention, capture_intermediates, find_modules, layer_names
from easytunix.distillation.strategies.defaults import (
    ModelForwardCallable,
    T,
    TokenLabels,
    default_dummy_input,
    default_forward_fn,
    default_functions,
    default_labels_fn,
    token_mask_of,
    vocab_size_of,
)
from easytunix.distillation.strategies.losses import (
    adaptive_avg_pool,
    call_loss_fn,
    check_alpha,
    cosine_distance,
    count_tokens,
    label_mask,
    masked_mean,
    pool_layers,
    pooling_matrix,
    stack_layers,
    task_loss,
    token_weights,
)
from easytunix.distillation.strategies.projection import LayerwiseProjection, replicate_on_devices_of
from easytunix.models.calling import token_mask_of_attention

NUM_TOKENS = "num_tokens"  # the aux key the trainer weights micro-batches by


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

  def pre_process_models(self, student_model: nnx.Module, teacher_model: nnx.Module) -> tuple[nnx.Module, nnx.Module]:
    """Prepares the models before training (e.g. adds a projection to the student); returns ``(student, teacher)``.

    The models are changed in place and returned, as Tunix's strategies return them. Default: unchanged.
    """
    return student_model, teacher_model

  def post_process_models(self, student_model: nnx.Module, teacher_model: nnx.Module) -> tuple[nnx.Module, nnx.Module]:
    """Reverts :meth:`pre_process_models`, leaving a plain student; returns ``(student, teacher)``. Default: unchanged."""
    return student_model, teacher_model

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


# ----------------------------------------------------------------------------- strategies on intermediates


class IntermediateStrategy(BaseStrategy):
  """Base of the feature and attention strategies: capture maps from a layer class in both models.

  ``loss = alpha * map_loss + (1 - alpha) * task_loss``. The student's output
  is ``{"logits", <maps_key>}`` plus ``"token_mask"`` [B, T] when the batch says
  which tokens are real and the maps have a token axis; the teacher's output is
  its stacked maps. :meth:`compute_loss` takes Tunix's outputs too: no
  ``token_mask`` (a plain mean) and maps of any shape (e.g. [L, B, D] pooled
  features of a classifier). Subclasses set ``maps_key`` and implement
  :meth:`map_loss` (and, for learned projections, :meth:`make_projection`).
  """

  maps_key = "features"
  seq_axis = 2  # the token axis of the stacked maps ([B, L, T, D]) that token_mask weights
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
        bad = [type(m).__name__ for _, m in found if not can_report_attention(m)]
        if bad:
          raise ValueError(
              f"The {role}'s {bad[0]} modules cannot report attention weights: attention distillation needs "
              "layers that sow 'attention_weights' when asked (easytunix Attention) or nnx.MultiHeadAttention."
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
    out = {"logits": logits, self.maps_key: maps}
    token_mask = self._token_mask(inputs, maps)
    if token_mask is not None:
      out["token_mask"] = token_mask
    return out

  def _token_mask(self, inputs: Any, maps: jax.Array) -> jax.Array | None:
    """The batch's real-token mask [B, T] when it fits the maps' token axis (None: weigh every entry)."""
    if not isinstance(inputs, dict):
      return None
    attention = inputs.get("attention_mask")
    if attention is not None and jnp.ndim(attention) == 3 and jnp.shape(attention)[1] == jnp.shape(attention)[2]:
      mask = token_mask_of_attention(attention)
    elif inputs.get("input_mask") is not None:
      mask = inputs["input_mask"]
    elif attention is not None and jnp.ndim(attention) == 2:
      mask = attention
    else:
      return None
    mask = jnp.asarray(mask).astype(jnp.bool_)
    fits = mask.ndim == 2 and maps.ndim > self.seq_axis and (maps.shape[0], maps.shape[self.seq_axis]) == mask.shape
    return mask if fits else None

  # -------------------------------------------------------------- losses

  pool_layers = staticmethod(pool_layers)

  @abc.abstractmethod
  def map_loss(self, student_maps: jax.Array, teacher_maps: jax.Array, token_mask: jax.Array | None) -> jax.Array:
    """The distance between the student's and the teacher's maps, over real tokens (all entries without a mask)."""

  def loss_terms(self, student_output: dict[str, jax.Array], teacher_output: jax.Array, labels: Any) -> dict[str, jax.Array]:
    if not isinstance(student_output, dict) or "logits" not in student_output or self.maps_key not in student_output:
      raise TypeError(
          f"{type(self).__name__}'s student output must be a dict with 'logits' and {self.maps_key!r} "
          "(and optionally 'token_mask'), as get_student_outputs returns."
      )
    distill = self.map_loss(student_output[self.maps_key], teacher_output, student_output.get("token_mask"))
    task = task_loss(student_output["logits"], labels)
    loss = self.alpha * distill + (1.0 - self.alpha) * task
    return {"loss": loss, "task_loss": task, "distill_loss": distill}

  def compute_eval_loss(self, student_output: dict[str, jax.Array], labels: Any) -> jax.Array:
    return task_loss(student_output["logits"], labels)

  def token_weights(self, token_mask: jax.Array | None, maps: jax.Array) -> jax.Array | None:
    """``token_mask`` [B, T] shaped to broadcast over ``maps`` along :attr:`seq_axis` (None: no mask)."""
    if token_mask is None:
      return None
    if maps.ndim <= self.seq_axis or (maps.shape[0], maps.shape[self.seq_axis]) != tuple(jnp.shape(token_mask)):
      raise ValueError(
          f"token_mask {tuple(jnp.shape(token_mask))} does not fit maps {maps.shape} (batch at axis 0, tokens at "
          f"axis {self.seq_axis}); leave 'token_mask' out of the student output to weigh every entry."
      )
    return token_weights(token_mask, maps.ndim, self.seq_axis)

  def custom_loss(self, student_maps: jax.Array, teacher_maps: jax.Array, token_mask: jax.Array | None) -> jax.Array:
    """A user's loss function on the maps, with padded positions zeroed in both."""
    weights = self.token_weights(token_mask, student_maps)
    if weights is not None:
      student_maps, teacher_maps = student_maps * weights, teacher_maps * weights
    return call_loss_fn(self.loss_fn, student_maps, teacher_maps, token_mask)

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
    replicate_on_devices_of(projection, student_model)
    setattr(student_model, name, projection)
    self.projection = projection

  def _detach_projection(self, student_model: nnx.Module) -> None:
    name = self.projection_name
    if name is not None and name in vars(student_model):
      delattr(student_model, name)


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
