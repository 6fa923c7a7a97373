"""Tunix's module path ``tunix.rl.utils``: small checks and pytree helpers used around RL training."""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx

__all__ = [
    "check_divisibility",
    "chunk_slices_by_size",
    "get_batch_slice",
    "get_partition_spec",
    "get_pytree_mesh_info",
    "is_positive_integer",
    "is_sharing_backbone",
    "is_sharing_weights",
    "merge_micro_batches",
    "put_params_on_memory_kind",
    "to_flat_dict",
]


def is_positive_integer(value: int | None, name: str) -> None:
  """A ValueError naming ``name`` unless ``value`` is None or a positive int (bools are not ints here)."""
  if value is None:
    return
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
    raise ValueError(f"{name} must be a positive integer, got {value!r}.")


def check_divisibility(small_size: int, big_size: int, small_size_name: str, big_size_name: str) -> None:
  """A ValueError unless ``big_size`` is a multiple of ``small_size``."""
  if big_size % small_size:
    raise ValueError(f"{big_size_name} ({big_size}) must be a multiple of {small_size_name} ({small_size}).")


def to_flat_dict(tree: Any) -> tuple[dict[tuple[Any, ...], Any], Any]:
  """``({(key, ...): leaf}, treedef)`` of a nested dict or ``nnx.State``."""
  if isinstance(tree, nnx.State):
    tree = nnx.to_pure_dict(tree)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
  return {tuple(getattr(k, "key", getattr(k, "idx", k)) for k in path): v for path, v in leaves}, treedef


def get_pytree_mesh_info(tree: Any) -> jax.sharding.Mesh | None:
  """The one mesh the arrays of ``tree`` are sharded over (None: no NamedSharding).

  Raises:
    ValueError: the arrays live on different meshes.
  """
  meshes = {
      leaf.sharding.mesh
      for leaf in jax.tree.leaves(tree)
      if isinstance(leaf, jax.Array) and isinstance(leaf.sharding, jax.sharding.NamedSharding)
  }
  if len(meshes) > 1:
    raise ValueError(f"All arrays of the pytree must be on one mesh, found {len(meshes)}: {meshes}.")
  return meshes.pop() if meshes else None


def _same_leaves(a: Any, b: Any) -> bool:
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  return len(la) == len(lb) and all(x is y for x, y in zip(la, lb))


def is_sharing_weights(m1: nnx.Module | None, m2: nnx.Module | None) -> bool:
  """Whether two models hold the very same arrays (not copies)."""
  if m1 is None or m2 is None:
    return False
  return _same_leaves(nnx.state(m1), nnx.state(m2))


def is_sharing_backbone(m1: nnx.Module, m2: nnx.Module) -> bool:
  """Whether two models hold the very same arrays apart from their LoRA adapters."""
  no_lora = nnx.Not(nnx.LoRAParam)
  return _same_leaves(nnx.state(m1, no_lora), nnx.state(m2, no_lora))


def chunk_slices_by_size(stop: int, step: int) -> Iterator[slice]:
  """``slice(0, step), slice(step, 2 * step), ...`` up to ``stop`` (the last one may be shorter)."""
  for start in range(0, stop, step):
    yield slice(start, min(start + step, stop))


def get_batch_slice(tree: Any, batch_slice: slice) -> Any:
  """``tree`` with every array leaf of rank >= 1 sliced along its first axis (other leaves kept)."""

  def cut(x: Any) -> Any:
    return x[batch_slice] if getattr(x, "ndim", 0) >= 1 else x

  return jax.tree.map(cut, tree, is_leaf=lambda x: x is None)


def merge_micro_batches(batches: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
  """One batch from micro-batch dicts: lists are joined, arrays concatenated along axis 0."""
  if not batches:
    return {}
  merged = {}
  for key in batches[0]:
    values = [b[key] for b in batches]
    if isinstance(values[0], list):
      merged[key] = list(itertools.chain.from_iterable(values))
    else:
      merged[key] = jax.tree.map(lambda *xs: np.concatenate([np.atleast_1d(x) for x in xs]), *values)
  return merged


def put_params_on_memory_kind(params: Any, memory_kind: str) -> Any:
  """``params`` moved to ``"device"``, ``"pinned_host"`` or ``"unpinned_host"`` memory, shardings kept."""
  if memory_kind not in ("device", "pinned_host", "unpinned_host"):
    raise ValueError(f"memory_kind must be device, pinned_host or unpinned_host, got {memory_kind!r}.")
  if not jax.tree.leaves(params):
    return params
  return jax.device_put(params, jax.tree.map(lambda x: x.sharding.with_memory_kind(memory_kind), params))


def get_partition_spec(sharding: jax.sharding.Sharding) -> jax.sharding.PartitionSpec:
  """The PartitionSpec of a NamedSharding; an empty (replicated) one for any other sharding."""
  if isinstance(sharding, jax.sharding.NamedSharding):
    return sharding.spec
  return jax.sharding.PartitionSpec()
