"""Low-rank adapters (LoRA) on the shared :class:`easytunix.layers.Linear`.

``apply_lora`` gives chosen projections a trainable ``lora_a`` [in, r] and
``lora_b`` [r, out] (``nnx.LoRAParam``, so ``nnx.LoRAParam`` selects exactly the
adapter weights); ``merge_lora`` folds them into the kernels; ``lora_disabled``
runs the base model without a second copy of it (what DPO needs for its
reference model).
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
  if isinstance(targets, str):
    targets = (targets,)
  targets = tuple(targets)
  if not targets:
    raise ValueError("apply_lora needs at least one target (a module name or a path regex).")
  modules = linear_modules(model)
  chosen = {p: m for p, m in modules.items() if any(_matches(t, p) for t in targets)}
  if not chosen:
    raise ValueError(
        f"No Linear module matches LoRA targets {list(targets)}. Available Linear paths: "
        f"{sorted(modules) or 'none'}. Targets match a module's attribute name or, as a regex, its full path."
    )
  rngs = rngs if rngs is not None else nnx.Rngs(seed)
  scale = float(alpha if alpha is not None else rank) / rank
  init_a = nnx.initializers.variance_scaling(1.0, "fan_in", "uniform")
  for path, linear in chosen.items():
    kernel = linear.kernel
    row_axis, col_axis = (tuple(kernel.get_metadata().get("partition") or (None, None)) + (None, None))[:2]
    a = init_a(rngs.params(), (linear.in_features, rank), param_dtype)
    b = jnp.zeros((rank, linear.out_features), param_dtype)
    mesh = _mesh_of(kernel[...])
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
  """Folds ``scale * lora_a @ lora_b`` into each adapted kernel and removes the adapters (in place)."""
  for linear in lora_modules(model).values():
    kernel = linear.kernel[...]
    merged = linear.merged_kernel()
    if getattr(kernel, "sharding", None) is not None and not isinstance(kernel, jax.core.Tracer):
      merged = jax.device_put(merged, kernel.sharding)
    linear.kernel[...] = merged
    linear.lora_a = None
    linear.lora_b = None
    linear.lora_scale = 0.0
  return model


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
    linear.lora_b[...] = jnp.zeros_like(value)
  try:
    yield model
  finally:
    for linear, value in saved:
      linear.lora_b[...] = value


def trainable_filter(model: nnx.Module) -> Any:
  """The nnx filter of what training updates: ``nnx.LoRAParam`` with LoRA on, else every ``nnx.Param``."""
  return nnx.LoRAParam if is_lora_enabled(model) else nnx.Param


def base_params(model: nnx.Module) -> nnx.State:
  """Every ``nnx.Param`` that is not a LoRA adapter."""
  return nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam)))


def lora_params(model: nnx.Module) -> nnx.State:
  """The LoRA adapters (``nnx.LoRAParam``) of ``model``."""
  return nnx.state(model, nnx.LoRAParam)


__all__ = [
    "DEFAULT_TARGETS",
    "apply_lora",
    "base_params",
    "is_lora_enabled",
    "linear_modules",
    "lora_disabled",
    "lora_modules",
    "lora_params",
    "merge_lora",
    "trainable_filter",
]
