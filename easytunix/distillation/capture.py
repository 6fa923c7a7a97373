"""Reading intermediate values (layer outputs, attention weights) out of one forward pass.

Distillation strategies compare what happens inside the student and the teacher.
:func:`capture_intermediates` runs a forward function once and returns, besides
its result, the output of every module of a chosen class and the attention
weights of every module of a chosen attention class, in call order.

What a module records is declared by the module: a layer lists the intermediates
it can sow in ``sown_intermediates`` and sows one when the active
:func:`~easytunix.layers.attention.sow_intermediates` request asks for it
(easytunix's ``DecoderLayer`` sows its output, ``Attention`` its softmax weights).
A capture builds that request (which module instances, which values), runs the
forward pass inside ``nnx.capture`` and reads the sown values back. The model is
never modified and the computation is the same, so results are identical with
and without capturing.

Modules that declare nothing (a leaf such as ``Linear``, a user's own block,
flax's ``nnx.MultiHeadAttention``) are recorded by a wrapper around their class's
``__call__`` for the duration of the capture, as ``nnx.capture(method_outputs=...)``
does, narrowed to the requested classes. The wrapper records only what the
context-local request asks for, so other instances and threads run unchanged;
``nnx.MultiHeadAttention`` (or any module whose ``__call__`` takes ``sow_weights``) is
called with ``sow_weights=True``.
"""

from __future__ import annotations

import contextlib
import inspect
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import jax
from flax import nnx

from easytunix.layers.attention import ATTENTION_WEIGHTS, LAYER_OUTPUT, should_sow, sow_intermediates

FEATURE_NAME = LAYER_OUTPUT
ATTENTION_NAME = ATTENTION_WEIGHTS


class _Request:
  """Which modules (ids) should sow which value, and the order in which they did."""

  def __init__(self, wanted: dict[str, set[int]]):
    self.wanted = wanted
    self.calls: dict[str, list[int]] = {name: [] for name in wanted}

  def __call__(self, module: nnx.Module, name: str) -> bool:
    if id(module) not in self.wanted.get(name, ()):
      return False
    self.calls[name].append(id(module))
    return True


def first_array(output: Any) -> jax.Array:
  """The feature a layer produced: its output, or the first element of a tuple/list output
  (a decoder layer returns ``(hidden, cache)``)."""
  while isinstance(output, (tuple, list)):
    if not output:
      raise ValueError("A captured layer returned an empty tuple; it has no output to distil.")
    output = output[0]
  return output


def declares(module: nnx.Module, name: str) -> bool:
  """Whether ``module`` sows ``name`` itself when a request asks (lists it in ``sown_intermediates``)."""
  return name in getattr(type(module), "sown_intermediates", ())


def can_report_attention(module: nnx.Module) -> bool:
  """Whether attention weights can be captured from ``module``: it declares them, or takes ``sow_weights``
  (``nnx.MultiHeadAttention`` or any module following flax's convention)."""
  return declares(module, ATTENTION_WEIGHTS) or takes_sow_weights(module)


# ----------------------------------------------------------------------------- modules that declare nothing

_WRAP_LOCK = threading.Lock()
_WRAPPED: dict[type, list[Any]] = {}  # class -> [its own __call__ (None: inherited), captures using the wrapper]


def _own_call(cls: type) -> Callable[..., Any] | None:
  """The ``__call__`` that ``cls`` runs, looking through capture wrappers."""
  for klass in cls.__mro__:
    fn = klass.__dict__.get("__call__")
    entry = _WRAPPED.get(klass)
    if entry is not None:
      fn = entry[0]
    if fn is not None:
      return fn
  return None


def takes_sow_weights(module: nnx.Module) -> bool:
  """Whether ``module.__call__`` takes flax's ``sow_weights`` flag (``nnx.MultiHeadAttention`` and lookalikes)."""
  if isinstance(module, nnx.MultiHeadAttention):
    return True
  try:
    return "sow_weights" in inspect.signature(_own_call(type(module))).parameters
  except (TypeError, ValueError):
    return False


def _recording_call(cls: type, own: Callable[..., Any] | None) -> Callable[..., Any]:
  """``cls.__call__`` that also sows what the active request asks of the instance."""

  def __call__(self, *args, **kwargs):
    call = own.__get__(self, cls) if own is not None else super(cls, self).__call__
    if type(self) is not cls:  # reached through super() from a subclass: the subclass's wrapper records
      return call(*args, **kwargs)
    if should_sow(self, ATTENTION_WEIGHTS) and takes_sow_weights(self):
      kwargs["sow_weights"] = True
    out = call(*args, **kwargs)
    if should_sow(self, LAYER_OUTPUT):
      self.sow(nnx.Intermediate, LAYER_OUTPUT, first_array(out))
    return out

  return __call__


@contextlib.contextmanager
def _recording_wrappers(classes: Iterable[type]) -> Iterator[None]:
  """Wraps ``__call__`` of each class for the block (shared, reference-counted across nested captures)."""
  classes = list(classes)
  with _WRAP_LOCK:
    for cls in classes:
      entry = _WRAPPED.get(cls)
      if entry is None:
        own = cls.__dict__.get("__call__")
        entry = _WRAPPED[cls] = [own, 0]
        setattr(cls, "__call__", _recording_call(cls, own))
      entry[1] += 1
  try:
    yield
  finally:
    with _WRAP_LOCK:
      for cls in classes:
        entry = _WRAPPED[cls]
        entry[1] -= 1
        if entry[1] == 0:
          del _WRAPPED[cls]
          if entry[0] is None:
            delattr(cls, "__call__")
          else:
            setattr(cls, "__call__", entry[0])


# ----------------------------------------------------------------------------- capture


def find_modules(model: nnx.Module, layer_type: type | tuple[type, ...]) -> list[tuple[tuple[Any, ...], nnx.Module]]:
  """``(path, module)`` of every module in ``model`` that is an instance of ``layer_type``, in graph order."""
  return [(tuple(path), m) for path, m in nnx.iter_modules(model) if isinstance(m, layer_type)]


def _in_call_order(entries: list[tuple[tuple[Any, ...], nnx.Module]], state: nnx.State, name: str, calls: list[int]) -> list[jax.Array]:
  """The values each module sowed under ``name``, ordered by when the module sowed (its k-th value: its k-th call)."""
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
      probabilities) of every module of this class, one entry per call, in the
      order of the calls. The class declares ``"attention_weights"`` in its
      ``sown_intermediates`` and sows them when ``should_sow`` says so (as
      :class:`easytunix.layers.attention.Attention` does), or is an ``nnx.MultiHeadAttention``.

  Returns:
    ``(result, features, attention_weights)``: lists of arrays (empty when not asked for).

  Raises:
    ValueError: a requested class has no instance in ``model``, or none of them ran.
    TypeError: an attention module cannot report its weights.
  """
  feature_entries = find_modules(model, feature_layer) if feature_layer is not None else []
  attention_entries = find_modules(model, attention_layer) if attention_layer is not None else []
  if feature_layer is not None and not feature_entries:
    raise ValueError(f"{type(model).__name__} has no {layer_names(feature_layer)} module to capture features from.")
  if attention_layer is not None:
    if not attention_entries:
      raise ValueError(f"{type(model).__name__} has no {layer_names(attention_layer)} module to capture attention from.")
    for path, m in attention_entries:
      if not can_report_attention(m):
        raise TypeError(
            f"{type(m).__name__} at {'.'.join(map(str, path))} cannot report its attention weights: attention "
            "distillation needs attention layers that declare sown_intermediates = ('attention_weights',) and sow "
            "their softmax weights when should_sow(self, 'attention_weights') (like easytunix.layers.attention."
            "Attention), or an nnx.MultiHeadAttention (any module whose __call__ takes sow_weights)."
        )
  if not feature_entries and not attention_entries:
    return fn(model), [], []
  request = _Request({
      LAYER_OUTPUT: {id(m) for _, m in feature_entries},
      ATTENTION_WEIGHTS: {id(m) for _, m in attention_entries},
  })
  undeclared = {type(m) for _, m in feature_entries if not declares(m, LAYER_OUTPUT)}
  undeclared |= {type(m) for _, m in attention_entries if not declares(m, ATTENTION_WEIGHTS)}
  with _recording_wrappers(sorted(undeclared, key=lambda c: (c.__module__, c.__qualname__))), sow_intermediates(request):
    try:
      result, state = nnx.capture(fn, nnx.Intermediate)(model)
    except BaseException:
      _clear_captures(model)
      raise
  features = _in_call_order(feature_entries, state, LAYER_OUTPUT, request.calls[LAYER_OUTPUT])
  attention = _in_call_order(attention_entries, state, ATTENTION_WEIGHTS, request.calls[ATTENTION_WEIGHTS])
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


__all__ = [
    "ATTENTION_NAME",
    "FEATURE_NAME",
    "can_report_attention",
    "capture_intermediates",
    "declares",
    "find_modules",
    "first_array",
    "layer_names",
    "takes_sow_weights",
]
