"""Low-rank adapters (LoRA) on the shared :class:`easytunix.layers.Linear`.

``apply_lora`` gives chosen projections a trainable ``lora_a`` [in, r] and
``lora_b`` [r, out] (``nnx.LoRAParam``, so ``nnx.LoRAParam`` selects exactly the
adapter weights); ``merge_lora`` folds them into the kernels; ``lora_disabled``
runs the base model without a second copy of it (what DPO needs for its
reference model). ``quantize_base`` stores the base kernels in 4 or 8 bits
(QLoRA): the adapters train in full precision on the frozen, quantized base.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from easytunix.layers.linear import Linear
from easytunix.layers.quantization import DEFAULT_BLOCK_SIZE, QuantizedKernel, check_block_size, check_method
from easytunix.layers.sharding import path_str, variable_sharding

DEFAULT_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def linear_modules(model: nnx.Module) -> dict[str, Linear]:
  """Every :class:`Linear` inside ``model``, by dotted path ('layers.0.attn.q_proj')."""
  return {path_str(path): m for path, m in nnx.iter_graph(model) if isinstance(m, Linear)}


def _matches(target: str, path: str) -> bool:
  """A target matches a module by its attribute name or as a regex over the whole dotted path."""
  if path.rsplit(".", 1)[-1] == target:
    return True
  try:
    return re.fullmatch(target, path) is not None
  except re.error:
    return False


def _mesh_of(value: Any):
  sharding = getattr(value, "sharding", None)
  return getattr(sharding, "mesh", None) if isinstance(sharding, jax.sharding.NamedSharding) else None


def _kernel_layout(linear: Linear) -> tuple[tuple[Any, Any], Any]:
  """``((row axis, column axis), mesh)`` of a Linear's kernel, quantized or not (mesh None when not on one)."""
  kernel = linear.kernel
  if isinstance(kernel, QuantizedKernel):
    return kernel.partition, _mesh_of(kernel.codes.get_value())
  axes = (tuple(kernel.get_metadata().get("partition") or (None, None)) + (None, None))[:2]
  return axes, _mesh_of(kernel.get_value())


def _select(model: nnx.Module, targets: str | Sequence[str], what: str) -> dict[str, Linear]:
  """The Linear modules of ``model`` that ``targets`` select, by path; raises when there are none."""
  if isinstance(targets, str):
    targets = (targets,)
  targets = tuple(targets)
  if not targets:
    raise ValueError(f"{what} needs at least one target (a module name or a path regex).")
  modules = linear_modules(model)
  chosen = {p: m for p, m in modules.items() if any(_matches(t, p) for t in targets)}
  if not chosen:
    label = "LoRA targets" if what == "apply_lora" else f"{what} targets"
    raise ValueError(
        f"No Linear module matches {label} {list(targets)}. Available Linear paths: "
        f"{sorted(modules) or 'none'}. Targets match a module's attribute name or, as a regex, its full path."
    )
  return chosen


def apply_lora(
    model: nnx.Module,
    rank: int,
    alpha: float | None = None,
    targets: str | Sequence[str] = DEFAULT_TARGETS,
    *,
    rngs: nnx.Rngs | None = None,
    seed: int = 0,
    param_dtype: Any = jnp.float32,
) -> nnx.Module:
  """Adds LoRA adapters to the projections of ``model`` that ``targets`` select (in place).

  Args:
    model: any module built from :class:`easytunix.layers.Linear`.
    rank: adapter rank r.
    alpha: the update is scaled by ``alpha / rank`` (default ``alpha = rank``: scale 1).
    targets: attribute names ("q_proj") or regular expressions matched against the
      whole dotted module path (r"layers\\.[0-3]\\.attn\\..*_proj").
    rngs / seed: randomness for ``lora_a`` (``seed`` is used when ``rngs`` is None).
    param_dtype: storage dtype of the adapters (float32 keeps small updates exact).

  ``lora_a`` starts fan-in-scaled uniform and ``lora_b`` at zero, so the model's
  output is unchanged until training moves ``lora_b``. On a model whose kernels
  live on a mesh the adapters are placed with the kernel's row/column sharding.

  Returns:
    ``model`` (modified in place), for chaining.

  Raises:
    ValueError: on a bad rank, or when no Linear module matches (the message lists them).
  """
  if not isinstance(rank, int) or rank <= 0:
    raise ValueError(f"LoRA rank must be a positive int, got {rank!r}.")
  chosen = _select(model, targets, "apply_lora")
  rngs = rngs if rngs is not None else nnx.Rngs(seed)
  scale = float(alpha if alpha is not None else rank) / rank
  init_a = nnx.initializers.variance_scaling(1.0, "fan_in", "uniform")
  for path, linear in chosen.items():
    (row_axis, col_axis), mesh = _kernel_layout(linear)
    a = init_a(rngs.params(), (linear.in_features, rank), param_dtype)
    b = jnp.zeros((rank, linear.out_features), param_dtype)
    if mesh is not None:
      a = jax.device_put(a, variable_sharding(path + ".lora_a", a.shape, (row_axis, None), mesh))
      b = jax.device_put(b, variable_sharding(path + ".lora_b", b.shape, (None, col_axis), mesh))
    # Linear declares the adapters as None (a static attribute); nnx.data marks them as state.
    linear.lora_a = nnx.data(nnx.LoRAParam(a, partition=(row_axis, None)))
    linear.lora_b = nnx.data(nnx.LoRAParam(b, partition=(None, col_axis)))
    linear.lora_scale = scale
  return model


def lora_modules(model: nnx.Module) -> dict[str, Linear]:
  """The Linear modules of ``model`` that carry adapters, by dotted path."""
  return {p: m for p, m in linear_modules(model).items() if m.lora_a is not None}


def is_lora_enabled(model: nnx.Module) -> bool:
  """True when ``model`` holds any ``nnx.LoRAParam``."""
  return any(isinstance(v, nnx.LoRAParam) for _, v in nnx.iter_graph(model))


def merge_lora(model: nnx.Module) -> nnx.Module:
  """Folds ``scale * lora_a @ lora_b`` into each adapted kernel and removes the adapters (in place).

  A quantized kernel becomes a full-precision ``nnx.Param`` again (dequantized base plus
  the adapters' update, in the kernel's original dtype and sharding): re-quantizing would
  round most of the update away.
  """
  for path, linear in lora_modules(model).items():
    if linear.quantized:
      axes, mesh = _kernel_layout(linear)
      merged = linear.merged_kernel()
      if mesh is not None and not isinstance(merged, jax.core.Tracer):
        merged = jax.device_put(merged, variable_sharding(path + ".kernel", merged.shape, axes, mesh))
      linear.kernel = nnx.Param(merged, partition=axes)
    else:
      kernel = linear.kernel[...]
      merged = linear.merged_kernel()
      # Tracer first: a tracer's ``.sharding`` raises an error whose message walks the whole jaxpr so far.
      if not isinstance(kernel, jax.core.Tracer) and getattr(kernel, "sharding", None) is not None:
        merged = jax.device_put(merged, kernel.sharding)
      linear.kernel.set_value(merged)
    linear.lora_a = None
    linear.lora_b = None
    linear.lora_scale = 0.0
  return model


def quantize_base(
    model: nnx.Module,
    method: str = "nf4",
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
    targets: str | Sequence[str] = DEFAULT_TARGETS,
) -> nnx.Module:
  """Quantizes the kernels of the Linear modules that ``targets`` select, in place (the base of QLoRA).

  Each kernel [in, out] becomes a frozen :class:`~easytunix.layers.quantization.QuantizedKernel`:
  blockwise absmax codes along ``in`` ("nf4" or "int4": 0.5 + 4/block_size bytes per weight;
  "int8": 1 + 4/block_size) that every call dequantizes in the compute dtype. The codes are
  not ``nnx.Param``, so only LoRA adapters (``apply_lora``, before or after) can train on them.
  Nothing else changes: biases, embeddings, norms and MoE expert weights stay in full precision.

  On a mesh, codes and scales take the kernel's row/column axes wherever the axis divides
  their (smaller) dimension and are replicated along it otherwise. Works on an abstract model
  too (inside ``nnx.eval_shape``, or with ``jax.ShapeDtypeStruct`` values), e.g. to count
  bytes without allocating them.

  Kernels already quantized with the same method and block size are left as they are, so
  calling it twice is harmless; there is no way back short of reloading the weights
  (``merge_lora`` restores full precision for adapted kernels only).

  Args:
    model: any module built from :class:`easytunix.layers.Linear`.
    method: "nf4" (QLoRA's NormalFloat-4), "int4" or "int8".
    block_size: input rows sharing one float32 scale; it must divide every chosen kernel's
      input dimension (and be even for the 4-bit methods).
    targets: attribute names ("q_proj") or regular expressions over the whole dotted path, as
      for :func:`apply_lora` (default: every attention and MLP projection).

  Returns:
    ``model`` (modified in place), for chaining.

  Raises:
    ValueError: an unknown method, a block size that does not divide a chosen kernel, no
      matching module, or a kernel already quantized differently. Nothing is changed then.
  """
  modules = linear_modules(model)
  for path in check_quantizable(model, method, block_size=block_size, targets=targets):
    linear = modules[path]
    axes, _ = _kernel_layout(linear)
    linear.kernel = QuantizedKernel.from_kernel(
        linear.kernel.get_value(), method, block_size, partition=axes, name=f"{path}.kernel"
    )
  return model


def check_quantizable(
    model: nnx.Module,
    method: str = "nf4",
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
    targets: str | Sequence[str] = DEFAULT_TARGETS,
) -> list[str]:
  """The paths of the Linear modules :func:`quantize_base` would quantize (already quantized ones left out).

  Raises:
    ValueError: what :func:`quantize_base` would raise; the model is not changed.
  """
  check_method(method)
  todo = []
  for path, linear in _select(model, targets, "quantize_base").items():
    if linear.quantized:
      kernel = linear.kernel
      if (kernel.method, kernel.block_size) != (method, block_size):
        raise ValueError(
            f"{path} is already quantized with method={kernel.method!r}, block_size={kernel.block_size}; "
            f"it cannot be quantized again with method={method!r}, block_size={block_size}. Quantization is "
            "not undone in place: load the model again to quantize it differently."
        )
      continue
    check_block_size(tuple(linear.kernel.get_value().shape), method, block_size, f"{path}.kernel")
    todo.append(path)
  return todo


def is_quantized(model: nnx.Module) -> bool:
  """True when any Linear of ``model`` has a quantized kernel."""
  return any(m.quantized for m in linear_modules(model).values())


def quantization_method(model: nnx.Module) -> str | None:
  """The method of ``model``'s quantized kernels (None: none is quantized).

  Raises:
    ValueError: kernels quantized with different methods (not something ``compile`` makes).
  """
  methods = {m.kernel.method for m in linear_modules(model).values() if m.quantized}
  if len(methods) > 1:
    raise ValueError(f"The model's kernels are quantized with several methods: {sorted(methods)}.")
  return methods.pop() if methods else None


@contextlib.contextmanager
def lora_disabled(model: nnx.Module) -> Iterator[nnx.Module]:
  """Runs ``model`` as its base model: inside the block every ``lora_b`` reads as zeros.

  Only variable *values* change, never the module structure or static fields, so
  it is safe inside ``jax.jit``/``nnx.jit`` and inside a loss function that the
  trainer differentiates (no gradient flows through the zeroed adapters): a DPO
  loss can compute reference log-probs from the same weights without a second
  copy of the model::

      with lora_disabled(model):
        ref_logits = jax.lax.stop_gradient(model(tokens)[0])

  The adapters are restored on exit, also when the block raises.
  """
  saved = []
  for linear in lora_modules(model).values():
    value = linear.lora_b[...]
    saved.append((linear, value))
    linear.lora_b.set_value(jnp.zeros_like(value))
  try:
    yield model
  finally:
    for linear, value in saved:
      linear.lora_b.set_value(value)


def trainable_filter(model: nnx.Module) -> Any:
  """The nnx filter of what training updates: ``nnx.LoRAParam`` with LoRA on, else every ``nnx.Param``."""
  return nnx.LoRAParam if is_lora_enabled(model) else nnx.Param


def base_params(model: nnx.Module) -> nnx.State:
  """Every ``nnx.Param`` that is not a LoRA adapter (quantized kernels are not ``nnx.Param``: not included)."""
  return nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam)))


def lora_params(model: nnx.Module) -> nnx.State:
  """The LoRA adapters (``nnx.LoRAParam``) of ``model``."""
  return nnx.state(model, nnx.LoRAParam)


__all__ = [
    "DEFAULT_TARGETS",
    "apply_lora",
    "base_params",
    "check_quantizable",
    "is_lora_enabled",
    "is_quantized",
    "linear_modules",
    "lora_disabled",
    "lora_modules",
    "lora_params",
    "merge_lora",
    "quantization_method",
    "quantize_base",
    "trainable_filter",
]
