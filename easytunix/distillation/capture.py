"""Reading intermediate values (layer outputs, attention weights) out of one forward pass.

Distillation strategies compare what happens inside the student and the teacher.
:func:`capture_intermediates` runs a forward function once and returns, besides
its result, the output of every module of a chosen class and the attention
weights of every module of a chosen attention class, in layer order.

Nothing about the model changes for longer than the call: matching modules are
switched, for the duration of the call only, to a subclass that logs the call
and sows their output (attention modules also get ``capture_weights=True``);
both are undone in a ``finally``. The forward computation itself is untouched, so results are
identical with and without capturing.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from typing import Any

import jax
from flax import nnx

FEATURE_NAME = "distillation_features"
ATTENTION_NAME = "attention_weights"

_RECORDING_SUBCLASSES: dict[type, type] = {}


class _CallLog:
  """Which instrumented modules ran, in call order (ids), and whose output to sow."""

  def __init__(self, sow_ids: set[int]):
    self.sow_ids = sow_ids
    self.calls: list[int] = []


_ACTIVE_LOG: contextvars.ContextVar["_CallLog | None"] = contextvars.ContextVar("distillation_call_log", default=None)


def first_array(output: Any) -> jax.Array:
  """The feature a layer produced: its output, or the first element of a tuple/list output
  (a decoder layer returns ``(hidden, cache)``)."""
  while isinstance(output, (tuple, list)):
    if not output:
      raise ValueError("A captured layer returned an empty tuple; it has no output to distil.")
    output = output[0]
  return output


def _recording_subclass(cls: type) -> type:
  """A subclass of ``cls`` whose ``__call__`` logs the call and, when asked, sows its output (cached per class)."""
  sub = _RECORDING_SUBCLASSES.get(cls)
  if sub is None:

    def __call__(self, *args, **kwargs):
      log = _ACTIVE_LOG.get()
      if log is not None:
        log.calls.append(id(self))
      out = cls.__call__(self, *args, **kwargs)
      if log is not None and id(self) in log.sow_ids:
        self.sow(nnx.Intermediate, FEATURE_NAME, first_array(out))
      return out

    sub = type(f"Capturing{cls.__name__}", (cls,), {"__call__": __call__, "__module__": __name__})
    _RECORDING_SUBCLASSES[cls] = sub
  return sub


def find_modules(model: nnx.Module, layer_type: type | tuple[type, ...]) -> list[tuple[tuple[Any, ...], nnx.Module]]:
  """``(path, module)`` of every module in ``model`` that is an instance of ``layer_type``, in graph order."""
  return [(tuple(path), m) for path, m in nnx.iter_modules(model) if isinstance(m, layer_type)]


@contextlib.contextmanager
def _instrumented(feature_modules: list[nnx.Module], attention_modules: list[nnx.Module]) -> Iterator[_CallLog]:
  modules = list({id(m): m for m in feature_modules + attention_modules}.values())
  classes = [(m, type(m)) for m in modules]
  flags = [(m, getattr(m, "capture_weights")) for m in attention_modules]
  log = _CallLog({id(m) for m in feature_modules})
  token = None
  try:
    for m, cls in classes:
      object.__setattr__(m, "__class__", _recording_subclass(cls))
    for m, _ in flags:
      object.__setattr__(m, "capture_weights", True)
    token = _ACTIVE_LOG.set(log)
    yield log
  finally:
    if token is not None:
      _ACTIVE_LOG.reset(token)
    for m, cls in classes:
      object.__setattr__(m, "__class__", cls)
    for m, flag in flags:
      object.__setattr__(m, "capture_weights", flag)


def _in_call_order(entries: list[tuple[tuple[Any, ...], nnx.Module]], state: nnx.State, name: str, calls: list[int]) -> list[jax.Array]:
  """The values each module sowed under ``name``, ordered by when the module ran (its k-th value: its k-th call)."""
  values = {id(m): _lookup(state, path, name) for path, m in entries}
  used = dict.fromkeys(values, 0)
  ordered = []
  for module_id in calls:
    if module_id in values and used[module_id] < len(values[module_id]):
      ordered.append(values[module_id][used[module_id]])
      used[module_id] += 1
  return ordered


def _clear_captures(model: nnx.Module) -> None:
  """Removes what an interrupted ``nnx.capture`` left on the modules."""
  for _, m in nnx.iter_modules(model):
    if "__captures__" in vars(m):
      delattr(m, "__captures__")


def _lookup(state: nnx.State, path: tuple[Any, ...], name: str) -> list[jax.Array]:
  node: Any = state
  for key in (*path, name):
    try:
      node = node[key]
    except (KeyError, TypeError):
      return []
  value = node.get_value() if isinstance(node, nnx.Variable) else node
  return list(value) if isinstance(value, tuple) else [value]


def capture_intermediates(
    model: nnx.Module,
    fn: Callable[[nnx.Module], Any],
    feature_layer: type | tuple[type, ...] | None = None,
    attention_layer: type | tuple[type, ...] | None = None,
) -> tuple[Any, list[jax.Array], list[jax.Array]]:
  """Runs ``fn(model)`` and collects intermediate values.

  Args:
    model: the module ``fn`` runs.
    fn: the forward pass, ``fn(model) -> result``.
    feature_layer: collect the output of every module of this class (the first
      array of a tuple output), one entry per call, in the order of the calls.
    attention_layer: collect the attention weights ([B, heads, T, S] softmax
      probabilities) of every module of this class; it must have a
      ``capture_weights`` attribute and, when it is True, sow them under
      ``"attention_weights"`` (as :class:`easytunix.layers.attention.Attention` does);
      one entry per call, in the order of the calls.

  Returns:
    ``(result, features, attention_weights)``: lists of arrays (empty when not asked for).

  Raises:
    ValueError: a requested class has no instance in ``model``.
    TypeError: an attention module cannot sow its weights.
  """
  feature_entries = find_modules(model, feature_layer) if feature_layer is not None else []
  attention_entries = find_modules(model, attention_layer) if attention_layer is not None else []
  if feature_layer is not None and not feature_entries:
    raise ValueError(f"{type(model).__name__} has no {layer_names(feature_layer)} module to capture features from.")
  if attention_layer is not None:
    if not attention_entries:
      raise ValueError(f"{type(model).__name__} has no {layer_names(attention_layer)} module to capture attention from.")
    for path, m in attention_entries:
      if not hasattr(m, "capture_weights"):
        raise TypeError(
            f"{type(m).__name__} at {'.'.join(map(str, path))} has no `capture_weights` attribute: attention "
            "distillation needs attention layers that sow their softmax weights as 'attention_weights' when "
            "capture_weights is True (like easytunix.layers.attention.Attention)."
        )
  if not feature_entries and not attention_entries:
    return fn(model), [], []
  with _instrumented([m for _, m in feature_entries], [m for _, m in attention_entries]) as log:
    try:
      result, state = nnx.capture(fn, nnx.Intermediate)(model)
    except BaseException:
      _clear_captures(model)
      raise
  features = _in_call_order(feature_entries, state, FEATURE_NAME, log.calls)
  attention = _in_call_order(attention_entries, state, ATTENTION_NAME, log.calls)
  if feature_entries and not features:
    raise ValueError(f"No {layer_names(feature_layer)} module of {type(model).__name__} was called by the forward pass.")
  if attention_entries and not attention:
    raise ValueError(
        f"No {layer_names(attention_layer)} module of {type(model).__name__} sowed attention weights during the forward pass."
    )
  return result, features, attention


def layer_names(layer_type: type | tuple[type, ...]) -> str:
  """``"DecoderLayer"`` or ``"A / B"`` for messages."""
  types = layer_type if isinstance(layer_type, tuple) else (layer_type,)
  return " / ".join(t.__name__ for t in types)


__all__ = ["ATTENTION_NAME", "FEATURE_NAME", "capture_intermediates", "find_modules", "first_array", "layer_names"]
